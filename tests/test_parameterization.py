"""diffusers_onestep.parameterization against closed forms (algorithms.md §1.1-§1.2) and diffusers' own schedules."""

import itertools
import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from diffusers_onestep import parameterization as param


PATHS = {
    "vp": lambda: param.VPPath.from_betas(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"),
    "flow": lambda: param.FlowPath(shift=3.0),
    "trigflow": lambda: param.TrigFlowPath(sigma_data=0.5),
}
#: interior times of each path (natural units), one per sample of a batch of 3
TIMES = {"vp": [10.0, 399.0, 990.0], "flow": [0.1, 0.5, 0.93], "trigflow": [0.2, 0.8, 1.45]}


def _batch(seed=0, shape=(3, 4, 5, 5)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------------------------------
# closed forms of the paths
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "betas",
    [
        {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"},  # SD / SDXL
        {"beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear"},  # PixArt
        {"beta_schedule": "squaredcos_cap_v2"},
    ],
)
def test_vp_alphas_equal_diffusers_ddpm(betas):
    path = param.VPPath.from_betas(**betas)
    expected = DDPMScheduler(**betas).alphas_cumprod.to(torch.float64)
    assert torch.equal(path.alphas_cumprod, expected)
    t = torch.tensor([0.0, 1.0, 399.0, 999.0])
    alpha, sigma = path.alpha_sigma(t)
    assert alpha.dtype == torch.float64
    torch.testing.assert_close(alpha, expected[t.long()].sqrt(), rtol=0, atol=1e-12)
    torch.testing.assert_close(sigma, (1 - expected[t.long()]).sqrt(), rtol=0, atol=1e-12)


def test_vp_linear_betas_closed_form():
    # alphā_t = prod_{i<=t} (1 - beta_i) with beta linear in float32, as diffusers builds it (Ho et al. 2020).
    path = param.VPPath.from_betas(beta_start=0.0001, beta_end=0.02, beta_schedule="linear")
    betas = torch.linspace(0.0001, 0.02, 1000, dtype=torch.float32)
    expected = torch.cumprod(1.0 - betas, dim=0).to(torch.float64)
    torch.testing.assert_close(path.alphas_cumprod, expected, rtol=0, atol=1e-7)
    assert path.t_min == 0 and path.t_max == 999 and path.kind == "vp"


def test_vp_fractional_time_interpolates_log_alpha_bar():
    path = PATHS["vp"]()
    ac = path.alphas_cumprod
    alpha, sigma = path.alpha_sigma(torch.tensor(10.25, dtype=torch.float64))
    alpha_bar = torch.exp(0.75 * ac[10].log() + 0.25 * ac[11].log())
    assert abs(alpha.item() ** 2 - alpha_bar.item()) < 1e-14
    assert abs(alpha.item() ** 2 + sigma.item() ** 2 - 1) < 1e-14


def test_vp_zero_terminal_snr_keeps_last_step_finite():
    path = param.VPPath.from_betas(beta_schedule="scaled_linear", rescale_betas_zero_snr=True)
    assert path.alphas_cumprod[-1].item() == 2**-24
    alpha, sigma = path.alpha_sigma(999)
    assert alpha.item() > 0 and abs(sigma.item() - 1) < 1e-6


def test_flow_path_and_shift_match_flow_match_euler():
    path = param.FlowPath(shift=3.0)
    t = torch.tensor([0.0, 0.25, 1.0], dtype=torch.float64)
    alpha, sigma = path.alpha_sigma(t)
    assert torch.equal(alpha, 1 - t) and torch.equal(sigma, t)
    # The shift formula t' = s t / (1 + (s - 1) t) (Esser et al. 2024) is the one FlowMatchEuler applies to its sigmas.
    n = 1000
    unshifted = torch.linspace(1, n, n, dtype=torch.float64).flip(0) / n
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    torch.testing.assert_close(path.shift_time(unshifted), scheduler.sigmas.to(torch.float64), rtol=0, atol=1e-6)
    u = torch.tensor([0.0, 0.1, 0.5, 1.0], dtype=torch.float64)
    torch.testing.assert_close(path.training_time(u), 3 * u / (1 + 2 * u), rtol=0, atol=1e-15)
    assert path.to_scheduler_timestep(torch.tensor(0.5)).item() == 500.0
    assert path.from_scheduler_timestep(250.0).item() == 0.25


def test_trigflow_path_is_cos_sin_and_accepts_diffusers_pi_over_two():
    path = param.TrigFlowPath(sigma_data=0.5)
    t = torch.tensor([0.0, 0.3, math.pi / 2], dtype=torch.float64)
    alpha, sigma = path.alpha_sigma(t)
    assert torch.equal(alpha, torch.cos(t)) and torch.equal(sigma, torch.sin(t))
    alpha, sigma = path.alpha_sigma(1.57080)  # SCMScheduler's max_timesteps, a hair above pi/2
    assert abs(alpha.item()) < 1e-5 and abs(sigma.item() - 1) < 1e-9
    assert path.describe() == {"noise_path": "trigflow", "sigma_data": 0.5}


def test_make_noise_path_reads_scheduler_configs():
    vp = param.make_noise_path(
        "vp", **dict(DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).config)
    )
    assert torch.equal(vp.alphas_cumprod, PATHS["vp"]().alphas_cumprod)
    assert param.make_noise_path("flow", shift=7.0).shift == 7.0
    assert param.make_noise_path("trigflow", sigma_data=0.3).sigma_data == 0.3


@pytest.mark.parametrize("time_shift_type", ["exponential", "linear"])
def test_dynamic_shift_matches_flow_match_euler_at_a_given_mu(time_shift_type):
    # FLUX.1 / SD3.5: mu is linear in the image sequence length (FluxPipeline's calculate_shift) and the scheduler
    # applies time_shift(mu, 1, t) = e^mu / (e^mu + 1/t - 1), the fixed-shift formula with s = exp(mu) ("linear": mu).
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    settings = {"base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096}
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, shift=3.0, time_shift_type=time_shift_type, **settings
    )
    path = param.noise_path_from_scheduler_config(scheduler.config)
    assert path.kind == "flow" and path.dynamic_shift is not None
    image_seq_len = 1024  # 512 px FLUX: (512 / 16) ** 2 packed latent tokens
    mu = path.dynamic_shift.mu(image_seq_len)
    m = (1.15 - 0.5) / (4096 - 256)
    assert mu == pytest.approx(0.5 + m * (image_seq_len - 256), abs=1e-12)  # closed form of the line
    assert mu == pytest.approx(
        calculate_shift(
            image_seq_len, **{"base_seq_len": 256, "max_seq_len": 4096, "base_shift": 0.5, "max_shift": 1.15}
        ),
        abs=1e-12,
    )
    expected_shift = math.exp(mu) if time_shift_type == "exponential" else mu
    fixed = path.at_image_seq_len(image_seq_len)
    assert fixed.dynamic_shift is None and fixed.shift == pytest.approx(expected_shift, abs=1e-12)
    n = 8
    scheduler.set_timesteps(num_inference_steps=n, mu=mu)
    unshifted = torch.linspace(1.0, 1.0 / 1000, n, dtype=torch.float64)  # the scheduler's sigmas before shifting
    torch.testing.assert_close(fixed.shift_time(unshifted), scheduler.sigmas[:-1].to(torch.float64), rtol=0, atol=1e-6)
    # the path of no resolution refuses to draw training times instead of ignoring the resolution
    with pytest.raises(ValueError, match=r"at_image_seq_len"):
        path.training_time(torch.tensor([0.5], dtype=torch.float64))
    # a OneStepScheduler keeps the dynamic settings through its config
    from diffusers_onestep import OneStepScheduler

    student = OneStepScheduler.from_noise_path(path, [1.0], "flow_prediction")
    assert student.path.describe() == path.describe()
    assert OneStepScheduler.from_config(student.config).path.dynamic_shift == path.dynamic_shift


#: native scheduler configs and the noise path and prediction type each was read as before the one resolver
#: (OneStepScheduler.from_config, the family adapters and the loader agreed on every one of them)
NATIVE_SCHEDULER_CASES = {
    "euler_sdxl": (
        lambda: __import__("diffusers").EulerDiscreteScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
        ),
        "vp",
        "epsilon",
    ),
    "ddpm_defaults": (lambda: DDPMScheduler(), "vp", "epsilon"),
    "ddim_v": (lambda: __import__("diffusers").DDIMScheduler(prediction_type="v_prediction"), "vp", "v_prediction"),
    "flow_match_shift7": (lambda: FlowMatchEulerDiscreteScheduler(shift=7.0), "flow", "flow_prediction"),
    "dpm_flow_shift3": (
        lambda: __import__("diffusers").DPMSolverMultistepScheduler(
            use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction"
        ),
        "flow",
        "flow_prediction",
    ),
    "dpm_flow_epsilon_default": (
        lambda: __import__("diffusers").DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0),
        "flow",
        "flow_prediction",
    ),
    "scm": (lambda: __import__("diffusers").SCMScheduler(sigma_data=0.5), "trigflow", "trigflow"),
}


