"""The ``tdm`` method (trajectory distribution matching, Luo et al. 2025, arXiv 2503.06674): its generator loss against
closed forms on Gaussian teachers, the fake-score weight against hand-computed values, the segment draw on VP and
flow paths, the training rollout against OneStepPipeline's sampling, and short trainer runs."""

import math

import numpy as np
import pytest
import torch
from training_utils import in_process, tiny_pixart_roles, tiny_run_argv, write_prompts

from diffusers_onestep import parameterization as param
from diffusers_onestep.distill import losses
from diffusers_onestep.distill.config import ConfigError, MethodConfig
from diffusers_onestep.distill.methods import TDM, build_method, resolve_method_config
from diffusers_onestep.distill.models import Batch, RandomSource
from diffusers_onestep.families import PixArtAlphaAdapter
from diffusers_onestep.testing import TINY_PROMPTS, save_tiny_native_pipeline, tiny_components
from diffusers_onestep.testing.analytic import GaussianMixture, GaussianStudent
from diffusers_onestep.testing.toy import ToyModels


VP = param.VPPath.from_betas()


# ----------------------------------------------------------------------------------------------------------------
# generator loss: closed forms
# ----------------------------------------------------------------------------------------------------------------


def _loss_terms(seed=0, shape=(3, 4, 5, 5)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    cond, uncond, fake = (x + 0.3 * torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3))
    return x, cond, uncond, fake


@pytest.mark.parametrize("huber_c", [1e-3, 0.5, None])
def test_generator_loss_gradient_is_the_closed_form(huber_c):
    """``dL/dx̂0 = d / (√(d² + c²) W N)`` (pseudo-Huber) or ``2 d / (W N)`` (MSE/W), with ``d = x̂_fake − x̂_cfg`` and
    ``W = mean|x̂0 − x̂_cfg|``, where the target is the paper's ``x* = x̂0 + (x̂_c − x̂_fake) + (w − 1)(x̂_c − x̂_u)``."""
    x, cond, uncond, fake = _loss_terms()
    w = 4.5
    guided = uncond + w * (cond - uncond)
    x = x.requires_grad_(True)
    loss, logs = losses.tdm_generator_loss(x, guided, fake, huber_c=huber_c)
    (grad,) = torch.autograd.grad(loss, x)

    target = x.detach() + (cond - fake) + (w - 1) * (cond - uncond)  # the paper's x*, written out
    d = x.detach() - target
    torch.testing.assert_close(d, fake - guided)
    W = (x.detach() - guided).abs().mean(dim=(1, 2, 3), keepdim=True)
    n = x.numel()
    expected = 2 * d / (W * n) if huber_c is None else d / (torch.sqrt(d**2 + huber_c**2) * W * n)
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-14)
    assert logs["tdm_normalizer"] == pytest.approx(float(W.mean()))
    # negative control: teacher and fake swapped flips the gradient
    x2 = x.detach().requires_grad_(True)
    swapped, _ = losses.tdm_generator_loss(x2, fake, guided, huber_c=huber_c)
    (grad_swapped,) = torch.autograd.grad(swapped, x2)
    assert not torch.allclose(grad_swapped, expected, rtol=1e-3, atol=1e-8)
    assert float((grad_swapped * expected).sum()) < 0


