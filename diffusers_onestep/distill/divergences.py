"""f-divergences and their VSD weighting functions ``h(r) = r^2 f''(r)`` (f-distill, Xu, Nie & Vahdat 2025).

For ``D_f(p || q) = E_q[f(r)]`` with ``r = p / q`` the density ratio *teacher over student* at the same noisy sample
``x_t`` and time ``t``, the generator gradient is (f-distill, arXiv 2502.15681, its main gradient theorem)::

    ∇θ D_f(p_t || q_t) = E_{z, ε}[ h(r_t(x_t)) · (s_q(x_t) − s_p(x_t)) · ∂x_t/∂θ ],      h(r) = r^2 f''(r)

so every f-divergence is the reverse-KL / DMD gradient (``h ≡ 1``) re-weighted per sample by ``h(r)``. ``h`` only
matters up to a positive constant, because :func:`~diffusers_onestep.distill.losses.f_divergence_weight` normalizes
it to unit batch mean (f-distill's two-stage normalization). ``f`` is given up to affine terms ``c (r − 1)``, which change neither
``f''`` nor ``E_q[f(r)]``; every ``f`` here satisfies ``f(1) = 0`` and is convex on ``r > 0``.

=======================  =====================================  ===============  ==========  ===================
name                     f(r)                                   h(r)             bounded h   FastGen key
=======================  =====================================  ===============  ==========  ===================
``reverse_kl``           −log r                                 1                yes         ``rkl``
``forward_kl``           r log r                                r                no          ``kl``
``js``                   r log r − (1+r) log((1+r)/2)           r / (1+r)        yes         ``js``
``hellinger``            (√r − 1)^2                             ½ √r             no          ``sh``
``jeffreys``             (r − 1) log r                          1 + r            no          ``jf``
``softened_reverse_kl``  (1+r) log((1+r)/(2r))                  1 / (1+r)        yes         ``sf``
``neyman``               (1 − r)^2 / r                          2 / r            no          ``neyman``
``pearson``              (r − 1)^2                              2 r^2            no          --
``alpha:<a>``            (r^a − a r − (1−a)) / (a (a−1))        r^a              a == 0      --
=======================  =====================================  ===============  ==========  ===================

"bounded" refers to ``h`` on ``r ∈ (0, ∞)``; in training the ratio is clipped to ``[0.1, 20]`` anyway
(:func:`~diffusers_onestep.distill.losses.density_ratio`), so "unbounded" means "high variance".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List

import torch
from torch import Tensor


__all__ = ["ALPHA_PREFIX", "DIVERGENCES", "Divergence", "alpha_divergence", "divergence_names", "get_divergence"]

#: prefix of the α-divergence family's names, e.g. ``"alpha:0.5"``
ALPHA_PREFIX = "alpha:"

# Neyman's h = 2/r: FastGen clamps r at 1e-8 before dividing (f_distill.py ``neyman``).
_TINY = 1e-8


@dataclass(frozen=True)
class Divergence:
    """An f-divergence ``D_f(p || q) = E_q[f(p/q)]`` and its VSD weighting ``h(r) = r^2 f''(r)``.

    Args:
        name (`str`): the name accepted by :func:`get_divergence` (the CLI name).
        f (`Callable[[Tensor], Tensor]`): the convex generator ``f`` with ``f(1) = 0``, elementwise on ``r > 0``.
        h (`Callable[[Tensor], Tensor]`): ``r^2 f''(r)``, the per-sample weight of the score difference
            (f-distill). Returns a tensor of the shape of ``r``.
        bounded (`bool`): whether ``h`` stays bounded on ``(0, ∞)`` (bounded weights give low-variance gradients).
        description (`str`): one line on the behaviour of the divergence.
    """

    name: str
    f: Callable[[Tensor], Tensor]
    h: Callable[[Tensor], Tensor]
    bounded: bool
    description: str


# ----------------------------------------------------------------------------------------------------------------
# The weighting table of f-distill (arXiv 2502.15681). Each f was differentiated by hand; tests/test_divergences.py checks
# h = r^2 f'' by double autograd, f(1) = 0 and f'' >= 0.
# ----------------------------------------------------------------------------------------------------------------


def _reverse_kl_f(r: Tensor) -> Tensor:
    return -torch.log(r)  # f'' = 1/r^2


def _forward_kl_f(r: Tensor) -> Tensor:
    return torch.xlogy(r, r)  # f'' = 1/r


def _js_f(r: Tensor) -> Tensor:
    # Twice the Jensen-Shannon divergence: f' = log r − log((1+r)/2), f'' = 1/(r (1+r)).
    return torch.xlogy(r, r) - (1 + r) * torch.log((1 + r) / 2)


def _hellinger_f(r: Tensor) -> Tensor:
    return (torch.sqrt(r) - 1) ** 2  # f'' = ½ r^{-3/2}


def _jeffreys_f(r: Tensor) -> Tensor:
    return (r - 1) * torch.log(r)  # f'' = 1/r + 1/r^2


def _softened_reverse_kl_f(r: Tensor) -> Tensor:
    return (1 + r) * torch.log((1 + r) / (2 * r))  # f'' = 1/(r^2 (1+r))


def _neyman_f(r: Tensor) -> Tensor:
    return (1 - r) ** 2 / r  # f'' = 2/r^3


def _pearson_f(r: Tensor) -> Tensor:
    return (r - 1) ** 2  # f'' = 2


DIVERGENCES: Dict[str, Divergence] = {
    d.name: d
    for d in (
        Divergence(
            "reverse_kl",
            _reverse_kl_f,
            lambda r: torch.ones_like(r),
            True,
            "KL(q||p), the DMD/VSD objective: mode-seeking, uniform weight.",
        ),
        Divergence(
            "forward_kl",
            _forward_kl_f,
            lambda r: r,
            False,
            "KL(p||q): mode-covering, upweights under-covered teacher regions linearly; high variance.",
        ),
        Divergence(
            "js",
            _js_f,
            lambda r: r / (1 + r),
            True,
            "Jensen-Shannon (times 2): mild mode coverage with bounded weights; f-distill's best overall.",
        ),
        Divergence(
            "hellinger",
            _hellinger_f,
            lambda r: 0.5 * torch.sqrt(r),
            False,
            "Squared Hellinger: between reverse and forward KL, weight grows like sqrt(r).",
        ),
        Divergence(
            "jeffreys",
            _jeffreys_f,
            lambda r: 1 + r,
            False,
            "Jeffreys = forward KL + reverse KL: mode-covering with a floor of 1 on the weight.",
        ),
        Divergence(
            "softened_reverse_kl",
            _softened_reverse_kl_f,
            lambda r: 1 / (1 + r),
            True,
            "Softened reverse KL: downweights teacher-dense regions; more mode-seeking than reverse KL.",
        ),
        Divergence(
            "neyman",
            _neyman_f,
            lambda r: 2 / r.clamp_min(_TINY),
            False,
            "Neyman chi^2: strongly mode-seeking, weight 2/r explodes where the teacher has little mass.",
        ),
        Divergence(
            "pearson",
            _pearson_f,
            lambda r: 2 * r**2,
            False,
            "Pearson chi^2: very strongly mode-covering, weight 2 r^2; very high variance.",
        ),
    )
}


def alpha_divergence(alpha: float) -> Divergence:
    """The α-divergence (Amari) ``f(r) = (r^α − α r − (1 − α)) / (α (α − 1))``, ``h(r) = r^α``.

    ``α = 0`` and ``α = 1`` are the limits ``f = r − 1 − log r`` (reverse KL) and ``f = r log r − r + 1`` (forward
    KL); they differ from ``reverse_kl`` / ``forward_kl`` only by the affine term ``±(r − 1)``, so ``h`` and
    ``D_f`` agree. ``α = ½`` is 2 × squared Hellinger (``f = 2 (√r − 1)^2``).

    Args:
        alpha (`float`): any finite real number.
    """
    a = float(alpha)
    if not math.isfinite(a):
        raise ValueError(f"The alpha of an alpha-divergence must be finite, got {alpha!r}.")
    name = f"{ALPHA_PREFIX}{a:g}"
    if a == 0.0:
        f = lambda r: r - 1 - torch.log(r)  # noqa: E731
        return Divergence(name, f, lambda r: torch.ones_like(r), True, "alpha = 0: the reverse-KL limit.")
    if a == 1.0:
        f = lambda r: torch.xlogy(r, r) - r + 1  # noqa: E731
        return Divergence(name, f, lambda r: r, False, "alpha = 1: the forward-KL limit.")
    return Divergence(
        name,
        lambda r: (r**a - a * r - (1 - a)) / (a * (a - 1)),
        lambda r: r**a,
        False,
        f"Amari alpha-divergence, alpha = {a:g}: more mode-covering as alpha grows (0: reverse KL, 1: forward KL).",
    )


def divergence_names() -> List[str]:
    """The fixed divergence names, in table order; ``"alpha:<a>"`` (any real ``a``) is accepted as well."""
    return list(DIVERGENCES)


def get_divergence(name: str) -> Divergence:
    """Look up a divergence by its CLI name (``"js"``, ``"forward_kl"``, ``"alpha:0.5"``, ...).

    Raises:
        `ValueError`: for an unknown name, listing the valid ones.
    """
    if isinstance(name, Divergence):
        return name
    if name in DIVERGENCES:
        return DIVERGENCES[name]
    if isinstance(name, str) and name.startswith(ALPHA_PREFIX):
        try:
            alpha = float(name[len(ALPHA_PREFIX) :])
        except ValueError:
            alpha = float("nan")
        if math.isfinite(alpha):
            return alpha_divergence(alpha)
    raise ValueError(
        f"Unknown divergence {name!r}; expected one of {', '.join(DIVERGENCES)} or {ALPHA_PREFIX}<a> "
        f"with a real number a, such as {ALPHA_PREFIX}0.5."
    )
