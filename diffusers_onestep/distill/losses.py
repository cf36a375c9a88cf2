"""The distillation losses as small pure functions (DMD, Yin et al. 2024; DMD2, Yin et al. 2024b; SNOOPI, arXiv 2412.02687; f-distill, Xu et al. 2025).

Nothing here knows which backbone produced its inputs: the losses take clean-sample (``x0``) estimates, logits and
per-sample weights. Prediction-type conversions go through :mod:`diffusers_onestep.parameterization` only. Weights
(the DMD normalizer, density ratios, ``h(r)``) are computed in float32 under ``torch.no_grad()``.

A generator step of DMD / f-distill composes them as::

    x = student(z)                                                 # x0 space, with grad
    x_t = parameterization.add_noise(x.detach(), eps, t, path)
    x0_real = to_x0(classifier_free_guidance(teacher_u, teacher_c, w), x_t, t, path, teacher_type)
    x0_fake = to_x0(fake(x_t, t), x_t, t, path, fake_type)
    ratio = normalizer(density_ratio(logits), t)                   # f-distill only
    loss, log = vsd_generator_loss(x, x0_real, x0_fake, weight=f_divergence_weight(ratio, divergence))
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import parameterization
from .config import SIM_DISTANCES
from .divergences import Divergence, get_divergence


__all__ = [
    "RatioNormalizer",
    "classifier_free_guidance",
    "denoising_loss",
    "density_ratio",
    "f_divergence_weight",
    "gan_discriminator_loss",
    "gan_generator_loss",
    "regression_loss",
    "sample_guidance_scale",
    "sid_generator_loss",
    "sim_generator_loss",
    "tdm_fake_loss",
    "tdm_generator_loss",
    "tdm_importance_weight",
    "vsd_gradient",
    "vsd_generator_loss",
]


# ----------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------


def _per_sample(value: Union[float, Tensor], like: Tensor) -> Tensor:
    """Shape a scalar or per-sample ``[B]`` value so that it broadcasts over ``like`` (``[B, ...]``)."""
    value = torch.as_tensor(value, device=like.device)
    if value.ndim == 0:
        return value
    if value.ndim == 1 and value.shape[0] == like.shape[0]:
        return value.reshape(-1, *([1] * (like.ndim - 1)))
    raise ValueError(f"Expected a scalar or a per-sample tensor of shape [{like.shape[0]}], got {tuple(value.shape)}.")


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float32, or float64 when an input already is: half-precision inputs never carry the loss math."""
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` over all ranks in place when ``torch.distributed`` is initialized (a no-op otherwise)."""
    if _distributed():
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor


# ----------------------------------------------------------------------------------------------------------------
# Variational score distillation (DMD arXiv 2311.18828; DMD2 arXiv 2405.14867; f-distill arXiv 2502.15681)
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def vsd_gradient(
    x0_student: Tensor,
    x0_real: Tensor,
    x0_fake: Tensor,
    weight: Optional[Union[float, Tensor]] = None,
    eps: float = 1e-6,
) -> Tuple[Tensor, Dict[str, float]]:
    """The per-element VSD gradient ``g`` with DMD's normalization (Yin et al. 2024, arXiv 2311.18828).

    ``g = weight · (x̂_fake − x̂_real) / (mean_{C,H,W} |x − x̂_real| + eps)`` per sample, in float32 (float64 for
    float64 inputs), with non-finite entries replaced by 0. Since ``s_fake − s_real = (α_t/σ_t²)(x̂_fake − x̂_real)``, this is DMD's weight
    ``w_t = (σ_t²/α_t) / mean|x − x̂_real|`` applied to the score difference (DMD, Yin et al. 2024).

    Args:
        x0_student (`torch.Tensor` of shape `[B, ...]`): the generator output ``x = G(z)`` (only its value is used).
        x0_real (`torch.Tensor`): the (guided) teacher's ``x̂0`` at ``x_t = α_t x + σ_t ε``.
        x0_fake (`torch.Tensor`): the fake score's ``x̂0`` at the same ``x_t``.
        weight (`float` or `torch.Tensor` of shape `[B]`, *optional*): a per-sample multiplier, e.g. the f-divergence
            weight ``h(r)`` of :func:`f_divergence_weight`; ``None`` means 1 (reverse KL).
        eps (`float`, defaults to 1e-6): added to the normalizer (FastGen); DMD2 uses 0.

    Returns:
        `tuple(torch.Tensor, dict)`: ``g`` (float32 or float64, shape of ``x0_student``) and a log dict with
        ``dm_grad_norm`` (mean per-sample L2 norm of ``g``), ``dm_normalizer`` (mean of ``mean|x − x̂_real|``),
        ``dm_weight_mean`` and ``nonfinite`` (the number of entries of ``g`` set to 0).
    """
    if not (x0_student.shape == x0_real.shape == x0_fake.shape):
        raise ValueError(
            f"x0_student, x0_real and x0_fake must have one shape, got {tuple(x0_student.shape)}, "
            f"{tuple(x0_real.shape)} and {tuple(x0_fake.shape)}."
        )
    dtype = _compute_dtype(x0_student, x0_real, x0_fake)
    x = x0_student.detach().to(dtype)
    x0_real, x0_fake = x0_real.to(dtype), x0_fake.to(dtype)
    reduce_dims = tuple(range(1, x.ndim))
    # DMD2 ``compute_distribution_matching_loss``: p_real = x − x̂_real, grad = (p_real − p_fake) / mean|p_real|.
    normalizer = (x - x0_real).abs().mean(dim=reduce_dims, keepdim=True) if reduce_dims else (x - x0_real).abs()
    g = (x0_fake - x0_real) / (normalizer + eps)
    if weight is not None:
        g = g * _per_sample(weight, x).to(dtype)
    nonfinite = int((~torch.isfinite(g)).sum())
    g = torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)
    per_sample_norm = g.reshape(g.shape[0], -1).norm(dim=1) if g.ndim else g.abs()
    log = {
        "dm_grad_norm": float(per_sample_norm.mean()),
        "dm_normalizer": float(normalizer.mean()),
        "dm_weight_mean": float(torch.as_tensor(weight, dtype=torch.float32).mean()) if weight is not None else 1.0,
        "nonfinite": float(nonfinite),
    }
    return g, log


def vsd_generator_loss(
    x0_student: Tensor,
    x0_real: Tensor,
    x0_fake: Tensor,
    weight: Optional[Union[float, Tensor]] = None,
    eps: float = 1e-6,
) -> Tuple[Tensor, Dict[str, float]]:
    """The VSD / DMD generator surrogate ``0.5 · mse(x, sg(x − g))`` (DMD2 ``compute_distribution_matching_loss``;
    f-distill).

    ``g`` is :func:`vsd_gradient`. The loss uses ``mean`` reduction over all elements, so ``dL/dx = g / x.numel()``;
    loss weights calibrated against DMD2 (GAN weights such as 5e-3) assume this reduction. Descent moves ``x``
    toward the teacher: ``−g ∝ x̂_real − x̂_fake``.

    Args:
        x0_student (`torch.Tensor` of shape `[B, ...]`): the generator output ``x = G(z)``, carrying the graph.
        x0_real (`torch.Tensor`): the (guided) teacher's ``x̂0`` at ``x_t``; no gradient flows into it.
        x0_fake (`torch.Tensor`): the fake score's ``x̂0`` at ``x_t``; no gradient flows into it.
        weight (`float` or `torch.Tensor` of shape `[B]`, *optional*): per-sample ``h(r)``; ``None`` = reverse KL.
        eps (`float`, defaults to 1e-6): added to the per-sample normalizer ``mean|x − x̂_real|``.

    Returns:
        `tuple(torch.Tensor, dict)`: the scalar loss (float32; float64 for float64 inputs) and the float log dict of
        :func:`vsd_gradient`.
    """
    g, log = vsd_gradient(x0_student, x0_real, x0_fake, weight=weight, eps=eps)
    x = x0_student.to(g.dtype)
    target = (x.detach() - g).detach()
    loss = 0.5 * F.mse_loss(x, target, reduction="mean")
    return loss, log


# ----------------------------------------------------------------------------------------------------------------
# Critic (fake score) denoising score matching
# ----------------------------------------------------------------------------------------------------------------


def denoising_loss(
    prediction: Tensor,
    x0: Tensor,
    noise: Tensor,
    t: Union[float, Tensor],
    path: "parameterization.NoisePath",
    prediction_type: str,
    weighting: Optional[Tensor] = None,
) -> Tensor:
    """Denoising score matching in the model's native parameterization (Ho et al. 2020 eq. 14; DMD2 ``L_fake``).

    The target is what a perfect model of type ``prediction_type`` outputs at ``x_t = α_t x0 + σ_t noise``:
    :func:`~diffusers_onestep.parameterization.from_x0_and_epsilon` (``ε`` for SD/SDXL/PixArt, ``ε − x0`` for SANA).

    Args:
        prediction (`torch.Tensor` of shape `[B, ...]`): the critic's raw output at ``(x_t, t)``.
        x0 (`torch.Tensor`): the clean samples, detached generator outputs ``sg(G(z))`` for the fake score.
        noise (`torch.Tensor`): the ``ε`` used to build ``x_t``.
        t (`float` or `torch.Tensor` of shape `[B]`): natural times of ``path``.
        path (`NoisePath`): the noise path of the critic.
        prediction_type (`str`): one of ``parameterization.PREDICTION_TYPES``.
        weighting (`torch.Tensor` of shape `[B]`, *optional*): per-sample loss weights (e.g. EDM's
            ``σ⁻² + σ_d⁻²``); ``None`` gives the plain mean.

    Returns:
        `torch.Tensor`: the scalar loss ``mean_b w_b · mean_{...} (prediction − target)²`` (float32 or wider).
    """
    target = parameterization.from_x0_and_epsilon(x0.detach(), noise.detach(), t, path, prediction_type)
    if target.shape != prediction.shape:
        raise ValueError(f"prediction has shape {tuple(prediction.shape)} but the target has {tuple(target.shape)}.")
    dtype = _compute_dtype(prediction, target)
    squared = (prediction.to(dtype) - target.to(dtype)) ** 2
    if weighting is None:
        return squared.mean()
    per_sample = squared.reshape(squared.shape[0], -1).mean(dim=1)
    return (per_sample * _per_sample(weighting, per_sample).to(dtype)).mean()


# ----------------------------------------------------------------------------------------------------------------
# Classifier-free guidance (Ho & Salimans 2022; random scales as SNOOPI, arXiv 2412.02687)
# ----------------------------------------------------------------------------------------------------------------


def classifier_free_guidance(pred_uncond: Tensor, pred_cond: Tensor, guidance_scale: Union[float, Tensor]) -> Tensor:
    """Classifier-free guidance ``ŷ_u + w (ŷ_c − ŷ_u)`` (Ho & Salimans 2022, arXiv 2207.12598, eq. 6, diffusers form).

    The argument order is fixed: **unconditional first, conditional second**; swapping them gives
    ``ŷ_c + w (ŷ_u − ŷ_c)``, which guides away from the prompt. ``w = 1`` returns ``pred_cond``, ``w = 0``
    returns ``pred_uncond``.

    Conventions and how to convert:

    * diffusers pipelines (``guidance_scale``) and DMD2 (``ε_u + w (ε_c − ε_u)``, uncond batch first,
      ``sd_guidance.py``) use this ``w``: pass it unchanged (DMD2 SD1.5 1.75, SDXL 8).
    * FastGen writes ``x0_c + (w − 1)(x0_c − x0_u)``, which is algebraically the same expression with the same
      ``w``: pass it unchanged.
    * The Ho & Salimans paper itself writes ``(1 + w') ε_c − w' ε_u``, i.e. ``w' = w − 1`` (``w' = 0`` is
      unguided). A scale quoted in that convention must be passed as ``w = w' + 1``; mixing the two is the
      off-by-one that FastVideo PR#1256 fixed.

    CFG is affine in the prediction at a shared ``x_t``, and every conversion of
    :mod:`~diffusers_onestep.parameterization` is affine in the prediction with coefficients that depend only on
    ``(x_t, t)``, so guiding ``ε``, ``x0``, ``v`` or the score at the same ``x_t`` gives the same ``x0``. Apply it
    in the teacher's native parameterization, before conversion.

    Args:
        pred_uncond (`torch.Tensor` of shape `[B, ...]`): the unconditional (negative-prompt) prediction.
        pred_cond (`torch.Tensor` of shape `[B, ...]`): the conditional prediction at the same ``(x_t, t)``.
        guidance_scale (`float` or `torch.Tensor` of shape `[B]`): ``w``; a tensor gives per-sample scales
            (SNOOPI, :func:`sample_guidance_scale`).

    Returns:
        `torch.Tensor`: the guided prediction, in float32 or the inputs' dtype if wider.
    """
    if pred_uncond.shape != pred_cond.shape:
        raise ValueError(
            f"pred_uncond and pred_cond must have one shape, got {tuple(pred_uncond.shape)} and "
            f"{tuple(pred_cond.shape)}."
        )
    dtype = _compute_dtype(pred_uncond, pred_cond)
    u, c = pred_uncond.to(dtype), pred_cond.to(dtype)
    w = _per_sample(guidance_scale, u).to(dtype)
    return u + w * (c - u)


def sample_guidance_scale(
    batch_size: int,
    guidance_scale: float,
    guidance_range: Optional[Sequence[float]] = None,
    generator: Optional[torch.Generator] = None,
    device: Optional[Union[str, torch.device]] = None,
) -> Tensor:
    """Per-sample CFG scales: constant, or uniform in ``guidance_range`` (SNOOPI's PG-SB, arXiv 2412.02687).

    Args:
        batch_size (`int`): ``B``.
        guidance_scale (`float`): the constant scale used when ``guidance_range`` is ``None``.
        guidance_range (`(float, float)`, *optional*): ``(low, high)``; each sample draws ``w ~ U[low, high]``.
        generator (`torch.Generator`, *optional*): a CPU generator for the draw.
        device (*optional*): where the returned tensor lives.

    Returns:
        `torch.Tensor` of shape `[B]`, float32.
    """
    if guidance_range is None:
        return torch.full((batch_size,), float(guidance_scale), dtype=torch.float32, device=device)
    low, high = (float(v) for v in guidance_range)
    if not low <= high:
        raise ValueError(f"guidance_range must be (low, high) with low <= high, got {tuple(guidance_range)}.")
    u = torch.rand(batch_size, generator=generator, dtype=torch.float32)
    return (low + (high - low) * u).to(device or "cpu")


# ----------------------------------------------------------------------------------------------------------------
# GAN terms (DMD2's GAN classifier, arXiv 2405.14867; f-distill's density-ratio discriminator, arXiv 2502.15681):
# non-saturating logistic losses
# ----------------------------------------------------------------------------------------------------------------


def gan_discriminator_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """``mean softplus(D(fake)) + mean softplus(−D(real))`` (Goodfellow et al. 2014; DMD2 ``guidance_cls_loss``).

    Minimized by ``D = log(p_real / p_fake)`` when both sides are sampled equally, which is what makes
    ``exp(D)`` a density-ratio estimate (:func:`density_ratio`).
    """
    return F.softplus(logits_fake.float()).mean() + F.softplus(-logits_real.float()).mean()


def gan_generator_loss(logits_fake: Tensor) -> Tensor:
    """The non-saturating generator loss ``mean softplus(−D(fake))`` (DMD2 ``gen_cls_loss``)."""
    return F.softplus(-logits_fake.float()).mean()


def regression_loss(student_x0: Tensor, teacher_x0: Tensor) -> Tensor:
    """DMD's regression loss (Yin et al. 2024, arXiv 2311.18828, §3.3), ``mean((G(z) − y)²)`` over every
    element, where ``y`` is the teacher's multi-step sample from the same noise ``z`` (a precomputed pair).

    DMD measures ``d`` with LPIPS on decoded images; this is the latent-space mean squared error (no LPIPS weights
    are needed, and no VAE decode): its gradient in ``G(z)`` is ``2 (G(z) − y) / n`` with ``n`` the element count.
    """
    if student_x0.shape != teacher_x0.shape:
        raise ValueError(
            f"The student's samples {tuple(student_x0.shape)} and the teacher's {tuple(teacher_x0.shape)} differ in "
            "shape; the regression pairs must be sampled at the training resolution."
        )
    return F.mse_loss(student_x0.float(), teacher_x0.detach().float())


# ----------------------------------------------------------------------------------------------------------------
# f-distill density ratio and its two-stage normalization (f-distill, Xu, Nie & Vahdat 2025, arXiv 2502.15681)
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def density_ratio(logits: Tensor, logit_clamp: float = 10.0, lower: float = 0.1, upper: float = 20.0) -> Tensor:
    """``r = clip(exp(clamp(D(x_t), ±logit_clamp)), lower, upper)``, detached, float32 (f-distill; FastGen).

    With the optimal discriminator of :func:`gan_discriminator_loss`, ``D = log(p_t / q_t)``, so ``exp(D)`` is the
    teacher(data)-over-student ratio at ``(x_t, t)``.

    Args:
        logits (`torch.Tensor` of shape `[B]` or `[B, heads, ...]`): discriminator logits; several heads are
            averaged in logit space first.
        logit_clamp (`float`, defaults to 10.0): symmetric clamp on the logit before ``exp``.
        lower (`float`, defaults to 0.1), upper (`float`, defaults to 20.0): clip of the ratio.

    Returns:
        `torch.Tensor` of shape `[B]`, float32, without grad.
    """
    logits = logits.detach().float()
    if logits.ndim > 1:
        logits = logits.reshape(logits.shape[0], -1).mean(dim=1)
    return torch.exp(logits.clamp(-logit_clamp, logit_clamp)).clamp(lower, upper)


class RatioNormalizer(torch.nn.Module):
    """Per-time-bin normalization of the density ratio (f-distill's first normalization stage).

    ``[t_min, t_max]`` is split into ``num_bins`` equal bins. Each call updates, for every bin that holds samples,
    ``bins[b] ← ema · bins[b] + (1 − ema) · mean_{i ∈ b} r_i`` (sums and counts all-reduced across ranks when
    ``torch.distributed`` is initialized), then returns ``r_i / (bins[b(i)] + 1e-6)``. With ``ema = 0`` (FastGen's
    default) this divides by the current batch's bin mean; ImageNet-64 uses ``ema = 0.5``. ``bins`` is a persistent
    buffer (initialized to 1), so it is saved and restored with the ``state_dict``.

    Args:
        num_bins (`int`, defaults to 10): number of equal-width time bins.
        t_min (`float`, defaults to 0.0), t_max (`float`, defaults to 1.0): the natural-time range of the path
            (``path.t_min``, ``path.t_max``); times outside it raise.
        ema (`float`, defaults to 0.0): EMA rate of the bin means, in ``[0, 1)``.
    """

    def __init__(self, num_bins: int = 10, t_min: float = 0.0, t_max: float = 1.0, ema: float = 0.0):
        super().__init__()
        if num_bins < 1:
            raise ValueError(f"num_bins must be at least 1, got {num_bins}.")
        if not t_max > t_min:
            raise ValueError(f"t_max must exceed t_min, got t_min={t_min} and t_max={t_max}.")
        if not 0.0 <= ema < 1.0:
            raise ValueError(f"ema must lie in [0, 1), got {ema}.")
        self.num_bins = int(num_bins)
        self.t_min, self.t_max, self.ema = float(t_min), float(t_max), float(ema)
        self.register_buffer("bins", torch.ones(self.num_bins, dtype=torch.float32), persistent=True)

    def extra_repr(self) -> str:
        return f"num_bins={self.num_bins}, t_min={self.t_min}, t_max={self.t_max}, ema={self.ema}"

    def bin_index(self, t: Tensor) -> Tensor:
        """The bin of each natural time ``t`` (``[B]`` long); ``t_max`` falls in the last bin."""
        t64 = torch.as_tensor(t).detach().to(torch.float64)
        span = self.t_max - self.t_min
        # diffusers stores TrigFlow's pi/2 as 1.57080, a hair above it: allow 1e-4 of the span
        if torch.any((t64 < self.t_min - 1e-4 * span) | (t64 > self.t_max + 1e-4 * span)):
            raise ValueError(
                f"RatioNormalizer got times outside [t_min, t_max] = [{self.t_min}, {self.t_max}]; build it with the "
                "noise path's t_min and t_max."
            )
        idx = torch.floor((t64 - self.t_min) / span * self.num_bins).long()
        return idx.clamp(0, self.num_bins - 1)

    @torch.no_grad()
    def forward(self, ratio: Tensor, t: Tensor, update: bool = True) -> Tensor:
        """Normalize ``ratio`` (``[B]``) by the mean ratio of its time bin; ``t`` is ``[B]`` natural times.

        Args:
            ratio (`torch.Tensor` of shape `[B]`): density ratios, e.g. from :func:`density_ratio`.
            t (`torch.Tensor` of shape `[B]`): the natural times the ratios were measured at.
            update (`bool`, defaults to `True`): update the bin means with this batch before normalizing.

        Returns:
            `torch.Tensor` of shape `[B]`, float32.
        """
        ratio = ratio.detach().float().reshape(-1)
        idx = self.bin_index(t).reshape(-1).to(ratio.device)
        if idx.shape != ratio.shape:
            raise ValueError(f"ratio and t must both be [B], got {tuple(ratio.shape)} and {tuple(idx.shape)}.")
        bins = self.bins.to(device=ratio.device, dtype=torch.float32)
        if update:
            stats = torch.zeros(2, self.num_bins, dtype=torch.float32, device=ratio.device)
            stats[0].index_add_(0, idx, ratio)
            stats[1].index_add_(0, idx, torch.ones_like(ratio))
            _all_reduce_sum(stats)  # one collective for sums and counts
            valid = stats[1] > 0
            batch_mean = stats[0][valid] / stats[1][valid]
            bins[valid] = self.ema * bins[valid] + (1.0 - self.ema) * batch_mean
            self.bins.copy_(bins.to(device=self.bins.device, dtype=self.bins.dtype))
        return ratio / (bins[idx] + 1e-6)


@torch.no_grad()
def f_divergence_weight(ratio: Tensor, divergence: Union[str, Divergence], normalize: bool = True) -> Tensor:
    """The f-distill weight ``h(r)``, normalized to unit (global-batch) mean (f-distill's second normalization stage).

    Args:
        ratio (`torch.Tensor` of shape `[B]`): teacher-over-student density ratios, e.g. after
            :class:`RatioNormalizer`.
        divergence (`str` or `Divergence`): a name of :func:`~.divergences.get_divergence` or a divergence.
        normalize (`bool`, defaults to `True`): divide by ``mean(h) + 1e-6``, the mean taken over all ranks when
            ``torch.distributed`` is initialized.

    Returns:
        `torch.Tensor` of shape `[B]`, float32, without grad; pass it as ``weight`` to :func:`vsd_generator_loss`.
    """
    divergence = get_divergence(divergence)
    h = divergence.h(ratio.detach().float())
    if not normalize:
        return h
    stats = torch.stack([h.sum(), torch.tensor(float(h.numel()), device=h.device)])
    _all_reduce_sum(stats)
    return h / (stats[0] / stats[1] + 1e-6)


# ----------------------------------------------------------------------------------------------------------------
# Score-divergence (Fisher-type) distillation: SiD (arXiv 2404.04057), SiD-LSG (arXiv 2406.01561), SIM (2410.16794)
# ----------------------------------------------------------------------------------------------------------------


def sid_generator_loss(
    x0_student: Tensor,
    x0_real: Tensor,
    x0_fake: Tensor,
    alpha: float = 1.2,
    normalize: bool = True,
    eps: float = 1e-5,
) -> Tuple[Tensor, Dict[str, float]]:
    """SiD's generator loss (Zhou et al. 2024, "Score identity Distillation", arXiv 2404.04057, eq. 23; SiD code
    ``training/sid_loss.py``).

    Per element, with ``δ = x̂_real − x̂_fake`` (``f_φ − f_ψ``) and ``x = G(z)``::

        L = δ ⊙ [(x̂_real − x) − α δ] / W = [(1 − α) δ² + δ ⊙ (x̂_fake − x)] / W,   W = mean_{C,H,W} |x − x̂_real|

    ``W`` is computed per sample without gradient and clipped at ``eps`` (SiD's ``weight_factor``). Unlike VSD, the
    gradient flows through ``x_t`` into **both** networks: ``x0_real`` and ``x0_fake`` must be evaluated at
    ``x_t = α_t x + σ_t ε`` with the graph to ``x`` kept (their parameters frozen). With an exact fake score
    ``f_ψ = E_q[x0 | x_t]`` the score identity ``E_q[h(x_t)ᵀ f_q(x_t)] = E[h(x_t)ᵀ x0]`` gives
    ``∇θ E[L] = ½ ∇θ E_q‖f_p − f_q‖² − (α − ½) ∂θ E‖δ‖²|_ψ`` for ``normalize=False``: α = ½ is the exact gradient
    of the (x0-space) Fisher divergence, and SiD's released α = 1.2 (α = 1 for SiD-LSG on SD) adds a term whose
    descent raises ``‖δ‖²`` along the sample path at frozen networks, for the fake score to catch up
    (``tests/test_score_divergence.py`` checks both on Gaussians; docs/methods.md's GMM benchmark shows α = 1.2
    diverging where the critic cannot catch up).

    Samples whose loss is not finite are dropped (SiD drops NaN samples). The reduction is the mean over all
    elements; SiD's code sums over elements, averages over the batch and multiplies by ``loss_scaling_G = 100``,
    a constant factor that Adam absorbs.

    Args:
        x0_student (`torch.Tensor` of shape `[B, ...]`): ``x = G(z)`` with its graph.
        x0_real (`torch.Tensor`): the (guided) teacher's ``x̂0`` at ``x_t``, graph to ``x_t`` kept.
        x0_fake (`torch.Tensor`): the (guided, SiD-LSG) fake score's ``x̂0`` at ``x_t``, graph to ``x_t`` kept.
        alpha (`float`, defaults to 1.2): SiD's α.
        normalize (`bool`, defaults to `True`): divide by ``W`` (SiD); ``False`` gives the raw Fisher-type loss.
        eps (`float`, defaults to 1e-5): lower clip of ``W``.

    Returns:
        `tuple(torch.Tensor, dict)`: the scalar loss (float32, float64 for float64 inputs) and logs ``sid_delta_sq``
        (mean ``δ²``), ``sid_normalizer`` (mean ``W``) and ``nonfinite`` (samples dropped).
    """
    if not (x0_student.shape == x0_real.shape == x0_fake.shape):
        raise ValueError(
            f"x0_student, x0_real and x0_fake must have one shape, got {tuple(x0_student.shape)}, "
            f"{tuple(x0_real.shape)} and {tuple(x0_fake.shape)}."
        )
    dtype = _compute_dtype(x0_student, x0_real, x0_fake)
    x, x0_real, x0_fake = x0_student.to(dtype), x0_real.to(dtype), x0_fake.to(dtype)
    delta = x0_real - x0_fake
    per_element = delta * ((x0_real - x) - alpha * delta)
    reduce_dims = tuple(range(1, x.ndim))
    with torch.no_grad():
        normalizer = (x - x0_real).abs().mean(dim=reduce_dims, keepdim=True).clamp_min(eps)
    if normalize:
        per_element = per_element / normalizer
    per_sample = per_element.reshape(per_element.shape[0], -1).mean(dim=1)
    finite = torch.isfinite(per_sample)
    loss = per_sample[finite].sum() / per_sample.shape[0]
    log = {
        "sid_delta_sq": float(delta.detach()[finite].pow(2).mean()) if bool(finite.any()) else float("nan"),
        "sid_normalizer": float(normalizer.mean()),
        "nonfinite": float((~finite).sum()),
    }
    return loss, log


def sim_generator_loss(
    x0_student: Tensor,
    x0_real: Tensor,
    x0_fake: Tensor,
    t: Union[float, Tensor],
    path: "parameterization.NoisePath",
    distance: str = "pseudo_huber",
    huber_c: float = 1.0,
    weight: Optional[Union[float, Tensor]] = None,
) -> Tuple[Tensor, Dict[str, float]]:
    """SIM's tractable generator loss (Luo et al. 2024, "One-Step Diffusion Distillation through Score Implicit
    Matching", arXiv 2410.16794, Theorem 3.1)::

        L = − w_t · d'(y_t)ᵀ (s_ψ(x_t) − ∇_{x_t} log q_t(x_t | x)),   y_t = s_ψ(x_t) − s_p(x_t)

    with the scores of the x0 estimates ``s = (α_t x̂0 − x_t)/σ_t²`` (§1.2 of algorithms.md). For
    ``x_t = α_t x + σ_t ε`` the conditional score is ``−ε/σ_t``, so ``s_ψ − ∇log q_t(x_t|x) = α_t (x̂_fake − x)/σ_t²``
    exactly and ``y_t = α_t (x̂_fake − x̂_real)/σ_t²``: the loss needs only the three x0 tensors, and its gradient
    reaches ``x`` directly and through ``x_t`` into both networks (as SiD). Distances (per sample, over all
    non-batch elements):

    - ``pseudo_huber``: ``d(y) = √(‖y‖² + c²) − c``, ``d'(y) = y / √(‖y‖² + c²)`` (SIM's choice).
    - ``squared``: ``d(y) = ‖y‖²``, ``d'(y) = 2y``. With ``w_t = σ_t⁴ / (2 α_t² W)`` this is SiD's loss at α = 1
      (:func:`sid_generator_loss`) elementwise -- tested.

    Note (derived here, checked on Gaussians): the exact gradient of ``∫ E_q d(y_t)`` also has the path term
    ``∂θ E[d(y_t)]`` at frozen networks, which this loss leaves out; for the squared distance that is SiD α = 1
    versus the Fisher gradient's α = ½.

    Args:
        x0_student (`torch.Tensor` of shape `[B, ...]`): ``x = G(z)`` with its graph.
        x0_real, x0_fake (`torch.Tensor`): teacher and fake ``x̂0`` at ``x_t``, graph to ``x_t`` kept.
        t (`float` or `torch.Tensor` of shape `[B]`): natural times of ``path``.
        path (`NoisePath`): the noise path ``x_t`` was built on.
        distance (`str`, defaults to ``"pseudo_huber"``): ``pseudo_huber`` or ``squared``.
        huber_c (`float`, defaults to 1.0): the pseudo-Huber ``c`` in score units (SIM's value is not confirmed).
        weight (`float` or `torch.Tensor` of shape `[B]`, *optional*): ``w_t`` per sample, no gradient; ``None``: 1.

    Returns:
        `tuple(torch.Tensor, dict)`: the scalar loss (mean over all elements, non-finite samples dropped) and logs
        ``sim_score_gap`` (mean per-sample ``‖y_t‖``) and ``nonfinite``.
    """
    if distance not in SIM_DISTANCES:
        raise ValueError(f"Unknown SIM distance {distance!r}; use one of {', '.join(SIM_DISTANCES)}.")
    if not (x0_student.shape == x0_real.shape == x0_fake.shape):
        raise ValueError(
            f"x0_student, x0_real and x0_fake must have one shape, got {tuple(x0_student.shape)}, "
            f"{tuple(x0_real.shape)} and {tuple(x0_fake.shape)}."
        )
    dtype = _compute_dtype(x0_student, x0_real, x0_fake)
    x, x0_real, x0_fake = x0_student.to(dtype), x0_real.to(dtype), x0_fake.to(dtype)
    t = torch.as_tensor(t, device=x.device)
    alpha_t, sigma_t = path.alpha_sigma(t.expand(x.shape[0]) if t.ndim == 0 else t, device=x.device)
    scale = _per_sample((alpha_t / sigma_t**2).to(dtype), x)
    y = scale * (x0_fake - x0_real)
    residual = scale * (x0_fake - x)  # s_ψ(x_t) − ∇log q_t(x_t | x)
    flat_y = y.reshape(y.shape[0], -1)
    norm_sq = flat_y.pow(2).sum(dim=1)
    if distance == "squared":
        direction = 2.0 * y
    else:
        direction = y / _per_sample(torch.sqrt(norm_sq + huber_c**2), y)
    per_element = -direction * residual
    if weight is not None:
        per_element = per_element * _per_sample(torch.as_tensor(weight, dtype=dtype, device=x.device).detach(), x)
    per_sample = per_element.reshape(per_element.shape[0], -1).mean(dim=1)
    finite = torch.isfinite(per_sample)
    loss = per_sample[finite].sum() / per_sample.shape[0]
    log = {"sim_score_gap": float(norm_sq.detach().sqrt().mean()), "nonfinite": float((~finite).sum())}
    return loss, log


# ----------------------------------------------------------------------------------------------------------------
# Trajectory distribution matching (TDM, Luo et al. ICCV 2025, arXiv 2503.06674; code train_tdm_demo.py)
# ----------------------------------------------------------------------------------------------------------------


def tdm_generator_loss(
    x0_student: Tensor,
    x0_real: Tensor,
    x0_fake: Tensor,
    huber_c: Optional[float] = 1e-3,
    eps: float = 1e-8,
) -> Tuple[Tensor, Dict[str, float]]:
    """TDM's generator loss (Luo et al. 2025, arXiv 2503.06674, its released ``train_tdm_demo.py``)::

        x* = x̂0 + (x̂_real,cond − x̂_fake) + (w − 1)(x̂_real,cond − x̂_real,uncond) = x̂0 + (x̂_real − x̂_fake)
        L  = mean[(√((x̂0 − sg(x*))² + c²) − c) / W],   W = mean_{C,H,W} |x̂0 − x̂_real|   (pseudo-Huber)
        L  = mean[(x̂0 − sg(x*))² / W]                                                    (``huber_c=None``: MSE/W)

    ``x̂_real = x̂_u + w (x̂_c − x̂_u)`` is the guided teacher, so both forms of ``x*`` agree (CFG is affine in ``x̂0``
    at a shared ``x_t``); the fake is unguided. ``x̂0 − x* = x̂_fake − x̂_real`` elementwise, so with ``N`` elements
    ``dL/dx̂0 = d / (√(d² + c²) W N)`` with ``d = x̂_fake − x̂_real``: for ``c → 0`` the sign of DMD's direction,
    for ``c → ∞`` ``c · dL/dx̂0 → d / (W N)`` (DMD's ``(x̂_fake − x̂_real)/W``, Yin et al. 2024, eq. 7), and the
    MSE form gives ``2 d / (W N)``. ``W`` (no gradient) is clipped at ``eps``.

    Args:
        x0_student (`torch.Tensor` of shape `[B, ...]`): the student's ``x̂0`` at its trajectory state, with graph.
        x0_real (`torch.Tensor`): the guided teacher's ``x̂0`` at ``x_t``; no gradient.
        x0_fake (`torch.Tensor`): the (unguided) fake score's ``x̂0`` at ``x_t``; no gradient.
        huber_c (`float`, *optional*, defaults to 1e-3): TDM's pseudo-Huber ``c`` (``--use_huber``); ``None``: MSE/W.
        eps (`float`): lower clip of ``W``.

    Returns:
        `tuple(torch.Tensor, dict)`: the scalar loss (float32, float64 for float64 inputs) and logs
        ``tdm_normalizer`` (mean ``W``) and ``tdm_gap`` (mean ``|x̂_fake − x̂_real|``).
    """
    if not (x0_student.shape == x0_real.shape == x0_fake.shape):
        raise ValueError(
            f"x0_student, x0_real and x0_fake must have one shape, got {tuple(x0_student.shape)}, "
            f"{tuple(x0_real.shape)} and {tuple(x0_fake.shape)}."
        )
    dtype = _compute_dtype(x0_student, x0_real, x0_fake)
    x = x0_student.to(dtype)
    with torch.no_grad():
        x0_real, x0_fake = x0_real.to(dtype), x0_fake.to(dtype)
        target = x.detach() + (x0_real - x0_fake)
        dims = tuple(range(1, x.ndim))
        normalizer = (x.detach() - x0_real).abs().mean(dim=dims, keepdim=True).clamp_min(eps)
    difference = x - target
    if huber_c is None:
        per_element = difference.pow(2)
    else:
        per_element = torch.sqrt(difference.pow(2) + huber_c**2) - huber_c
    loss = (per_element / normalizer).mean()
    log = {"tdm_normalizer": float(normalizer.mean()), "tdm_gap": float((x0_fake - x0_real).abs().mean())}
    return loss, log


@torch.no_grad()
def tdm_importance_weight(mixed_noise: Tensor, fresh_noise: Tensor) -> Tensor:
    """TDM's per-sample importance weight of the fake-score loss (``train_tdm_demo.py``)::

        ω = exp(−½ mean(ñ²)) / exp(−½ mean(n²))

    with ``n`` the fresh noise of the forward transition and ``ñ = (x_t − α_t x̂0)/σ_t`` the total noise of ``x_t``
    (part deterministic, the student's ``ε̂``): the ratio of the (per-element mean) Gaussian densities of the noise
    the fake sees to the noise that was drawn. Computed as ``exp(−½ (mean(ñ²) − mean(n²)))`` in float32/64."""
    dtype = _compute_dtype(mixed_noise, fresh_noise)
    dims = tuple(range(1, mixed_noise.ndim))
    mixed = mixed_noise.to(dtype).pow(2).mean(dim=dims)
    fresh = fresh_noise.to(dtype).pow(2).mean(dim=dims)
    return torch.exp(-0.5 * (mixed - fresh))


def tdm_fake_loss(
    x0_fake: Tensor, x0_student: Tensor, snr: Tensor, importance_weight: Tensor, snr_cap: float = 5.0
) -> Tuple[Tensor, Dict[str, float]]:
    """TDM's fake-score loss: ``mean_B[ mean_{C,H,W}(x̂_fake − x̂0)² · min(SNR_t, 5) · ω ]`` (``train_tdm_demo.py``;
    the min-SNR weight of Hang et al. 2023, arXiv 2303.09556, times :func:`tdm_importance_weight`). ``x0_student`` is
    the student's ``x̂0`` (no gradient) whose re-noised ``x_t`` the fake denoises.

    Returns:
        `tuple(torch.Tensor, dict)`: the scalar loss and logs ``tdm_importance_weight`` (mean ``ω``).
    """
    dtype = _compute_dtype(x0_fake, x0_student)
    dims = tuple(range(1, x0_fake.ndim))
    per_sample = (x0_fake.to(dtype) - x0_student.detach().to(dtype)).pow(2).mean(dim=dims)
    weight = (torch.clamp(snr.to(per_sample.device, dtype), max=snr_cap) * importance_weight.to(dtype)).detach()
    return (per_sample * weight).mean(), {"tdm_importance_weight": float(importance_weight.float().mean())}