@pytest.mark.parametrize("case", sorted(NATIVE_SCHEDULER_CASES))
def test_noise_path_from_scheduler_config_reads_native_schedulers(case):
    make, kind, prediction_type = NATIVE_SCHEDULER_CASES[case]
    scheduler = make()
    for config in (scheduler.config, {**dict(scheduler.config), "_class_name": type(scheduler).__name__}):
        path = param.noise_path_from_scheduler_config(config)
        assert path.kind == kind
        assert param.prediction_type_from_scheduler_config(config, path.kind) == prediction_type
    if kind == "vp":
        assert torch.equal(path.alphas_cumprod, scheduler.alphas_cumprod.to(torch.float64))
    elif kind == "flow":
        assert path.shift == float(scheduler.config.get("shift") or scheduler.config.get("flow_shift"))
        assert path.dynamic_shift is None and path.describe() == {
            "noise_path": "flow",
            "shift": path.shift,
            "num_train_timesteps": 1000,
        }
    else:
        assert path.sigma_data == 0.5


def test_noise_path_from_scheduler_config_kinds_and_defaults():
    # a config naming its path (OneStepScheduler's) is read as it says, whatever kind the caller expects
    assert param.noise_path_from_scheduler_config({"noise_path": "flow", "shift": 2.0}, kind="vp").shift == 2.0
    assert (
        param.prediction_type_from_scheduler_config({"noise_path": "flow", "prediction_type": "sample"}, "flow")
        == "sample"
    )
    # otherwise the caller's kind wins over what the config suggests (a family adapter knows its path)
    assert param.noise_path_from_scheduler_config(FlowMatchEulerDiscreteScheduler().config, kind="vp").kind == "vp"
    # values left out: DDPM's betas, shift 1, sigma_data 0.5
    assert torch.equal(
        param.noise_path_from_scheduler_config({}).alphas_cumprod, DDPMScheduler().alphas_cumprod.to(torch.float64)
    )
    assert param.noise_path_from_scheduler_config({}, kind="flow").describe() == {
        "noise_path": "flow",
        "shift": 1.0,
        "num_train_timesteps": 1000,
    }
    assert param.noise_path_from_scheduler_config({}, kind="trigflow").sigma_data == 0.5


