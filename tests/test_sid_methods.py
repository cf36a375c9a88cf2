"""The ``sid`` and ``sim`` methods: configuration, SiD-LSG's guidance placement on a tiny real backbone, gradients
through ``x_t`` into both frozen networks, and a short training run on the 2-D analytic teacher."""

import math

import pytest
import torch
from training_utils import in_process, tiny_pixart_roles, tiny_run_argv, write_prompts

from diffusers_onestep import parameterization as param
from diffusers_onestep.distill import losses
from diffusers_onestep.distill.config import ConfigError, MethodConfig
from diffusers_onestep.distill.methods import SIM, SiD, build_method, resolve_method_config
from diffusers_onestep.distill.models import Batch, RandomSource
from diffusers_onestep.testing import TINY_PROMPTS, save_tiny_native_pipeline, tiny_components
from diffusers_onestep.testing.analytic import GaussianMixture
from diffusers_onestep.testing.toy import train_toy


def test_resolved_settings_and_refusals():
    sid = resolve_method_config(MethodConfig(method="sid"))
    assert (sid.sid_alpha, sid.critic_updates_per_student, sid.gan_weight, sid.divergence) == (1.2, 1, 0.0, None)
    assert (sid.fake_guidance_scale, sid.fake_train_guidance_scale) == (1.0, 1.0)
    sim = resolve_method_config(MethodConfig(method="sim"))
    assert (sim.sim_distance, sim.sim_huber_c, sim.sid_alpha) == ("pseudo_huber", 1.0, None)
    lsg = resolve_method_config(MethodConfig(method="sid", sid_alpha=1.0, fake_guidance_scale=4.5, guidance_scale=4.5))
    assert (lsg.sid_alpha, lsg.fake_guidance_scale, lsg.guidance_scale) == (1.0, 4.5, 4.5)
    refusals = [
        (MethodConfig(sid_alpha=1.0), "applies to the sid method, not dmd2"),
        (MethodConfig(method="sid", sim_distance="squared"), "applies to the sim method, not sid"),
        (MethodConfig(method="fdistill", fake_guidance_scale=2.0), "applies to the sid and sim methods"),
        (MethodConfig(method="sid", divergence="js"), "drop --divergence"),
        (MethodConfig(method="sim", gan_weight=0.1), "trains no discriminator"),
        (MethodConfig(method="sid", guidance_range=(1.0, 3.0)), "not --guidance_range"),
    ]
    for config, message in refusals:
        with pytest.raises(ConfigError, match=message):
            resolve_method_config(config)


def test_sd_family_defaults_are_sid_lsg_published_settings():
    """SiD-LSG's run_sid.sh for SD 1.5 (algorithms.md §7.2): init timestep 625, α = 1, κ1..κ4 = 2, 1:1, lr 1e-6;
    they apply to ``sid`` only, and what the user sets wins."""
    from diffusers_onestep.families import StableDiffusionAdapter

    defaults = StableDiffusionAdapter.training_defaults
    sid = resolve_method_config(MethodConfig(method="sid"), defaults)
    assert sid.student_timesteps == [625.0] and sid.sid_alpha == 1.0 and sid.critic_updates_per_student == 1
    assert (sid.guidance_scale, sid.fake_guidance_scale, sid.fake_train_guidance_scale) == (2.0, 2.0, 2.0)
    assert defaults.learning_rate("full", "sid") == 1e-6 and defaults.learning_rate("full", "dmd2") == 1e-5
    chosen = resolve_method_config(MethodConfig(method="sid", guidance_scale=4.5, sid_alpha=1.2), defaults)
    assert (chosen.guidance_scale, chosen.sid_alpha, chosen.fake_guidance_scale) == (4.5, 1.2, 2.0)
    dmd2 = resolve_method_config(MethodConfig(), defaults)
    assert dmd2.student_timesteps == [999.0] and dmd2.guidance_scale == 1.75 and dmd2.sid_alpha is None
    sim = resolve_method_config(MethodConfig(method="sim"), defaults)  # no published SIM run on SD 1.5
    assert sim.student_timesteps == [999.0] and sim.fake_guidance_scale == 1.0


def test_sid_and_sim_take_sids_adam_betas(tmp_path):
    """SiD's and SiD-LSG's released runs use Adam β = (0, 0.999) (algorithms.md §7.1-7.2); unset, those are the
    betas of both roles; a user's beta wins; DMD2 keeps AdamW's (0.9, 0.999)."""
    from diffusers_onestep.distill import cli

    teacher = save_tiny_native_pipeline("pixart_alpha", str(tmp_path / "teacher"))
    argv = ["--teacher", teacher, "--prompts", write_prompts(str(tmp_path)), "--output_dir", str(tmp_path / "o")]
    for method_name in ("sid", "sim"):
        optim = cli.resolve_args(argv + ["--method", method_name])[0].config.optim
        assert (optim.adam_beta1, optim.adam_beta2) == (0.0, 0.999)
    mine = cli.resolve_args(argv + ["--method", "sid", "--adam_beta1", "0.5"])[0].config.optim
    assert (mine.adam_beta1, mine.adam_beta2) == (0.5, 0.999)
    dmd2 = cli.resolve_args(argv)[0].config.optim
    assert (dmd2.adam_beta1, dmd2.adam_beta2) == (0.9, 0.999)