def test_pseudo_huber_limits():
    """``c → ∞``: ``c · dL/dx̂0 → d / (W N)``, DMD's ``(x̂_fake − x̂_real)/W`` (half the MSE form's gradient); ``c → 0``:
    ``sign(d) / (W N)``."""
    x, cond, uncond, fake = _loss_terms(1)
    guided = uncond + 4.5 * (cond - uncond)
    grads = {}
    for c in (1e-9, 1e4, None):
        xg = x.clone().requires_grad_(True)
        (grads[c],) = torch.autograd.grad(losses.tdm_generator_loss(xg, guided, fake, huber_c=c)[0], xg)
    W = (x - guided).abs().mean(dim=(1, 2, 3), keepdim=True)
    dmd = (fake - guided) / W / x.numel()
    torch.testing.assert_close(1e4 * grads[1e4], dmd, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(grads[None], 2 * dmd)
    torch.testing.assert_close(grads[1e-9], torch.sign(fake - guided) / W / x.numel(), rtol=1e-6, atol=1e-12)


def test_gaussian_teacher_gradient_is_the_score_difference_and_descends_the_kl():
    """Exact Gaussian teacher (class-conditional, CFG 3) and exact fake (the Gaussian student's denoiser): the MSE/W
    gradient is ``2 σ_t²/α_t (s_q − s_p,cfg) / (W N)`` per element (Tweedie; DMD's reverse-KL score difference),
    and one gradient step on the student's mean lowers ``KL(q_t ‖ p_t)`` (unconditional teacher, w = 1) while the
    swapped-sign step raises it."""
    teacher = GaussianMixture(
        torch.tensor([[1.5, -0.5], [-1.0, 1.0]], dtype=torch.float64),
        torch.tensor([0.4, 0.4], dtype=torch.float64),
        labels=torch.tensor([0, 1]),
    )
    student = GaussianStudent(torch.eye(2, dtype=torch.float64) * 0.7, torch.tensor([0.2, 0.3], dtype=torch.float64))
    n, t, w = 4096, torch.tensor(500.0, dtype=torch.float64), 3.0
    g = torch.Generator().manual_seed(0)
    z, eps = torch.randn(n, 2, generator=g, dtype=torch.float64), torch.randn(n, 2, generator=g, dtype=torch.float64)
    x = student.sample(z)
    tt = t.expand(n)
    x_t = param.add_noise(x.detach(), eps, tt, VP)
    cond, uncond = teacher.x0(x_t, tt, VP, label=0), teacher.x0(x_t, tt, VP)
    guided = uncond + w * (cond - uncond)
    fake = student.x0(x_t, tt, VP)
    loss, _ = losses.tdm_generator_loss(x, guided, fake, huber_c=None)
    (grad_x,) = torch.autograd.grad(loss, x, retain_graph=True)
    alpha, sigma = VP.alpha_sigma(t)
    score_p = teacher.score(x_t, tt, VP) + w * (teacher.score(x_t, tt, VP, label=0) - teacher.score(x_t, tt, VP))
    W = (x.detach() - guided).abs().mean(dim=1, keepdim=True)
    expected = 2 * sigma**2 / alpha * (student.score(x_t, tt, VP) - score_p) / (W * x.numel())
    torch.testing.assert_close(grad_x, expected, rtol=1e-8, atol=1e-14)

    def kl(b):  # KL(q_t ‖ p_t) for the unconditional teacher's first component as a Gaussian teacher
        mu, s2 = teacher.means[0], float(teacher.stds[0]) ** 2
        cov_q = alpha**2 * student.covariance() + sigma**2 * torch.eye(2, dtype=torch.float64)
        var_p = alpha**2 * s2 + sigma**2
        diff = alpha * (b - mu)
        return 0.5 * (torch.trace(cov_q) / var_p + diff @ diff / var_p - 2 + 2 * math.log(var_p) - torch.logdet(cov_q))

    single = GaussianMixture(teacher.means[:1], teacher.stds[:1])
    real = single.x0(x_t, tt, VP)
    step = {}
    for sign, (r, f) in {"tdm": (real, fake), "swapped": (fake, real)}.items():
        xs = student.sample(z)
        (grad_b,) = torch.autograd.grad(losses.tdm_generator_loss(xs, r, f, huber_c=1e-3)[0], student.b)
        step[sign] = float(kl(student.b.detach() - 0.05 * grad_b / grad_b.norm()))
    before = float(kl(student.b.detach()))
    assert step["tdm"] < before < step["swapped"], (step, before)


# ----------------------------------------------------------------------------------------------------------------
# fake loss weight
# ----------------------------------------------------------------------------------------------------------------


def test_fake_loss_weight_is_min_snr_times_the_importance_weight():
    """``min(SNR_t, 5) · exp(−½ mean ñ²) / exp(−½ mean n²)`` against values computed by hand from the DDPM betas."""
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float32)  # diffusers builds the DDPM schedule in float32
    alpha_bar = np.cumprod(1 - betas, dtype=np.float32).astype(np.float64)
    times = [50, 300, 800]
    snr = torch.tensor([alpha_bar[t] / (1 - alpha_bar[t]) for t in times])
    torch.testing.assert_close(
        param.signal_to_noise(torch.tensor(times, dtype=torch.float64), VP), snr.double(), rtol=1e-5, atol=0
    )
    assert snr[0] > 5 > snr[1] > snr[2]  # the cap binds at t=50 only

    mixed = torch.stack([torch.full((2, 3, 3), v) for v in (0.5, 1.0, 2.0)]).double()
    fresh = torch.ones(3, 2, 3, 3, dtype=torch.float64)
    omega = losses.tdm_importance_weight(mixed, fresh)
    torch.testing.assert_close(omega, torch.tensor([math.exp(0.375), 1.0, math.exp(-1.5)], dtype=torch.float64))

    x0 = torch.zeros(3, 2, 3, 3, dtype=torch.float64)
    fake = torch.stack([torch.full((2, 3, 3), v) for v in (1.0, 2.0, 3.0)]).double()  # per-sample MSE 1, 4, 9
    loss, logs = losses.tdm_fake_loss(fake, x0, snr.double(), omega)
    by_hand = (1 * 5.0 * math.exp(0.375) + 4 * float(snr[1]) * 1.0 + 9 * float(snr[2]) * math.exp(-1.5)) / 3
    assert float(loss) == pytest.approx(by_hand, rel=1e-12)
    assert logs["tdm_importance_weight"] == pytest.approx(float(omega.mean()))


