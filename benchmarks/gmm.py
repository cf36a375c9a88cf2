"""Do the f-divergences behave as theory says? One-step students of exact 2-D Gaussian-mixture teachers.

Every run trains with the library's own method: ``build_method(MethodConfig(divergence=...), ToyModels(...), [t_max])``
and its ``student_step`` / ``critic_step`` (``diffusers_onestep.testing.toy.train_toy``), on the teachers of
algorithms.md §13.4 with exact scores:

* ``ring8``  -- 8 equal modes on a circle of radius 2;
* ``grid25`` -- 25 equal modes at {-4, -2, 0, 2, 4}^2;
* ``pair``   -- two modes at x = -2 (weight 0.9) and x = +2 (weight 0.1), where reverse KL is expected to drop the
  minor mode.

The standard toys use mode stds 0.02 / 0.05 / 0.1; here every mode has std ``--std`` (0.2 by default) so that the
within-mode structure is resolved by a fair share of the noise levels the method samples (see docs/methods.md).

Networks (``ToyModels``): student MLP z (2-d) -> x0; critic MLP (EDM-preconditioned x0 head, native output = the
path's prediction) trained by the method's denoising loss; discriminator MLP on (x_t, t) -- "teacher features" are
x_t -- trained with the critic on exact teacher samples (``Batch.real``). One Adam(beta1=0, beta2=0.999) per role.

Metrics on 4000 student samples (``toy.mixture_metrics``):

* modes: components whose 3-sigma ball holds >= 0.5 * pi_k of all samples (half their fair share); "lenient" counts
  >= 0.2 * pi_k, which a uniform fill of the box already passes when the modes are this wide;
* HQ: fraction of samples within 3 sigma of some mean;
* minor: the fraction of samples nearer to the minor mean (x > 0) on ``pair`` (Voronoi mass; the teacher has 0.1);
  minor3s: the fraction inside the minor mode's 3-sigma ball among the HQ samples;
* TV: total variation between the Voronoi masses and pi;
* energy: squared energy distance to 4000 fresh teacher samples.

Two reference rows calibrate them: ``teacher`` (fresh exact samples: the best a student can score) and ``uniform``
(uniform over the box spanned by the means +- 3 sigma: what a space-filling student that learned no modes scores).

Variants (``--variants``): ``learned`` (default), ``oracle`` (exact ratio), ``oracle_fake`` (exact fake score),
``collapsed`` (mode-dropped start), ``low_t`` (t <= 0.5) and ``ode_fit`` (no distillation: the student MLP regressed
onto the teacher's exact probability-flow ODE map, a capacity check). ``--beta1`` and ``--lr_decay`` change the
optimiser of every role. On grid25 the 2000-step students cover only 2-13 of the 25 modes: the same MLP regressed
onto the exact ODE map needs ~30000 steps to cover them all (docs/methods.md, "grid25: what limits coverage").

Run (the tables in docs/methods.md came from the commands printed at the top of the output)::

    .venv/bin/python benchmarks/gmm.py                       # 3 teachers x (5 divergences + sid + sim + tdm), 1 seed
    .venv/bin/python benchmarks/gmm.py --methods sid,sim     # the score-divergence methods only
    .venv/bin/python benchmarks/gmm.py --methods tdm --tag tdm_2step   # a 2-step TDM student (--tdm_loss mse too)
    .venv/bin/python benchmarks/gmm.py --teachers pair --variants all --seeds 0,1,2

The last printed line is one JSON object
``{"ring8_modes": {div: n}, "grid25_modes": {div: n}, "minor_mass": {div: m}, "high_quality": {div: f},
"energy": {div: e}}`` (means over seeds; ``high_quality`` and ``energy`` are averaged over the teachers run).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any, Dict, List, Optional


os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from diffusers_onestep import parameterization as param  # noqa: E402
from diffusers_onestep.distill.config import MethodConfig  # noqa: E402
from diffusers_onestep.testing.analytic import GaussianMixture  # noqa: E402
from diffusers_onestep.testing.toy import mixture_metrics, train_toy  # noqa: E402


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIVERGENCES = ["reverse_kl", "js", "forward_kl", "hellinger", "jeffreys"]
#: ``--methods``: ``divergence`` runs DMD2 (reverse KL) / f-distill once per ``--divergences`` entry; ``sid`` (SiD at
#: its default α = 1.2) and ``sim`` (SIM, pseudo-Huber, c = 1) run once each, labelled by the method's name in the
#: tables' divergence column (they match scores, not an f-divergence; no discriminator, no ratio)
METHODS = ["divergence", "sid", "sim", "tdm"]
#: ``tdm`` (TDM, a 2-step student by default: ``--tdm_steps``) also runs once, labelled ``tdm-<K>step``
SCORE_METHODS = ["sid", "sim"]
TEACHERS = ["ring8", "grid25", "pair"]

#: Diagnostic variants (``--variants``). ``learned`` is the default method; the others change one thing.
VARIANTS = {
    "learned": "learned discriminator (the method as shipped)",
    "oracle": "oracle ratio: exact log p_t minus the exact log-density of the noised student bank (f-divergences only)",
    "collapsed": "student first regressed onto the major mode only (a mode-dropped start)",
    "low_t": "time_range (0.02, 0.5): no large-t terms (algorithms.md §13.3)",
    "oracle_fake": "exact fake score: the posterior mean of the noised student bank instead of the critic MLP",
    "ode_fit": "no distillation: the same student MLP regressed (MSE) onto the teacher's exact probability-flow ODE "
    "map noise -> x0, same steps / batch / optimizer (a capacity check; one run per seed)",
}


def make_teacher(name: str, std: float) -> GaussianMixture:
    if name == "ring8":
        return GaussianMixture.ring8(std=std)
    if name == "grid25":
        return GaussianMixture.grid25(std=std)
    if name == "pair":
        return GaussianMixture.imbalanced_pair(std=std)
    raise ValueError(f"Unknown teacher {name!r}; expected one of {', '.join(TEACHERS)}.")


def make_path(name: str) -> param.NoisePath:
    return param.VPPath.from_betas() if name == "vp" else param.FlowPath()


def uniform_box(teacher: GaussianMixture, n: int, seed: int) -> torch.Tensor:
    lo = (teacher.means - 3 * teacher.stds[:, None]).min(0).values
    hi = (teacher.means + 3 * teacher.stds[:, None]).max(0).values
    u = torch.rand(n, teacher.dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return lo + u * (hi - lo)


# ----------------------------------------------------------------------------------------------------------------
# plots (PIL only)
# ----------------------------------------------------------------------------------------------------------------


def scatter_png(samples: torch.Tensor, teacher: GaussianMixture, path: str, title: str, size: int = 320) -> None:
    lim = float(teacher.means.abs().max()) + 1.2
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)

    def to_px(x: float, y: float):
        return (x + lim) / (2 * lim) * (size - 1), (lim - y) / (2 * lim) * (size - 1)

    for (mx, my), s in zip(teacher.means.tolist(), teacher.stds.tolist()):
        cx, cy = to_px(mx, my)
        r = 3 * s / (2 * lim) * size
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=(220, 50, 50))
    for x, y in samples.tolist():
        px, py = to_px(x, y)
        if 0 <= px < size and 0 <= py < size:
            draw.point((px, py), fill=(20, 60, 200))
    draw.text((4, 3), title, fill=(0, 0, 0))
    img.save(path)


def contact_sheet(files: List[List[Optional[str]]], path: str) -> None:
    """Paste a grid of PNGs (rows of file paths, None = blank) into one image."""
    tiles = [[Image.open(f) if f else None for f in row] for row in files]
    w, h = next(t.size for row in tiles for t in row if t is not None)
    sheet = Image.new("RGB", (w * max(len(r) for r in tiles), h * len(tiles)), "white")
    for i, row in enumerate(tiles):
        for j, tile in enumerate(row):
            if tile is not None:
                sheet.paste(tile, (j * w, i * h))
    sheet.save(path)


# ----------------------------------------------------------------------------------------------------------------
# one run
# ----------------------------------------------------------------------------------------------------------------


def collapse_student(models, teacher: GaussianMixture, steps: int = 300, seed: int = 0) -> None:
    """Regress the student onto the major mode ``N(μ_0, s_0² I)`` (a student that has dropped every other mode)."""
    generator = torch.Generator().manual_seed(seed + 123)
    params = models.role_parameters("student")
    optimizer = torch.optim.Adam(params, lr=1e-3)
    t = torch.full((512,), float(models.student_time), dtype=torch.float64)
    for _ in range(steps):
        z = torch.randn(512, teacher.dim, generator=generator)
        target = teacher.means[0].float() + float(teacher.stds[0]) * z
        loss = ((models.student(z, t, None) - target) ** 2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


@torch.no_grad()
def ode_map(teacher: GaussianMixture, path: param.NoisePath, z: torch.Tensor, steps: int = 200) -> torch.Tensor:
    """The teacher's exact probability-flow ODE from ``x_1 = z`` to ``x_0`` (flow path, Heun, exact velocity)."""
    if path.kind != "flow":
        raise ValueError("ode_map integrates the flow path only.")
    x = z.to(torch.float64).clone()
    ts = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)

    def velocity(x, t):
        x0 = teacher.x0(x, torch.full((x.shape[0],), float(t), dtype=torch.float64), path)
        return (x - x0) / float(t)  # = eps_hat - x0_hat

    for t0, t1 in zip(ts[:-1], ts[1:]):
        d0 = velocity(x, t0)
        x_euler = x + (t1 - t0) * d0
        x = x + (t1 - t0) * 0.5 * (d0 + velocity(x_euler, t1)) if float(t1) > 0 else x_euler
    return x