@pytest.fixture(scope="module")
def setup():
    adapter, roles = tiny_pixart_roles(tiny_components("pixart_alpha"))
    condition = adapter.encode_prompt(TINY_PROMPTS[:2])
    noise = torch.randn(adapter.latent_shape(2, 8, 8), generator=torch.Generator().manual_seed(0))
    return adapter, roles, Batch(condition=condition, noise=noise)


def _guided(network, x_t, t, condition, null, scale):
    return losses.classifier_free_guidance(network(x_t, t, null), network(x_t, t, condition), scale)


@pytest.mark.parametrize("method_name", ["sid", "sim"])
def test_lsg_guidance_placement_and_input_gradients(setup, method_name):
    """SiD-LSG: κ4 on the teacher and κ2 on the fake in the generator loss, each at the same ``x_t``, whose graph
    reaches the student through both frozen networks (their parameters get no gradient)."""
    adapter, roles, batch = setup
    path = adapter.noise_path
    config = MethodConfig(
        method=method_name, guidance_scale=3.0, fake_guidance_scale=2.0, fake_train_guidance_scale=1.5
    )
    method = build_method(config, roles, [400])
    assert type(method) is {"sid": SiD, "sim": SIM}[method_name]
    with roles.train_phase("student"):
        terms = method.score_terms(batch, RandomSource.from_seed(0))
        null = roles.unconditional(batch.condition)
        with torch.no_grad():
            x_t = terms.x_t.detach()
            real = _guided(roles.teacher, x_t, terms.t, batch.condition, null, 3.0)
            fake = _guided(roles.critic, x_t, terms.t, batch.condition, null, 2.0)
        # one batched pass (null and prompt) against two separate ones: float32 rounding, amplified by 1/α_t
        close = {"rtol": 1e-4, "atol": 1e-4}
        torch.testing.assert_close(terms.x0_real, param.to_x0(real, x_t, terms.t, path, "epsilon"), **close)
        torch.testing.assert_close(terms.x0_fake, param.to_x0(fake, x_t, terms.t, path, "epsilon"), **close)
        # negative control: the unguided fake is far from what the method used
        unguided = param.to_x0(roles.critic(x_t, terms.t, batch.condition), x_t, terms.t, path, "epsilon")
        assert (terms.x0_fake - unguided).abs().max() > 1e-2
        # Input gradients: d x̂_real / d x and d x̂_fake / d x differ from the direct path through x_t's skip term.
        for x0 in (terms.x0_real, terms.x0_fake):
            (grad,) = torch.autograd.grad(x0.sum(), terms.x_t, retain_graph=True)
            alpha, sigma = path.alpha_sigma(terms.t)
            skip_only = (1.0 / alpha.float())[:, None, None, None].expand_as(grad)  # ε-prediction's 1/α_t x_t term
            assert (grad - skip_only).abs().max() > 1e-3
        loss, _ = method.generator_loss(terms)
        loss.backward()
    roles.end_phase()
    student = [p for _, p in roles.named_role_parameters("student")]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student)
    assert all(p.grad is None for _, p in roles.named_role_parameters("critic"))
    for p in student:
        p.grad = None


def test_fake_score_trains_on_its_kappa1_guided_prediction(setup):
    """SiD-LSG's κ1 (``cfg_train_fake``): the fake score's DSM loss is taken on its own guided prediction."""
    adapter, roles, batch = setup
    method = build_method(MethodConfig(method="sid", fake_train_guidance_scale=1.5), roles, [400])
    loss, logs = method.critic_step(batch, RandomSource.from_seed(3))
    roles.end_phase()
    replay = RandomSource.from_seed(3)
    with torch.no_grad():
        x = param.to_x0(
            roles.student(batch.noise, torch.full((2,), 400.0, dtype=torch.float64), batch.condition),
            batch.noise,
            torch.full((2,), 400.0, dtype=torch.float64),
            adapter.noise_path,
            "epsilon",
        )
        t = replay.times(adapter.noise_path, 2, method.config.critic_time_range)
        noise = replay.randn(x.shape)
        x_t = param.add_noise(x, noise, t, adapter.noise_path)
        null = roles.unconditional(batch.condition)
        pred = _guided(roles.critic, x_t, t, batch.condition, null, 1.5)
        expected = losses.denoising_loss(pred, x, noise, t, adapter.noise_path, "epsilon")
        unguided = losses.denoising_loss(
            roles.critic(x_t, t, batch.condition), x, noise, t, adapter.noise_path, "epsilon"
        )
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)
    assert abs(float(expected - unguided)) > 1e-6  # negative control: guidance changes the loss