# ---------------------------------------------------------------------------------------------------------------------
# conversions
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path_name", sorted(PATHS))
@pytest.mark.parametrize("prediction_type", param.PREDICTION_TYPES)
def test_round_trip_x0_eps_through_every_prediction_type(path_name, prediction_type):
    path = PATHS[path_name]()
    x0, eps = _batch()
    t = torch.tensor(TIMES[path_name], dtype=torch.float64)
    x_t = param.add_noise(x0, eps, t, path)
    target = param.from_x0_and_epsilon(x0, eps, t, path, prediction_type)
    x0_back, eps_back = param.to_x0_and_epsilon(target, x_t, t, path, prediction_type)
    assert x0_back.dtype == torch.float64
    torch.testing.assert_close(x0_back, x0, rtol=0, atol=1e-10)
    torch.testing.assert_close(eps_back, eps, rtol=0, atol=1e-10)
    torch.testing.assert_close(param.to_x0(target, x_t, t, path, prediction_type), x0, rtol=0, atol=1e-10)
    torch.testing.assert_close(param.to_epsilon(target, x_t, t, path, prediction_type), eps, rtol=0, atol=1e-10)


def test_prediction_targets_closed_forms():
    x0, eps = _batch(1)
    for name, path in ((n, f()) for n, f in PATHS.items()):
        t = torch.tensor(TIMES[name], dtype=torch.float64)
        a, s = path.alpha_sigma(t)
        a, s = a.view(-1, 1, 1, 1), s.view(-1, 1, 1, 1)
        torch.testing.assert_close(param.add_noise(x0, eps, t, path), a * x0 + s * eps, rtol=0, atol=1e-14)
        assert torch.equal(param.from_x0_and_epsilon(x0, eps, t, path, "epsilon"), eps)
        assert torch.equal(param.from_x0_and_epsilon(x0, eps, t, path, "sample"), x0)
        v = param.from_x0_and_epsilon(x0, eps, t, path, "v_prediction")
        torch.testing.assert_close(v, a * eps - s * x0, rtol=0, atol=1e-14)  # Salimans & Ho 2022
        flow = param.from_x0_and_epsilon(x0, eps, t, path, "flow_prediction")
        torch.testing.assert_close(flow, eps - x0, rtol=0, atol=1e-14)  # rectified flow velocity
        toward_data = param.from_x0_and_epsilon(x0, eps, t, path, "data_velocity")
        torch.testing.assert_close(toward_data, x0 - eps, rtol=0, atol=1e-14)  # Rectified Flow's / InstaFlow's
    # TrigFlow target F = cos(t) eps - sin(t) x0 (sCM eq. 6)
    t = torch.tensor(TIMES["trigflow"], dtype=torch.float64)
    F = param.from_x0_and_epsilon(x0, eps, t, PATHS["trigflow"](), "trigflow")
    torch.testing.assert_close(
        F, torch.cos(t).view(-1, 1, 1, 1) * eps - torch.sin(t).view(-1, 1, 1, 1) * x0, rtol=0, atol=1e-14
    )


