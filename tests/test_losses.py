"""The distillation losses against closed forms (algorithms.md §2, §6, §13.3).

The generator tests use the exact testbeds of ``testing.analytic``: a Gaussian-mixture teacher (exact real ``x̂0``),
a linear-Gaussian student (exact fake ``x̂0``) and the exact density ratio, so any failure is the loss's, not a
critic's.
"""

import math

import pytest
import torch

from diffusers_onestep import parameterization as P
from diffusers_onestep.distill import losses
from diffusers_onestep.distill.divergences import get_divergence
from diffusers_onestep.distill.losses import (
    RatioNormalizer,
    classifier_free_guidance,
    denoising_loss,
    density_ratio,
    f_divergence_weight,
    gan_discriminator_loss,
    gan_generator_loss,
    sample_guidance_scale,
    vsd_generator_loss,
    vsd_gradient,
)
from diffusers_onestep.testing.analytic import GaussianMixture, GaussianStudent, mc_f_divergence


VP = P.VPPath.from_betas()
FLOW = P.FlowPath()
TRIG = P.TrigFlowPath()


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------------------------
# VSD surrogate
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(4, 3, 5, 5), (16, 2), (6,)])
@pytest.mark.parametrize("weighted", [False, True])
def test_vsd_loss_gradient_is_g_over_numel(shape, weighted):
    g_ = gen(0)
    x = torch.randn(shape, generator=g_, requires_grad=True)
    x0_real, x0_fake = torch.randn(shape, generator=g_), torch.randn(shape, generator=g_)
    weight = torch.rand(shape[0], generator=g_) + 0.5 if weighted else None
    loss, log = vsd_generator_loss(x, x0_real, x0_fake, weight=weight)
    loss.backward()

    # the DMD gradient written out independently, per sample
    expected = torch.empty(shape)
    for i in range(shape[0]):
        normalizer = (x[i].detach() - x0_real[i]).abs().mean() + 1e-6
        expected[i] = (x0_fake[i] - x0_real[i]) / normalizer * (weight[i] if weighted else 1.0)
    torch.testing.assert_close(x.grad, expected / x.numel())
    torch.testing.assert_close(vsd_gradient(x, x0_real, x0_fake, weight=weight)[0], expected)
    # the surrogate's value is 0.5 mean(g^2)
    torch.testing.assert_close(loss, 0.5 * (expected**2).mean())
    assert loss.dtype == torch.float32
    assert set(log) >= {"dm_grad_norm", "dm_weight_mean", "dm_normalizer", "nonfinite"}
    assert all(isinstance(v, float) for v in log.values()) and log["nonfinite"] == 0.0
    assert math.isclose(log["dm_weight_mean"], float(weight.mean()) if weighted else 1.0, rel_tol=1e-6)
    # descent moves x toward the teacher: -grad points from fake to real
    assert float((-x.grad * (x0_real - x0_fake)).sum()) > 0


def test_vsd_loss_bfloat16_student_and_no_grad_into_estimates():
    x = torch.randn(4, 8, dtype=torch.bfloat16, requires_grad=True)
    x0_real = torch.randn(4, 8, requires_grad=True)
    x0_fake = torch.randn(4, 8, requires_grad=True)
    loss, _ = vsd_generator_loss(x, x0_real, x0_fake)
    loss.backward()
    assert x.grad is not None and x.grad.dtype == torch.bfloat16
    assert x0_real.grad is None and x0_fake.grad is None


def test_vsd_loss_replaces_non_finite_gradients_and_counts_them():
    x = torch.randn(4, 3, requires_grad=True)
    x0_real, x0_fake = torch.randn(4, 3), torch.randn(4, 3)
    x0_real[1, 0] = float("nan")  # poisons sample 1's normalizer: the whole sample
    x0_fake[2, 2] = float("inf")  # one element
    loss, log = vsd_generator_loss(x, x0_real, x0_fake)
    loss.backward()
    assert torch.isfinite(loss) and torch.all(torch.isfinite(x.grad))
    assert log["nonfinite"] == 4.0
    assert torch.all(x.grad[1] == 0) and x.grad[2, 2] == 0 and x.grad[2, :2].abs().min() > 0
    clean, _ = vsd_gradient(x[[0, 3]], x0_real[[0, 3]], x0_fake[[0, 3]])
    torch.testing.assert_close(x.grad[[0, 3]] * x.numel(), clean)  # other samples untouched
    # a zero normalizer with eps = 0 (DMD2) is an infinity, also zeroed
    _, log = vsd_generator_loss(torch.ones(2, 3), torch.ones(2, 3), torch.zeros(2, 3), eps=0.0)
    assert log["nonfinite"] == 6.0


