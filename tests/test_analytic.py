"""The closed-form testbeds of ``testing.analytic`` against finite differences, Tweedie and torch.distributions."""

import math

import pytest
import torch
from torch import distributions as D

from diffusers_onestep import parameterization as P
from diffusers_onestep.testing.analytic import GaussianMixture, GaussianStudent, mc_f_divergence


VP = P.VPPath.from_betas()  # DDPM linear betas 1e-4..0.02
FLOW = P.FlowPath()
PATHS = {
    "vp": (VP, [0.0, 10.0, 250.0, 999.0]),
    "flow": (FLOW, [0.0, 0.05, 0.5, 0.95]),
}


def wide_mixture():
    """Three unequal, overlapping components: every responsibility matters somewhere."""
    return GaussianMixture(
        means=[[-1.0, 0.0], [1.0, 0.5], [0.0, -1.5]], stds=[0.3, 0.5, 0.2], weights=[0.5, 0.3, 0.2], labels=[0, 1, 1]
    )


def student():
    return GaussianStudent(A=[[0.7, 0.2], [-0.1, 0.4]], b=[0.3, -0.2])


def points(n=64, seed=0, scale=1.5):
    return scale * torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def finite_difference_grad(fn, x, step=1e-5):
    grad = torch.zeros_like(x)
    for i in range(x.shape[1]):
        e = torch.zeros_like(x)
        e[:, i] = step
        grad[:, i] = (fn(x + e) - fn(x - e)) / (2 * step)
    return grad


def alpha_sigma(path, t):
    return (float(v) for v in path.alpha_sigma(torch.tensor(t, dtype=torch.float64)))


@pytest.mark.parametrize("kind", list(PATHS))
def test_mixture_noisy_log_prob_matches_torch_distributions(kind):
    path, times = PATHS[kind]
    gm, x = wide_mixture(), points()
    for t in times:
        alpha, sigma = alpha_sigma(path, t)
        scale = torch.sqrt(alpha**2 * gm.stds**2 + sigma**2)
        reference = D.MixtureSameFamily(
            D.Categorical(probs=gm.weights), D.Independent(D.Normal(alpha * gm.means, scale[:, None].expand(-1, 2)), 1)
        )
        torch.testing.assert_close(gm.noisy_log_prob(x, t, path), reference.log_prob(x), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gm.log_prob(x), gm.noisy_log_prob(x, 0.0, FLOW))


@pytest.mark.parametrize("kind", list(PATHS))
def test_mixture_score_and_x0_match_finite_differences_and_tweedie(kind):
    path, times = PATHS[kind]
    gm, x = wide_mixture(), points()
    for t in times[1:]:  # t = 0 has sigma = 0 on the flow path: Tweedie divides by sigma
        score = gm.score(x, t, path)
        fd = finite_difference_grad(lambda y: gm.noisy_log_prob(y, t, path), x)
        torch.testing.assert_close(score, fd, rtol=1e-6, atol=1e-6)
        alpha, sigma = alpha_sigma(path, t)
        if alpha > 1e-3:  # Tweedie: E[x0 | x_t] = (x_t + sigma^2 score) / alpha
            torch.testing.assert_close(gm.x0(x, t, path), (x + sigma**2 * score) / alpha, rtol=1e-9, atol=1e-9)
        # parameterization's own Tweedie agrees: x0 -> score
        torch.testing.assert_close(P.x0_to_score(gm.x0(x, t, path), x, t, path), score, rtol=1e-9, atol=1e-9)


def test_mixture_x0_is_the_posterior_mean_by_monte_carlo():
    """Independent of Tweedie: E[x0 | x_t = x] = E_{p_0}[x0 N(x; a x0, s^2 I)] / E_{p_0}[N(x; a x0, s^2 I)]."""
    gm, path, t = wide_mixture(), FLOW, 0.4
    alpha, sigma = 1 - t, t
    x0 = gm.sample(200_000, torch.Generator().manual_seed(1))
    query = torch.tensor([[0.3, 0.1], [-0.8, 0.2], [0.1, -1.0]], dtype=torch.float64)
    log_lik = -0.5 * ((query[:, None, :] - alpha * x0[None]) ** 2).sum(-1) / sigma**2  # [3, n]
    weights = torch.softmax(log_lik, dim=1)
    assert float(1 / (weights**2).sum(1).max()) > 20_000  # effective sample size
    torch.testing.assert_close(weights @ x0, gm.x0(query, t, path), atol=0.01, rtol=0)


@pytest.mark.parametrize("kind", list(PATHS))
def test_mixture_predictions_round_trip_through_parameterization(kind):
    path, times = PATHS[kind]
    gm, x = wide_mixture(), points()
    types = ("epsilon", "sample", "v_prediction") if kind == "vp" else ("epsilon", "sample", "flow_prediction")
    t = torch.full((x.shape[0],), times[2], dtype=torch.float64)
    for prediction_type in types:
        pred = gm.prediction(x, t, path, prediction_type)
        torch.testing.assert_close(P.to_x0(pred, x, t, path, prediction_type), gm.x0(x, t, path))
        sigma = path.alpha_sigma(t)[1][:, None]
        torch.testing.assert_close(-P.to_epsilon(pred, x, t, path, prediction_type) / sigma, gm.score(x, t, path))


def test_per_sample_times_equal_scalar_times():
    gm, x = wide_mixture(), points(8)
    t = torch.tensor([10.0, 100.0, 200.0, 300.0, 400.0, 500.0, 700.0, 999.0])
    per_sample = gm.x0(x, t, VP)
    for i in range(8):
        torch.testing.assert_close(per_sample[i : i + 1], gm.x0(x[i : i + 1], float(t[i]), VP))


