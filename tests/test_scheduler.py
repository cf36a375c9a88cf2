"""OneStepScheduler: the diffusers scheduler contract (as diffusers' SchedulerCommonTest sweeps it) and oracles
against LCMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler and SCMScheduler."""

import itertools
import math

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    LCMScheduler,
    SCMScheduler,
)

from diffusers_onestep import OneStepScheduler, OneStepSchedulerOutput
from diffusers_onestep import parameterization as param


#: four descending conditioning timesteps per noise path (natural units)
STORED = {
    "vp": [999, 749, 499, 249],
    "flow": [1.0, 0.75, 0.5, 0.25],
    "trigflow": [1.5708, 1.2, 0.8, 0.4],
}
PATH_CONFIG = {"vp": {}, "flow": {"shift": 3.0}, "trigflow": {"sigma_data": 0.5}}
SHAPE = (2, 4, 8, 8)


NATIVE_PREDICTION = {"vp": "epsilon", "flow": "flow_prediction", "trigflow": "trigflow"}


def make(noise_path="vp", prediction_type=None, timesteps=None, **config):
    prediction_type = prediction_type or NATIVE_PREDICTION[noise_path]
    return OneStepScheduler(
        conditioning_timesteps=timesteps if timesteps is not None else STORED[noise_path],
        prediction_type=prediction_type,
        noise_path=noise_path,
        **{**PATH_CONFIG[noise_path], **config},
    )


def oracle_output(scheduler, x0, sample, t_natural):
    """What a perfect student of ``scheduler``'s parameterization outputs at ``(sample, t)`` for clean sample x0."""
    path = scheduler.path
    alpha, sigma = (c.to(torch.float64) for c in path.alpha_sigma(torch.tensor(float(t_natural))))
    eps = (sample.double() - alpha * x0.double()) / sigma
    return param.from_x0_and_epsilon(x0.double(), eps, t_natural, path, scheduler.config.prediction_type).float()


def sample_loop(scheduler, x0, num_inference_steps=None, seed=0):
    scheduler.set_timesteps(num_inference_steps)
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(x0.shape, generator=generator)
    outputs = []
    for i, t in enumerate(scheduler.timesteps):
        model_output = oracle_output(scheduler, x0, sample, scheduler.path_timesteps[i])
        out = scheduler.step(model_output, t, sample, generator=generator)
        outputs.append(out)
        sample = out.prev_sample
    return outputs


# ---------------------------------------------------------------------------------------------------------------------
# contract sweeps
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "noise_path, prediction_type", list(itertools.product(sorted(STORED), param.PREDICTION_TYPES))
)
def test_sweep_steps_and_serialization(noise_path, prediction_type, tmp_path):
    """prediction type x noise path x 1-4 steps, through save_pretrained/from_pretrained and from_config."""
    timesteps = STORED[noise_path]
    if prediction_type == "epsilon" and noise_path != "vp":
        timesteps = [0.95 * timesteps[0]] + timesteps[1:]  # epsilon cannot start where alpha_t = 0 (tested below)
    scheduler = make(noise_path, prediction_type, timesteps=timesteps)
    scheduler.save_pretrained(tmp_path)
    reloaded = OneStepScheduler.from_pretrained(tmp_path)
    from_config = OneStepScheduler.from_config(scheduler.config)
    assert (tmp_path / "scheduler_config.json").is_file()
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    for other in (reloaded, from_config):
        assert public(other.config) == public(scheduler.config)
        assert other.path.describe() == scheduler.path.describe()
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    for steps in range(1, 5):
        outputs = [sample_loop(s, x0, steps, seed=steps) for s in (scheduler, reloaded, from_config)]
        assert len(outputs[0]) == steps
        for out in outputs[0]:
            # a perfect student predicts x0 at every step
            torch.testing.assert_close(out.denoised, x0, rtol=0, atol=2e-5)
        assert outputs[0][-1].prev_sample is outputs[0][-1].denoised  # the last step returns x0 itself
        for other in outputs[1:]:
            for a, b in zip(outputs[0], other):
                assert torch.equal(a.prev_sample, b.prev_sample) and torch.equal(a.denoised, b.denoised)