# ----------------------------------------------------------------------------------------------------------------
# the segment draw on the VP and flow paths
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, timesteps", [(VP, [899.0, 674.0, 449.0, 224.0]), (param.FlowPath(shift=3.0), [1.0, 0.75, 0.5, 0.25])]
)
@pytest.mark.parametrize("random_mid", [False, True])
def test_segment_draw(path, timesteps, random_mid):
    """Times inside ``[max(t_lo, t_mid), T_k − t_hi)`` (2 % and 1 % of the path's span: 20 and 10 steps on VP),
    ``t_mid`` the segment's lower edge (or inside it), the input the rollout's state ``k``, and ``x_t`` a sample of
    the forward transition whose total noise about ``α_t x̂0`` is the ``mixed_noise`` of the importance weight."""
    teacher = GaussianMixture(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]), torch.tensor([0.3, 0.3]))
    models = ToyModels(teacher, path, hidden=16, depth=1, discriminator_trunk=None)
    method = build_method(
        MethodConfig(method="tdm", student_timesteps=timesteps, tdm_random_mid=random_mid or None), models, timesteps
    )
    assert method.lower == timesteps[1:] + [0.0]
    n = 512
    noise = torch.randn(n, 2, generator=torch.Generator().manual_seed(1))
    drawn = method.draw(Batch(condition=None, noise=noise), RandomSource.from_seed(0), with_grad=False)
    span = 1000.0 if path.kind == "vp" else 1.0
    upper = torch.tensor(timesteps, dtype=torch.float64)[drawn.segment]
    lower = torch.tensor(method.lower, dtype=torch.float64)[drawn.segment]
    torch.testing.assert_close(drawn.t_student, upper)
    assert set(drawn.segment.tolist()) == {0, 1, 2, 3}
    if random_mid:
        assert bool(((drawn.t_mid >= lower) & (drawn.t_mid < upper - 0.02 * span)).all())
        assert bool((drawn.t_mid > lower).any())
    else:
        torch.testing.assert_close(drawn.t_mid, lower)
    assert bool((drawn.t >= torch.clamp(drawn.t_mid, min=0.02 * span)).all())
    assert bool((drawn.t < upper - 0.01 * span).all())
    if path.kind == "vp":
        assert bool((drawn.t == drawn.t.round()).all())
    # the student's input is the rollout's state at the segment
    states = method.rollout(noise, None, 3)
    torch.testing.assert_close(states[0], noise)
    for k in range(4):
        with torch.no_grad():
            x0, eps = method._student_x0_eps(states[k], method._full_time(timesteps[k], noise), None)
        chosen = drawn.segment == k
        torch.testing.assert_close(drawn.x0[chosen], x0[chosen])
        torch.testing.assert_close(drawn.eps[chosen], eps[chosen])
        if k < 3:  # the next state is x̂0 re-noised with the student's own ε̂ (deterministic, DDIM eta 0)
            torch.testing.assert_close(states[k + 1], param.add_noise(x0, eps, timesteps[k + 1], path))
    # x_t = α_t x̂0 + σ_t ñ with ñ the mixed noise; ñ is unit-variance Gaussian only when ε̂ is
    alpha_t, sigma_t = path.alpha_sigma(drawn.t)
    rebuilt = alpha_t[:, None] * drawn.x0.double() + sigma_t[:, None] * drawn.mixed_noise.double()
    torch.testing.assert_close(rebuilt.float(), drawn.x_t, rtol=1e-5, atol=1e-5)