@pytest.mark.parametrize("method_name", ["sid", "sim"])
def test_short_toy_run_learns(method_name):
    """150 student steps (1:1 with the fake score) on a two-mode teacher: the energy distance to the teacher falls
    by more than 3x from the first evaluation."""
    teacher = GaussianMixture(torch.tensor([[2.0, 0.0], [-2.0, 0.0]]), torch.tensor([0.3, 0.3]))
    result = train_toy(
        teacher,
        param.VPPath.from_betas(),
        MethodConfig(method=method_name),
        student_steps=150,
        batch_size=128,
        hidden=64,
        depth=2,
        critic_warmup=50,
        eval_samples=1000,
        eval_every=50,
    )
    energies = [entry["energy"] for entry in result.history]
    assert energies[-1] < energies[0] / 3, energies
    assert result.last_logs["student/nonfinite"] == 0


def test_cli_flags_set_the_method_settings():
    from diffusers_onestep.distill import cli

    argv = ["--teacher", "t", "--prompts", "p.txt", "--method", "sim", "--sim_distance", "squared"]
    argv += ["--sim_huber_c", "0.5", "--fake_guidance_scale", "2", "--fake_train_guidance_scale", "1.5"]
    method = cli.parse_args(argv)[0].method
    assert (method.method, method.sim_distance, method.sim_huber_c) == ("sim", "squared", 0.5)
    assert (method.fake_guidance_scale, method.fake_train_guidance_scale, method.sid_alpha) == (2.0, 1.5, None)
    assert cli.parse_args(["--teacher", "t", "--prompts", "p.txt", "--sid_alpha", "1"])[0].method.sid_alpha == 1.0


def test_model_card_names_the_score_divergence(tmp_path):
    from huggingface_hub import ModelCard

    from diffusers_onestep import hub
    from diffusers_onestep.distill.config import TrainConfig

    config = TrainConfig(teacher="stable-diffusion-v1-5/stable-diffusion-v1-5")
    config.method = resolve_method_config(MethodConfig(method="sid"))
    config.data.prompts = "prompts.txt"
    hub.write_model_card(str(tmp_path), config, family="sd", student_timesteps=[625], lora=False, method=SiD)
    card = ModelCard.load(str(tmp_path / "README.md"))
    assert {"sid", "fisher"} <= set(card.data.tags) and None not in card.data.tags
    assert "divergence `fisher`" in card.text and "arXiv 2404.04057" in card.text


@pytest.mark.parametrize("method_name, student", [("sid", "lora"), ("sim", "full")])
def test_trainer_runs_the_method_in_process(tmp_path, method_name, student):
    """The real trainer on a tiny PixArt teacher: a LoRA student (one shared backbone: the input gradient runs
    through the frozen teacher and the LoRA fake on the same weights) and a full one, with SiD-LSG's flags."""
    workspace = {
        "teacher": save_tiny_native_pipeline("pixart_alpha", str(tmp_path / "teacher")),
        "prompts": write_prompts(str(tmp_path)),
    }
    flags = ["--method", method_name, "--student", student, "--max_train_steps", "3"]
    flags += ["--fake_guidance_scale", "2", "--fake_train_guidance_scale", "1.5"]
    result = in_process(tiny_run_argv(workspace, tmp_path / "out", *flags))
    assert result.global_step == 3
    assert all(math.isfinite(value) for value in result.logs.values()), result.logs
    assert result.logs["student/nonfinite"] == 0 and result.logs["student/grad_norm"] > 0
    assert (tmp_path / "out" / "README.md").exists()


@pytest.mark.parametrize("method_name", ["sid", "sim"])
def test_resumed_run_is_bit_exact(tmp_path, method_name):
    """Kill-free resume: 4 steps straight vs 2 steps, then resumed from checkpoint-2 to 4; every state file equal."""
    import shutil

    from safetensors.torch import load_file

    workspace = {
        "teacher": save_tiny_native_pipeline("pixart_alpha", str(tmp_path / "teacher")),
        "prompts": write_prompts(str(tmp_path)),
    }
    flags = ["--method", method_name, "--fake_guidance_scale", "2", "--fake_train_guidance_scale", "1.5"]
    flags += ["--checkpointing_steps", "2", "--lr_scheduler", "constant", "--ema_decay", "0.9"]
    in_process(tiny_run_argv(workspace, tmp_path / "straight", *flags, "--max_train_steps", "4"))
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "straight", resumed)
    shutil.rmtree(resumed / "checkpoint-4")
    student_updates = []

    def count(event, trainer, **info):
        if event == "optimizer_step" and info.get("role") == "student":
            student_updates.append(info)

    argv = tiny_run_argv(workspace, resumed, *flags, "--max_train_steps", "4", "--resume_from_checkpoint", "latest")
    in_process(argv, hooks=[count])
    assert len(student_updates) == 2  # it resumed at step 2 rather than starting over
    for name in ("trainable.safetensors", "ema.safetensors", "optimizer_student.safetensors"):
        expected = load_file(str(tmp_path / "straight" / "checkpoint-4" / name))
        actual = load_file(str(resumed / "checkpoint-4" / name))
        assert expected.keys() == actual.keys() and expected, name
        for key in expected:
            assert torch.equal(expected[key], actual[key]), f"{name}:{key}"
