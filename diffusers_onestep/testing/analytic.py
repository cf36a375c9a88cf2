"""Closed-form testbeds: Gaussian-mixture teachers and Gaussian students with exact noisy scores.

Along any Gaussian path ``x_t = α_t x0 + σ_t ε`` a mixture of isotropic Gaussians stays a mixture with

.. code-block:: text

    p_t(x)  = Σ_k π_k N(x; α_t μ_k, c_k I),        c_k = α_t² s_k² + σ_t²
    γ_k(x)  = π_k N(x; α_t μ_k, c_k I) / p_t(x)                               (computed with logsumexp)
    ∇log p_t(x) = − Σ_k γ_k(x) (x − α_t μ_k) / c_k
    E[x0 | x_t = x] = Σ_k γ_k(x) [ μ_k + α_t s_k² / c_k · (x − α_t μ_k) ]

and a linear-Gaussian student ``G(z) = A z + b``, ``z ~ N(0, I)`` has ``q_t = N(α_t b, α_t² A Aᵀ + σ_t² I)``.
So the teacher's ``x̂0`` (the "real score"), the student's ``x̂0`` (an exact "fake score") and the density ratio
``r_t = p_t / q_t`` are all exact: the distillation losses can be tested without any learned network, and a
benchmark can separate method error from critic error.

Times are the path's natural times (``parameterization``), a scalar or one per sample. Everything is computed in
float64 and returned in the dtype of ``x``.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .. import parameterization
from ..distill.divergences import Divergence, get_divergence
from ..parameterization import NoisePath


__all__ = ["GaussianMixture", "GaussianStudent", "mc_f_divergence"]

TimeLike = Union[float, int, Tensor, Sequence[float]]
LabelLike = Optional[Union[int, Tensor]]

# exp() of a float64 log-ratio overflows past ~709.
_MAX_LOG_RATIO = 700.0


def _path_coefficients(path: NoisePath, t: TimeLike, x: Tensor) -> Tuple[Tensor, Tensor]:
    """``(α_t, σ_t)`` in float64, shaped ``[B, 1]`` (per-sample ``t``) or ``[]`` (scalar ``t``)."""
    t = torch.as_tensor(t, dtype=torch.float64, device=x.device)
    alpha, sigma = path.alpha_sigma(t, device=x.device)
    alpha, sigma = alpha.to(torch.float64), sigma.to(torch.float64)
    if alpha.ndim == 1:
        if alpha.shape[0] not in (1, x.shape[0]):
            raise ValueError(f"Got {alpha.shape[0]} times for {x.shape[0]} samples.")
        alpha, sigma = alpha[:, None], sigma[:, None]
    return alpha, sigma


class GaussianMixture:
    """A mixture of isotropic Gaussians ``Σ_k π_k N(μ_k, s_k² I)`` with exact noisy densities.

    Args:
        means (`torch.Tensor` of shape `[K, d]`): component means ``μ_k``.
        stds (`torch.Tensor` of shape `[K]` or `float`): component standard deviations ``s_k``.
        weights (`torch.Tensor` of shape `[K]`, *optional*): mixture weights ``π_k`` (normalized here); uniform
            if omitted.
        labels (`torch.Tensor` of shape `[K]`, *optional*): an integer class label per component. The
            class-conditional density ``p(x | c)`` is the mixture over the components labelled ``c`` (weights
            renormalized), so the unconditional mixture is ``Σ_c p(c) p(x | c)``. Every method takes
            ``label=None`` (unconditional), an ``int`` or a per-sample ``[B]`` tensor.
    """

    def __init__(self, means, stds, weights=None, labels=None):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        if self.means.ndim != 2:
            raise ValueError(f"means must have shape [K, d], got {tuple(self.means.shape)}.")
        num = self.means.shape[0]
        self.stds = torch.as_tensor(stds, dtype=torch.float64).expand(num).clone()
        weights = torch.ones(num) if weights is None else weights
        weights = torch.as_tensor(weights, dtype=torch.float64)
        if weights.shape != (num,) or torch.any(weights < 0) or weights.sum() <= 0 or torch.any(self.stds <= 0):
            raise ValueError("weights must be K non-negative numbers with a positive sum, and stds positive.")
        self.weights = weights / weights.sum()
        self.labels = None if labels is None else torch.as_tensor(labels, dtype=torch.long).reshape(num)

    # -- constructors: GAN mode-collapse toys (VEEGAN, arXiv 1705.07761; PacGAN, arXiv 1712.04086) ----------------

    @classmethod
    def ring8(cls, radius: float = 2.0, std: float = 0.02, num_modes: int = 8) -> "GaussianMixture":
        """Ring-8: ``num_modes`` equal Gaussians on a circle of ``radius`` (VEEGAN/PacGAN toy); one class per mode."""
        angles = 2 * math.pi * torch.arange(num_modes, dtype=torch.float64) / num_modes
        means = radius * torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
        return cls(means, std, labels=torch.arange(num_modes))

    @classmethod
    def grid25(cls, spacing: float = 2.0, std: float = 0.05, size: int = 5) -> "GaussianMixture":
        """Grid-25: equal Gaussians at ``{−4, −2, 0, 2, 4}²`` (spacing 2, centred); one class per mode."""
        axis = spacing * (torch.arange(size, dtype=torch.float64) - (size - 1) / 2)
        means = torch.cartesian_prod(axis, axis)
        return cls(means, std, labels=torch.arange(size * size))

    @classmethod
    def imbalanced_pair(
        cls, weights: Sequence[float] = (0.9, 0.1), offset: float = 2.0, std: float = 0.1, dim: int = 2
    ) -> "GaussianMixture":
        """Two modes at ``∓offset · e_1`` with ``π = weights`` (major mode at ``−offset``); where reverse KL drops
        the minor mode. Labels 0 and 1."""
        means = torch.zeros(2, dim, dtype=torch.float64)
        means[0, 0], means[1, 0] = -offset, offset
        return cls(means, std, weights=weights, labels=torch.arange(2))

    # -- basic properties -----------------------------------------------------------------------------------------

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def num_classes(self) -> int:
        return 0 if self.labels is None else int(self.labels.max()) + 1

    def mean(self) -> Tensor:
        """``E[x0] = Σ π_k μ_k`` (forward-KL-optimal Gaussian mean: moment matching)."""
        return self.weights @ self.means

    def covariance(self) -> Tensor:
        """``Cov[x0] = Σ π_k (s_k² I + μ_k μ_kᵀ) − E[x0] E[x0]ᵀ`` (forward-KL-optimal ``A Aᵀ``)."""
        second = torch.einsum("k,ki,kj->ij", self.weights, self.means, self.means)
        second = second + (self.weights * self.stds**2).sum() * torch.eye(self.dim, dtype=torch.float64)
        m = self.mean()
        return second - torch.outer(m, m)

    def _log_weights(self, label: LabelLike, device) -> Tensor:
        """``log π_k`` restricted to the components of ``label`` and renormalized: ``[K]`` or ``[B, K]``."""
        log_w = torch.log(self.weights).to(device)
        if label is None:
            return log_w
        if self.labels is None:
            raise ValueError("This mixture has no component labels; build it with labels=... for class conditioning.")
        label = torch.as_tensor(label, dtype=torch.long, device=device)
        member = self.labels.to(device)[None, :] == label.reshape(-1, 1)  # [B or 1, K]
        if not torch.all(member.any(dim=1)):
            known = sorted(set(self.labels.tolist()))
            raise ValueError(f"Unknown class label in {label.tolist()}; the labels are {known}.")
        log_w = torch.where(member, log_w, torch.full_like(log_w, -math.inf))
        log_w = log_w - torch.logsumexp(log_w, dim=1, keepdim=True)
        return log_w[0] if label.ndim == 0 else log_w

    # -- densities along a path -----------------------------------------------------------------------------------

    def _components(self, x: Tensor, alpha: Tensor, sigma: Tensor, label: LabelLike):
        """Per-component ``(log π_k N(x; α μ_k, c_k I), x − α μ_k, c_k)`` in float64."""
        x64 = x.to(torch.float64)
        means, stds = self.means.to(x.device), self.stds.to(x.device)
        diff = x64[:, None, :] - alpha[..., None] * means[None]  # [B, K, d]
        var = alpha**2 * stds**2 + sigma**2  # [B or 1, K]
        log_norm = -0.5 * self.dim * torch.log(2 * math.pi * var) - 0.5 * (diff**2).sum(-1) / var
        return self._log_weights(label, x.device) + log_norm, diff, var

    def _log_prob_at(self, x: Tensor, alpha: Tensor, sigma: Tensor, label: LabelLike) -> Tensor:
        log_joint, _, _ = self._components(x, alpha, sigma, label)
        return torch.logsumexp(log_joint, dim=1)

    def log_prob(self, x: Tensor, label: LabelLike = None) -> Tensor:
        """``log p_0(x)`` of the clean mixture, ``[B]``."""
        one = torch.ones((), dtype=torch.float64, device=x.device)
        return self._log_prob_at(x, one, 0 * one, label).to(x.dtype)

    def noisy_log_prob(self, x: Tensor, t: TimeLike, path: NoisePath, label: LabelLike = None) -> Tensor:
        """``log p_t(x)`` of the noised mixture at natural time ``t`` of ``path``, ``[B]``."""
        alpha, sigma = _path_coefficients(path, t, x)
        return self._log_prob_at(x, alpha, sigma, label).to(x.dtype)

    def responsibilities(self, x: Tensor, t: TimeLike, path: NoisePath, label: LabelLike = None) -> Tensor:
        """``γ_k(x) = P(component k | x_t = x)``, ``[B, K]``."""
        alpha, sigma = _path_coefficients(path, t, x)
        log_joint, _, _ = self._components(x, alpha, sigma, label)
        return torch.softmax(log_joint, dim=1).to(x.dtype)

    def score(self, x: Tensor, t: TimeLike, path: NoisePath, label: LabelLike = None) -> Tensor:
        """``∇_x log p_t(x) = − Σ_k γ_k (x − α_t μ_k) / c_k``."""
        alpha, sigma = _path_coefficients(path, t, x)
        log_joint, diff, var = self._components(x, alpha, sigma, label)
        gamma = torch.softmax(log_joint, dim=1)
        return (-(gamma / var)[..., None] * diff).sum(1).to(x.dtype)

    def x0(self, x: Tensor, t: TimeLike, path: NoisePath, label: LabelLike = None) -> Tensor:
        """The posterior mean ``E[x0 | x_t = x] = Σ_k γ_k [μ_k + α_t s_k²/c_k (x − α_t μ_k)]`` (the ideal denoiser)."""
        alpha, sigma = _path_coefficients(path, t, x)
        log_joint, diff, var = self._components(x, alpha, sigma, label)
        gamma = torch.softmax(log_joint, dim=1)
        gain = alpha * self.stds.to(x.device) ** 2 / var  # [B or 1, K]
        per_component = self.means.to(x.device)[None] + gain[..., None] * diff
        return (gamma[..., None] * per_component).sum(1).to(x.dtype)

    def prediction(
        self, x: Tensor, t: TimeLike, path: NoisePath, prediction_type: str, label: LabelLike = None
    ) -> Tensor:
        """The output of a perfect model of type ``prediction_type`` at ``(x_t = x, t)``, via ``parameterization``."""
        x0 = self.x0(x, t, path, label)
        eps = parameterization.to_epsilon(x0, x, t, path, "sample")
        return parameterization.from_x0_and_epsilon(x0, eps, t, path, prediction_type)

    # -- sampling -------------------------------------------------------------------------------------------------

    def sample_with_labels(
        self, n: int, generator: Optional[torch.Generator] = None, label: LabelLike = None, dtype=torch.float64
    ) -> Tuple[Tensor, Tensor]:
        """Draw ``n`` samples of ``p_0`` (or ``p_0(· | label)``) and their components' class labels (``-1`` if the
        mixture is unlabelled)."""
        log_w = self._log_weights(label, "cpu")
        probs = torch.exp(log_w).expand(n, -1) if log_w.ndim == 1 else torch.exp(log_w)
        if probs.shape[0] != n:
            raise ValueError(f"Got {probs.shape[0]} labels for {n} samples.")
        comp = torch.multinomial(probs, 1, replacement=True, generator=generator)[:, 0]
        noise = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        x = self.means[comp] + self.stds[comp, None] * noise
        labels = self.labels[comp] if self.labels is not None else torch.full((n,), -1, dtype=torch.long)
        return x.to(dtype), labels

    def sample(
        self, n: int, generator: Optional[torch.Generator] = None, label: LabelLike = None, dtype=torch.float64
    ) -> Tensor:
        """Draw ``n`` samples ``[n, d]`` of ``p_0`` (or of ``p_0(· | label)``)."""
        return self.sample_with_labels(n, generator, label, dtype)[0]

    def class_probabilities(self) -> Tensor:
        """``p(c)`` for each class label, ``[num_classes]``."""
        if self.labels is None:
            raise ValueError("This mixture has no component labels.")
        return torch.zeros(self.num_classes, dtype=torch.float64).index_add_(0, self.labels, self.weights)

    def __repr__(self) -> str:
        return f"GaussianMixture(num_components={self.num_components}, dim={self.dim})"


class GaussianStudent(torch.nn.Module):
    """A linear-Gaussian one-step generator ``G(z) = A z + b``, ``z ~ N(0, I)``.

    Its noised marginal is ``q_t = N(α_t b, α_t² A Aᵀ + σ_t² I)``, so its score, its ideal denoiser (an exact
    "fake score") and the ratio ``p_t / q_t`` to a :class:`GaussianMixture` teacher are closed form. ``A`` and
    ``b`` are parameters: a generator step differentiates :meth:`sample`. The closed forms use their current
    (detached) values.

    Args:
        A (`torch.Tensor` of shape `[d, d]`): the linear map.
        b (`torch.Tensor` of shape `[d]`): the offset.
    """

    def __init__(self, A, b):
        super().__init__()
        A = torch.as_tensor(A, dtype=torch.float64)
        b = torch.as_tensor(b, dtype=torch.float64)
        if A.ndim != 2 or A.shape[0] != A.shape[1] or b.shape != (A.shape[0],):
            raise ValueError(f"A must be [d, d] and b [d], got {tuple(A.shape)} and {tuple(b.shape)}.")
        self.A = torch.nn.Parameter(A.clone())
        self.b = torch.nn.Parameter(b.clone())

    @property
    def dim(self) -> int:
        return self.b.shape[0]

    def sample(self, z: Tensor) -> Tensor:
        """``x = A z + b`` for latents ``z`` of shape ``[n, d]``; differentiable in ``A`` and ``b``."""
        return z.to(self.A.dtype) @ self.A.T + self.b

    def covariance(self) -> Tensor:
        """``A Aᵀ``, the covariance of ``q_0``."""
        A = self.A.detach()
        return A @ A.T

    def _moments(self, x: Tensor, t: TimeLike, path: NoisePath):
        """``(α [B or 1, 1], mean [B or 1, d], precision C_t⁻¹ [B or 1, d, d], log det C_t [B or 1])`` in float64.

        ``C_t`` is factored once per distinct time (Monte-Carlo batches repeat a few times many times).
        """
        t = torch.as_tensor(t, dtype=torch.float64, device=x.device).reshape(-1)
        if t.shape[0] not in (1, x.shape[0]):
            raise ValueError(f"Got {t.shape[0]} times for {x.shape[0]} samples.")
        unique_t, inverse = torch.unique(t, return_inverse=True)
        alpha, sigma = path.alpha_sigma(unique_t, device=x.device)
        alpha, sigma = alpha.to(torch.float64)[:, None, None], sigma.to(torch.float64)[:, None, None]
        eye = torch.eye(self.dim, dtype=torch.float64, device=x.device)
        cov = alpha**2 * self.covariance().to(x.device) + sigma**2 * eye  # [U, d, d]
        chol = torch.linalg.cholesky(cov)
        precision = torch.cholesky_inverse(chol)
        log_det = 2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
        alpha = alpha[inverse, 0]  # [B or 1, 1]
        mean = alpha * self.b.detach().to(x.device)
        return alpha, mean, precision[inverse], log_det[inverse]

    def noisy_log_prob(self, x: Tensor, t: TimeLike, path: NoisePath) -> Tensor:
        """``log q_t(x)``, ``[B]``."""
        _, mean, precision, log_det = self._moments(x, t, path)
        diff = x.to(torch.float64) - mean
        mahalanobis = torch.einsum("bi,bij,bj->b", diff, precision.expand(diff.shape[0], -1, -1), diff)
        out = -0.5 * (self.dim * math.log(2 * math.pi) + log_det + mahalanobis)
        return out.to(x.dtype)

    def score(self, x: Tensor, t: TimeLike, path: NoisePath) -> Tensor:
        """``∇ log q_t(x) = − C_t⁻¹ (x − α_t b)``."""
        _, mean, precision, _ = self._moments(x, t, path)
        diff = x.to(torch.float64) - mean
        return (-torch.einsum("bij,bj->bi", precision.expand(diff.shape[0], -1, -1), diff)).to(x.dtype)

    def x0(self, x: Tensor, t: TimeLike, path: NoisePath) -> Tensor:
        """``E_q[x0 | x_t = x] = b + α_t A Aᵀ C_t⁻¹ (x − α_t b)``; well defined at ``α_t = 0``."""
        alpha, mean, precision, _ = self._moments(x, t, path)
        diff = x.to(torch.float64) - mean
        solved = torch.einsum("bij,bj->bi", precision.expand(diff.shape[0], -1, -1), diff)
        out = self.b.detach().to(x.device) + alpha * (solved @ self.covariance().to(x.device).T)
        return out.to(x.dtype)

    def prediction(self, x: Tensor, t: TimeLike, path: NoisePath, prediction_type: str) -> Tensor:
        """The student-optimal critic's output of type ``prediction_type`` at ``(x, t)``, via ``parameterization``."""
        x0 = self.x0(x, t, path)
        eps = parameterization.to_epsilon(x0, x, t, path, "sample")
        return parameterization.from_x0_and_epsilon(x0, eps, t, path, prediction_type)

    def log_ratio(self, x: Tensor, t: TimeLike, path: NoisePath, teacher: GaussianMixture, label: LabelLike = None):
        """``log r_t(x) = log p_t(x) − log q_t(x)`` (teacher over student), float64 ``[B]``."""
        x64 = x.to(torch.float64)
        return teacher.noisy_log_prob(x64, t, path, label) - self.noisy_log_prob(x64, t, path)

    def exact_ratio(
        self, x: Tensor, t: TimeLike, path: NoisePath, teacher: GaussianMixture, label: LabelLike = None
    ) -> Tensor:
        """The exact density ratio ``r_t(x) = p_t(x) / q_t(x)``, ``[B]`` in the dtype of ``x``."""
        log_r = self.log_ratio(x, t, path, teacher, label).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
        return torch.exp(log_r).to(x.dtype)