def _toy_tdm_run(steps, swapped=False):
    """A 2-step TDM student (MSE/W) on a two-mode VP teacher, 1:1 updates after 50 fake-only warm-up steps; the energy
    distance of its 2-step samples to the teacher at the start and every 100 iterations."""
    import dataclasses

    from diffusers_onestep.testing.toy import energy_distance

    teacher = GaussianMixture(torch.tensor([[2.0, 0.0], [-2.0, 0.0]]), torch.tensor([0.3, 0.3]))
    models = ToyModels(teacher, VP, hidden=64, depth=2, discriminator_trunk=None, seed=0)
    times = [999.0, 499.0]
    config = MethodConfig(method="tdm", student_timesteps=times, guidance_scale=1.0, tdm_loss="mse")
    method = build_method(config, models, times)
    if swapped:  # negative control: the teacher and the fake trade places in the generator loss
        loss_of = method.generator_loss
        method.generator_loss = lambda t: loss_of(dataclasses.replace(t, x0_real=t.x0_fake, x0_fake=t.x0_real))
    optimizers = {
        "student": torch.optim.Adam(models.role_parameters("student"), lr=1e-3, betas=(0.0, 0.95)),
        "critic": torch.optim.Adam(models.role_parameters("critic"), lr=5e-3, betas=(0.0, 0.95)),
    }
    rng, g = RandomSource.from_seed(0), torch.Generator().manual_seed(123)
    reference = teacher.sample(2000, generator=torch.Generator().manual_seed(5))
    eval_noise = torch.randn(2000, 2, generator=torch.Generator().manual_seed(9))
    energies = [energy_distance(method.rollout(eval_noise, None, 2)[-1], reference)]
    for i in range(steps):
        batch = Batch(condition=None, noise=torch.randn(128, 2, generator=g))
        for role in ("student", "critic") if i >= 50 else ("critic",):
            loss, _ = (method.student_step if role == "student" else method.critic_step)(batch, rng)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(models.role_parameters(role), 1.0)
            optimizers[role].step()
            for optimizer in optimizers.values():
                optimizer.zero_grad(set_to_none=True)
            models.end_phase()
        if (i + 1) % 100 == 0:
            energies.append(energy_distance(method.rollout(eval_noise, None, 2)[-1], reference))
    return energies


