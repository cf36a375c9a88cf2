"""The f-divergence table against its definition: h(r) = r^2 f''(r) by double autograd, f(1) = 0, f convex."""

import pytest
import torch

from diffusers_onestep.distill.divergences import (
    DIVERGENCES,
    Divergence,
    alpha_divergence,
    divergence_names,
    get_divergence,
)


ALPHA_NAMES = ["alpha:0", "alpha:1", "alpha:0.5", "alpha:-1", "alpha:2", "alpha:0.3"]
ALL_NAMES = list(DIVERGENCES) + ALPHA_NAMES
# 1e-2 .. 1e2, a grid dense in the region the clipped ratio [0.1, 20] lives in.
R_GRID = torch.logspace(-2, 2, 41, dtype=torch.float64)


def second_derivative(f, r):
    r = r.clone().requires_grad_(True)
    (d1,) = torch.autograd.grad(f(r).sum(), r, create_graph=True)
    (d2,) = torch.autograd.grad(d1.sum(), r)
    return d2


def test_names():
    assert divergence_names() == [
        "reverse_kl",
        "forward_kl",
        "js",
        "hellinger",
        "jeffreys",
        "softened_reverse_kl",
        "neyman",
        "pearson",
    ]
    for name in divergence_names():
        assert get_divergence(name).name == name
    assert get_divergence("alpha:0.5").name == "alpha:0.5"
    assert get_divergence(DIVERGENCES["js"]) is DIVERGENCES["js"]


@pytest.mark.parametrize("name", ALL_NAMES)
def test_h_is_r_squared_f_second_derivative(name):
    div = get_divergence(name)
    f2 = second_derivative(div.f, R_GRID)
    torch.testing.assert_close(div.h(R_GRID), R_GRID**2 * f2, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_f_vanishes_at_one_and_is_convex(name):
    div = get_divergence(name)
    assert abs(float(div.f(torch.ones(1, dtype=torch.float64)))) < 1e-12
    assert torch.all(second_derivative(div.f, R_GRID) > 0)
    # convexity, checked without derivatives too: f at a midpoint lies below the chord
    a, b = R_GRID[:-2], R_GRID[2:]
    assert torch.all(div.f((a + b) / 2) <= (div.f(a) + div.f(b)) / 2 + 1e-12)
    # D_f >= 0 with f(1) = 0 requires f(r) >= f'(1)(r - 1): the tangent at 1 lies below f
    r1 = torch.ones(1, dtype=torch.float64, requires_grad=True)
    (slope,) = torch.autograd.grad(div.f(r1).sum(), r1)
    assert torch.all(div.f(R_GRID) >= slope * (R_GRID - 1) - 1e-12)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("reverse_kl", lambda r: torch.ones_like(r)),
        ("forward_kl", lambda r: r),
        ("js", lambda r: r / (1 + r)),
        ("hellinger", lambda r: 0.5 * r.sqrt()),
        ("jeffreys", lambda r: 1 + r),
        ("softened_reverse_kl", lambda r: 1 / (1 + r)),
        ("neyman", lambda r: 2 / r),
        ("pearson", lambda r: 2 * r**2),
        ("alpha:0.5", lambda r: r**0.5),
        ("alpha:0", lambda r: torch.ones_like(r)),
        ("alpha:1", lambda r: r),
    ],
)
def test_h_table(name, expected):
    """The weights of algorithms.md §6.2 (FastGen's ``js`` is ``1 − 1/(1+r)``, the same function)."""
    torch.testing.assert_close(get_divergence(name).h(R_GRID), expected(R_GRID))


def test_alpha_limits_match_the_kl_divergences():
    """alpha -> 0 and alpha -> 1 are continuous limits, and equal reverse/forward KL up to an affine term."""
    r = R_GRID
    for limit, near, kl in ((0.0, 1e-6, "reverse_kl"), (1.0, 1 - 1e-6, "forward_kl")):
        torch.testing.assert_close(alpha_divergence(near).f(r), alpha_divergence(limit).f(r), rtol=1e-4, atol=1e-5)
        difference = alpha_divergence(limit).f(r) - get_divergence(kl).f(r)
        slope = (difference[-1] - difference[0]) / (r[-1] - r[0])
        torch.testing.assert_close(difference, slope * (r - 1), rtol=0, atol=1e-9)  # affine, zero at r = 1
    torch.testing.assert_close(alpha_divergence(0.5).f(r), 2 * get_divergence("hellinger").f(r))


def test_bounded_flag_matches_h():
    wide = torch.logspace(-8, 8, 33, dtype=torch.float64)
    for name in ALL_NAMES:
        div = get_divergence(name)
        peak = float(div.h(wide).max())
        assert (peak <= 1.0 + 1e-12) == div.bounded, name


def test_unknown_name_raises_one_sentence():
    with pytest.raises(ValueError) as info:
        get_divergence("kl_forward")
    message = str(info.value)
    assert message.count(". ") == 0 and message.endswith(".")
    for name in divergence_names():
        assert name in message
    assert "alpha:<a>" in message
    for bad in ("alpha:", "alpha:x", "alpha:inf", "alpha:nan", "rkl"):
        with pytest.raises(ValueError):
            get_divergence(bad)


def test_divergence_is_frozen():
    div = get_divergence("js")
    assert isinstance(div, Divergence)
    with pytest.raises(Exception):
        div.name = "other"
