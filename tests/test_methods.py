"""Methods on a tiny real backbone: method selection, teacher CFG, backward simulation of multi-step students."""

import pytest
import torch
from training_utils import tiny_pixart_roles

from diffusers_onestep import parameterization as param
from diffusers_onestep.distill import losses
from diffusers_onestep.distill.config import MethodConfig
from diffusers_onestep.distill.methods import DMD2, FDistill, build_method
from diffusers_onestep.distill.models import Batch, RandomSource
from diffusers_onestep.testing import TINY_PROMPTS, tiny_components


@pytest.fixture(scope="module")
def setup():
    adapter, roles = tiny_pixart_roles(tiny_components("pixart_alpha"))
    condition = adapter.encode_prompt(TINY_PROMPTS[:2])
    noise = torch.randn(adapter.latent_shape(2, 8, 8), generator=torch.Generator().manual_seed(0))
    return adapter, roles, Batch(condition=condition, noise=noise)


def test_method_classes(setup):
    _, roles, _ = setup
    assert type(build_method(MethodConfig().validate(), roles, [400])) is DMD2
    method = build_method(MethodConfig(divergence="js").validate(), roles, [400])
    assert type(method) is FDistill and method.gan_weight > 0 and method.discriminator_trunk == "teacher"
    assert set(method.state_dict()) == {"ratio_normalizer"}


def test_teacher_x0_is_cfg_in_the_native_parameterization(setup):
    adapter, roles, batch = setup
    method = build_method(MethodConfig(guidance_scale=3.0).validate(), roles, [400])
    t = torch.full((2,), 500.0, dtype=torch.float64)
    x_t = torch.randn_like(batch.noise)
    rng = RandomSource.from_seed(0)
    with torch.no_grad():
        x0, logits = method._teacher_x0(x_t, t, batch.condition, rng)
        uncond = roles.teacher(x_t, t, roles.unconditional(batch.condition))
        cond = roles.teacher(x_t, t, batch.condition)
    expected = param.to_x0(losses.classifier_free_guidance(uncond, cond, 3.0), x_t, t, adapter.noise_path, "epsilon")
    torch.testing.assert_close(x0, expected, rtol=1e-5, atol=1e-5)
    assert logits is None
    # guidance 1 is the conditional teacher alone
    method = build_method(MethodConfig(guidance_scale=1.0).validate(), roles, [400])
    with torch.no_grad():
        x0, _ = method._teacher_x0(x_t, t, batch.condition, RandomSource.from_seed(0))
    torch.testing.assert_close(x0, param.to_x0(cond, x_t, t, adapter.noise_path, "epsilon"), rtol=1e-5, atol=1e-5)


def test_backward_simulation_rolls_out_the_current_student(setup):
    """DMD2 §4.4: k ~ U{0..3} shared by all samples; the input at t_k is the student's own k-step rollout."""
    adapter, roles, batch = setup
    timesteps = [999, 749, 499, 249]
    method = build_method(MethodConfig().validate(), roles, timesteps)
    seen = set()
    for seed in range(12):
        rng = RandomSource.from_seed(seed)
        replay = RandomSource.from_seed(seed)
        x_in, t, k = method.student_input(batch, rng)
        seen.add(k)
        assert torch.all(t == timesteps[k])
        # replay by hand: the same k, then the same noises
        assert replay.randint(4) == k
        x = batch.noise
        with torch.no_grad():
            for j in range(k):
                tj = torch.full((2,), float(timesteps[j]), dtype=torch.float64)
                x0 = param.to_x0(roles.student(x, tj, batch.condition), x, tj, adapter.noise_path, "epsilon")
                fresh = replay.randn(x0.shape)
                x = param.add_noise(
                    x0, fresh, torch.full((2,), float(timesteps[j + 1]), dtype=torch.float64), adapter.noise_path
                )
        torch.testing.assert_close(x_in, x)
        if k == 0:
            assert torch.equal(x_in, batch.noise)  # pure noise at the first timestep
    assert seen == {0, 1, 2, 3}
    # one-step students and --no backward simulation never roll out
    single = build_method(MethodConfig(backward_simulation=False).validate(), roles, timesteps)
    assert single.student_input(batch, RandomSource.from_seed(0))[2] == 0


