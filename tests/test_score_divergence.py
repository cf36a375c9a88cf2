"""Oracle tests of the score-divergence losses (SiD, SIM) on closed-form Gaussian teachers and students.

Setting: teacher ``p_0 = N(μ, s² I)`` (a one-component :class:`GaussianMixture`), student ``G(z) = A z + b``
(:class:`GaussianStudent`), the exact fake score ``f_ψ = E_q[x0 | x_t]`` frozen at the current ``θ = (A, b)``, one
noise time on SD's VP path. Every quantity is affine in ``x_t``, so every loss is quadratic in ``(z, ε)``: the 2n
points ``±√n e_i`` of ``(z, ε) ∈ R^n`` (equal weights) integrate quadratics against ``N(0, I)`` exactly, which makes
the expectations and their θ-gradients exact, not Monte Carlo.

The last section is groundwork for Uni-Instruct (algorithms.md §8): the diffusion expansion of f-divergences and the
exact gradient of its integrand, on a 1-D mixture teacher with Gauss-Hermite quadrature.
"""

import math

import numpy as np
import pytest
import torch

from diffusers_onestep import parameterization as param
from diffusers_onestep.distill import losses
from diffusers_onestep.distill.divergences import get_divergence
from diffusers_onestep.testing.analytic import GaussianMixture, GaussianStudent


DIM = 2
PATH = param.VPPath.from_betas()


def _nodes(dim: int = DIM):
    """``(z, ε)`` nodes: an exact cubature of degree 3 for ``N(0, I_{2·dim})`` with equal weights."""
    n = 2 * dim
    eye = torch.eye(n, dtype=torch.float64) * math.sqrt(n)
    points = torch.cat([eye, -eye])
    return points[:, :dim], points[:, dim:]


def _setup(t_value=400.0):
    teacher = GaussianMixture(torch.tensor([[1.0, -0.5]]), torch.tensor([0.7]))
    student = GaussianStudent(torch.tensor([[1.3, 0.2], [-0.1, 0.6]]), torch.tensor([-0.4, 0.3]))
    z, eps = _nodes()
    t = torch.full((z.shape[0],), t_value, dtype=torch.float64)
    return teacher, student, z, eps, t


def _live_student_x0(student, x_t, t):
    """``E_{q_θ}[x0 | x_t]`` with the *live* parameters (its θ-dependence is what the score identity replaces)."""
    alpha, sigma = PATH.alpha_sigma(t[:1])
    cov0 = student.A @ student.A.T
    cov_t = alpha**2 * cov0 + sigma**2 * torch.eye(DIM, dtype=torch.float64)
    gain = alpha * cov0 @ torch.linalg.inv(cov_t)
    return student.b + (x_t - alpha * student.b) @ gain.T


def _grads(value, student):
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(value, [student.A, student.b])])


def _terms(teacher, student, z, eps, t, detach_x_t=False):
    x = student.sample(z)
    x_t = param.add_noise(x, eps, t, PATH)
    x_t_in = x_t.detach() if detach_x_t else x_t
    x0_real = teacher.x0(x_t_in, t, PATH)
    x0_fake = student.x0(x_t_in, t, PATH)  # parameters frozen at θ0, input differentiated
    return x, x_t, x0_real, x0_fake


@pytest.mark.parametrize("alpha", [0.5, 1.0, 1.2])
def test_sid_gradient_is_the_fisher_divergence_gradient_plus_the_alpha_term(alpha):
    """SiD (Zhou et al. 2024, eq. 23) with an exact fake score: ``∇θ E[L_α] = ½ ∇θ D_F − (α − ½) ∂θ E‖δ‖²|_ψ`` where
    ``D_F = E_q ‖f_p − f_q‖² / d`` is the x0-space Fisher divergence; α = ½ is exactly half its gradient."""
    teacher, student, z, eps, t = _setup()
    x, x_t, x0_real, x0_fake = _terms(teacher, student, z, eps, t)
    loss, logs = losses.sid_generator_loss(x, x0_real, x0_fake, alpha=alpha, normalize=False)
    grad_sid = _grads(loss, student)
    assert logs["nonfinite"] == 0

    x, x_t, x0_real, _ = _terms(teacher, student, z, eps, t)
    fisher = (x0_real - _live_student_x0(student, x_t, t)).pow(2).mean()
    grad_fisher = _grads(fisher, student)
    x, x_t, x0_real, x0_fake = _terms(teacher, student, z, eps, t)
    grad_path = _grads((x0_real - x0_fake).pow(2).mean(), student)

    expected = 0.5 * grad_fisher - (alpha - 0.5) * grad_path
    torch.testing.assert_close(grad_sid, expected, rtol=1e-9, atol=1e-12)
    assert grad_fisher.norm() > 1e-2 and grad_path.norm() > 1e-2  # both terms are really exercised
    # Negative controls: VSD-style stop-gradient on x_t (no input gradient into the networks), and swapped networks.
    x, _, x0_real_sg, x0_fake_sg = _terms(teacher, student, z, eps, t, detach_x_t=True)
    detached = _grads(losses.sid_generator_loss(x, x0_real_sg, x0_fake_sg, alpha, normalize=False)[0], student)
    assert (detached - expected).norm() > 0.05 * expected.norm()
    x, _, x0_real, x0_fake = _terms(teacher, student, z, eps, t)
    swapped = _grads(losses.sid_generator_loss(x, x0_fake, x0_real, alpha, normalize=False)[0], student)
    assert (swapped - expected).norm() > 0.05 * expected.norm()


