"""2-D toy distillation: exact Gaussian-mixture teachers, small MLP students, critics and discriminators.

:class:`ToyModels` implements :class:`~diffusers_onestep.distill.models.DistillationModels` for a
:class:`~.analytic.GaussianMixture` teacher, so the *library's* methods (``build_method`` →
:class:`~diffusers_onestep.distill.methods.VSD` / :class:`~diffusers_onestep.distill.methods.FDistill`, with their
losses, ratio clipping and two-stage normalization) run unchanged on a teacher whose score is exact
(:mod:`.analytic`). Only the networks differ from the real backbones:

* **teacher** -- the mixture's exact native prediction ``teacher.prediction(x_t, t, path, prediction_type)``; its
  "trunk features" are the noisy input ``x_t`` itself (an analytic teacher has no hidden layers).
* **student** -- an MLP from the input noise (a ``d``-dimensional latent, ``d`` = data dimension) and the student
  time to the clean sample (``student_prediction_type="sample"``).
* **critic** (fake score) -- an MLP on ``(c_in(t)·x_t, emb(t))`` giving the native prediction (ε on VP paths), trained
  by the method's denoising loss; its features are the last hidden layer.
* **discriminator** -- an MLP on ``(features, emb(t))`` giving one logit per sample, trained with the critic.

The grad-flag discipline is the one of :class:`~diffusers_onestep.distill.roles.BackboneRoles`, from the same
:class:`~diffusers_onestep.distill.models.RolePhases`: inside ``train_phase(role)`` only that role's parameters
require grad (the critic role owns the discriminator), and the phase lasts until :meth:`ToyModels.end_phase` (after
the optimizer step), so backward sees the same flags as the forward.

Diagnostics that separate estimator error from method error (``ratio="oracle"``, ``fake_score="oracle"``): the
density ratio ``log p_t(x) − log q̂_t(x)`` and the fake ``x̂0`` are computed from the exact teacher density and the
exact noised density of a fresh bank of student samples, ``q̂_t = mean_j N(α_t x_j, σ_t² I)`` (the noised
*empirical* student distribution: exact up to the bank's Monte-Carlo error, which is largest at small ``σ_t``).

:func:`train_toy` runs the trainer's schedule (:func:`~diffusers_onestep.distill.models.roles_to_update`: critic
every iteration, the student first on every ``critic_updates_per_student``-th) with one Adam per role;
:func:`mixture_metrics` scores the student's samples against the teacher (modes covered, high-quality fraction,
per-mode mass, energy distance; the first two as in VEEGAN, arXiv 1705.07761, and PacGAN, arXiv 1712.04086).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .. import parameterization as param
from ..distill.config import MethodConfig
from ..distill.methods import build_method, resolve_method_config
from ..distill.models import (
    TRAINABLE_ROLES,
    Batch,
    DistillationModels,
    RandomSource,
    RolePhases,
    check_trainable_role,
    roles_to_update,
)
from ..families import FamilyAdapter
from .analytic import GaussianMixture


#: the "family defaults" of the 2-D test beds, filling what a MethodConfig leaves unset: the generic ones, with the
#: generator GAN weight 1e-3 that the committed GMM results (benchmarks/results/gmm/) were measured with
TOY_TRAINING_DEFAULTS = dataclasses.replace(FamilyAdapter.training_defaults, gan_weight=1e-3)

__all__ = ["TOY_TRAINING_DEFAULTS", "ToyModels", "ToyResult", "energy_distance", "mixture_metrics", "train_toy"]


def _mlp(inputs: int, hidden: int, depth: int, outputs: int) -> nn.Sequential:
    layers: List[nn.Module] = []
    width = inputs
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.SiLU()]
        width = hidden
    layers.append(nn.Linear(width, outputs))
    return nn.Sequential(*layers)


class TimeEmbedding(nn.Module):
    """Sinusoidal embedding of the path time, rescaled to ``u = (t − t_min)/(t_max − t_min) ∈ [0, 1]`` × 1000."""

    def __init__(self, path: param.NoisePath, dim: int = 32):
        super().__init__()
        self.t_min, self.span = float(path.t_min), float(path.t_max - path.t_min)
        half = dim // 2
        self.register_buffer("freqs", torch.exp(-math.log(10000.0) * torch.arange(half) / half), persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        u = (t.to(torch.float32) - self.t_min) / self.span * 1000.0
        angles = u[:, None] * self.freqs[None]
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


class ToyModels(RolePhases, DistillationModels):
    """Teacher, student, critic and discriminator of the 2-D testbed (see the module docstring).

    Args:
        teacher (`GaussianMixture`): the exact teacher ``p_0``.
        path (`NoisePath`): the noise path (``VPPath.from_betas()`` or ``FlowPath()``).
        prediction_type (`str`, *optional*): the teacher's and critic's native prediction; ε on VP, the flow
            velocity on flow paths by default.
        student_prediction_type (`str`, defaults to ``"sample"``): what the student MLP outputs.
        hidden (`int`, defaults to 256), depth (`int`, defaults to 3): width and number of hidden layers of every MLP.
        critic_hidden (`int`, *optional*), critic_depth (`int`, *optional*): the critic's, if different.
        discriminator_trunk (`str` or `None`): ``"teacher"`` (features = ``x_t``, f-distill), ``"critic"`` (features =
            the critic's last hidden layer, DMD2) or ``None`` (no discriminator). Pass
            the resolved method config's ``discriminator_trunk`` when the method uses one.
        ratio (`str`, defaults to ``"learned"``): ``"learned"`` or ``"oracle"`` (the discriminator returns the exact
            ``log p_t − log q̂_t``; teacher trunk only).
        fake_score (`str`, defaults to ``"learned"``): ``"learned"`` or ``"oracle"`` (the critic returns the
            posterior mean of the noised student bank).
        oracle_bank (`int`, defaults to 2048): student samples drawn afresh for every oracle call.
        student_time (`float`, *optional*): the one-step student's time, used to draw the oracle bank
            (default: ``path.t_max``).
        seed (`int`, defaults to 0): initialises the networks and the oracle bank's generator.
    """

    def __init__(
        self,
        teacher: GaussianMixture,
        path: param.NoisePath,
        prediction_type: Optional[str] = None,
        student_prediction_type: str = "sample",
        hidden: int = 256,
        depth: int = 3,
        critic_hidden: Optional[int] = None,
        critic_depth: Optional[int] = None,
        discriminator_trunk: Optional[str] = "teacher",
        ratio: str = "learned",
        fake_score: str = "learned",
        oracle_bank: int = 2048,
        student_time: Optional[float] = None,
        critic_output: str = "x0",
        seed: int = 0,
    ):
        if ratio not in ("learned", "oracle") or fake_score not in ("learned", "oracle"):
            raise ValueError(f"ratio and fake_score must be 'learned' or 'oracle', got {ratio!r} and {fake_score!r}.")
        if discriminator_trunk not in (None, "teacher", "critic"):
            raise ValueError(f"discriminator_trunk must be None, 'teacher' or 'critic', got {discriminator_trunk!r}.")
        if ratio == "oracle" and discriminator_trunk != "teacher":
            raise ValueError("The oracle ratio reads x_t from the teacher trunk: use discriminator_trunk='teacher'.")
        if fake_score == "oracle" and discriminator_trunk == "critic":
            raise ValueError("An oracle fake score has no hidden features for a critic-trunk discriminator.")
        self.gmm = teacher
        self.path = path
        self.prediction_type = param.check_prediction_type(
            prediction_type or ("flow_prediction" if path.kind == "flow" else "epsilon")
        )
        self.student_prediction_type = param.check_prediction_type(student_prediction_type)
        self.dim = teacher.dim
        # Input scaling (EDM's c_in): x_t / sqrt(α² s² + σ²) has about unit variance at every t.
        self.data_var = float(torch.diagonal(teacher.covariance()).mean())
        self.discriminator_trunk = discriminator_trunk
        self.ratio_mode, self.fake_mode = ratio, fake_score
        if critic_output not in ("native", "x0"):
            raise ValueError(f"critic_output must be 'native' or 'x0', got {critic_output!r}.")
        self.critic_output = critic_output
        self.oracle_bank = int(oracle_bank)
        self.student_time = float(path.t_max if student_time is None else student_time)

        torch.manual_seed(seed)
        emb = 32
        self.student_net = nn.ModuleDict(
            {"emb": TimeEmbedding(path, emb), "mlp": _mlp(self.dim + emb, hidden, depth, self.dim)}
        )
        c_hidden, c_depth = critic_hidden or hidden, critic_depth or depth
        self.critic_net = nn.ModuleDict(
            {
                "emb": TimeEmbedding(path, emb),
                "trunk": _mlp(self.dim + emb, c_hidden, c_depth - 1, c_hidden),
                "out": nn.Sequential(nn.SiLU(), nn.Linear(c_hidden, self.dim)),
            }
        )
        self.discriminator_net: Optional[nn.ModuleDict] = None
        if discriminator_trunk is not None and ratio == "learned":
            features = self.dim if discriminator_trunk == "teacher" else c_hidden
            self.discriminator_net = nn.ModuleDict(
                {"emb": TimeEmbedding(path, emb), "mlp": _mlp(features + emb, hidden, depth, 1)}
            )
        self._bank_generator = torch.Generator().manual_seed(seed + 7919)
        self._apply_requires_grad()

    # -- parameters (phases: distill.models.RolePhases, as roles.BackboneRoles) ------------------------------------

    def trainable_modules(self) -> Dict[str, nn.Module]:
        modules: Dict[str, nn.Module] = {"student_net": self.student_net, "critic_net": self.critic_net}
        if self.discriminator_net is not None:
            modules["discriminator_net"] = self.discriminator_net
        return modules

    def named_role_parameters(self, role: str) -> Iterator[Tuple[str, nn.Parameter]]:
        """``(name, parameter)`` of a trainable role; the critic's include the discriminator."""
        check_trainable_role(role)
        names = ["student_net"] if role == "student" else ["critic_net", "discriminator_net"]
        for module_name in names:
            module = getattr(self, module_name)
            if module is None:
                continue
            for name, parameter in module.named_parameters():
                yield f"{module_name}.{name}", parameter

    @contextlib.contextmanager
    def input_grad_pass(self, role: str):
        """A pass through a frozen role differentiated w.r.t. its input: the role's parameters must not require
        grad (nothing to switch off here -- no adapters or gradient checkpointing)."""
        if role in TRAINABLE_ROLES and role == self._phase:
            raise RuntimeError(f"input_grad_pass({role!r}) inside the {role} phase: that role is not frozen.")
        yield

    # -- helpers ---------------------------------------------------------------------------------------------------

    def _times(self, t, like: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, device=like.device)
        return t.expand(like.shape[0]) if t.ndim == 0 else t

    def _c_in(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self.path.alpha_sigma(t.to(torch.float64), device=like.device)
        return (1.0 / torch.sqrt(alpha**2 * self.data_var + sigma**2)).to(like.dtype)[:, None]

    @staticmethod
    def _check_condition(condition) -> None:
        if condition is not None:
            raise ValueError("ToyModels teachers are unconditional: pass condition=None.")

    @torch.no_grad()
    def student_bank(self, n: Optional[int] = None) -> torch.Tensor:
        """``n`` fresh one-step student samples (no grad), as used by the oracles."""
        n = n or self.oracle_bank
        z = torch.randn(n, self.dim, generator=self._bank_generator)
        t = torch.full((n,), self.student_time, dtype=torch.float64)
        pred = self._student_forward(z, t)
        return param.to_x0(pred, z, t, self.path, self.student_prediction_type)

    def _bank_logits(self, x_t: torch.Tensor, t: torch.Tensor, bank: torch.Tensor):
        """``log N(x_t; α_t x_j, σ_t² I)`` for every bank sample ``j``: ``[B, M]`` float64."""
        alpha, sigma = self.path.alpha_sigma(t.to(torch.float64), device=x_t.device)
        diff = x_t.to(torch.float64)[:, None, :] - alpha[:, None, None] * bank.to(torch.float64)[None]
        var = (sigma**2)[:, None]
        return -0.5 * (diff**2).sum(-1) / var - 0.5 * self.dim * torch.log(2 * math.pi * var)

    def oracle_log_ratio(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``log p_t(x_t) − log q̂_t(x_t)``: exact teacher, noised empirical student (differentiable in ``x_t``)."""
        bank = self.student_bank()
        log_q = torch.logsumexp(self._bank_logits(x_t, t, bank), dim=1) - math.log(bank.shape[0])
        log_p = self.gmm.noisy_log_prob(x_t.to(torch.float64), t.to(torch.float64), self.path)
        return (log_p - log_q).to(x_t.dtype)

    @torch.no_grad()
    def oracle_fake_prediction(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The native prediction of the ideal denoiser of the noised student bank."""
        bank = self.student_bank()
        weights = torch.softmax(self._bank_logits(x_t, t, bank), dim=1)
        x0 = (weights @ bank.to(torch.float64)).to(x_t.dtype)
        eps = param.to_epsilon(x0, x_t, t, self.path, "sample")
        return param.from_x0_and_epsilon(x0, eps, t, self.path, self.prediction_type)

    def _student_forward(self, x_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = torch.cat([x_in.to(torch.float32), self.student_net["emb"](t)], dim=1)
        # Scaled by the data std so that the initial output has about the teacher's spread order.
        return self.student_net["mlp"](h) * math.sqrt(self.data_var)

    # -- DistillationModels ----------------------------------------------------------------------------------------

    def teacher(self, x_t, t, condition, *, guidance=None, return_features=False):
        self._check_condition(condition)
        t = self._times(t, x_t)
        # The analytic teacher has no parameters; its output keeps a graph to x_t where the caller differentiates
        # the frozen teacher w.r.t. its input (SiD, SIM).
        pred = self.gmm.prediction(x_t, t, self.path, self.prediction_type)
        if return_features:
            return pred, x_t  # the trunk features of an analytic teacher: its input
        return pred

    def critic(self, x_t, t, condition, *, return_features=False):
        self._check_condition(condition)
        t = self._times(t, x_t)
        if self.fake_mode == "oracle":
            pred = self.oracle_fake_prediction(x_t, t)
            return (pred, None) if return_features else pred
        h = torch.cat([x_t.to(torch.float32) * self._c_in(t, x_t), self.critic_net["emb"](t)], dim=1)
        features = self.critic_net["trunk"](h)
        out = self.critic_net["out"](features)
        if self.critic_output == "native":
            pred = out
        else:
            # EDM-style preconditioning: x̂0 = c_skip x_t + c_out F, exact for Gaussian data of the teacher's
            # variance s², then the native prediction of that x̂0 (the loss stays the method's native DSM).
            alpha, sigma = self.path.alpha_sigma(t.to(torch.float64), device=x_t.device)
            alpha, sigma = alpha[:, None], sigma[:, None]
            norm = alpha**2 * self.data_var + sigma**2
            c_skip, c_out = alpha * self.data_var / norm, math.sqrt(self.data_var) * sigma / norm.sqrt()
            x0 = (c_skip * x_t.to(torch.float64) + c_out * out.to(torch.float64)).to(out.dtype)
            eps = param.to_epsilon(x0, x_t, t, self.path, "sample")
            pred = param.from_x0_and_epsilon(x0, eps, t, self.path, self.prediction_type)
        return (pred, features) if return_features else pred

    def student(self, x_t, t, condition):
        self._check_condition(condition)
        return self._student_forward(x_t, self._times(t, x_t))

    def discriminator(self, features: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = self._times(t, features)
        if self.ratio_mode == "oracle":
            return self.oracle_log_ratio(features, t)
        if self.discriminator_net is None:
            raise RuntimeError("These ToyModels were built without a discriminator (discriminator_trunk=None).")
        if self.discriminator_trunk == "teacher":
            features = features.to(torch.float32) * self._c_in(t, features)
        h = torch.cat([features.to(torch.float32), self.discriminator_net["emb"](t)], dim=1)
        return self.discriminator_net["mlp"](h).squeeze(-1)

    def unconditional(self, condition):
        self._check_condition(condition)
        return None

    def concat(self, conditions: Sequence[Any]):
        for condition in conditions:
            self._check_condition(condition)
        return None


# ----------------------------------------------------------------------------------------------------------------
# metrics (modes covered and high-quality fraction as in VEEGAN / PacGAN; per-mode mass; energy distance)
# ----------------------------------------------------------------------------------------------------------------


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """The squared energy distance ``2 E|X − Y| − E|X − X'| − E|Y − Y'|`` (U-statistics for the within terms)."""
    x, y = x.to(torch.float64), y.to(torch.float64)
    n, m = x.shape[0], y.shape[0]
    xy = torch.cdist(x, y).mean()
    xx = torch.cdist(x, x).sum() / (n * (n - 1))
    yy = torch.cdist(y, y).sum() / (m * (m - 1))
    return float(2 * xy - xx - yy)


def mixture_metrics(
    teacher: GaussianMixture,
    samples: torch.Tensor,
    reference: Optional[torch.Tensor] = None,
    radius: float = 3.0,
    min_share: float = 0.5,
) -> Dict[str, Any]:
    """Score student samples against the mixture.

    * ``modes``: components ``k`` whose ``radius``-σ ball holds at least ``min_share · π_k`` of *all* samples (half
      the mode's fair share by default: 6.25 % for ring-8, 2 % for grid-25, 5 % for the 0.1 mode of the pair), and
      ``modes_lenient`` with a fifth of it. With wide modes a space-filling student that learned no modes passes the
      lenient count (with std 0.2, a uniform fill of the bounding box puts 4.2 % into each ring-8 ball and 1.3 % into
      each grid-25 ball) but not the default one.
    * ``high_quality``: the fraction of samples within ``radius`` σ of some mean.
    * ``mode_mass``: the fraction of samples nearest to each mean (Voronoi cells; sums to 1), and
      ``mode_mass_hq``: the fraction within each mode's ball among the high-quality samples.
    * ``mass_tv``: total variation between ``mode_mass`` and ``π``.
    * ``energy``: squared energy distance to ``reference`` teacher samples (if given).
    """
    x = samples.detach().to(torch.float64)
    dist = torch.cdist(x, teacher.means)  # [n, K]
    inside = dist <= radius * teacher.stds[None]
    per_mode = inside.double().mean(0)
    hq = inside.any(1)
    voronoi = torch.bincount(dist.argmin(1), minlength=teacher.num_components).double() / x.shape[0]
    hq_mass = inside[hq].double().mean(0) if bool(hq.any()) else torch.zeros(teacher.num_components)
    out = {
        "modes": int((per_mode >= min_share * teacher.weights).sum()),
        "modes_lenient": int((per_mode >= 0.2 * teacher.weights).sum()),
        "num_modes": teacher.num_components,
        "high_quality": float(hq.double().mean()),
        "mode_mass": voronoi.tolist(),
        "mode_mass_hq": hq_mass.tolist(),
        "mass_tv": float(0.5 * (voronoi - teacher.weights).abs().sum()),
    }
    if reference is not None:
        out["energy"] = energy_distance(x, reference)
    return out


# ----------------------------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class ToyResult:
    samples: torch.Tensor
    metrics: Dict[str, Any]
    seconds: float
    history: List[Dict[str, Any]] = field(default_factory=list)
    last_logs: Dict[str, float] = field(default_factory=dict)
    models: Optional["ToyModels"] = None
    method: Any = None


def train_toy(
    teacher: GaussianMixture,
    path: param.NoisePath,
    method_config: MethodConfig,
    student_steps: int = 2000,
    batch_size: int = 256,
    lr: float = 1e-3,
    critic_lr: Optional[float] = None,
    betas: Tuple[float, float] = (0.0, 0.999),
    critic_warmup: int = 200,
    max_grad_norm: float = 10.0,
    hidden: int = 256,
    depth: int = 3,
    critic_hidden: Optional[int] = None,
    critic_depth: Optional[int] = None,
    ratio: str = "learned",
    fake_score: str = "learned",
    prediction_type: Optional[str] = None,
    critic_output: str = "x0",
    seed: int = 0,
    eval_samples: int = 4000,
    eval_every: int = 0,
    callback: Optional[Callable[[int, Dict[str, Any]], None]] = None,
    init_student: Optional[Callable[["ToyModels"], None]] = None,
    lr_decay: bool = False,
) -> ToyResult:
    """Distil ``teacher`` into an MLP student with ``build_method(method_config, ToyModels(...), [t_max])``.

    The schedule is the trainer's, :func:`~diffusers_onestep.distill.models.roles_to_update` (DMD2's two time-scale
    update rule, arXiv 2405.14867): every iteration updates the critic (+ discriminator); iterations ``i`` with
    ``i % critic_updates_per_student == 0`` first update the student. Real samples for the discriminator are exact
    teacher samples (``Batch.real``). ``init_student(models)``, if given, runs before the warm-up (e.g. to start
    from a mode-dropped student).

    One update follows the trainer's rule: a fresh batch, the method's step inside the role's phase, a non-finite
    loss or gradient norm stops the run (``FloatingPointError``; the trainer's ``--on_nonfinite stop``), backward,
    the role's gradients clipped to ``max_grad_norm``, its optimizer's step, then both optimizers' gradients are
    zeroed and the phase ends. Where it differs from the trainer, on purpose:

    * a role with nothing to train -- no optimizer, or a loss that does not require grad (``fake_score="oracle"``
      without a discriminator) -- skips backward and the step; the trainer's roles always have parameters;
    * ``student_steps`` counts student updates and the run stops after the iteration that made the last one (so
      ``(student_steps − 1) · critic_updates_per_student + 1`` iterations), where the trainer counts iterations;
    * ``critic_warmup`` critic-only updates come first (the MLP critic starts from scratch, unlike a LoRA critic that
      starts at the teacher);
    * one Adam per role without weight decay, and ``lr_decay`` decays both learning rates linearly to 0 over the
      student steps (after the warm-up) instead of a per-role LR scheduler.

    These keep the committed ``benchmarks/results/gmm`` numbers reproducible.
    """
    config = resolve_method_config(method_config, TOY_TRAINING_DEFAULTS)
    student_time = float(path.t_max)
    trunk = config.discriminator_trunk if config.uses_discriminator else None
    models = ToyModels(
        teacher,
        path,
        prediction_type=prediction_type,
        hidden=hidden,
        depth=depth,
        critic_hidden=critic_hidden,
        critic_depth=critic_depth,
        discriminator_trunk=trunk,
        ratio=ratio,
        fake_score=fake_score,
        student_time=student_time,
        critic_output=critic_output,
        seed=seed,
    )
    method = build_method(config, models, [student_time])
    if init_student is not None:
        init_student(models)
    optimizers = {
        "student": torch.optim.Adam(models.role_parameters("student"), lr=lr, betas=betas),
    }
    critic_params = models.role_parameters("critic")
    if fake_score == "oracle":
        critic_params = [p for n, p in models.named_role_parameters("critic") if not n.startswith("critic_net.")]
    optimizers["critic"] = torch.optim.Adam(critic_params, lr=critic_lr or lr, betas=betas) if critic_params else None

    rng = RandomSource.from_seed(seed)
    data = torch.Generator().manual_seed(seed + 1)

    def batch() -> Batch:
        noise = torch.randn(batch_size, teacher.dim, generator=data)
        real = teacher.sample(batch_size, generator=data, dtype=torch.float32) if config.uses_discriminator else None
        return Batch(condition=None, noise=noise, real=real)

    def update(role: str) -> Dict[str, float]:
        step_fn = method.student_step if role == "student" else method.critic_step
        try:
            loss, logs = step_fn(batch(), rng)
            if not bool(torch.isfinite(loss.detach()).all()):
                raise FloatingPointError(f"Non-finite {role} loss: {logs}")
            optimizer = optimizers[role]
            if optimizer is not None and loss.requires_grad:
                loss.backward()
                grad_norm = float(torch.nn.utils.clip_grad_norm_(models.role_parameters(role), max_grad_norm))
                if not math.isfinite(grad_norm):
                    raise FloatingPointError(f"Non-finite {role} gradient norm: {logs}")
                optimizer.step()
        finally:
            for opt in optimizers.values():
                if opt is not None:
                    opt.zero_grad(set_to_none=True)
            models.end_phase()
        return logs

    reference = teacher.sample(eval_samples, generator=torch.Generator().manual_seed(10_000 + seed))
    history: List[Dict[str, Any]] = []

    def evaluate(step: int) -> Dict[str, Any]:
        samples = models.student_bank(eval_samples)
        metrics = mixture_metrics(teacher, samples, reference)
        history.append(
            {
                "student_step": step,
                **{k: metrics[k] for k in ("modes", "high_quality", "energy")},
                "mode_mass": metrics["mode_mass"],
            }
        )
        if callback is not None:
            callback(step, metrics)
        return metrics

    started = time.perf_counter()
    for _ in range(critic_warmup):
        update("critic")
    logs: Dict[str, float] = {}
    done = 0
    iteration = 0
    while done < student_steps:
        for role in roles_to_update(iteration, config.critic_updates_per_student):
            logs.update(update(role))
            if role == "student":
                done += 1
                if eval_every and done % eval_every == 0 and done < student_steps:
                    evaluate(done)
        iteration += 1
        if lr_decay:
            for opt in optimizers.values():
                for group in opt.param_groups if opt is not None else []:
                    group.setdefault("initial_lr", group["lr"])
                    group["lr"] = group["initial_lr"] * max(0.0, 1.0 - done / student_steps)
    seconds = time.perf_counter() - started
    samples = models.student_bank(eval_samples)
    metrics = mixture_metrics(teacher, samples, reference)
    history.append(
        {
            "student_step": done,
            **{k_: metrics[k_] for k_ in ("modes", "high_quality", "energy")},
            "mode_mass": metrics["mode_mass"],
        }
    )
    return ToyResult(
        samples=samples,
        metrics=metrics,
        seconds=seconds,
        history=history,
        last_logs=logs,
        models=models,
        method=method,
    )