def test_short_toy_run_learns_and_the_swapped_loss_diverges():
    """300 iterations: the 2-step student's energy distance to the teacher falls more than 3x (1.72 → 0.26 measured);
    with the teacher and fake swapped it grows more than 3x within 100 iterations (1.72 → 21.5)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2-D MLPs: threading only adds overhead
    try:
        learned = _toy_tdm_run(300)
        swapped = _toy_tdm_run(100, swapped=True)
    finally:
        torch.set_num_threads(threads)
    assert learned[-1] < learned[0] / 3, learned
    assert swapped[-1] > 3 * swapped[0], swapped


def test_segments_too_close_are_refused():
    teacher = GaussianMixture(torch.tensor([[1.0, 0.0]]), torch.tensor([0.3]))
    models = ToyModels(teacher, VP, hidden=8, depth=1, discriminator_trunk=None)
    with pytest.raises(ValueError, match="leaves no noise times"):
        build_method(MethodConfig(method="tdm", student_timesteps=[999.0, 990.0]), models, [999.0, 990.0])


def test_config_defaults_and_refusals():
    pixart = resolve_method_config(MethodConfig(method="tdm"), PixArtAlphaAdapter.training_defaults)
    assert pixart.student_timesteps == [899.0, 674.0, 449.0, 224.0] and pixart.guidance_scale == 4.5
    assert (pixart.tdm_loss, pixart.tdm_huber_c, pixart.tdm_random_mid) == ("pseudo_huber", 1e-3, False)
    assert pixart.critic_updates_per_student == 1 and pixart.gan_weight == 0.0 and pixart.divergence is None
    eight = resolve_method_config(MethodConfig(method="tdm", student_timesteps=[999 - 120 * i for i in range(8)]))
    assert len(eight.student_timesteps) == 8
    for config, message in [
        (MethodConfig(method="tdm", student_timesteps=[399.0]), "2-8 step student"),
        (MethodConfig(method="tdm"), "pass --student_timesteps"),
        (MethodConfig(tdm_huber_c=0.1), "applies to the tdm method"),
        (MethodConfig(method="tdm", student_timesteps=[899, 449], divergence="js"), "drop --divergence"),
        (MethodConfig(method="tdm", student_timesteps=[899, 449], gan_weight=0.1), "drop --gan_weight"),
    ]:
        with pytest.raises(ConfigError, match=message):
            resolve_method_config(config)


# ----------------------------------------------------------------------------------------------------------------
# the rollout is the pipeline's sampler
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pixart_roles():
    return tiny_pixart_roles(tiny_components("pixart_alpha"))


def test_training_rollout_equals_onestep_pipeline_sampling(pixart_roles):
    """The trajectory the student trains on (``TDM.rollout``) is what the exported scheduler (``solver="ode"``)
    samples for the same noise, to 1e-5; DMD2's fresh-noise sampler (``"sde"``) is not (negative control)."""
    from diffusers_onestep.distill.export import StudentRenderer

    adapter, roles = pixart_roles
    timesteps = [899.0, 674.0, 449.0, 224.0]
    method = build_method(MethodConfig(method="tdm", student_timesteps=timesteps), roles, timesteps)
    condition = adapter.encode_prompt(TINY_PROMPTS[:2])
    noise = torch.randn(adapter.latent_shape(2, 8, 8), generator=torch.Generator().manual_seed(0))
    roles.activate("student")
    trained = method.rollout(noise, condition, len(timesteps))[-1]
    outputs = {}
    for solver in ("ode", "sde"):
        renderer = StudentRenderer(roles, adapter, adapter.components, "pixart_alpha", timesteps, 8, 16, solver=solver)
        pipe = renderer.pipeline(roles._module_of("student"))
        assert pipe.scheduler.config.solver == solver and pipe.scheduler.max_inference_steps == 4
        outputs[solver] = pipe(
            prompt_embeds=condition.embeds,
            prompt_attention_mask=condition.mask,
            height=8,
            width=8,
            latents=noise,
            generator=torch.Generator().manual_seed(1),
            output_type="latent",
        ).images
    assert method.sampler_solver == "ode"
    torch.testing.assert_close(outputs["ode"].float(), trained.float(), rtol=0, atol=1e-5)
    assert (outputs["sde"].float() - trained.float()).abs().max() > 1e-3


def test_student_and_fake_steps_train_their_roles(pixart_roles):
    adapter, roles = pixart_roles
    timesteps = [899.0, 449.0]
    method = build_method(MethodConfig(method="tdm", student_timesteps=timesteps), roles, timesteps)
    batch = Batch(
        condition=adapter.encode_prompt(TINY_PROMPTS[:2]),
        noise=torch.randn(adapter.latent_shape(2, 8, 8), generator=torch.Generator().manual_seed(0)),
    )
    for role, step in (("student", method.student_step), ("critic", method.critic_step)):
        loss, logs = step(batch, RandomSource.from_seed(2))
        loss.backward()
        roles.end_phase()
        assert math.isfinite(float(loss.detach())) and logs[f"{role}/loss"] == pytest.approx(float(loss.detach()))
        other = "critic" if role == "student" else "student"
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for _, p in roles.named_role_parameters(role))
        assert all(p.grad is None for _, p in roles.named_role_parameters(other))
        for _, p in roles.named_role_parameters(role):
            p.grad = None