@pytest.mark.parametrize("noise_path", sorted(STORED))
def test_set_timesteps_without_count_runs_the_stored_timesteps(noise_path):
    scheduler = make(noise_path)
    scheduler.set_timesteps()
    stored = torch.tensor(STORED[noise_path], dtype=torch.float64)
    assert scheduler.num_inference_steps == 4 and scheduler.max_inference_steps == 4
    assert torch.equal(scheduler.path_timesteps, stored)
    if noise_path == "vp":
        assert scheduler.timesteps.dtype == torch.int64
        assert scheduler.timesteps.tolist() == STORED["vp"]
    elif noise_path == "flow":  # diffusers' flow pipelines see sigma * num_train_timesteps
        assert scheduler.timesteps.dtype == torch.float32
        torch.testing.assert_close(scheduler.timesteps, (stored * 1000).float())
    else:
        torch.testing.assert_close(scheduler.timesteps, stored.float())
    for i, t in enumerate(scheduler.timesteps):
        assert abs(scheduler.to_path_time(t).item() - stored[i].item()) < 1e-4


@pytest.mark.parametrize("steps", [1, 2, 3, 4])
def test_subset_selection_matches_lcm_scheduler(steps):
    # LCMScheduler with original_inference_steps=4 has the grid [999, 749, 499, 249] and picks N evenly from the top.
    lcm = LCMScheduler(original_inference_steps=4)
    lcm.set_timesteps(steps)
    scheduler = make("vp")
    scheduler.set_timesteps(steps)
    assert scheduler.timesteps.tolist() == lcm.timesteps.tolist()
    assert scheduler.select_timesteps(steps) == [float(t) for t in lcm.timesteps.tolist()]


def test_explicit_timesteps_override_the_stored_ones():
    scheduler = make("vp")
    scheduler.set_timesteps(timesteps=[800, 400])
    assert scheduler.timesteps.tolist() == [800, 400]
    scheduler.set_timesteps(num_inference_steps=1, timesteps=torch.tensor([500]))
    assert scheduler.timesteps.tolist() == [500]
    assert scheduler.config.conditioning_timesteps == STORED["vp"]  # the config is untouched


def test_determinism_given_a_generator():
    scheduler = make("vp")
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))

    # a student that is not perfect, so the re-noising noise reaches the output
    def student(sample):
        return 0.5 * sample

    def run(seed):
        scheduler.set_timesteps()
        generator = torch.Generator().manual_seed(seed)
        sample = x0.clone()
        for t in scheduler.timesteps:
            sample = scheduler.step(student(sample), t, sample, generator=generator).prev_sample
        return sample

    assert torch.equal(run(0), run(0))
    assert not torch.allclose(run(0), run(1))


def test_output_dataclass_and_tuple():
    scheduler = make("vp", timesteps=[999, 499])
    scheduler.set_timesteps()
    sample = torch.randn(SHAPE)
    out = scheduler.step(torch.zeros(SHAPE), scheduler.timesteps[0], sample, generator=torch.Generator())
    assert isinstance(out, OneStepSchedulerOutput)
    assert set(out.keys()) == {"prev_sample", "denoised"}
    assert out.prev_sample.shape == out.denoised.shape == SHAPE
    assert not torch.equal(out.prev_sample, out.denoised)  # re-noised to 499 before the last step
    prev, denoised = scheduler.step(torch.zeros(SHAPE), scheduler.timesteps[1], out.prev_sample, return_dict=False)
    assert prev is denoised