def test_vsd_loss_rejects_mismatched_inputs():
    with pytest.raises(ValueError):
        vsd_generator_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError):
        vsd_generator_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3), weight=torch.ones(3))


@pytest.mark.parametrize("path, t", [(VP, 400.0), (FLOW, 0.45), (TRIG, 0.8)])
def test_vsd_scale_equals_dmd_weight_times_score_difference(path, t):
    """§13.3: s = −(x_t − α x̂0)/σ², so s_f − s_r = (α/σ²)(x̂_f − x̂_r) and
    g = (x̂_f − x̂_r)/mean|x − x̂_r| = w_t (s_f − s_r) with DMD's w_t = (σ²/α)/mean|x − x̂_r|."""
    teacher = GaussianMixture.imbalanced_pair(std=0.3)
    student = GaussianStudent([[0.8, 0.1], [0.0, 0.6]], [0.5, 0.3])
    g_ = gen(1)
    x = student.sample(torch.randn(256, 2, generator=g_, dtype=torch.float64)).detach().requires_grad_(True)
    x_t = P.add_noise(x.detach(), torch.randn(256, 2, generator=g_, dtype=torch.float64), t, path)
    x0_real, x0_fake = teacher.x0(x_t, t, path), student.x0(x_t, t, path)
    loss, _ = vsd_generator_loss(x, x0_real, x0_fake, eps=0.0)
    loss.backward()
    g = x.grad * x.numel()

    alpha, sigma = (float(v) for v in path.alpha_sigma(torch.tensor(t, dtype=torch.float64)))
    score_diff = student.score(x_t, t, path) - teacher.score(x_t, t, path)  # exact scores, not via x0
    w_t = (sigma**2 / alpha) / (x.detach() - x0_real).abs().mean(dim=1, keepdim=True)
    assert g.dtype == torch.float64  # float64 inputs keep float64 math
    torch.testing.assert_close(g, w_t * score_diff, rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# Sign test (§13.3): one generator step decreases an independent Monte-Carlo E_t D_f(p_t || q_t)
# ----------------------------------------------------------------------------------------------------------------


def generator_step(teacher, student, divergence, path, time_range, lr, generator, flip=False, batch=4096):
    """One SGD step on (A, b) with the VSD loss weighted by the exact f-divergence weight."""
    z = torch.randn(batch, 2, generator=generator, dtype=torch.float64)
    eps = torch.randn(batch, 2, generator=generator, dtype=torch.float64)
    lo, hi = time_range
    t = lo + (hi - lo) * torch.rand(batch, generator=generator, dtype=torch.float64)
    x = student.sample(z)
    x_t = P.add_noise(x.detach(), eps, t, path)
    x0_real, x0_fake = teacher.x0(x_t, t, path), student.x0(x_t, t, path)
    if flip:  # the classic bug: real and fake swapped
        x0_real, x0_fake = x0_fake, x0_real
    weight = f_divergence_weight(student.exact_ratio(x_t, t, path, teacher), divergence)
    loss, _ = vsd_generator_loss(x, x0_real, x0_fake, weight=weight)
    grad_A, grad_b = torch.autograd.grad(loss, [student.A, student.b])
    return GaussianStudent(student.A.detach() - lr * grad_A, student.b.detach() - lr * grad_b)


@pytest.mark.parametrize("kind", ["vp", "flow"])
@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl", "js", "hellinger", "jeffreys"])
def test_one_generator_step_decreases_the_f_divergence(divergence, kind):
    """Times are restricted to the middle of the path: near t = 0 the ratio p_t/q_t of a sharp mixture is extreme
    and E_q[f(r)] (forward KL, Jeffreys) has a heavy-tailed estimator; near pure noise p_t ≈ q_t and the change
    vanishes under the Monte-Carlo noise. The DMD normalizer re-weights samples, so the step is a positively
    re-weighted gradient, not the exact one: the test asserts descent, which a flipped sign would turn into ascent.
    The teacher's std is widened from 0.1 to 0.3 so that r_t stays moderate (finite-variance estimators)."""
    path, time_range = {"vp": (VP, (100.0, 600.0)), "flow": (FLOW, (0.2, 0.7))}[kind]
    teacher = GaussianMixture.imbalanced_pair(std=0.3)
    student = GaussianStudent(0.8 * torch.eye(2, dtype=torch.float64), torch.tensor([0.5, 0.3], dtype=torch.float64))
    stepped = generator_step(teacher, student, divergence, path, time_range, 0.05, gen(0))
    flipped = generator_step(teacher, student, divergence, path, time_range, 0.05, gen(0), flip=True)

    times = torch.linspace(*time_range, 5)

    def estimate(s):  # independent of the step's samples; one seed for all three = common random numbers
        return float(mc_f_divergence(teacher, s, divergence, path, times, 30_000, gen(1234)))

    before, after, wrong = estimate(student), estimate(stepped), estimate(flipped)
    # measured on this setup: decreases of 1.4-14 % and increases of 2.7-200 % over four seeds
    assert after < before * (1 - 0.005), (before, after)
    assert wrong > before * (1 + 0.005), (before, wrong)


# ----------------------------------------------------------------------------------------------------------------
# Critic denoising loss
# ----------------------------------------------------------------------------------------------------------------


def closed_form_target(x0, noise, t, path, prediction_type):
    """What a perfect model outputs, written from the definitions (parameterization module docstring)."""
    alpha, sigma = (v.float()[:, None] for v in path.alpha_sigma(t))
    return {
        "epsilon": noise,
        "sample": x0,
        "v_prediction": alpha * noise - sigma * x0,
        "trigflow": alpha * noise - sigma * x0,
        "flow_prediction": noise - x0,
        "data_velocity": x0 - noise,
    }[prediction_type]


@pytest.mark.parametrize("prediction_type", P.PREDICTION_TYPES)
@pytest.mark.parametrize("path, t", [(VP, [5.0, 500.0, 999.0]), (FLOW, [0.01, 0.5, 1.0]), (TRIG, [0.1, 0.7, 1.5])])
def test_denoising_loss_is_zero_at_the_perfect_prediction(prediction_type, path, t):
    g_ = gen(2)
    x0, noise = torch.randn(3, 4, 2, 2, generator=g_), torch.randn(3, 4, 2, 2, generator=g_)
    t = torch.tensor(t, dtype=torch.float64)
    perfect = closed_form_target(x0.flatten(1), noise.flatten(1), t, path, prediction_type).reshape(x0.shape)
    assert float(denoising_loss(perfect, x0, noise, t, path, prediction_type)) < 1e-10
    wrong = perfect + 0.1
    torch.testing.assert_close(denoising_loss(wrong, x0, noise, t, path, prediction_type), torch.tensor(0.01))
    # the type matters: an epsilon model's output is not a flow velocity
    if prediction_type != "epsilon":
        assert float(denoising_loss(noise, x0, noise, t, path, prediction_type)) > 1e-2


def test_denoising_loss_weighting_and_gradients():
    g_ = gen(3)
    x0, noise = torch.randn(4, 6, generator=g_, requires_grad=True), torch.randn(4, 6, generator=g_)
    t = torch.tensor([0.2, 0.4, 0.6, 0.8])
    prediction = torch.randn(4, 6, generator=g_, requires_grad=True)
    target = closed_form_target(x0.detach(), noise, t, FLOW, "flow_prediction")
    per_sample = ((prediction.detach() - target) ** 2).mean(dim=1)
    weighting = torch.tensor([1.0, 0.0, 2.0, 0.5])
    loss = denoising_loss(prediction, x0, noise, t, FLOW, "flow_prediction", weighting=weighting)
    torch.testing.assert_close(loss, (weighting * per_sample).mean())
    torch.testing.assert_close(denoising_loss(prediction, x0, noise, t, FLOW, "flow_prediction"), per_sample.mean())
    loss.backward()
    assert x0.grad is None  # the target never trains the generator
    assert torch.all(prediction.grad[1] == 0) and prediction.grad[0].abs().sum() > 0


# ----------------------------------------------------------------------------------------------------------------
# Classifier-free guidance
# ----------------------------------------------------------------------------------------------------------------


def test_cfg_order_and_conventions():
    g_ = gen(4)
    u, c = torch.randn(3, 5, generator=g_), torch.randn(3, 5, generator=g_)
    w = 4.5
    guided = classifier_free_guidance(u, c, w)
    torch.testing.assert_close(guided, u + w * (c - u))
    torch.testing.assert_close(classifier_free_guidance(u, c, 1.0), c)
    torch.testing.assert_close(classifier_free_guidance(u, c, 0.0), u)
    # the order cannot be swapped silently
    swapped = classifier_free_guidance(c, u, w)
    assert (swapped - guided).abs().min() > 0
    torch.testing.assert_close(guided - swapped, (2 * w - 1) * (c - u))
    # FastGen's x0_c + (w - 1)(x0_c - x0_u) is the same w
    torch.testing.assert_close(guided, c + (w - 1) * (c - u))
    # Ho & Salimans' paper form (1 + w') c - w' u uses w' = w - 1; passing w' as w is off by one
    w_paper = w - 1
    torch.testing.assert_close(guided, (1 + w_paper) * c - w_paper * u)
    torch.testing.assert_close(guided - classifier_free_guidance(u, c, w_paper), c - u)
    # per-sample scales
    scales = torch.tensor([1.0, 2.0, 7.5])
    per_sample = classifier_free_guidance(u, c, scales)
    for i in range(3):
        one = classifier_free_guidance(u[i : i + 1], c[i : i + 1], float(scales[i]))
        torch.testing.assert_close(per_sample[i : i + 1], one)
    # half-precision inputs are guided in float32
    assert classifier_free_guidance(u.bfloat16(), c.bfloat16(), w).dtype == torch.float32
    with pytest.raises(ValueError):
        classifier_free_guidance(u, c[:, :4], w)


@pytest.mark.parametrize(
    "path, t, types",
    [
        (VP, 350.0, ("epsilon", "sample", "v_prediction")),
        (FLOW, 0.35, ("epsilon", "sample", "flow_prediction", "v_prediction")),
        (TRIG, 0.6, ("epsilon", "sample", "trigflow")),
    ],
)
def test_cfg_gives_one_x0_in_every_parameterization(path, t, types):
    """With an exact class-conditional teacher, guiding ε, x0, v or the flow velocity at the same x_t gives the same
    x0, and its score is the exact guided score s_u + w (s_c − s_u)."""
    teacher = GaussianMixture.ring8(std=0.3)
    x_t = 1.5 * torch.randn(32, 2, generator=gen(5), dtype=torch.float64)
    label = torch.arange(32) % 8
    w = torch.linspace(1.0, 7.0, 32, dtype=torch.float64)
    x0s = []
    for prediction_type in types:
        u = teacher.prediction(x_t, t, path, prediction_type)
        c = teacher.prediction(x_t, t, path, prediction_type, label=label)
        x0s.append(P.to_x0(classifier_free_guidance(u, c, w), x_t, t, path, prediction_type))
    for x0 in x0s[1:]:
        torch.testing.assert_close(x0, x0s[0], rtol=1e-9, atol=1e-9)
    s_u, s_c = teacher.score(x_t, t, path), teacher.score(x_t, t, path, label=label)
    torch.testing.assert_close(P.x0_to_score(x0s[0], x_t, t, path), s_u + w[:, None] * (s_c - s_u))


def test_sample_guidance_scale():
    torch.testing.assert_close(sample_guidance_scale(4, 4.5), torch.full((4,), 4.5))
    scales = sample_guidance_scale(10_000, 4.5, guidance_range=(2.0, 8.0), generator=gen(6))
    assert scales.shape == (10_000,) and scales.dtype == torch.float32
    assert float(scales.min()) >= 2.0 and float(scales.max()) <= 8.0
    assert abs(float(scales.mean()) - 5.0) < 0.05 and abs(float(scales.std()) - 6 / math.sqrt(12)) < 0.05
    first, second = (sample_guidance_scale(5, 1.0, (2.0, 8.0), gen(7)) for _ in range(2))
    torch.testing.assert_close(first, second)  # reproducible with a seeded generator
    with pytest.raises(ValueError):
        sample_guidance_scale(2, 1.0, (8.0, 2.0))


# ----------------------------------------------------------------------------------------------------------------
# GAN terms and density ratios
# ----------------------------------------------------------------------------------------------------------------


def test_gan_losses_values():
    zeros = torch.zeros(8)
    torch.testing.assert_close(gan_discriminator_loss(zeros, zeros), torch.tensor(2 * math.log(2)))
    torch.testing.assert_close(gan_generator_loss(zeros), torch.tensor(math.log(2)))
    real, fake = torch.tensor([3.0, -1.0]), torch.tensor([0.5, -2.0])
    expected = torch.log1p(torch.exp(fake)).mean() + torch.log1p(torch.exp(-real)).mean()
    torch.testing.assert_close(gan_discriminator_loss(real, fake), expected)
    # non-saturating: the generator's gradient does not vanish where D confidently rejects the fake
    logits = torch.tensor([-8.0], requires_grad=True)
    gan_generator_loss(logits).backward()
    assert float(logits.grad) < -0.99


def test_learned_discriminator_recovers_the_density_ratio():
    """The minimizer of gan_discriminator_loss is D = log(p/q). Here p = N(0, 1) (real) and q = N(1, 1.5²) (fake),
    so log p/q is quadratic and logistic regression on (1, x, x²) is well specified."""
    torch.manual_seed(0)
    g_ = gen(8)
    features = lambda x: torch.stack([x, x**2], dim=1)  # noqa: E731
    head = torch.nn.Linear(2, 1)
    optimizer = torch.optim.Adam(head.parameters(), lr=0.05)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 400)  # anneal away Adam's step noise
    for _ in range(400):
        real = torch.randn(1024, generator=g_)
        fake = 1.0 + 1.5 * torch.randn(1024, generator=g_)
        loss = gan_discriminator_loss(head(features(real))[:, 0], head(features(fake))[:, 0])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    x = torch.linspace(-1.5, 2.0, 50)  # where both densities have mass; exact ratio in [0.25, 2.24], never clipped
    p, q = torch.distributions.Normal(0.0, 1.0), torch.distributions.Normal(1.0, 1.5)
    exact = torch.exp(p.log_prob(x) - q.log_prob(x))
    estimate = density_ratio(head(features(x)))
    # worst relative error over six seeds was 2.5 %; a flipped loss (D = log q/p) would be off by a factor r^2
    assert float(((estimate - exact) / exact).abs().max()) < 0.08