def test_steps_return_losses_and_logs(setup):
    _, roles, batch = setup
    method = build_method(MethodConfig(guidance_scale=2.0).validate(), roles, [400])
    loss, logs = method.student_step(batch, RandomSource.from_seed(0))
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert {"student/loss", "student/dm_loss", "student/dm_grad_norm", "student/simulated_steps"} <= set(logs)
    roles.end_phase()
    loss, logs = method.critic_step(batch, RandomSource.from_seed(0))
    assert set(logs) == {"critic/loss", "critic/dsm_loss"}
    roles.end_phase()
    with pytest.raises(ValueError, match="needs real images"):
        build_method(MethodConfig(divergence="js").validate(), roles, [400]).critic_step(
            batch, RandomSource.from_seed(0)
        )
    roles.end_phase()


def test_random_source_slices_the_global_batch():
    """Rank r of N gets rows r*b..(r+1)*b of what one process with batch N*b gets."""
    whole = RandomSource.from_seed(3).randn((4, 2))
    parts = [RandomSource(torch.Generator().manual_seed(3), rank=r, world_size=2).randn((2, 2)) for r in (0, 1)]
    torch.testing.assert_close(torch.cat(parts), whole)
    path = param.VPPath.from_betas()
    whole_t = RandomSource.from_seed(5).times(path, 4, (0.02, 0.98))
    parts_t = [
        RandomSource(torch.Generator().manual_seed(5), rank=r, world_size=2).times(path, 2, (0.02, 0.98))
        for r in (0, 1)
    ]
    torch.testing.assert_close(torch.cat(parts_t), whole_t)


def test_random_guidance_reaches_teacher_and_critic_with_one_draw(setup):
    """SNOOPI PG-SB (arXiv 2412.02687): the per-sample CFG scale drawn for a step guides both the teacher and the
    fake score; the critic's x̂0 is u + w (c - u) of its own null and prompt passes with that same w."""
    adapter, roles, batch = setup
    seen = {}

    def record(method):
        teacher_x0, critic_x0 = method._teacher_x0, method._critic_x0

        def teacher(*args, guidance=None, **kwargs):
            seen["teacher"] = guidance
            return teacher_x0(*args, guidance=guidance, **kwargs)

        def critic(x_t, t, condition, null_discriminator=False, guidance=None):
            seen["critic"] = guidance
            out = critic_x0(x_t, t, condition, null_discriminator, guidance=guidance)
            seen["critic_args"] = (x_t.detach(), t, out[0])
            return out

        method._teacher_x0, method._critic_x0 = teacher, critic
        return method

    method = record(build_method(MethodConfig(guidance_range=(2.0, 8.0)).validate(), roles, [400]))
    assert method.critic_guided
    method.student_step(batch, RandomSource.from_seed(3))
    roles.end_phase()
    w = seen["teacher"]
    assert w is not None and seen["critic"] is w
    assert w.shape == (2,) and bool((w >= 2.0).all() and (w <= 8.0).all()) and w[0] != w[1]
    x_t, t, critic_x0 = seen["critic_args"]
    with torch.no_grad():
        uncond = roles.critic(x_t, t, roles.unconditional(batch.condition))
        cond = roles.critic(x_t, t, batch.condition)
    expected = param.to_x0(losses.classifier_free_guidance(uncond, cond, w), x_t, t, adapter.noise_path, "epsilon")
    torch.testing.assert_close(critic_x0, expected, rtol=1e-5, atol=1e-5)
    # the guided critic is not the conditional one (the draw matters)
    assert not torch.allclose(critic_x0, param.to_x0(cond, x_t, t, adapter.noise_path, "epsilon"), atol=1e-4)

    # negative controls: --no_critic_guidance, and a fixed scale, leave the critic conditional (DMD, SwiftBrush)
    for config in (MethodConfig(guidance_range=(2.0, 8.0), critic_guidance=False), MethodConfig(guidance_scale=4.5)):
        seen.clear()
        method = record(build_method(config.validate(), roles, [400]))
        assert not method.critic_guided
        method.student_step(batch, RandomSource.from_seed(3))
        roles.end_phase()
        assert seen["teacher"] is not None and seen["critic"] is None
        x_t, t, critic_x0 = seen["critic_args"]
        with torch.no_grad():
            cond = roles.critic(x_t, t, batch.condition)
        torch.testing.assert_close(critic_x0, param.to_x0(cond, x_t, t, adapter.noise_path, "epsilon"))