def test_diffusers_conventions():
    scheduler = make("vp")
    assert scheduler.order == 1 and scheduler.init_noise_sigma == 1.0 and len(scheduler) == 1000
    sample = torch.randn(SHAPE)
    assert scheduler.scale_model_input(sample, 999) is sample
    scheduler.set_timesteps()
    assert scheduler.index_for_timestep(torch.tensor(499)) == 2
    scheduler.set_begin_index(1)
    assert scheduler.begin_index == 1
    scheduler.step(torch.zeros(SHAPE), scheduler.timesteps[1], sample)
    assert scheduler.step_index == 2
    # add_noise takes scheduler units (the flow path's timesteps are sigma * 1000)
    noise = torch.randn(SHAPE)
    flow = make("flow")
    torch.testing.assert_close(
        flow.add_noise(sample, noise, torch.tensor([500.0, 250.0])),
        param.add_noise(sample, noise, torch.tensor([0.5, 0.25]), flow.path),
    )
    torch.testing.assert_close(
        scheduler.add_noise(sample, noise, torch.tensor([399, 399])),
        param.add_noise(sample, noise, 399, scheduler.path),
    )


def test_from_config_of_native_schedulers_keeps_their_schedules():
    euler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    vp = OneStepScheduler.from_config(euler.config, conditioning_timesteps=[399])
    assert vp.config.noise_path == "vp" and vp.config.prediction_type == "epsilon"
    assert torch.equal(vp.path.alphas_cumprod, euler.alphas_cumprod.double())
    # the noise path (and the matching parameterization) is read off flow and TrigFlow configs
    flow = OneStepScheduler.from_config(
        FlowMatchEulerDiscreteScheduler(shift=7.0).config, conditioning_timesteps=[1.0]
    )
    assert flow.config.noise_path == "flow" and flow.config.prediction_type == "flow_prediction"
    assert flow.path.shift == 7.0
    dpm = DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction")
    assert OneStepScheduler.from_config(dpm.config, conditioning_timesteps=[1.0]).path.shift == 3.0
    trig = OneStepScheduler.from_config(SCMScheduler(sigma_data=0.5).config, conditioning_timesteps=[1.5708])
    assert trig.config.noise_path == "trigflow" and trig.config.prediction_type == "trigflow"
    with pytest.raises(
        ValueError,
        match=r"`conditioning_timesteps` of a flow student must lie in \(0, 1\], got "
        r"\[999.0\]",
    ):
        OneStepScheduler.from_config(FlowMatchEulerDiscreteScheduler().config)
    # a source left at its class defaults keeps them (DDPM's linear betas, not OneStepScheduler's SDXL defaults)
    ddpm = OneStepScheduler.from_config(DDPMScheduler().config, conditioning_timesteps=[400])
    assert torch.equal(ddpm.path.alphas_cumprod, DDPMScheduler().alphas_cumprod.double())
    # explicit arguments and our own saved configs are taken as they are
    assert OneStepScheduler.from_config(flow.config).config.noise_path == "flow"
    explicit = OneStepScheduler.from_config(FlowMatchEulerDiscreteScheduler().config, noise_path="vp")
    assert explicit.config.noise_path == "vp"


# ---------------------------------------------------------------------------------------------------------------------
# oracles: the same numbers as diffusers' schedulers where they can express the same student
# ---------------------------------------------------------------------------------------------------------------------


def test_one_vp_step_equals_ddpm_x0():
    ddpm = DDPMScheduler(clip_sample=False)
    ddpm.set_timesteps(timesteps=[400])
    scheduler = make("vp", timesteps=[400], beta_start=0.0001, beta_end=0.02, beta_schedule="linear")
    scheduler.set_timesteps()
    g = torch.Generator().manual_seed(0)
    sample, eps = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    expected = ddpm.step(eps, 400, sample).pred_original_sample
    torch.testing.assert_close(scheduler.step(eps, 400, sample).denoised, expected, rtol=0, atol=1e-5)