def test_flow_velocity_inversion_matches_algorithms_closed_form():
    # algorithms.md §1.2: x̂0 = x_t - t v̂ and ε̂ = x_t + (1 - t) v̂ on the rectified-flow path.
    path = param.FlowPath()
    x0, eps = _batch(2)
    t = torch.tensor(TIMES["flow"], dtype=torch.float64).view(-1, 1, 1, 1)
    x_t = (1 - t) * x0 + t * eps
    v = torch.randn_like(x0)
    x0_hat, eps_hat = param.to_x0_and_epsilon(v, x_t, t.flatten(), path, "flow_prediction")
    torch.testing.assert_close(x0_hat, x_t - t * v, rtol=0, atol=1e-12)
    torch.testing.assert_close(eps_hat, x_t + (1 - t) * v, rtol=0, atol=1e-12)
    # InstaFlow's orientation (v toward the data): one Euler step of dZ = v dt from t to 0 lands on x0
    x0_hat, eps_hat = param.to_x0_and_epsilon(-v, x_t, t.flatten(), path, "data_velocity")
    torch.testing.assert_close(x0_hat, x_t + t * (-v), rtol=0, atol=1e-12)
    torch.testing.assert_close(eps_hat, x_t - (1 - t) * (-v), rtol=0, atol=1e-12)


@pytest.mark.parametrize("path_name", sorted(PATHS))
def test_convert_prediction_between_every_pair(path_name):
    path = PATHS[path_name]()
    x0, eps = _batch(3)
    t = torch.tensor(TIMES[path_name], dtype=torch.float64)
    x_t = param.add_noise(x0, eps, t, path)
    for source, target in itertools.product(param.PREDICTION_TYPES, repeat=2):
        y = param.from_x0_and_epsilon(x0, eps, t, path, source)
        converted = param.convert_prediction(y, x_t, t, path, source, target)
        expected = param.from_x0_and_epsilon(x0, eps, t, path, target)
        torch.testing.assert_close(converted, expected, rtol=0, atol=1e-9, msg=f"{source} -> {target}")


