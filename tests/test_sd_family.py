"""Stable Diffusion 1.x (epsilon) and 2.x (v-prediction) students: parity with StableDiffusionPipeline at one and four
steps, batches and generators as the native pipeline takes them, and LoRA files in StableDiffusionPipeline's format.

The parametrized tests over ``TINY_FAMILIES`` (test_pipeline.py, test_community_pipelines.py, ...) run the epsilon
(SD 1.5-like) fixture; the v-prediction (SD 2.x-like) model is built here from
``tiny_sd_components(v_prediction=True)``.
"""

import numpy as np
import pytest
import torch
from diffusers import LCMScheduler, StableDiffusionPipeline

from diffusers_onestep import OneStepPipeline
from diffusers_onestep.families import StableDiffusionAdapter, detect_family_from_folder
from diffusers_onestep.testing import native_one_step_pipeline, random_lora_state_dict, tiny_sd_components


PROMPT = "a photo of a cat"
FOUR_STEPS = [999, 749, 499, 249]


@pytest.fixture(scope="module")
def sd2_folder(tmp_path_factory):
    """A tiny SD 2.x-like pipeline (DDIMScheduler with prediction_type="v_prediction") saved as a native folder."""
    folder = str(tmp_path_factory.mktemp("sd2") / "sd2")
    components = tiny_sd_components(seed=3, v_prediction=True)
    StableDiffusionPipeline(**components, **StableDiffusionAdapter.native_pipeline_kwargs).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=["sd1-epsilon", "sd2-v"])
def folder_and_prediction(request, native_folder, sd2_folder):
    if request.param == "sd1-epsilon":
        return native_folder("sd"), "epsilon"
    return sd2_folder, "v_prediction"


def _student(folder, timesteps):
    pipe = OneStepPipeline.from_pretrained(folder, conditioning_timesteps=timesteps)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("timesteps", [[999], FOUR_STEPS], ids=["1-step", "4-step"])
def test_parity_with_stable_diffusion_pipeline(folder_and_prediction, timesteps, run):
    folder, prediction_type = folder_and_prediction
    assert detect_family_from_folder(folder) == "sd"
    pipe = _student(folder, timesteps)
    assert pipe.scheduler.config.prediction_type == prediction_type  # read off the teacher's scheduler config
    assert pipe.adapter.default_resolution == 32
    images = run(pipe)
    # the cards' few-step recipe: LCMScheduler with timesteps=[...] at guidance 0 (fresh noise between steps)
    native, kwargs = native_one_step_pipeline("sd", folder, timesteps=timesteps)
    assert isinstance(native.scheduler, LCMScheduler)
    assert native.scheduler.config.prediction_type == prediction_type
    expected = run(native, **kwargs)
    assert images.shape == expected.shape == (1, 32, 32, 3)
    assert np.abs(images - expected).max() <= 1e-5
    assert images.std() > 1e-3
    # a negative control: the other parameterization gives another image
    other = "epsilon" if prediction_type == "v_prediction" else "v_prediction"
    wrong = OneStepPipeline.from_pretrained(folder, conditioning_timesteps=timesteps, prediction_type=other)
    wrong.set_progress_bar_config(disable=True)
    assert np.abs(run(wrong) - expected).max() > 1e-3


def test_batches_generators_and_output_types_equal_the_native_pipeline(sd2_folder, run):
    pipe = _student(sd2_folder, [999])
    native, kwargs = native_one_step_pipeline("sd", sd2_folder, timesteps=[999])
    prompts = ["a photo of a cat", "a red car on the road"]

    def call(p, **extra):
        generators = [torch.Generator().manual_seed(s) for s in (5, 6, 7, 8)]
        return p(prompts, num_images_per_prompt=2, generator=generators, output_type="np", **extra).images

    images = call(pipe)
    assert images.shape == (4, 32, 32, 3)
    assert np.abs(images - call(native, **kwargs)).max() <= 1e-5
    assert np.abs(images[0] - images[1]).max() > 1e-4  # one generator per image
    # pre-computed embeddings: StableDiffusionPipeline's encode_prompt gives the same tensors
    embeds, mask, pooled = pipe.encode_prompt(PROMPT)
    assert mask is None and pooled is None and embeds.shape == (1, 77, 24)
    native_embeds, _ = native.encode_prompt(PROMPT, "cpu", 1, False)
    assert torch.equal(embeds, native_embeds)
    latents = pipe(PROMPT, generator=torch.Generator().manual_seed(0), output_type="latent").images
    assert latents.shape == (1, 4, 16, 16)
    with pytest.raises(ValueError, match=r"Pass at most one of `negative_prompt` and `negative_prompt_embeds`"):
        pipe(PROMPT, negative_prompt="blurry", negative_prompt_embeds=embeds)
    with pytest.raises(ValueError, match=r"distilled with its guidance built in .* \(got 7.5\)"):
        pipe(PROMPT, guidance_scale=7.5)


def test_lora_file_is_stable_diffusion_pipelines_format(native_folder, tmp_path, run):
    """A student LoRA written with the adapter's saver loads with StableDiffusionPipeline.load_lora_weights and gives
    the image OneStepPipeline gives with it fused."""
    folder = native_folder("sd")
    pipe = _student(folder, [999])
    adapter = pipe.adapter
    state = random_lora_state_dict(pipe.unet, adapter.default_lora_target_modules, rank=2, seed=1, scale=0.3)
    saver = getattr(__import__("diffusers"), adapter.lora_pipeline_class_name)
    saver.save_lora_weights(str(tmp_path), **adapter.lora_save_kwargs(state), weight_name="student_lora.safetensors")
    before = run(pipe)
    pipe.load_student_lora(str(tmp_path / "student_lora.safetensors"))
    ours = run(pipe)
    assert np.abs(ours - before).max() > 1e-3
    native, kwargs = native_one_step_pipeline("sd", folder)
    native.load_lora_weights(str(tmp_path), weight_name="student_lora.safetensors")
    native.fuse_lora()
    assert np.abs(run(native, **kwargs) - ours).max() <= 1e-5