def test_four_vp_steps_equal_lcm_scheduler():
    lcm = LCMScheduler.from_config(
        EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").config
    )
    lcm.set_timesteps(timesteps=STORED["vp"])
    scheduler = make("vp")
    scheduler.set_timesteps()
    assert scheduler.timesteps.tolist() == lcm.timesteps.tolist()

    def student(sample, t):  # any deterministic epsilon-predictor
        return torch.tanh(sample) * (t / 1000.0)

    start = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    results = []
    for s in (lcm, scheduler):
        generator = torch.Generator().manual_seed(5)
        sample = start.clone()
        for t in s.timesteps:
            sample, denoised = s.step(student(sample, float(t)), t, sample, generator=generator, return_dict=False)
        results.append(denoised)
    # LCM's boundary scalings c_skip, c_out differ from (0, 1) by < 1e-7 at t >= 249
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("steps", [2, 8])
def test_vp_ode_steps_equal_trailing_euler_and_ddim(steps):
    # SDXL-Lightning's recipe (EulerDiscreteScheduler, trailing) and Hyper-SD's N-step LoRAs' (DDIMScheduler, trailing,
    # eta 0) are the same deterministic step on an epsilon student: x0 and the predicted noise, moved to the next
    # timestep. Euler works on x_t / alpha_t (sigma-scaled) samples and feeds the network x_t / sqrt(sigma^2 + 1).
    sdxl = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
    euler = EulerDiscreteScheduler(**sdxl, timestep_spacing="trailing")
    ddim = DDIMScheduler(**sdxl, timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=False)
    euler.set_timesteps(steps)
    ddim.set_timesteps(steps)
    scheduler = make("vp", timesteps=[int(t) for t in ddim.timesteps], solver="ode")
    scheduler.set_timesteps()
    assert scheduler.timesteps.tolist() == ddim.timesteps.tolist() == [int(t) for t in euler.timesteps]
    assert len(scheduler.timesteps) == steps  # 8 stored timesteps: the most a student may have

    def student(x, t):  # any deterministic epsilon-predictor of the network input
        return torch.tanh(x) * (0.5 + float(t) / 2000.0)

    start = torch.randn(SHAPE, generator=torch.Generator().manual_seed(8))
    # the same unit-variance network input at the first step for all three
    ours, theirs_ddim, theirs_euler = start.clone(), start.clone(), start * (euler.sigmas[0].item() ** 2 + 1) ** 0.5
    for i, t in enumerate(scheduler.timesteps):
        ours = scheduler.step(student(ours, t), t, ours).prev_sample
        theirs_ddim = ddim.step(student(theirs_ddim, t), ddim.timesteps[i], theirs_ddim).prev_sample
        model_input = euler.scale_model_input(theirs_euler, euler.timesteps[i])
        theirs_euler = euler.step(student(model_input, t), euler.timesteps[i], theirs_euler).prev_sample
    torch.testing.assert_close(ours, theirs_ddim, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours, theirs_euler, rtol=0, atol=1e-5)


def test_one_flow_step_equals_flow_match_euler():
    euler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    euler.set_timesteps(1)
    scheduler = make("flow", "flow_prediction", timesteps=[1.0])
    scheduler.set_timesteps()
    assert scheduler.timesteps.tolist() == euler.timesteps.tolist() == [1000.0]
    g = torch.Generator().manual_seed(0)
    sample, velocity = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    expected = euler.step(velocity, euler.timesteps[0], sample).prev_sample
    torch.testing.assert_close(
        scheduler.step(velocity, scheduler.timesteps[0], sample).prev_sample, expected, rtol=0, atol=1e-6
    )


