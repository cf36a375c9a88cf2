"""A short version of ``benchmarks/gmm.py``: the library's VSD / f-distill methods on exact 2-D mixture teachers.

Every run goes through ``build_method`` and its ``student_step`` / ``critic_step`` (``testing.toy.train_toy``), on the
flow path with mode std 0.2 (as the benchmark). The thresholds are loose versions of what the benchmark measured
(docs/methods.md, "Benchmark: 2-D Gaussian mixtures"):

* on the 0.9/0.1 pair every divergence -- reverse KL included -- keeps the minor mode with about its weight. The
  textbook expectation that reverse KL drops it did *not* hold for these flexible students (see the docs), so the
  test pins what was measured instead: a minor-mode mass near 0.1 for reverse KL, JS and forward KL alike;
* JS covers the 8 modes of ring-8;
* the exact probability-flow ODE map that ``benchmarks/gmm.py --variants ode_fit`` regresses the student onto covers
  every grid-25 mode (the capacity check behind the grid-25 numbers);
* the grad-flag discipline of ``ToyModels`` is the one of ``roles.BackboneRoles`` (both are ``RolePhases``): each
  update reaches only its role; ``train_toy`` updates the roles in the trainer's order and stops on a non-finite
  loss with the phase ended.
"""

import importlib.util
import json
import os

import pytest
import torch

from diffusers_onestep import parameterization as P
from diffusers_onestep.distill.config import MethodConfig
from diffusers_onestep.distill.methods import build_method, resolve_method_config
from diffusers_onestep.distill.models import Batch, RandomSource, RolePhases
from diffusers_onestep.testing.analytic import GaussianMixture
from diffusers_onestep.testing.toy import TOY_TRAINING_DEFAULTS, ToyModels, mixture_metrics, train_toy


FLOW = P.FlowPath()
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def short_run(teacher, divergence, steps, seed=0):
    config = MethodConfig(divergence=divergence, guidance_scale=1.0, critic_updates_per_student=1)
    return train_toy(
        teacher,
        FLOW,
        config,
        student_steps=steps,
        batch_size=256,
        hidden=64,
        critic_warmup=100,
        seed=seed,
        eval_samples=2000,
    )


@pytest.mark.parametrize("divergence", ["reverse_kl", "js", "forward_kl"])
def test_imbalanced_pair_keeps_the_minor_mode_with_about_its_weight(divergence):
    teacher = GaussianMixture.imbalanced_pair(std=0.2)
    result = short_run(teacher, divergence, steps=500)
    metrics = result.metrics
    minor = metrics["mode_mass"][1]
    assert 0.03 <= minor <= 0.25, (divergence, metrics)
    assert metrics["high_quality"] >= 0.6, (divergence, metrics)
    if divergence != "reverse_kl":
        # the discriminator tells exact teacher samples from student samples (logit_real > logit_fake)
        assert result.last_logs["critic/logit_real"] > result.last_logs["critic/logit_fake"]


def test_ring8_covered_by_js():
    teacher = GaussianMixture.ring8(std=0.2)
    metrics = short_run(teacher, "js", steps=500).metrics
    assert metrics["modes"] >= 7, metrics
    assert metrics["high_quality"] >= 0.5, metrics


def test_metrics_calibration():
    """Exact teacher samples score every mode; a uniform fill of the box scores none (strict count)."""
    teacher = GaussianMixture.grid25(std=0.2)
    generator = torch.Generator().manual_seed(0)
    exact = mixture_metrics(teacher, teacher.sample(4000, generator=generator))
    assert exact["modes"] == 25 and exact["high_quality"] > 0.98 and exact["mass_tv"] < 0.05
    uniform = (torch.rand(4000, 2, generator=generator, dtype=torch.float64) * 9.2) - 4.6
    fill = mixture_metrics(teacher, uniform)
    assert fill["modes"] == 0 and fill["modes_lenient"] == 25


def test_benchmark_ode_map_covers_grid25():
    gmm = _benchmark_module()
    teacher = GaussianMixture.grid25(std=0.2)
    z = torch.randn(2000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    metrics = mixture_metrics(teacher, gmm.ode_map(teacher, FLOW, z, steps=100))
    assert metrics["modes"] == 25 and metrics["high_quality"] > 0.95, metrics


def _benchmark_module():
    spec = importlib.util.spec_from_file_location("gmm_benchmark", os.path.join(REPO, "benchmarks", "gmm.py"))
    gmm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gmm)
    return gmm


def test_benchmark_methods_option_adds_sid_and_sim_rows(tmp_path):
    """``--methods divergence,sid,sim``: one row per divergence, then SiD's and SIM's, each trained by its method
    (a few steps: this checks the plumbing, the committed tables check the training)."""
    gmm = _benchmark_module()
    argv = ["--teachers", "pair", "--divergences", "reverse_kl", "--methods", "divergence,sid,sim", "--sid_alpha"]
    argv += ["1.0", "--student_steps", "3", "--batch_size", "32", "--hidden", "16", "--out", str(tmp_path)]
    summary = gmm.main(argv)
    assert list(summary["minor_mass"]) == ["reverse_kl", "sid", "sim"]
    rows = json.loads((tmp_path / "main.json").read_text())["rows"]
    assert [(r["divergence"], r["sid_alpha"]) for r in rows] == [("reverse_kl", 1.0), ("sid", 1.0), ("sim", 1.0)]
    assert "| sid | learned |" in (tmp_path / "main.md").read_text()


