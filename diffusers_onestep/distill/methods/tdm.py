"""TDM: trajectory distribution matching for few-step students (Luo et al., "Learning Few-Step Diffusion Models by
Trajectory Distribution Matching", ICCV 2025, arXiv 2503.06674; released code ``train_tdm_demo.py``).

A ``K``-step student (2-8 conditioning timesteps ``T_1 > ... > T_K``) samples deterministically: at each ``T_k`` it
predicts ``(x̂0, ε̂)`` and re-noises ``x̂0`` with its own ``ε̂`` to ``T_{k+1}`` (DDIM with eta 0), which is
:class:`~diffusers_onestep.OneStepScheduler`'s ``solver="ode"`` -- the solver the exported student's scheduler
config names, so ``OneStepPipeline`` samples exactly the trajectory the student was trained on (tested ≤ 1e-5).

Each step (student and fake alike) rolls the current student's trajectory from noise without gradient, picks a
segment ``k`` per sample, and has the student predict ``(x̂0, ε̂)`` at the trajectory state ``x_{T_k}``. The segment
``k`` covers ``[T_{k+1}, T_k]`` (``T_{K+1}`` = the path's clean end): ``x̂0`` is re-noised deterministically with
``ε̂`` to the lower edge ``t_mid = T_{k+1}`` (``tdm_random_mid``: a random time inside the segment), then moved by a
stochastic forward transition to ``t ~ U[max(t_lo, t_mid), T_k − t_hi)`` (TDM's ``--use_separate``: segments do not
share noise levels), where ``x_t = (α_t/α_mid) x_mid + √(σ_t² − (α_t σ_mid/α_mid)²) n``.

Noise-path terms: everything is written in the path's own ``(α_t, σ_t)`` (:mod:`diffusers_onestep.parameterization`),
so VP (SD/SDXL/PixArt: ``t`` = DDPM step index), flow (SANA/SD3/FLUX: ``t`` = σ) and TrigFlow paths run the same
code. The demo's margins, ``t_lo = 20`` and ``t_hi = 10`` steps of a 1000-step VP schedule, are kept as fractions of
the path's span -- 2 % and 1 % of ``num_train_timesteps`` on VP (20 and 10 steps exactly, integer times drawn as the
demo's ``randint``), of ``[0, 1]`` on flow (0.02 and 0.01 in σ) and of ``[0, π/2]`` on TrigFlow. The demo's grid
(``total_steps = 900``: ``T_k`` = 899, 674, 449, 224, lower edges ``T_k − 224``) is PixArt's default here; its lower
edge is one DDPM step above ``T_{k+1}``, ours is ``T_{k+1}`` itself, the state the student's next step starts from.

Generator loss (:func:`~..losses.tdm_generator_loss`): pseudo-Huber (``c = 1e-3``) between ``x̂0`` and
``x* = x̂0 + (x̂_teacher,cfg − x̂_fake)``, divided by ``W = mean|x̂0 − x̂_teacher,cfg|``; fake unguided. Fake loss
(:func:`~..losses.tdm_fake_loss`): x0-MSE weighted by ``min(SNR_t, 5)`` and the importance weight
(:func:`~..losses.tdm_importance_weight`). One fake update per generator update (1:1).

Unlike the demo, which rolls one trajectory per iteration for both updates, each update here rolls its own with the
current student (the student updates first in this trainer, so the fake sees the updated student's samples).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch

from ... import parameterization as param
from .. import losses
from ..config import ConfigError, MethodConfig
from ..models import Batch, DistillationModels, RandomSource
from .base import DistillationMethod, GeneratorTerms, Logs, register_method


#: the lower margin of the noise times and the top margin below a segment's upper edge, as fractions of the path's
#: span (``train_tdm_demo.py``: ``max(20, t_mid)`` and ``T_k − 10`` of 1000 DDPM steps)
LOW_MARGIN = 0.02
HIGH_MARGIN = 0.01
#: ``tdm_random_mid``: the random lower edge stays this far below ``T_k`` (the demo's ``randint(t_mid, T_k − 20)``)
RANDOM_MID_MARGIN = 0.02


@dataclass
class SegmentDraw:
    """What one TDM step drew and computed for its batch (all times natural path times ``[B]``).

    Attributes:
        segment: the segment index ``k`` (0-based: ``T_{k}`` is the student's conditioning time) per sample.
        t_student: ``T_k``; t_mid: the deterministic re-noising time; t: the noise time of ``x_t``.
        x0: the student's ``x̂0`` at the trajectory state (with graph inside a student phase); eps: its ``ε̂``.
        x_t: ``x̂0`` re-noised to ``t_mid`` with ``ε̂``, then forward to ``t`` with ``fresh_noise``.
        mixed_noise: the total noise of ``x_t`` about ``α_t x̂0``, ``(x_t − α_t x̂0)/σ_t``.
    """

    segment: torch.Tensor
    t_student: torch.Tensor
    t_mid: torch.Tensor
    t: torch.Tensor
    x0: torch.Tensor
    eps: torch.Tensor
    x_t: torch.Tensor
    fresh_noise: torch.Tensor
    mixed_noise: torch.Tensor


def path_span(path: param.NoisePath) -> float:
    """The length of the path's time axis the margins are fractions of: ``num_train_timesteps`` on VP (its times are
    step indices, so 2 % is 20 steps of 1000), ``t_max − t_min`` elsewhere."""
    if path.kind == "vp":
        return float(path.num_train_timesteps)
    return float(path.t_max - path.t_min)


@register_method
class TDM(DistillationMethod):
    """Trajectory distribution matching for a ``K``-step student (module docstring)."""

    name = "tdm"
    description = (
        "TDM: trajectory distribution matching for 2-8 step students (LoRA by default), each step matched on the "
        "student's own deterministic trajectory; samples with OneStepScheduler's ode solver"
    )
    reference = "Luo et al. 2025 (TDM, ICCV 2025, arXiv 2503.06674; train_tdm_demo.py)"
    tags = ("tdm", "trajectory-distribution-matching", "few-step")
    divergence_label = "trajectory reverse KL"
    default_divergence = None
    divergences = ()
    settings = ("tdm_loss", "tdm_huber_c", "tdm_random_mid")
    #: how the exported scheduler moves between conditioning timesteps: the deterministic rollout trained on
    sampler_solver = "ode"
    #: ``train_tdm_demo.py``'s optimizer: Adam β = (0, 0.95), weight decay 1e-2 (the generic default), fake lr 2e-5
    #: and generator lr 2e-5 / 5 (full PixArt fine-tuning; the LoRA releases do not state theirs)
    optimizer_defaults = {"learning_rate": 4e-6, "critic_learning_rate": 2e-5, "adam_beta1": 0.0, "adam_beta2": 0.95}
    critic_learning_rate_ratio = 5.0
    default_guidance_scale = 4.5
    min_steps, max_steps = 2, 8

    @classmethod
    def accepts_divergence(cls, divergence: str) -> bool:
        return False

    @classmethod
    def resolve_config(cls, config: MethodConfig, defaults, has_real_images: bool) -> MethodConfig:
        config = copy.deepcopy(config)
        if config.divergence is not None:
            raise ConfigError(
                "The tdm method matches trajectory distributions, not an f-divergence; drop --divergence."
            )
        if config.gan_weight:
            raise ConfigError("The tdm method trains no discriminator; drop --gan_weight.")
        config.gan_weight = 0.0
        if config.guidance_range is not None:
            raise ConfigError("The tdm method takes a fixed --guidance_scale, not --guidance_range.")
        if config.student_timesteps is None:
            raise ConfigError(
                f"The tdm method trains a {cls.min_steps}-{cls.max_steps} step student and this family records no "
                "TDM timesteps; pass --student_timesteps with 2 to 8 decreasing values, e.g. 899 674 449 224 (TDM's "
                "4-step grid on a 1000-step VP teacher) or 0.9 0.675 0.45 0.225 (the same grid in flow sigmas)."
            )
        if not cls.min_steps <= len(config.student_timesteps) <= cls.max_steps:
            raise ConfigError(
                f"The tdm method trains a {cls.min_steps}-{cls.max_steps} step student, got "
                f"{len(config.student_timesteps)} --student_timesteps {list(config.student_timesteps)}; give 2 to 8 "
                "decreasing values or pick another --method."
            )
        if not config.backward_simulation:
            raise ConfigError(
                "The tdm method always trains on the student's own trajectory; drop --no_backward_simulation."
            )
        if config.critic_updates_per_student is None:
            config.critic_updates_per_student = 1  # TDM: one fake update per generator update
        if config.guidance_scale is None:
            config.guidance_scale = cls.default_guidance_scale
        if config.tdm_loss is None:
            config.tdm_loss = "pseudo_huber"
        if config.tdm_huber_c is None:
            config.tdm_huber_c = 1e-3
        if config.tdm_random_mid is None:
            config.tdm_random_mid = False
        config = super().resolve_config(config, defaults, has_real_images)
        config.divergence = None
        return config

    def __init__(self, config: MethodConfig, models: DistillationModels, student_timesteps: Sequence[float]):
        super().__init__(config, models, student_timesteps)
        times = self.student_timesteps
        if not self.min_steps <= len(times) <= self.max_steps:
            raise ValueError(f"TDM trains a 2-8 step student, got student timesteps {times}.")
        span = path_span(self.path)
        self.low_margin, self.high_margin = LOW_MARGIN * span, HIGH_MARGIN * span
        self.random_mid_margin = RANDOM_MID_MARGIN * span
        #: each segment's upper edge (the student's conditioning time) and lower edge (the next one, or clean)
        self.upper: List[float] = list(times)
        self.lower: List[float] = list(times[1:]) + [float(self.path.t_min)]
        for upper, lower in zip(self.upper, self.lower):
            if upper - self.high_margin <= max(self.low_margin, lower):
                raise ValueError(
                    f"The TDM segment [{lower:g}, {upper:g}] leaves no noise times between max({self.low_margin:g}, "
                    f"{lower:g}) and {upper:g} - {self.high_margin:g}; space the student timesteps {times} further "
                    "apart."
                )

    # ------------------------------------------------------------------------------------------------------------
    # the trajectory
    # ------------------------------------------------------------------------------------------------------------

    def _student_x0_eps(self, x_in: torch.Tensor, t: torch.Tensor, condition) -> Tuple[torch.Tensor, torch.Tensor]:
        pred = self.models.student(x_in, t, condition)
        return param.to_x0_and_epsilon(pred, x_in, t, self.path, self.models.student_prediction_type)

    @torch.no_grad()
    def rollout(self, noise: torch.Tensor, condition, steps: int) -> List[torch.Tensor]:
        """The student's deterministic trajectory from ``noise``: states ``[x_{T_1} = noise, ..., x_{T_{steps+1}}]``,
        each ``x_{T_{k+1}} = α x̂0 + σ ε̂`` of the student's prediction at ``x_{T_k}`` -- what
        ``OneStepScheduler(solver="ode")`` does between steps (the last entry is ``x̂0`` when ``steps`` is ``K``)."""
        states = [noise]
        x = noise
        for k in range(steps):
            x0, eps = self._student_x0_eps(x, self._full_time(self.upper[k], x), condition)
            if k + 1 < len(self.upper):
                x = param.add_noise(x0, eps, self._full_time(self.upper[k + 1], x), self.path)
            else:
                x = x0
            states.append(x)
        return states

    def _uniform(self, rng: RandomSource, batch_size: int, device) -> torch.Tensor:
        """``u ~ U[0, 1)`` per sample of the global batch, sliced to this process (float64)."""
        full = torch.rand(batch_size * rng.world_size, generator=rng.generator, dtype=torch.float64)
        return rng._slice(full, batch_size).to(device)

    def _between(self, lo: torch.Tensor, hi: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """A time uniform in ``[lo, hi)``: integer steps on VP (the demo's ``randint(lo, hi)``), continuous else."""
        if self.path.kind == "vp":
            lo, hi = torch.ceil(lo), torch.ceil(hi)
            return torch.minimum(lo + torch.floor(u * (hi - lo)), hi - 1)
        return lo + u * (hi - lo)

    def draw(self, batch: Batch, rng: RandomSource, with_grad: bool) -> SegmentDraw:
        """Roll the trajectory, pick segments, predict ``(x̂0, ε̂)`` at the states and noise them to ``x_t``."""
        noise = batch.noise
        n, device = noise.shape[0], noise.device
        K = len(self.upper)
        # segments for the global batch: every process rolls as deep as the deepest sample of any process, so all
        # make the same number of student passes (FSDP gathers parameters in each)
        full = (torch.rand(n * rng.world_size, generator=rng.generator, dtype=torch.float64) * K).long()
        full = full.clamp(max=K - 1)
        segment = rng._slice(full, n).to(device)
        states = self.rollout(noise, batch.condition, int(full.max()))
        index = segment.view(-1, *([1] * (noise.ndim - 1))).expand_as(noise)
        x_in = torch.stack(states).gather(0, index.unsqueeze(0)).squeeze(0)
        upper = torch.tensor(self.upper, dtype=torch.float64, device=device)[segment]
        lower = torch.tensor(self.lower, dtype=torch.float64, device=device)[segment]
        t_mid = lower
        if self.config.tdm_random_mid:
            t_mid = self._between(lower, upper - self.random_mid_margin, self._uniform(rng, n, device))
        t = self._between(
            torch.clamp(t_mid, min=self.low_margin), upper - self.high_margin, self._uniform(rng, n, device)
        )
        fresh = rng.randn(noise.shape, dtype=noise.dtype).to(device)

        with torch.set_grad_enabled(with_grad and torch.is_grad_enabled()):
            x0, eps = self._student_x0_eps(x_in, upper, batch.condition)
        with torch.no_grad():
            eps = eps.detach()
            x_mid = param.add_noise(x0.detach(), eps, t_mid, self.path)
            x_t = param.forward_transition(x_mid, fresh, t_mid, t, self.path)
            scale, std = param.forward_transition_coefficients(t_mid, t, self.path, device=device)
            _, sigma_mid = self.path.alpha_sigma(t_mid, device=device)
            _, sigma_t = self.path.alpha_sigma(t, device=device)
            shape = (-1,) + (1,) * (noise.ndim - 1)
            mixed = (
                (scale * sigma_mid).view(shape) * eps.to(scale.dtype) + std.view(shape) * fresh.to(scale.dtype)
            ) / sigma_t.view(shape)
        return SegmentDraw(
            segment=segment,
            t_student=upper,
            t_mid=t_mid,
            t=t,
            x0=x0,
            eps=eps,
            x_t=x_t,
            fresh_noise=fresh,
            mixed_noise=mixed.to(noise.dtype),
        )

    # ------------------------------------------------------------------------------------------------------------
    # the two steps
    # ------------------------------------------------------------------------------------------------------------

    def generator_loss(self, terms: GeneratorTerms) -> Tuple[torch.Tensor, Logs]:
        huber_c = self.config.tdm_huber_c if self.config.tdm_loss == "pseudo_huber" else None
        loss, logs = losses.tdm_generator_loss(terms.x, terms.x0_real, terms.x0_fake, huber_c=huber_c)
        loss = self.config.dm_weight * loss
        return loss, dict(logs, dm_loss=float(loss.detach()))

    def student_step(self, batch: Batch, rng: RandomSource) -> Tuple[torch.Tensor, Logs]:
        models = self.models
        with models.train_phase("student"):
            drawn = self.draw(batch, rng, with_grad=True)
            guidance = self.sample_guidance(drawn.x_t, rng)
            x0_real, _ = self._teacher_x0(drawn.x_t, drawn.t, batch.condition, rng, guidance=guidance)
            x0_fake, _ = self._critic_x0(drawn.x_t, drawn.t, batch.condition)
            terms = GeneratorTerms(
                x=drawn.x0,
                x_t=drawn.x_t,
                t=drawn.t,
                noise=drawn.fresh_noise,
                x0_real=x0_real,
                x0_fake=x0_fake,
                logits=None,
                batch=batch,
                simulated_steps=int(drawn.segment.max()),
            )
            loss, term_logs = self.generator_loss(terms)
            logs: Dict[str, float] = {f"student/{name}": value for name, value in term_logs.items()}
            logs["student/loss"] = float(loss.detach())
            logs["student/simulated_steps"] = float(drawn.segment.float().mean())
        return loss, logs

    def critic_step(self, batch: Batch, rng: RandomSource) -> Tuple[torch.Tensor, Logs]:
        models = self.models
        with models.train_phase("critic"):
            drawn = self.draw(batch, rng, with_grad=False)
            pred = models.critic(drawn.x_t, drawn.t, batch.condition)
            x0_fake = param.to_x0(pred, drawn.x_t, drawn.t, self.path, models.prediction_type)
            snr = param.signal_to_noise(drawn.t, self.path, device=drawn.t.device)
            weight = losses.tdm_importance_weight(drawn.mixed_noise, drawn.fresh_noise)
            loss, term_logs = losses.tdm_fake_loss(x0_fake, drawn.x0.detach(), snr, weight)
            logs = {f"critic/{name}": value for name, value in term_logs.items()}
            logs["critic/fake_loss"] = float(loss.detach())
            logs["critic/loss"] = logs["critic/fake_loss"]
        return loss, logs