def test_scalar_time_and_float32_inputs_keep_their_dtype():
    path = PATHS["vp"]()
    x0, eps = (v.float() for v in _batch(4))
    x_t = param.add_noise(x0, eps, 399, path)
    assert x_t.dtype == torch.float32
    x0_back = param.to_x0(eps, x_t, 399, path, "epsilon")
    assert x0_back.dtype == torch.float32
    torch.testing.assert_close(x0_back, x0, rtol=0, atol=1e-5)


def test_score_is_tweedie_and_matches_a_gaussian_closed_form():
    # Data x0 ~ N(0, s^2 I) gives p_t = N(0, (alpha^2 s^2 + sigma^2) I): score -x_t / (alpha^2 s^2 + sigma^2), and the
    # posterior mean E[x0 | x_t] = alpha s^2 x_t / (alpha^2 s^2 + sigma^2) (Tweedie's formula).
    s2 = 0.7**2
    for name, path in ((n, f()) for n, f in PATHS.items()):
        t = torch.tensor(TIMES[name], dtype=torch.float64)
        a, s = (c.view(-1, 1, 1, 1) for c in path.alpha_sigma(t))
        x_t = torch.randn(3, 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
        variance = a**2 * s2 + s**2
        posterior_mean = a * s2 * x_t / variance
        score = param.x0_to_score(posterior_mean, x_t, t, path)
        torch.testing.assert_close(score, -x_t / variance, rtol=0, atol=1e-10, msg=name)
        # and -ε̂/σ for the matching noise estimate
        eps_hat = param.to_epsilon(posterior_mean, x_t, t, path, "sample")
        torch.testing.assert_close(score, -eps_hat / s, rtol=0, atol=1e-10, msg=name)


def test_trigflow_flow_wrapping_identities():
    # algorithms.md §1.2: s = sin t / (sin t + cos t), t = arctan(s / (1 - s)), x_s = x_t / (sin t + cos t) is the flow
    # sample at s, and F = [(1 - 2s) x_s + (s^2 + (1 - s)^2) v] / sqrt(s^2 + (1 - s)^2) for the flow velocity v.
    a, eps = _batch(6)
    t = torch.tensor(TIMES["trigflow"], dtype=torch.float64)
    tb = t.view(-1, 1, 1, 1)
    x_t = torch.cos(tb) * a + torch.sin(tb) * eps
    s = param.trigflow_to_flow_time(t)
    torch.testing.assert_close(s, torch.sin(t) / (torch.sin(t) + torch.cos(t)), rtol=0, atol=1e-15)
    torch.testing.assert_close(torch.atan(s / (1 - s)), t, rtol=0, atol=1e-12)
    x_s = param.trigflow_to_flow_sample(x_t, t)
    sb = s.view(-1, 1, 1, 1)
    torch.testing.assert_close(x_s, (1 - sb) * a + sb * eps, rtol=0, atol=1e-12)
    F = param.flow_velocity_to_trigflow(eps - a, x_s, s)
    torch.testing.assert_close(F, torch.cos(tb) * eps - torch.sin(tb) * a, rtol=0, atol=1e-12)
    # and the x0 it implies on the TrigFlow path is the latent: x̂0 = cos t x_t - sin t F
    x0_hat = param.to_x0(F, x_t, t, param.TrigFlowPath(), "trigflow")
    torch.testing.assert_close(x0_hat, a, rtol=0, atol=1e-12)


def test_sample_training_times():
    g = torch.Generator().manual_seed(0)
    vp = PATHS["vp"]().sample_training_times(4096, generator=g)
    assert vp.dtype == torch.int64 and vp.min() >= 20 and vp.max() <= 980
    flow = PATHS["flow"]().sample_training_times(4096, generator=torch.Generator().manual_seed(0))
    lo, hi = param.FlowPath(shift=3.0).shift_time(torch.tensor([0.02, 0.98], dtype=torch.float64))
    assert flow.min() >= lo and flow.max() <= hi
    again = PATHS["flow"]().sample_training_times(4096, generator=torch.Generator().manual_seed(0))
    assert torch.equal(flow, again)


# ---------------------------------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path_name, bad, message",
    [
        ("vp", 1000.0, r"VP timesteps must lie in \[0, 999\]"),
        ("vp", -1.0, r"VP timesteps must lie in \[0, 999\]"),
        ("flow", 1.5, r"Flow times \(sigmas\) must lie in \[0, 1\]"),
        ("trigflow", 2.0, r"TrigFlow times must lie in \[0, pi/2\]"),
    ],
)
def test_out_of_range_times_are_refused(path_name, bad, message):
    path = PATHS[path_name]()
    with pytest.raises(ValueError, match=message):
        path.alpha_sigma(torch.tensor([TIMES[path_name][0], bad]))
    x = torch.zeros(2, 1, 2, 2)
    with pytest.raises(ValueError, match=message):
        param.to_x0(x, x, torch.tensor([TIMES[path_name][0], bad]), path, "epsilon")