def test_density_ratio_clamps_and_detaches():
    logits = torch.tensor([-100.0, -3.0, 0.0, 2.0, 100.0], requires_grad=True)
    r = density_ratio(logits)
    assert not r.requires_grad and r.dtype == torch.float32
    torch.testing.assert_close(r, torch.tensor([0.1, 0.1, 1.0, math.exp(2.0), 20.0]))
    torch.testing.assert_close(density_ratio(torch.tensor([30.0]), upper=1e9), torch.tensor([math.exp(10.0)]))
    # several heads are averaged in logit space
    heads = torch.tensor([[0.0, 2.0], [1.0, -3.0]], dtype=torch.bfloat16)
    torch.testing.assert_close(density_ratio(heads), torch.tensor([math.e, math.exp(-1.0)]))


def test_f_divergence_weight():
    r = torch.tensor([0.1, 0.5, 1.0, 4.0, 20.0], requires_grad=True)
    for name in ("forward_kl", "js", "hellinger", "alpha:0.5"):
        h = get_divergence(name).h(r.detach())
        w = f_divergence_weight(r, name)
        assert not w.requires_grad and w.dtype == torch.float32
        torch.testing.assert_close(w, h / (h.mean() + 1e-6))
        assert abs(float(w.mean()) - 1.0) < 1e-5
        torch.testing.assert_close(f_divergence_weight(r, name, normalize=False), h)
    torch.testing.assert_close(f_divergence_weight(r, get_divergence("reverse_kl")), torch.full((5,), 1 / (1 + 1e-6)))
    # forward KL weights the under-covered samples (r > 1) up, reverse-KL-like ones down
    w = f_divergence_weight(r, "forward_kl")
    assert float(w[-1]) > 1 > float(w[0])