def test_sid_descent_lowers_the_fisher_divergence():
    """Sign: a small step against SiD's gradient (α = ½, exact fake) decreases the exact Fisher divergence."""
    teacher, student, z, eps, t = _setup()

    def fisher():
        x = student.sample(z)
        x_t = param.add_noise(x, eps, t, PATH)
        return (teacher.x0(x_t, t, PATH) - _live_student_x0(student, x_t, t)).pow(2).mean()

    before = float(fisher().detach())
    x, _, x0_real, x0_fake = _terms(teacher, student, z, eps, t)
    grads = torch.autograd.grad(
        losses.sid_generator_loss(x, x0_real, x0_fake, 0.5, normalize=False)[0], [student.A, student.b]
    )
    with torch.no_grad():
        student.A -= 0.05 * grads[0]
        student.b -= 0.05 * grads[1]
    assert float(fisher().detach()) < before


def test_sid_normaliser_divides_each_sample_by_its_detached_mean_abs_gap():
    """``W = mean_{C,H,W}|x − x̂_real|`` per sample, without gradient (SiD's ``weight_factor``)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, generator=generator, requires_grad=True)
    x0_real = (x * 0.5 + torch.randn(3, 4, 5, generator=generator)).detach().requires_grad_(True)
    x0_fake = torch.randn(3, 4, 5, generator=generator, requires_grad=True)
    loss, logs = losses.sid_generator_loss(x, x0_real, x0_fake, alpha=1.2)
    raw, _ = losses.sid_generator_loss(x, x0_real, x0_fake, alpha=1.2, normalize=False)
    weight = (x - x0_real).abs().mean(dim=(1, 2), keepdim=True).detach()
    per_element = (x0_real - x0_fake) * ((x0_real - x) - 1.2 * (x0_real - x0_fake)) / weight
    torch.testing.assert_close(loss, per_element.mean())
    g, g_raw = torch.autograd.grad(loss, x)[0], torch.autograd.grad(raw, x)[0]
    torch.testing.assert_close(g, g_raw / weight)  # no gradient through W
    assert logs["sid_normalizer"] == pytest.approx(float(weight.mean()))


def test_sid_drops_nonfinite_samples():
    x = torch.randn(3, 4)
    x0_real, x0_fake = torch.randn(3, 4), torch.randn(3, 4)
    x0_real[1, 2] = float("nan")
    loss, logs = losses.sid_generator_loss(x, x0_real, x0_fake)
    keep = [0, 2]
    expected = losses.sid_generator_loss(x[keep], x0_real[keep], x0_fake[keep])[0] * 2 / 3
    assert logs["nonfinite"] == 1
    torch.testing.assert_close(loss, expected)


def test_sim_with_squared_distance_is_sid_at_alpha_one():
    """SIM (Luo et al. 2024, Thm 3.1) with ``d = ‖·‖²`` and ``w_t = σ_t⁴ / (2 α_t² W)`` equals SiD at α = 1: value
    and gradient through ``x`` and ``x_t`` into both networks."""
    teacher, student, z, eps, t = _setup()
    t = torch.linspace(100.0, 900.0, z.shape[0], dtype=torch.float64)  # per-sample times
    x, _, x0_real, x0_fake = _terms(teacher, student, z, eps, t)
    sid, _ = losses.sid_generator_loss(x, x0_real, x0_fake, alpha=1.0)
    alpha_t, sigma_t = PATH.alpha_sigma(t)
    W = (x - x0_real).abs().mean(dim=1).clamp_min(1e-5).detach()
    sim, _ = losses.sim_generator_loss(
        x, x0_real, x0_fake, t, PATH, distance="squared", weight=sigma_t**4 / (2 * alpha_t**2 * W)
    )
    torch.testing.assert_close(sim, sid, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        torch.cat([g.reshape(-1) for g in torch.autograd.grad(sim, [student.A, student.b], retain_graph=True)]),
        torch.cat([g.reshape(-1) for g in torch.autograd.grad(sid, [student.A, student.b])]),
    )
    # Negative control: SiD's released α = 1.2 differs from SIM-squared.
    sid_12, _ = losses.sid_generator_loss(x, x0_real, x0_fake, alpha=1.2)
    assert abs(float((sid_12 - sim).detach())) > 1e-3 * abs(float(sim.detach()))


def _sim_path_term(teacher, student, z, eps, t, distance, c):
    """``∂θ E[d(y_t)]`` at frozen networks (input differentiated)."""
    x, x_t, x0_real, x0_fake = _terms(teacher, student, z, eps, t)
    alpha_t, sigma_t = PATH.alpha_sigma(t)
    y = (alpha_t / sigma_t**2)[:, None] * (x0_fake - x0_real)
    norm_sq = y.pow(2).sum(1)
    d = norm_sq if distance == "squared" else torch.sqrt(norm_sq + c**2) - c
    return _grads(d.mean() / DIM, student)


def test_sim_gradient_is_the_score_divergence_gradient_less_the_path_term():
    """``D_d = E_q d(s_q − s_p)`` (SIM's divergence). By the score identity
    ``∇θ D_d = ∂θ E[d(y)]|_ψ + ∇θ L_SIM``: the tractable loss carries the term of ``s_q``'s θ-dependence, exactly."""
    teacher, student, z, eps, t = _setup()
    distance, c = "squared", 0.5
    x, x_t, x0_real, x0_fake = _terms(teacher, student, z, eps, t)
    loss, _ = losses.sim_generator_loss(x, x0_real, x0_fake, t, PATH, distance=distance, huber_c=c)
    grad_sim = _grads(loss, student)

    # D_d with the live student score (closed form): s_q(x) = (α f_q(x) − x)/σ², s_p likewise.
    x = student.sample(z)
    x_t = param.add_noise(x, eps, t, PATH)
    alpha_t, sigma_t = PATH.alpha_sigma(t)
    y_live = (alpha_t / sigma_t**2)[:, None] * (_live_student_x0(student, x_t, t) - teacher.x0(x_t, t, PATH))
    norm_sq = y_live.pow(2).sum(1)
    divergence = norm_sq.mean() / DIM
    grad_divergence = _grads(divergence, student)
    grad_path = _sim_path_term(teacher, student, z, eps, t, distance, c)

    # quadratic in (z, ε): the cubature is exact (pseudo-Huber is not; see the Monte-Carlo test below)
    torch.testing.assert_close(grad_sim, grad_divergence - grad_path, rtol=1e-9, atol=1e-12)
    assert grad_path.norm() > 0.05 * grad_divergence.norm()  # the left-out term is not negligible here


def test_sim_pseudo_huber_gradient_matches_the_divergence_gradient_by_monte_carlo():
    """The same identity for the pseudo-Huber distance, with common random numbers (the difference of the two
    sides is an unbiased zero-mean estimate; its error shrinks as 1/√n)."""
    teacher, student, _, _, _ = _setup()
    generator = torch.Generator().manual_seed(0)
    n = 200_000
    z = torch.randn(n, DIM, generator=generator, dtype=torch.float64)
    eps = torch.randn(n, DIM, generator=generator, dtype=torch.float64)
    t = torch.full((n,), 400.0, dtype=torch.float64)
    c = 0.5
    x, x_t, x0_real, x0_fake = _terms(teacher, student, z, eps, t)
    grad_sim = _grads(losses.sim_generator_loss(x, x0_real, x0_fake, t, PATH, huber_c=c)[0], student)
    x = student.sample(z)
    x_t = param.add_noise(x, eps, t, PATH)
    alpha_t, sigma_t = PATH.alpha_sigma(t)
    y_live = (alpha_t / sigma_t**2)[:, None] * (_live_student_x0(student, x_t, t) - teacher.x0(x_t, t, PATH))
    divergence = (torch.sqrt(y_live.pow(2).sum(1) + c**2) - c).mean() / DIM
    grad_divergence = _grads(divergence, student)
    grad_path = _sim_path_term(teacher, student, z, eps, t, "pseudo_huber", c)
    expected = grad_divergence - grad_path
    assert (grad_sim - expected).norm() < 0.03 * expected.norm()
    # Negative control: the sign-flipped loss is far off.
    assert (-grad_sim - expected).norm() > 1.5 * expected.norm()


# ---------------------------------------------------------------------------------------------------------------------
# Groundwork for Uni-Instruct (Wang et al. 2025, arXiv 2505.20755; algorithms.md §8). Its Theorem 3.2 could not be
# read here (UNI_INSTRUCT_FINDINGS.md on branch issue14-uni), so these tests pin only what can be derived: the diffusion
# expansion of D_f (§8.1, the object its Theorem 3.1 expands) and the exact θ-gradient of that expansion's integrand.
# Setting: a 1-D two-component teacher and a linear student on the flow path (α_t = 1 − t, σ_t = t, whose forward SDE
# has g_t² = 2t / (1 − t)); expectations by a tensor Gauss-Hermite rule (smooth integrands, accurate to ~1e-9).
# ---------------------------------------------------------------------------------------------------------------------

FLOW = param.FlowPath()
EXPANSION_DIVERGENCES = ["reverse_kl", "forward_kl", "js", "jeffreys", "hellinger", "pearson"]


def _expansion_setup():
    teacher = GaussianMixture(
        torch.tensor([[-1.0], [1.2]]), torch.tensor([0.3, 0.5]), weights=torch.tensor([0.3, 0.7])
    )
    student = GaussianStudent(torch.tensor([[1.1]]), torch.tensor([0.2]))
    return teacher, student


def _hermite(n):
    """Probabilists' Gauss-Hermite nodes and weights normalized to sum 1 (``E_{N(0,1)}``)."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(n)
    return torch.tensor(nodes), torch.tensor(weights / weights.sum())


def _h_and_derivatives(divergence, r):
    """``h(r) = r² f''(r)``, ``h'`` and ``h''`` by autograd (``+ 0·r³`` keeps a graph for constant ``h``)."""
    r = r.detach().clone().requires_grad_(True)
    h = divergence.h(r) + 0 * r**3
    (h1,) = torch.autograd.grad(h.sum(), r, create_graph=True)
    (h2,) = torch.autograd.grad(h1.sum(), r)
    return h.detach(), h1.detach(), h2.detach()


@pytest.mark.parametrize("name", EXPANSION_DIVERGENCES)
def test_diffusion_expansion_of_f_divergences(name):
    """algorithms.md §8.1: for two marginals under one forward SDE,
    ``d/dt D_f(p_t‖q_t) = −(g_t²/2) E_{q_t}[h(r_t) ‖s_p − s_q‖²]`` with ``h = r² f''`` and ``r = p_t / q_t``.
    Integrated over t this is the expansion Uni-Instruct's Theorem 3.1 states (reverse KL: h ≡ 1, de Bruijn)."""
    divergence = get_divergence(name)
    teacher, student = _expansion_setup()
    nodes, weights = _hermite(120)

    def on_q_t(t):
        alpha, sigma = FLOW.alpha_sigma(torch.tensor(t, dtype=torch.float64))
        std = torch.sqrt(alpha**2 * student.covariance()[0, 0] + sigma**2)
        x = (alpha * student.b.detach() + std * nodes)[:, None]
        return x, student.exact_ratio(x, t, FLOW, teacher)

    def divergence_at(t):
        _, ratio = on_q_t(t)
        return (weights * divergence.f(ratio)).sum()

    def expansion_integrand(t, h):
        x, ratio = on_q_t(t)
        gap = (teacher.score(x, t, FLOW) - student.score(x, t, FLOW)).pow(2).sum(1)
        return (weights * h(ratio) * gap).sum()

    for t in (0.5, 0.8):
        step = 1e-5
        rate = (divergence_at(t + step) - divergence_at(t - step)) / (2 * step)
        g_sq = 2 * t / (1 - t)
        predicted = -(g_sq / 2) * expansion_integrand(t, divergence.h)
        assert float(rate) < 0  # both marginals contract towards the same prior
        torch.testing.assert_close(rate, predicted, rtol=1e-6, atol=0)
        assert abs(float(2 * predicted - rate)) > 0.5 * abs(float(rate))  # negative control: g² without the ½
    # Negative control (at t = 0.5, where r_t is far from 1): h of the ratio the wrong way round (student over
    # teacher; reverse KL's h ≡ 1 is blind to that, so there the weight f'' without the r² factor).
    wrong = (lambda r: divergence.h(r) / r**2) if name == "reverse_kl" else (lambda r: divergence.h(1 / r))
    assert abs(float(expansion_integrand(0.5, wrong) / expansion_integrand(0.5, divergence.h)) - 1) > 0.05


def _grads_kept(value, student):
    """θ-gradient, keeping the graph: the four terms below share one forward pass."""
    grads = torch.autograd.grad(value, [student.A, student.b], retain_graph=True)
    return torch.cat([g.reshape(-1) for g in grads])


@pytest.mark.parametrize("name", EXPANSION_DIVERGENCES)
def test_gradient_of_the_expanded_f_divergence_integrand(name):
    """The exact θ-gradient of ``J_t(θ) = E_{q_t}[h(r_t) ‖s_p − s_q‖²]`` (derived here, not Uni-Instruct's Thm 3.2)::

        ∇θ J_t = ∇θ E[h(r̄(x_t)) ℓ_SIM]                                   (SIM, weight differentiated through x_t)
               + E[−r² h''(r) ‖Δ‖² · (s_p − s_q) · ∂x_t/∂θ]               (a DI/VSD-type term)
               + (h − r h')(r) · ∂θ E‖Δ(x_t)‖² at frozen networks          (the path term)

    ``ℓ_SIM`` is SIM's squared-distance per-sample loss, ``Δ = s_q − s_p``, ``r̄`` the ratio frozen at θ0 as a
    function of x (a discriminator's logit, input differentiated). The weight on SIM must carry its x_t-gradient:
    with a stop-gradient weight (the released Uni-Instruct code's ``loss * w_sim``) the sum is off by 25-75 %."""
    divergence = get_divergence(name)
    teacher, student = _expansion_setup()
    nodes, weights = _hermite(60)
    z = nodes.repeat_interleave(nodes.shape[0])[:, None]
    eps = nodes.repeat(nodes.shape[0])[:, None]
    w = weights.repeat_interleave(nodes.shape[0]) * weights.repeat(nodes.shape[0])
    t = torch.full((z.shape[0],), 0.5, dtype=torch.float64)
    alpha_t, sigma_t = FLOW.alpha_sigma(torch.tensor(0.5, dtype=torch.float64))

    # Left side: J_t with the live student density (q_t = N(α b, α² a² + σ²)), differentiated in closed form.
    x_t = param.add_noise(student.sample(z), eps, t, FLOW)
    var = alpha_t**2 * student.A[0, 0] ** 2 + sigma_t**2
    centred = x_t[:, 0] - alpha_t * student.b[0]
    log_q = -0.5 * (math.log(2 * math.pi) + torch.log(var) + centred**2 / var)
    ratio_live = torch.exp(teacher.noisy_log_prob(x_t, t, FLOW) - log_q)
    gap_live = (teacher.score(x_t, t, FLOW)[:, 0] + centred / var) ** 2
    expected = _grads_kept((w * divergence.h(ratio_live) * gap_live).sum(), student)

    # Right side: networks and ratio frozen at θ0, inputs differentiated.
    x = student.sample(z)
    x_t = param.add_noise(x, eps, t, FLOW)
    ratio = student.exact_ratio(x_t, t, FLOW, teacher)
    h, h1, h2 = _h_and_derivatives(divergence, ratio)
    x0_real, x0_fake = teacher.x0(x_t, t, FLOW), student.x0(x_t, t, FLOW)
    gap = (alpha_t / sigma_t**2) * (x0_fake - x0_real)  # s_q − s_p
    gap_sq = gap.pow(2).sum(1)
    sim_per_sample = (-2 * gap * (alpha_t / sigma_t**2) * (x0_fake - x)).sum(1)  # SIM, d = ‖·‖², Thm 3.1
    sim_term = _grads_kept((w * divergence.h(ratio) * sim_per_sample).sum(), student)
    sim_term_stop_grad = _grads_kept((w * h * sim_per_sample).sum(), student)
    di_weight = (-(ratio.detach() ** 2) * h2 * gap_sq).detach()
    di_term = _grads_kept((w * di_weight * (-gap.detach() * x_t).sum(1)).sum(), student)
    path_term = _grads_kept((w * (h - ratio.detach() * h1) * gap_sq).sum(), student)

    torch.testing.assert_close(sim_term + di_term + path_term, expected, rtol=1e-7, atol=1e-10)
    if name != "reverse_kl":  # h ≡ 1: an x-independent weight
        assert (sim_term_stop_grad + di_term + path_term - expected).norm() > 0.2 * expected.norm()
    if name in ("js", "hellinger", "pearson"):  # h'' = 0 for reverse KL, forward KL, Jeffreys: no DI term there
        assert di_term.norm() > 1e-3 * expected.norm()
    if name != "forward_kl":  # h = r: h − r h' = 0
        assert path_term.norm() > 0.02 * expected.norm()
