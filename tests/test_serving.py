"""The serving engines' ``dmd2_config`` block: written for flow students, read from folders converted for serving."""

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from diffusers_onestep import OneStepPipeline, OneStepScheduler
from diffusers_onestep.pipelines.serving import DMD2_CONFIG_KEY
from diffusers_onestep.testing import native_one_step_pipeline


PROMPT = "a photo of a cat"


def _model_index(folder):
    with open(f"{folder}/model_index.json", encoding="utf-8") as f:
        return json.load(f)


def _serving_folder(native_folder, tmp_path, block, family="sana"):
    """A copy of the tiny native ``family`` folder with a ``dmd2_config`` block, as a converter would write it."""
    folder = tmp_path / f"{family}-serving"
    shutil.copytree(native_folder(family), folder)
    index = _model_index(folder)
    index[DMD2_CONFIG_KEY] = block
    (folder / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    return str(folder)


def test_flow_student_writes_the_block_and_others_do_not(student_folder):
    block = _model_index(student_folder("sana"))[DMD2_CONFIG_KEY]
    assert block == {"num_inference_steps": 1, "denoising_timesteps": [1000], "solver": "sde", "guidance_scale": 1.0}
    for family in ("sdxl", "pixart_sigma", "sana_sprint"):  # VP and TrigFlow students: the engines cannot run them
        assert DMD2_CONFIG_KEY not in _model_index(student_folder(family))


def test_multi_step_block_names_the_model_timesteps(native_folder, load_student, tmp_path):
    pipe = load_student(native_folder("sana"), "sana", conditioning_timesteps=[1.0, 0.75, 0.5, 0.25])
    pipe.save_pretrained(tmp_path / "four")
    block = _model_index(tmp_path / "four")[DMD2_CONFIG_KEY]
    pipe.scheduler.set_timesteps()
    # exactly the timesteps the denoiser is called at
    assert block["denoising_timesteps"] == [1000, 750, 500, 250] == pipe.scheduler.timesteps.tolist()
    assert block["num_inference_steps"] == 4


def test_our_folder_round_trips_with_the_block(student_folder, student, run):
    reloaded = OneStepPipeline.from_pretrained(student_folder("sana"))
    reloaded.set_progress_bar_config(disable=True)
    assert isinstance(reloaded.scheduler, OneStepScheduler)
    assert np.array_equal(run(reloaded), run(student("sana")))


@pytest.mark.parametrize("solver", ["ode", "sde"])
def test_serving_folder_loads_with_its_timesteps_and_solver(solver, native_folder, tmp_path):
    block = {"num_inference_steps": 2, "denoising_timesteps": [1000, 500], "solver": solver, "guidance_scale": 1.0}
    pipe = OneStepPipeline.from_pretrained(_serving_folder(native_folder, tmp_path, block))
    assert pipe.scheduler.config.conditioning_timesteps == [1.0, 0.5]
    assert pipe.scheduler.config.solver == solver
    # the caller's timesteps win over the folder's
    override = OneStepPipeline.from_pretrained(
        _serving_folder(native_folder, tmp_path / "o", block), conditioning_timesteps=[1.0]
    )
    assert override.scheduler.config.conditioning_timesteps == [1.0]


def test_ode_solver_is_the_native_flow_euler_sampler(native_folder, tmp_path, run):
    """Two deterministic steps at sigmas [1, 0.5] equal SanaPipeline driven by FlowMatchEulerDiscreteScheduler at the
    same (unshifted) sigmas: re-noising x0 with the predicted noise is an Euler step of the flow ODE."""
    block = {"num_inference_steps": 2, "denoising_timesteps": [1000, 500], "solver": "ode", "guidance_scale": 1.0}
    pipe = OneStepPipeline.from_pretrained(_serving_folder(native_folder, tmp_path, block))
    pipe.set_progress_bar_config(disable=True)
    native, kwargs = native_one_step_pipeline("sana", native_folder("sana"))
    native.scheduler = FlowMatchEulerDiscreteScheduler.from_config(native.scheduler.config, shift=1.0)
    kwargs.pop("num_inference_steps")
    expected = run(native, sigmas=[1.0, 0.5], **kwargs)
    images = run(pipe)
    assert np.abs(images - expected).max() <= 1e-5
    # a negative control: the re-noising sampler draws fresh noise and lands elsewhere
    sde = OneStepPipeline.from_pretrained(_serving_folder(native_folder, tmp_path / "sde", {**block, "solver": "sde"}))
    sde.set_progress_bar_config(disable=True)
    assert np.abs(run(sde) - expected).max() > 1e-3


def test_ode_scheduler_step_reuses_the_predicted_noise():
    scheduler = OneStepScheduler(
        conditioning_timesteps=[1.0, 0.5], prediction_type="flow_prediction", noise_path="flow", solver="ode"
    )
    scheduler.set_timesteps()
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    velocity = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    out = scheduler.step(velocity, scheduler.timesteps[0], x)
    # Euler on dx/dsigma = v from sigma 1 to 0.5, and the x0 of a flow prediction
    assert torch.allclose(out.prev_sample, x - 0.5 * velocity, atol=1e-6)
    assert torch.allclose(out.denoised, x - velocity, atol=1e-6)


@pytest.mark.parametrize(
    "block, match",
    [
        ({"num_inference_steps": 3, "denoising_timesteps": [1000, 500]}, "num_inference_steps=3 but lists 2"),
        ({"denoising_timesteps": []}, "non-empty list of numbers"),
        ({"denoising_timesteps": [1000], "solver": "heun"}, "must be 'sde' or 'ode'"),
        ({"denoising_timesteps": [1000], "guidance_scale": 3.5}, "no embedded guidance"),
    ],
)
def test_bad_blocks_are_one_sentence(block, match, native_folder, tmp_path):
    with pytest.raises(ValueError, match=match):
        OneStepPipeline.from_pretrained(_serving_folder(native_folder, tmp_path, block))


def test_block_on_a_vp_folder_is_refused(native_folder, tmp_path):
    block = {"num_inference_steps": 1, "denoising_timesteps": [999]}
    with pytest.raises(ValueError, match="flow-matching students, but this sdxl folder"):
        OneStepPipeline.from_pretrained(_serving_folder(native_folder, tmp_path, block, family="sdxl"))


def test_unknown_solver_is_refused_by_the_scheduler():
    with pytest.raises(ValueError, match="`solver` must be one of 'sde', 'ode'"):
        OneStepScheduler(solver="heun")


def test_block_on_a_dynamically_shifted_folder(native_folder, tmp_path):
    """FLUX.1-dev's scheduler shifts sigmas with the resolution: a multi-step block's final timesteps hold at one size
    only and are refused; the one-step block (sigma 1, which no shift moves) loads, its guidance the embedded one."""
    block = {"num_inference_steps": 2, "denoising_timesteps": [1000, 500], "solver": "ode", "guidance_scale": 3.5}
    with pytest.raises(ValueError, match=r"shifts them with the resolution \(use_dynamic_shifting\)"):
        OneStepPipeline.from_pretrained(_serving_folder(native_folder, tmp_path, block, family="flux"))
    block = {"num_inference_steps": 1, "denoising_timesteps": [1000], "solver": "sde", "guidance_scale": 2.0}
    pipe = OneStepPipeline.from_pretrained(_serving_folder(native_folder, tmp_path / "one", block, family="flux"))
    assert pipe.scheduler.config.conditioning_timesteps == [1.0] and pipe.config.embedded_guidance_scale == 2.0