def test_bad_names_and_configs_are_refused_with_the_choices():
    x = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match=r"Unknown prediction_type 'eps'; expected one of epsilon, v_prediction"):
        param.to_x0(x, x, 10, PATHS["vp"](), "eps")
    with pytest.raises(ValueError, match=r"Unknown prediction_type"):
        param.from_x0_and_epsilon(x, x, 10, PATHS["vp"](), "velocity")
    with pytest.raises(ValueError, match=r"Unknown noise path 've'; expected one of vp, flow, trigflow"):
        param.make_noise_path("ve")
    with pytest.raises(ValueError, match=r"The flow shift must be positive, got 0"):
        param.FlowPath(shift=0)
    with pytest.raises(ValueError, match=r"alphas_cumprod must hold at least two values in \(0, 1\]"):
        param.VPPath(torch.tensor([0.5, 0.0]))


def test_float64_exactness_is_independent_of_batch_layout():
    # A per-sample time vector gives the same numbers as scalar times sample by sample.
    path = PATHS["vp"]()
    x0, eps = _batch(7)
    t = torch.tensor(TIMES["vp"], dtype=torch.float64)
    batched = param.add_noise(x0, eps, t, path)
    for i, ti in enumerate(TIMES["vp"]):
        single = param.add_noise(x0[i : i + 1], eps[i : i + 1], ti, path)
        np.testing.assert_array_equal(batched[i : i + 1].numpy(), single.numpy())


@pytest.mark.parametrize("path_name", sorted(PATHS))
@pytest.mark.parametrize("prediction_type", param.PREDICTION_TYPES)
def test_precomputed_coefficients_give_bit_identical_conversions(path_name, prediction_type):
    # Samplers pass path.alpha_sigma(t) computed once (OneStepScheduler.step); the results must not move by one bit,
    # and to_x0 (which skips eps) must equal to_x0_and_epsilon's x0.
    path = PATHS[path_name]()
    y, x_t = (v.float() for v in _batch(8))
    t = torch.tensor(TIMES[path_name], dtype=torch.float64)
    coefficients = path.alpha_sigma(t)
    x0 = param.to_x0(y, x_t, t, path, prediction_type)
    assert x0.dtype == torch.float32
    assert torch.equal(param.to_x0(y, x_t, t, path, prediction_type, coefficients), x0)
    x0_both, eps = param.to_x0_and_epsilon(y, x_t, t, path, prediction_type)
    assert torch.equal(x0_both, x0)
    x0_c, eps_c = param.to_x0_and_epsilon(y, x_t, t, path, prediction_type, coefficients)
    assert torch.equal(x0_c, x0) and torch.equal(eps_c, eps)
    assert torch.equal(param.add_noise(x0, eps, t, path, coefficients), param.add_noise(x0, eps, t, path))