# ----------------------------------------------------------------------------------------------------------------
# the trainer and the exported student
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "family, student, timesteps, size",
    [
        ("pixart_alpha", "lora", ["899", "449"], 8),
        ("pixart_alpha", "full", ["899", "674", "449", "224"], 8),
        ("sana", "lora", ["1.0", "0.5"], 32),  # a flow teacher: times are sigmas
    ],
)
def test_trainer_runs_tdm_and_exports_a_k_step_student(tmp_path, family, student, timesteps, size):
    """``--method tdm`` on tiny PixArt (VP) and SANA (flow) teachers: the TDM optimizer defaults reach the config, and
    the saved folder loads in OneStepPipeline with the K timesteps and the ode solver, and samples in K steps."""
    import json

    from diffusers_onestep import OneStepPipeline

    workspace = {
        "teacher": save_tiny_native_pipeline(family, str(tmp_path / "teacher")),
        "prompts": write_prompts(str(tmp_path)),
    }
    out = tmp_path / "out"
    flags = ["--method", "tdm", "--student", student, "--max_train_steps", "2", "--student_timesteps", *timesteps]
    result = in_process(tiny_run_argv(workspace, out, *flags, "--resolution", str(size)))
    assert result.global_step == 2
    assert all(math.isfinite(value) for value in result.logs.values()), result.logs
    assert result.logs["student/grad_norm"] > 0 and result.logs["critic/grad_norm"] > 0
    with open(out / "training_config.json") as f:
        config = json.load(f)
    optim = config["optim"]
    assert (optim["adam_beta1"], optim["adam_beta2"], optim["adam_weight_decay"]) == (0.0, 0.95, 0.01)
    assert optim["critic_learning_rate"] == pytest.approx(5 * optim["learning_rate"])  # --learning_rate 1e-3 given

    pipe = OneStepPipeline.from_pretrained(str(out))
    assert pipe.scheduler.config.solver == "ode"
    assert pipe.scheduler.config.conditioning_timesteps == [float(t) for t in timesteps]
    steps = []
    images = pipe(
        TINY_PROMPTS[0],
        height=size,
        width=size,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
        callback_on_step_end=lambda p, i, t, kwargs: steps.append(float(p.scheduler.path_timesteps[i])) or {},
    ).images
    assert images.shape == (1, size, size, 3) and np.isfinite(images).all()
    assert steps == [float(t) for t in timesteps]


def test_resumed_tdm_run_is_bit_exact(tmp_path):
    """4 steps straight vs 2 steps, then resumed from checkpoint-2: every state file equal."""
    import shutil

    from safetensors.torch import load_file

    workspace = {
        "teacher": save_tiny_native_pipeline("pixart_alpha", str(tmp_path / "teacher")),
        "prompts": write_prompts(str(tmp_path)),
    }
    flags = ["--method", "tdm", "--tdm_random_mid", "--checkpointing_steps", "2", "--lr_scheduler", "constant"]
    in_process(tiny_run_argv(workspace, tmp_path / "straight", *flags, "--max_train_steps", "4"))
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "straight", resumed)
    shutil.rmtree(resumed / "checkpoint-4")
    argv = tiny_run_argv(workspace, resumed, *flags, "--max_train_steps", "4", "--resume_from_checkpoint", "latest")
    in_process(argv)
    for name in ("trainable.safetensors", "optimizer_student.safetensors", "optimizer_critic.safetensors"):
        expected = load_file(str(tmp_path / "straight" / "checkpoint-4" / name))
        actual = load_file(str(resumed / "checkpoint-4" / name))
        assert expected.keys() == actual.keys() and expected, name
        for key in expected:
            assert torch.equal(expected[key], actual[key]), f"{name}:{key}"


def test_released_optimizer_settings_are_the_defaults(tmp_path):
    """Unset, the learning rates are TDM's (fake 2e-5, generator 2e-5 / 5) and Adam's betas (0, 0.95); other methods
    keep AdamW's (0.9, 0.999) and one learning rate for both roles."""
    from diffusers_onestep.distill import cli
    from diffusers_onestep.distill.methods import get_method_class

    assert get_method_class("tdm") is TDM
    teacher = save_tiny_native_pipeline("pixart_alpha", str(tmp_path / "teacher"))
    argv = ["--teacher", teacher, "--prompts", write_prompts(str(tmp_path)), "--output_dir", str(tmp_path / "o")]
    tdm = cli.resolve_args(argv + ["--method", "tdm"])[0].config.optim
    assert (tdm.learning_rate, tdm.critic_learning_rate, tdm.adam_beta1, tdm.adam_beta2) == (4e-6, 2e-5, 0.0, 0.95)
    dmd2 = cli.resolve_args(argv)[0].config.optim
    assert (dmd2.critic_learning_rate, dmd2.adam_beta1, dmd2.adam_beta2) == (dmd2.learning_rate, 0.9, 0.999)
    mine = cli.resolve_args(argv + ["--method", "tdm", "--adam_beta1", "0.5", "--critic_learning_rate", "1e-4"])
    assert (mine[0].config.optim.adam_beta1, mine[0].config.optim.critic_learning_rate) == (0.5, 1e-4)