def test_class_conditional_mixture():
    gm, x = wide_mixture(), points()
    t = 0.3
    p_c = gm.class_probabilities()
    torch.testing.assert_close(p_c, torch.tensor([0.5, 0.5], dtype=torch.float64))
    # p(x) = sum_c p(c) p(x | c)
    mixed = torch.logsumexp(
        torch.stack([math.log(p_c[c]) + gm.noisy_log_prob(x, t, FLOW, label=c) for c in range(2)]), dim=0
    )
    torch.testing.assert_close(mixed, gm.noisy_log_prob(x, t, FLOW))
    # class 0 is the single component 0: an exact Gaussian posterior
    alpha, sigma = 1 - t, t
    c0 = alpha**2 * 0.3**2 + sigma**2
    torch.testing.assert_close(gm.score(x, t, FLOW, label=0), -(x - alpha * gm.means[0]) / c0)
    # per-sample labels equal per-label calls
    labels = torch.arange(x.shape[0]) % 2
    by_sample = gm.x0(x, t, FLOW, label=labels)
    for c in range(2):
        torch.testing.assert_close(by_sample[labels == c], gm.x0(x[labels == c], t, FLOW, label=c))
    with pytest.raises(ValueError):
        gm.score(x, t, FLOW, label=5)
    with pytest.raises(ValueError):
        GaussianMixture([[0.0, 0.0]], 1.0).score(x, t, FLOW, label=0)


def test_mixture_sampling_and_constructors():
    g = torch.Generator().manual_seed(0)
    pair = GaussianMixture.imbalanced_pair()
    x, labels = pair.sample_with_labels(20_000, g)
    assert abs(float((labels == 1).double().mean()) - 0.1) < 0.01
    torch.testing.assert_close(x.mean(0), pair.mean(), atol=0.03, rtol=0)
    torch.testing.assert_close(torch.cov(x.T), pair.covariance(), atol=0.05, rtol=0)
    x1 = pair.sample(1000, g, label=1)
    assert torch.all(x1[:, 0] > 1.0)

    ring = GaussianMixture.ring8()
    torch.testing.assert_close(ring.means.norm(dim=1), torch.full((8,), 2.0, dtype=torch.float64))
    assert float(ring.stds[0]) == 0.02 and ring.num_classes == 8
    grid = GaussianMixture.grid25()
    assert grid.num_components == 25 and float(grid.stds[0]) == 0.05
    assert sorted(set(grid.means[:, 0].tolist())) == [-4.0, -2.0, 0.0, 2.0, 4.0]


@pytest.mark.parametrize("kind", list(PATHS))
def test_student_closed_forms(kind):
    path, times = PATHS[kind]
    st, x = student(), points()
    for t in times[1:]:
        alpha, sigma = alpha_sigma(path, t)
        cov = alpha**2 * st.covariance() + sigma**2 * torch.eye(2, dtype=torch.float64)
        reference = D.MultivariateNormal(alpha * st.b.detach(), covariance_matrix=cov)
        torch.testing.assert_close(st.noisy_log_prob(x, t, path), reference.log_prob(x))
        score = st.score(x, t, path)
        fd = finite_difference_grad(lambda y: st.noisy_log_prob(y, t, path), x)
        torch.testing.assert_close(score, fd, rtol=1e-6, atol=1e-6)
        if alpha > 1e-3:
            torch.testing.assert_close(st.x0(x, t, path), (x + sigma**2 * score) / alpha)
    # pure noise (flow t = 1): the posterior mean is the prior mean b
    torch.testing.assert_close(st.x0(x, 1.0, FLOW), st.b.detach().expand_as(x))


def test_student_sample_is_differentiable_and_has_the_right_moments():
    st = student()
    z = torch.randn(50_000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = st.sample(z)
    x.sum().backward()
    torch.testing.assert_close(st.b.grad, torch.full((2,), 50_000.0, dtype=torch.float64))
    torch.testing.assert_close(torch.cov(x.detach().T), st.covariance(), atol=0.01, rtol=0)


def test_exact_ratio_and_mc_divergence_against_gaussian_closed_forms():
    """With a one-component teacher, p_t and q_t are Gaussians: KL both ways is closed form."""
    teacher = GaussianMixture([[1.0, -0.5]], stds=[0.6])
    st, path, t = student(), FLOW, 0.3
    alpha, sigma = 1 - t, t
    eye = torch.eye(2, dtype=torch.float64)
    p = D.MultivariateNormal(alpha * teacher.means[0], (alpha**2 * 0.36 + sigma**2) * eye)
    q = D.MultivariateNormal(alpha * st.b.detach(), alpha**2 * st.covariance() + sigma**2 * eye)
    x = points()
    torch.testing.assert_close(st.exact_ratio(x, t, path, teacher), torch.exp(p.log_prob(x) - q.log_prob(x)))
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    rkl = float(mc_f_divergence(teacher, st, "reverse_kl", path, [t], 200_000, g()))
    fkl = float(mc_f_divergence(teacher, st, "forward_kl", path, [t], 200_000, g()))
    assert rkl == pytest.approx(float(D.kl_divergence(q, p)), rel=0.02)
    assert fkl == pytest.approx(float(D.kl_divergence(p, q)), rel=0.05)
    # a student equal to the teacher has ratio 1 and zero divergence
    matched = GaussianStudent(0.6 * torch.eye(2, dtype=torch.float64), teacher.means[0])
    torch.testing.assert_close(matched.exact_ratio(x, t, path, teacher), torch.ones(64, dtype=torch.float64))
    assert abs(float(mc_f_divergence(teacher, matched, "js", path, [0.2, t], 1000, g()))) < 1e-12