@torch.no_grad()
def mc_f_divergence(
    teacher: GaussianMixture,
    student: GaussianStudent,
    divergence: Union[str, Divergence],
    path: NoisePath,
    times: TimeLike,
    n: int,
    generator: Optional[torch.Generator] = None,
    label: LabelLike = None,
) -> Tensor:
    """Monte-Carlo ``mean_t D_f(p_t || q_t) = mean_t E_{x ~ q_t}[f(p_t(x) / q_t(x))]`` with exact densities.

    For each time in ``times``, draws ``n`` samples ``x_t = α_t (A z + b) + σ_t ε`` and averages ``f`` of the exact
    ratio (log-ratios clamped to ±700 before ``exp``). Reusing a generator seed across calls gives common random
    numbers, so differences between two students are measured with little noise.

    Args:
        teacher (`GaussianMixture`): ``p_0``.
        student (`GaussianStudent`): defines ``q_0``.
        divergence (`str` or `Divergence`): which ``f``.
        path (`NoisePath`): the noise path.
        times (`float` or sequence or `torch.Tensor`): natural times, averaged uniformly.
        n (`int`): samples per time.
        generator (`torch.Generator`, *optional*): for ``z`` and ``ε``.
        label (*optional*): restrict the teacher to a class.

    Returns:
        `torch.Tensor`: a float64 scalar.
    """
    divergence = get_divergence(divergence)
    times = torch.as_tensor(times, dtype=torch.float64).reshape(-1)
    t = times.repeat_interleave(n)
    z = torch.randn(t.shape[0], student.dim, generator=generator, dtype=torch.float64)
    eps = torch.randn(t.shape[0], student.dim, generator=generator, dtype=torch.float64)
    x_t = parameterization.add_noise(student.sample(z), eps, t, path)
    log_r = student.log_ratio(x_t, t, path, teacher, label).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    return divergence.f(torch.exp(log_r)).mean()