def test_benchmark_methods_option_adds_a_k_step_tdm_row(tmp_path):
    """``--methods tdm``: a 2-step TDM row on the grid ``t_max, t_max / 2``, sampled by the method's own deterministic
    rollout (the exported student's ``ode`` trajectory), labelled with its steps and a non-default loss."""
    gmm = _benchmark_module()
    assert gmm.tdm_grid(FLOW, 2) == [1.0, 0.5] and gmm.tdm_grid(P.VPPath.from_betas(), 2) == [999.0, 499.0]
    argv = ["--teachers", "pair", "--methods", "tdm", "--tdm_loss", "mse", "--student_steps", "3", "--batch_size"]
    argv += ["32", "--hidden", "16", "--out", str(tmp_path), "--tag", "tdm"]
    summary = gmm.main(argv)
    assert list(summary["minor_mass"]) == ["tdm-2step-mse"]
    assert "| tdm-2step-mse | learned |" in (tmp_path / "tdm.md").read_text()
    spec = json.loads((tmp_path / "tdm.json").read_text())["rows"][0]
    result = gmm.train_tdm(GaussianMixture.imbalanced_pair(std=0.2), FLOW, spec)
    assert result.method.student_timesteps == [1.0, 0.5]
    noise = torch.randn(4000, 2, generator=torch.Generator().manual_seed(spec["seed"] + 7))
    with torch.no_grad():
        states = result.method.rollout(noise, None, 2)
    torch.testing.assert_close(result.samples, states[-1].double())
    assert not torch.allclose(states[1], states[-1])  # two student passes: the second starts from the re-noised x̂0


@pytest.mark.parametrize("divergence", ["reverse_kl", "js"])
def test_each_update_reaches_only_its_role(divergence):
    teacher = GaussianMixture.imbalanced_pair(std=0.2)
    config = resolve_method_config(MethodConfig(divergence=divergence, guidance_scale=1.0), TOY_TRAINING_DEFAULTS)
    trunk = config.discriminator_trunk if config.uses_discriminator else None
    models = ToyModels(teacher, FLOW, hidden=16, depth=2, discriminator_trunk=trunk)
    assert isinstance(models, RolePhases)
    method = build_method(config, models, [FLOW.t_max])
    generator = torch.Generator().manual_seed(0)
    batch = Batch(
        condition=None,
        noise=torch.randn(8, 2, generator=generator),
        real=teacher.sample(8, generator=generator, dtype=torch.float32),
    )
    for role, other in (("student", "critic"), ("critic", "student")):
        step = method.student_step if role == "student" else method.critic_step
        loss, _ = step(batch, RandomSource.from_seed(1))
        loss.backward()
        assert all(p.grad is not None for p in models.role_parameters(role)), role
        assert all(p.grad is None and not p.requires_grad for p in models.role_parameters(other)), role
        for p in models.role_parameters(role):
            p.grad = None
        models.end_phase()
    assert all(p.requires_grad for r in ("student", "critic") for p in models.role_parameters(r))
    assert models.unconditional(None) is None and models.concat([None, None]) is None


def all_trainable_and_clean(models):
    """Outside a phase: every trainable parameter requires grad and holds no gradient."""
    return all(p.requires_grad and p.grad is None for r in ("student", "critic") for p in models.role_parameters(r))


def record_phases(log):
    """An ``init_student`` that records the role of every update ``train_toy`` makes."""

    def init(models):
        enter = models.train_phase
        models.train_phase = lambda role: (log.append(role), enter(role))[1]

    return init


def test_train_toy_follows_the_trainer_schedule():
    """Warm-up critic updates, then ``roles_to_update``; the run stops after the iteration of the last student
    update."""
    teacher = GaussianMixture.imbalanced_pair(std=0.2)
    config = MethodConfig(divergence="reverse_kl", guidance_scale=1.0, critic_updates_per_student=3)
    log = []
    result = train_toy(
        teacher,
        FLOW,
        config,
        student_steps=3,
        batch_size=16,
        hidden=8,
        depth=2,
        critic_warmup=2,
        eval_samples=100,
        init_student=record_phases(log),
    )
    assert log == ["critic"] * 2 + ["student", "critic", "critic", "critic"] * 2 + ["student", "critic"]
    assert result.models.phase is None and all_trainable_and_clean(result.models)


def test_train_toy_stops_on_a_non_finite_loss_with_the_phase_ended():
    teacher = GaussianMixture.imbalanced_pair(std=0.2)
    config = MethodConfig(divergence="reverse_kl", guidance_scale=1.0)
    seen = []

    def poison(models):
        seen.append(models)
        with torch.no_grad():
            for parameter in models.role_parameters("student"):
                parameter.fill_(float("nan"))

    with pytest.raises(FloatingPointError, match="Non-finite critic loss"):
        train_toy(
            teacher,
            FLOW,
            config,
            student_steps=2,
            batch_size=16,
            hidden=8,
            depth=2,
            critic_warmup=1,
            eval_samples=100,
            init_student=poison,
        )
    assert seen[0].phase is None and all_trainable_and_clean(seen[0])