# ----------------------------------------------------------------------------------------------------------------
# RatioNormalizer
# ----------------------------------------------------------------------------------------------------------------


def test_ratio_normalizer_per_bin():
    norm = RatioNormalizer(num_bins=4, t_min=0.0, t_max=1.0)
    assert "bins" in norm.state_dict() and torch.all(norm.bins == 1)
    t = torch.tensor([0.1, 0.2, 0.3, 0.6, 0.7, 1.0])  # bins 0, 0, 1, 2, 2, 3 (t_max is in the last bin)
    torch.testing.assert_close(norm.bin_index(t), torch.tensor([0, 0, 1, 2, 2, 3]))
    ratio = torch.tensor([1.0, 3.0, 5.0, 0.5, 1.5, 8.0])
    out = norm(ratio, t)
    torch.testing.assert_close(norm.bins, torch.tensor([2.0, 5.0, 1.0, 8.0]))
    torch.testing.assert_close(out, ratio / (torch.tensor([2.0, 2.0, 5.0, 1.0, 1.0, 8.0]) + 1e-6))
    # ema = 0: a bin absent from the batch keeps its value, present bins take the batch mean
    norm(torch.tensor([4.0]), torch.tensor([0.05]))
    torch.testing.assert_close(norm.bins, torch.tensor([4.0, 5.0, 1.0, 8.0]))
    # update=False normalizes with the stored means
    torch.testing.assert_close(norm(torch.tensor([10.0]), torch.tensor([0.3]), update=False), torch.tensor([2.0]))
    with pytest.raises(ValueError):
        norm(torch.tensor([1.0]), torch.tensor([500.0]))  # VP time given to a [0, 1] normalizer
    # diffusers' TrigFlow t_max 1.57080 lies a hair above pi/2 and lands in the last bin
    trig = RatioNormalizer(num_bins=10, t_min=TRIG.t_min, t_max=TRIG.t_max)
    assert int(trig.bin_index(torch.tensor([1.57080]))) == 9