class _FitResult:
    def __init__(self, samples, metrics, seconds, target_metrics):
        self.samples, self.metrics, self.seconds, self.target_metrics = samples, metrics, seconds, target_metrics
        self.last_logs: Dict[str, float] = {}


def ode_fit(teacher: GaussianMixture, path: param.NoisePath, spec: Dict[str, Any], pairs: int = 32768) -> _FitResult:
    """Regress the benchmark's student MLP onto the exact ODE map (``pairs`` fixed (z, x0) pairs), with the run's
    steps, batch, lr, betas and decay: how well can this student represent a map that covers every mode?"""
    from diffusers_onestep.testing.toy import ToyModels

    generator = torch.Generator().manual_seed(spec["seed"] + 5)
    z = torch.randn(pairs, teacher.dim, generator=generator, dtype=torch.float64)
    target = ode_map(teacher, path, z).float()
    z_eval = torch.randn(4000, teacher.dim, generator=generator, dtype=torch.float64)
    reference = teacher.sample(4000, generator=torch.Generator().manual_seed(10_000 + spec["seed"]))
    target_metrics = mixture_metrics(teacher, ode_map(teacher, path, z_eval), reference)
    models = ToyModels(teacher, path, hidden=spec["hidden"], depth=3, discriminator_trunk=None, seed=spec["seed"])
    optimizer = torch.optim.Adam(models.role_parameters("student"), lr=spec["lr"], betas=(spec["beta1"], 0.999))
    t = torch.full((spec["batch"],), float(path.t_max), dtype=torch.float64)
    started = time.perf_counter()
    for step in range(spec["steps"]):
        if spec["lr_decay"]:
            optimizer.param_groups[0]["lr"] = spec["lr"] * (1.0 - step / spec["steps"])
        idx = torch.randint(0, pairs, (spec["batch"],), generator=generator)
        loss = ((models.student(z[idx].float(), t, None) - target[idx]) ** 2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - started
    with torch.no_grad():
        t_eval = torch.full((4000,), float(path.t_max), dtype=torch.float64)
        samples = models.student(z_eval.float(), t_eval, None).double()
    return _FitResult(samples, mixture_metrics(teacher, samples, reference), seconds, target_metrics)


def tdm_label(steps: int, loss: str) -> str:
    """The tables' name of a TDM run: ``tdm-2step`` (the method's pseudo-Huber), ``tdm-2step-mse``."""
    return f"tdm-{steps}step" + ("" if loss == "pseudo_huber" else f"-{loss}")


def tdm_grid(path: param.NoisePath, steps: int) -> List[float]:
    """The ``K``-step student's conditioning times ``T_k = t_max (1 − (k − 1)/K)``: 1.0, 0.5 on flow and 999, 499
    on VP at 2 steps (tests/test_tdm.py's toy grid; on VP rounded down to integer DDPM steps)."""
    times = [path.t_max * (1.0 - k / steps) for k in range(steps)]
    return [float(math.floor(t)) if path.kind == "vp" else t for t in times]


def train_tdm(teacher: GaussianMixture, path: param.NoisePath, spec: Dict[str, Any]):
    """A ``K``-step TDM student trained with the library's method on the toy roles, then sampled the way the exported
    student samples: the method's own deterministic rollout (``TDM.rollout``: x̂0 re-noised with the student's ε̂,
    what ``OneStepScheduler(solver="ode")`` does between steps; tested equal to ``OneStepPipeline`` in
    tests/test_tdm.py).

    The loop is :func:`~diffusers_onestep.testing.toy.train_toy`'s (its 200 fake-only warm-up updates, one Adam per
    role, gradients clipped to 10, a non-finite loss stops the run) with TDM's own 1:1 ratio and optimizer: the fake
    score's learning rate is ``TDM.critic_learning_rate_ratio`` (5) times the student's and Adam's β2 is TDM's 0.95
    (``TDM.optimizer_defaults``); β1 is ``--beta1`` (0 by default, also TDM's). ``train_toy`` cannot run it: it
    builds a one-step method at ``t_max``.
    """
    from diffusers_onestep.distill.methods import build_method, resolve_method_config
    from diffusers_onestep.distill.methods.tdm import TDM
    from diffusers_onestep.distill.models import Batch, RandomSource
    from diffusers_onestep.testing.toy import TOY_TRAINING_DEFAULTS, ToyModels, ToyResult

    times = tdm_grid(path, spec["tdm_steps"])
    config = resolve_method_config(
        MethodConfig(method="tdm", student_timesteps=times, guidance_scale=1.0, tdm_loss=spec["tdm_loss"]),
        TOY_TRAINING_DEFAULTS,
    )
    seed = spec["seed"]
    models = ToyModels(teacher, path, hidden=spec["hidden"], depth=3, discriminator_trunk=None, seed=seed)
    method = build_method(config, models, times)
    betas = (spec["beta1"], TDM.optimizer_defaults["adam_beta2"])
    optimizers = {
        "student": torch.optim.Adam(models.role_parameters("student"), lr=spec["lr"], betas=betas),
        "critic": torch.optim.Adam(
            models.role_parameters("critic"), lr=spec["lr"] * TDM.critic_learning_rate_ratio, betas=betas
        ),
    }
    rng = RandomSource.from_seed(seed)
    data = torch.Generator().manual_seed(seed + 1)
    logs: Dict[str, float] = {}

    def update(role: str) -> None:
        noise = torch.randn(spec["batch"], teacher.dim, generator=data)
        step_fn = method.student_step if role == "student" else method.critic_step
        try:
            loss, step_logs = step_fn(Batch(condition=None, noise=noise), rng)
            if not bool(torch.isfinite(loss.detach()).all()):
                raise FloatingPointError(f"Non-finite {role} loss: {step_logs}")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(models.role_parameters(role), 10.0)
            optimizers[role].step()
            logs.update(step_logs)
        finally:
            for optimizer in optimizers.values():
                optimizer.zero_grad(set_to_none=True)
            models.end_phase()

    started = time.perf_counter()
    for _ in range(200):
        update("critic")
    for step in range(spec["steps"]):
        if spec["lr_decay"]:
            for role, optimizer in optimizers.items():
                scale = TDM.critic_learning_rate_ratio if role == "critic" else 1.0
                optimizer.param_groups[0]["lr"] = spec["lr"] * scale * (1.0 - step / spec["steps"])
        update("student")
        update("critic")
    seconds = time.perf_counter() - started
    noise = torch.randn(4000, teacher.dim, generator=torch.Generator().manual_seed(seed + 7))
    with torch.no_grad():
        samples = method.rollout(noise, None, len(times))[-1].double()
    reference = teacher.sample(4000, generator=torch.Generator().manual_seed(10_000 + seed))
    metrics = mixture_metrics(teacher, samples, reference)
    return ToyResult(samples=samples, metrics=metrics, seconds=seconds, last_logs=logs, models=models, method=method)


def run_one(spec: Dict[str, Any]) -> Dict[str, Any]:
    torch.set_num_threads(1)
    teacher = make_teacher(spec["teacher"], spec["std"])
    path = make_path(spec["path"])
    variant = spec["variant"]
    if spec["divergence"].startswith("tdm"):
        return _finish(spec, teacher, train_tdm(teacher, path, spec), {"tdm_loss": spec["tdm_loss"]})
    if variant == "ode_fit":
        result = ode_fit(teacher, path, spec)
        return _finish(
            spec,
            teacher,
            result,
            {
                "target_modes": result.target_metrics["modes"],
                "target_high_quality": result.target_metrics["high_quality"],
            },
        )
    label = spec["divergence"]
    method = {"method": label} if label in SCORE_METHODS else {"divergence": label}
    if label == "sid" and spec.get("sid_alpha") is not None:
        method["sid_alpha"] = spec["sid_alpha"]
    config = MethodConfig(
        **method,
        guidance_scale=1.0,
        critic_updates_per_student=spec["ratio"],
        time_range=(0.02, 0.5) if variant == "low_t" else (0.02, 0.98),
    )

    def collapse(models):
        collapse_student(models, teacher, seed=spec["seed"])

    result = train_toy(
        teacher,
        path,
        config,
        student_steps=spec["steps"],
        batch_size=spec["batch"],
        lr=spec["lr"],
        hidden=spec["hidden"],
        betas=(spec["beta1"], 0.999),
        lr_decay=spec["lr_decay"],
        ratio="oracle" if variant == "oracle" else "learned",
        fake_score="oracle" if variant == "oracle_fake" else "learned",
        seed=spec["seed"],
        init_student=collapse if variant == "collapsed" else None,
    )
    extra = {}
    if spec.get("ratio_check") and variant == "learned" and label not in ["reverse_kl", *SCORE_METHODS]:
        extra["ratio_check"] = ratio_check(result.models, path, seed=spec["seed"])
    return _finish(spec, teacher, result, extra)


def _finish(spec: Dict[str, Any], teacher: GaussianMixture, result, extra: Dict[str, Any]) -> Dict[str, Any]:
    variant = spec["variant"]
    m = result.metrics
    row = {
        **spec,
        "seconds": result.seconds,
        **{
            k: m[k]
            for k in (
                "modes",
                "modes_lenient",
                "num_modes",
                "high_quality",
                "mass_tv",
                "energy",
                "mode_mass",
                "mode_mass_hq",
            )
        },
    }
    if spec["teacher"] == "pair":
        row["minor"] = m["mode_mass"][1]
        row["minor3s"] = m["mode_mass_hq"][1]
    row.update(extra)
    row["logit_real"] = result.last_logs.get("critic/logit_real")
    row["logit_fake"] = result.last_logs.get("critic/logit_fake")
    png = os.path.join(spec["out"], "plots", f"{spec['name']}.png")
    title = f"{spec['teacher']} {spec['divergence']} {variant} s{spec['seed']}: {m['modes']}/{m['num_modes']}"
    scatter_png(result.samples[:4000], teacher, png, title)
    row["png"] = os.path.relpath(png, REPO)
    return row


@torch.no_grad()
def ratio_check(models, path: param.NoisePath, times=(0.05, 0.2, 0.5, 0.8), n: int = 2048, seed: int = 0):
    """How good is the learned density ratio? On noised student samples at fixed ``t``: the correlation between the
    discriminator's logit and the oracle ``log p_t − log q̂_t`` (exact teacher, noised bank of 2048 student samples),
    both standard deviations, and the share of oracle ratios outside the clip range [0.1, 20]."""
    generator = torch.Generator().manual_seed(seed)
    x = models.student_bank(n)
    out = []
    for tv in times:
        t = torch.full((n,), float(path.training_time(torch.tensor(tv))), dtype=torch.float64)
        if path.kind == "vp":
            t = t.round()
        x_t = param.add_noise(x, torch.randn(x.shape, generator=generator), t, path)
        learned = models.discriminator(x_t, t).double()
        oracle = models.oracle_log_ratio(x_t, t).double()
        corr = float(torch.corrcoef(torch.stack([learned, oracle]))[0, 1])
        clipped = float(((oracle < math.log(0.1)) | (oracle > math.log(20.0))).double().mean())
        out.append(
            {
                "t": tv,
                "corr": corr,
                "std_learned": float(learned.std()),
                "std_oracle": float(oracle.std()),
                "oracle_clipped": clipped,
            }
        )
    return out


# ----------------------------------------------------------------------------------------------------------------
# tables
# ----------------------------------------------------------------------------------------------------------------


def _mean_std(values: List[float]) -> str:
    if len(values) == 1:
        return None
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _fmt(values: List[float], digits: int) -> str:
    mean = sum(values) / len(values)
    sd = _mean_std(values)
    return f"{mean:.{digits}f}" if sd is None else f"{mean:.{digits}f} ± {sd:.{digits}f}"


def tables(rows: List[Dict[str, Any]], references: Dict[str, Dict[str, Any]]) -> str:
    out = []
    for teacher in [t for t in TEACHERS if any(r["teacher"] == t for r in rows)]:
        sub = [r for r in rows if r["teacher"] == teacher]
        pair = teacher == "pair"
        head = (
            "| divergence / method | variant | seeds | modes | lenient | HQ | "
            + ("minor | minor3s | " if pair else "")
            + "TV | energy | s/run |"
        )
        out += [
            f"**{teacher}** (std {sub[0]['std']}, {sub[0]['num_modes']} modes)",
            "",
            head,
            "|" + "---|" * (head.count("|") - 1),
        ]
        for name, ref in references[teacher].items():
            cells = [
                f"*{name}*",
                "—",
                "—",
                f"{ref['modes']}/{ref['num_modes']}",
                f"{ref['modes_lenient']}/{ref['num_modes']}",
                f"{ref['high_quality']:.3f}",
            ]
            if pair:
                cells += [f"{ref['mode_mass'][1]:.3f}", f"{ref['mode_mass_hq'][1]:.3f}"]
            cells += [f"{ref['mass_tv']:.3f}", f"{ref['energy']:.4f}", "—"]
            out.append("| " + " | ".join(cells) + " |")
        keys = []
        for r in sub:
            if (r["divergence"], r["variant"]) not in keys:
                keys.append((r["divergence"], r["variant"]))
        for div, variant in keys:
            runs = [r for r in sub if r["divergence"] == div and r["variant"] == variant]
            modes = [r["modes"] for r in runs]
            cells = [
                div,
                variant,
                ",".join(str(r["seed"]) for r in runs),
                "/".join(str(m) for m in modes) + f" of {runs[0]['num_modes']}",
                "/".join(str(r["modes_lenient"]) for r in runs),
                _fmt([r["high_quality"] for r in runs], 3),
            ]
            if pair:
                cells += [_fmt([r["minor"] for r in runs], 3), _fmt([r["minor3s"] for r in runs], 3)]
            cells += [
                _fmt([r["mass_tv"] for r in runs], 3),
                _fmt([r["energy"] for r in runs], 4),
                f"{sum(r['seconds'] for r in runs) / len(runs):.0f}",
            ]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def summary_json(rows: List[Dict[str, Any]]) -> Dict[str, Dict[str, float]]:
    main = [r for r in rows if r["variant"] == "learned"]

    def avg(values):
        return round(sum(values) / len(values), 4) if values else None

    tdm = [d for d in dict.fromkeys(r["divergence"] for r in main) if d.startswith("tdm")]
    divs = [d for d in DIVERGENCES + SCORE_METHODS + tdm if any(r["divergence"] == d for r in main)]
    out: Dict[str, Dict[str, float]] = {
        "ring8_modes": {},
        "grid25_modes": {},
        "minor_mass": {},
        "high_quality": {},
        "energy": {},
    }
    for d in divs:
        sub = [r for r in main if r["divergence"] == d]
        for teacher, key in (("ring8", "ring8_modes"), ("grid25", "grid25_modes")):
            values = [r["modes"] for r in sub if r["teacher"] == teacher]
            if values:
                out[key][d] = avg(values)
        minor = [r["minor"] for r in sub if r["teacher"] == "pair"]
        if minor:
            out["minor_mass"][d] = avg(minor)
        out["high_quality"][d] = avg([r["high_quality"] for r in sub])
        out["energy"][d] = avg([r["energy"] for r in sub])
    return out


# ----------------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------------


def main(argv=None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teachers", default=",".join(TEACHERS))
    parser.add_argument("--divergences", default=",".join(DIVERGENCES))
    parser.add_argument(
        "--methods",
        default=",".join(METHODS),
        help="comma-separated of divergence (DMD2 / f-distill over --divergences), sid, sim, tdm",
    )
    parser.add_argument("--tdm_steps", type=int, default=2, help="the tdm student's number of steps K (2 to 8)")
    parser.add_argument(
        "--tdm_loss", default="pseudo_huber", help="tdm's generator distance: pseudo_huber (the method's) or mse"
    )
    parser.add_argument("--variants", default="learned", help=f"comma-separated of {', '.join(VARIANTS)}, or 'all'")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--path", default="flow", choices=["flow", "vp"])
    parser.add_argument("--sid_alpha", type=float, default=None, help="SiD's α (default: the method's, 1.2)")
    parser.add_argument("--std", type=float, default=0.2, help="std of every mode")
    parser.add_argument("--student_steps", type=int, default=2000)
    parser.add_argument("--critic_updates_per_student", type=int, default=1)
    parser.add_argument("--batch_size", type=int, default=512)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--beta1", type=float, default=0.0, help="Adam beta1 of every role")
    parser.add_argument("--lr_decay", action="store_true", help="decay every learning rate linearly to 0")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument(
        "--ratio_check",
        action="store_true",
        help="after each learned f-divergence run, compare its discriminator with the oracle ratio",
    )
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (one torch thread each)")
    parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "gmm"))
    parser.add_argument("--tag", default="main", help="name of this run's results files")
    parser.add_argument("--plot_suffix", default="", help="appended to every scatter plot's file name")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    command = "HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/gmm.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    print(f"command: {command}", flush=True)

    variants = list(VARIANTS) if args.variants == "all" else args.variants.split(",")
    for v in variants:
        if v not in VARIANTS:
            parser.error(f"unknown variant {v!r}; expected one of {', '.join(VARIANTS)}")
    methods = args.methods.split(",")
    for m in methods:
        if m not in METHODS:
            parser.error(f"unknown method {m!r}; expected one of {', '.join(METHODS)}")
    labels = (
        (args.divergences.split(",") if "divergence" in methods else [])
        + [m for m in methods if m in SCORE_METHODS]
        + ([tdm_label(args.tdm_steps, args.tdm_loss)] if "tdm" in methods else [])
    )
    os.makedirs(os.path.join(args.out, "plots"), exist_ok=True)
    specs = []
    for teacher in args.teachers.split(","):
        for variant in variants:
            for div in labels:
                if variant == "oracle" and div in ["reverse_kl", *SCORE_METHODS]:
                    continue  # h = 1 or no f-divergence: the ratio is unused
                if div.startswith("tdm") and variant != "learned":
                    continue  # the diagnostic variants are for the one-step methods
                if variant == "ode_fit":
                    if div != labels[0]:
                        continue  # no divergence involved: one run per seed
                    div = "none"
                for seed in (int(s) for s in args.seeds.split(",")):
                    name = f"{args.path}_{teacher}_{div}_{variant}_s{seed}{args.plot_suffix}"
                    specs.append(
                        {
                            "name": name,
                            "teacher": teacher,
                            "divergence": div,
                            "variant": variant,
                            "seed": seed,
                            "path": args.path,
                            "std": args.std,
                            "steps": args.student_steps,
                            "ratio": args.critic_updates_per_student,
                            "batch": args.batch_size,
                            "lr": args.lr,
                            "hidden": args.hidden,
                            "beta1": args.beta1,
                            "lr_decay": args.lr_decay,
                            "out": args.out,
                            "ratio_check": args.ratio_check,
                            "sid_alpha": args.sid_alpha,
                            "tdm_steps": args.tdm_steps,
                            "tdm_loss": args.tdm_loss,
                        }
                    )
    started = time.perf_counter()
    rows: List[Dict[str, Any]] = []

    def report(row):
        rows.append(row)
        extra = f" minor {row['minor']:.3f}" if "minor" in row else ""
        print(
            f"[{len(rows)}/{len(specs)}] {row['name']}: modes {row['modes']}/{row['num_modes']} "
            f"HQ {row['high_quality']:.3f}{extra} energy {row['energy']:.4f} ({row['seconds']:.0f} s)",
            flush=True,
        )

    if args.jobs > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(args.jobs) as pool:
            for row in pool.imap_unordered(run_one, specs):
                report(row)
    else:
        for spec in specs:
            report(run_one(spec))
    order = {s["name"]: i for i, s in enumerate(specs)}
    rows.sort(key=lambda r: order[r["name"]])
    wall = time.perf_counter() - started

    references = {}
    for teacher in dict.fromkeys(r["teacher"] for r in rows):
        gm = make_teacher(teacher, args.std)
        ref = gm.sample(4000, generator=torch.Generator().manual_seed(10_000))
        references[teacher] = {
            "teacher": mixture_metrics(gm, gm.sample(4000, generator=torch.Generator().manual_seed(1)), ref),
            "uniform": mixture_metrics(gm, uniform_box(gm, 4000, 2), ref),
        }
    table = tables(rows, references)
    checks = [r for r in rows if r.get("ratio_check")]
    if checks:
        lines = [
            "**Ratio check**: learned discriminator logit vs oracle log-ratio on noised student samples "
            "(corr; std learned / std oracle; share of oracle ratios outside [0.1, 20])",
            "",
            "| run | " + " | ".join(f"t = {c['t']}" for c in checks[0]["ratio_check"]) + " |",
            "|---|" + "---|" * len(checks[0]["ratio_check"]),
        ]
        for r in checks:
            lines.append(
                f"| {r['teacher']} {r['divergence']} s{r['seed']} | "
                + " | ".join(
                    f"{c['corr']:.2f}; {c['std_learned']:.2f} / {c['std_oracle']:.2f}; {c['oracle_clipped']:.2f}"
                    for c in r["ratio_check"]
                )
                + " |"
            )
        table += "\n".join(lines) + "\n"
    summary = summary_json(rows)
    header = (
        f"Command: `{command}`\n\nPath `{args.path}`, mode std {args.std}, {args.student_steps} student steps, "
        f"critic:student {args.critic_updates_per_student}:1, batch {args.batch_size}, Adam({args.beta1:g}, 0.999) lr "
        f"{args.lr}{' decayed linearly to 0' if args.lr_decay else ''}, MLPs {args.hidden} wide. Wall time {wall / 60:.1f} min with --jobs {args.jobs} on the "
        f"shared 2-core CPU machine.\n"
    )
    print("\n" + header + "\n" + table, flush=True)

    # per-teacher contact sheets: rows = divergences x variants, columns = seeds
    for teacher in references:
        grid = []
        for div in labels + ["none"]:
            for variant in variants:
                files = [
                    os.path.join(REPO, r["png"])
                    for r in rows
                    if r["teacher"] == teacher and r["divergence"] == div and r["variant"] == variant
                ]
                if files:
                    grid.append(files)
        contact_sheet(grid, os.path.join(args.out, f"{args.tag}_{args.path}_{teacher}.png"))
    with open(os.path.join(args.out, f"{args.tag}.json"), "w") as f:
        json.dump(
            {"command": command, "wall_s": wall, "rows": rows, "references": references, "summary": summary},
            f,
            indent=1,
        )
    with open(os.path.join(args.out, f"{args.tag}.md"), "w") as f:
        f.write(header + "\n" + table + "\n")
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