def test_two_trigflow_steps_equal_scm_scheduler_in_sample_space():
    # SCMScheduler works in sigma_data-scaled sample space with the network output scaled by sigma_data
    # (SanaSprintPipeline); OneStepScheduler works in latent units.
    sigma_data = 0.5
    scm = SCMScheduler(sigma_data=sigma_data)
    scm.set_timesteps(2)
    scheduler = make("trigflow", "trigflow", timesteps=[1.5708, 1.3])
    scheduler.set_timesteps()
    assert torch.allclose(scheduler.timesteps, scm.timesteps[:-1])

    def student(x):  # a TrigFlow output for latent-unit input
        return torch.sin(x) - 0.3 * x

    latents = torch.randn(SHAPE, generator=torch.Generator().manual_seed(6))
    ours, theirs = latents.clone(), latents.clone() * sigma_data
    g_ours, g_theirs = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    for i in range(2):
        ours, ours_x0 = scheduler.step(
            student(ours), scheduler.timesteps[i], ours, generator=g_ours, return_dict=False
        )
        theirs, theirs_x0 = scm.step(
            student(theirs / sigma_data) * sigma_data, scm.timesteps[i], theirs, generator=g_theirs, return_dict=False
        )
        torch.testing.assert_close(ours_x0 * sigma_data, theirs_x0, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours * sigma_data, theirs, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "noise_path, timesteps, message",
    [
        ("vp", [249, 999], r"must be strictly decreasing, got \[249.0, 999.0\]"),
        ("vp", [999, 999], r"must be strictly decreasing"),
        ("vp", list(range(999, 150, -50)), r"must hold 1 to 16 timesteps, got 17"),
        ("vp", [], r"must hold 1 to 16 timesteps, got 0"),
        ("vp", [1000], r"of a vp student must lie in \(0, 999\]"),
        ("vp", [0], r"of a vp student must lie in \(0, 999\]"),
        ("vp", [399.5], r"of a VP student must be integer steps, got \[399.5\]"),
        ("flow", [1.2], r"of a flow student must lie in \(0, 1\]"),
        ("flow", [0.0], r"of a flow student must lie in \(0, 1\]"),
        ("trigflow", [2.0], r"of a trigflow student must lie in \(0, 1.5708\]"),
    ],
)
def test_bad_conditioning_timesteps_are_refused(noise_path, timesteps, message):
    with pytest.raises(ValueError, match=r"`conditioning_timesteps` " + message):
        make(noise_path, timesteps=timesteps)
    scheduler = make(noise_path)
    with pytest.raises(ValueError, match=r"`timesteps` " + message):
        scheduler.set_timesteps(timesteps=timesteps)


def test_bad_step_counts_and_call_order_are_refused():
    scheduler = make("vp", timesteps=[999, 499])
    with pytest.raises(ValueError, match=r"`set_timesteps` must be called before `step`"):
        scheduler.step(torch.zeros(SHAPE), 999, torch.zeros(SHAPE))
    with pytest.raises(
        ValueError,
        match=r"supports 1 to 2 inference steps \(it was trained at timesteps "
        r"\[999.0, 499.0\]\), got num_inference_steps=3",
    ):
        scheduler.set_timesteps(3)
    with pytest.raises(ValueError, match=r"supports 1 to 2 inference steps"):
        scheduler.set_timesteps(0)
    with pytest.raises(ValueError, match=r"`num_inference_steps` must be an integer, got 1.5"):
        scheduler.set_timesteps(1.5)
    with pytest.raises(ValueError, match=r"Pass either `num_inference_steps` or `timesteps`, not both"):
        scheduler.set_timesteps(2, timesteps=[999])
    scheduler.set_timesteps(1)
    sample = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match=r"Timestep 499 is not one of this scheduler's timesteps \[999\]"):
        scheduler.step(sample, 499, sample)
    scheduler.step(sample, 999, sample)
    with pytest.raises(ValueError, match=r"All 1 steps have been taken; call `set_timesteps` again"):
        scheduler.step(sample, 999, sample)


def test_unknown_prediction_type_and_noise_path_are_refused():
    with pytest.raises(ValueError, match=r"Unknown prediction_type 'x0'"):
        OneStepScheduler(prediction_type="x0")
    with pytest.raises(ValueError, match=r"Unknown noise path 'edm'"):
        OneStepScheduler(noise_path="edm")