def test_ratio_normalizer_ema_and_state_dict_round_trip():
    norm = RatioNormalizer(num_bins=10, t_min=0.0, t_max=999.0, ema=0.5)
    t = torch.tensor([50.0, 60.0, 950.0])
    norm(torch.tensor([3.0, 5.0, 0.2]), t)
    torch.testing.assert_close(norm.bins[[0, 9]], torch.tensor([0.5 * 1 + 0.5 * 4.0, 0.5 * 1 + 0.5 * 0.2]))
    norm(torch.tensor([1.0]), torch.tensor([10.0]))
    assert math.isclose(float(norm.bins[0]), 0.5 * 2.5 + 0.5 * 1.0)
    restored = RatioNormalizer(num_bins=10, t_min=0.0, t_max=999.0, ema=0.5)
    restored.load_state_dict(norm.state_dict())
    torch.testing.assert_close(restored.bins, norm.bins)
    probe = torch.tensor([2.0, 2.0]), torch.tensor([20.0, 990.0])
    torch.testing.assert_close(restored(*probe, update=False), norm(*probe, update=False))


def test_ratio_normalizer_and_weight_reduce_across_ranks(monkeypatch):
    """The all-reduce hook sums (sum, count) across ranks: simulate a second rank that saw ratio 7 in bin 0."""

    def fake_all_reduce(tensor):
        if tensor.ndim == 2:  # the normalizer's [sums; counts]
            tensor[0, 0] += 7.0
            tensor[1, 0] += 1.0
        else:  # f_divergence_weight's [sum h, count]
            tensor += torch.tensor([3.0, 1.0])
        return tensor

    monkeypatch.setattr(losses, "_all_reduce_sum", fake_all_reduce)
    norm = RatioNormalizer(num_bins=2)
    norm(torch.tensor([1.0]), torch.tensor([0.1]))
    torch.testing.assert_close(norm.bins, torch.tensor([4.0, 1.0]))
    w = f_divergence_weight(torch.tensor([1.0]), "forward_kl")  # global mean of h = (1 + 3) / 2
    torch.testing.assert_close(w, torch.tensor([1.0 / (2.0 + 1e-6)]))


def test_ratio_normalizer_with_a_real_process_group(tmp_path):
    """A one-rank gloo group runs the real collective; the result equals the single-process one."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        ratio, t = torch.tensor([1.0, 3.0, 5.0]), torch.tensor([0.1, 0.2, 0.9])
        norm = RatioNormalizer(num_bins=2)
        out = norm(ratio, t)
        torch.testing.assert_close(norm.bins, torch.tensor([2.0, 5.0]))
        torch.testing.assert_close(out, ratio / (torch.tensor([2.0, 2.0, 5.0]) + 1e-6))
        torch.testing.assert_close(f_divergence_weight(ratio, "forward_kl"), ratio / (3.0 + 1e-6))
    finally:
        dist.destroy_process_group()


def test_ratio_normalizer_validates_arguments():
    for kwargs in ({"num_bins": 0}, {"t_min": 1.0, "t_max": 1.0}, {"ema": 1.0}):
        with pytest.raises(ValueError):
            RatioNormalizer(**kwargs)