@pytest.mark.parametrize(
    "noise_path, timesteps, config",
    [("flow", [1.0], {}), ("trigflow", [1.5708], {}), ("vp", [999], {"rescale_betas_zero_snr": True})],
)
def test_epsilon_students_cannot_start_where_no_signal_is_left(noise_path, timesteps, config):
    with pytest.raises(
        ValueError,
        match=r"leave no signal on the .* path \(alpha_t < 1e-3\), where an "
        r"epsilon-prediction student cannot recover x0",
    ):
        make(noise_path, "epsilon", timesteps=timesteps, **config)
    make(noise_path, "v_prediction", timesteps=timesteps, **config)  # fine for other parameterizations


def test_trigflow_default_timestep_is_diffusers_pi_over_two():
    scheduler = make("trigflow", "trigflow", timesteps=[round(math.pi / 2, 5)])
    scheduler.set_timesteps()
    assert abs(scheduler.timesteps.item() - 1.5708) < 1e-6


# ---------------------------------------------------------------------------------------------------------------------
# per-call constants: the schedule and its float64 coefficients are computed once and reused bit-exactly
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "noise_path, prediction_type", list(itertools.product(sorted(STORED), param.PREDICTION_TYPES))
)
def test_steps_with_cached_coefficients_equal_the_conversions_evaluated_at_each_step(noise_path, prediction_type):
    timesteps = STORED[noise_path]
    if prediction_type == "epsilon" and noise_path != "vp":
        timesteps = [0.95 * timesteps[0]] + timesteps[1:]
    scheduler = make(noise_path, prediction_type, timesteps=timesteps)
    path = scheduler.path
    for _ in range(2):  # the second run reuses the first run's schedule and coefficients
        generator, reference_generator = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
        scheduler.set_timesteps()
        sample = reference = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
        for i, t in enumerate(scheduler.timesteps):
            model_output = torch.randn(SHAPE, generator=torch.Generator().manual_seed(i + 1))
            sample, denoised = scheduler.step(model_output, t, sample, generator=generator, return_dict=False)
            # the conversions evaluated from the time itself, as every step did before the cache
            x0 = param.to_x0_and_epsilon(model_output, reference, scheduler.path_timesteps[i], path, prediction_type)[
                0
            ]
            assert torch.equal(denoised, x0)
            if i + 1 < len(scheduler.timesteps):
                noise = torch.randn(SHAPE, generator=reference_generator)
                reference = param.add_noise(x0, noise, scheduler.path_timesteps[i + 1], path)
            else:
                reference = x0
            assert torch.equal(sample, reference)


def test_set_timesteps_reuses_the_last_schedule_and_rebuilds_on_change():
    scheduler = make("vp")
    scheduler.set_timesteps()
    timesteps, path_timesteps = scheduler.timesteps, scheduler.path_timesteps
    scheduler.set_timesteps()
    assert scheduler.timesteps is timesteps and scheduler.path_timesteps is path_timesteps
    scheduler.set_timesteps(2)
    assert scheduler.timesteps.tolist() == [999, 499]
    scheduler.set_timesteps(timesteps=[800, 300])
    assert scheduler.timesteps.tolist() == [800, 300]
    scheduler.set_timesteps()
    assert scheduler.timesteps.tolist() == [999, 749, 499, 249] and scheduler.timesteps is not timesteps


def test_path_timesteps_set_by_hand_are_honoured():
    scheduler = make("vp", timesteps=[999])
    scheduler.set_timesteps()
    scheduler.step(torch.zeros(SHAPE), scheduler.timesteps[0], torch.zeros(SHAPE))  # fills the coefficient cache
    scheduler.set_timesteps()
    scheduler.path_timesteps = torch.tensor([500.0], dtype=torch.float64)
    sample = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    output = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    denoised = scheduler.step(output, scheduler.timesteps[0], sample).denoised
    assert torch.equal(denoised, param.to_x0(output, sample, 500.0, scheduler.path, "epsilon"))
