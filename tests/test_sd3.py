"""SD3 / SD3.5: the shift-3 flow path, parity with StableDiffusion3Pipeline's own schedule at 4 steps, T5 dropped
(``text_encoder_3=None``) in inference, and the discriminator features of its joint blocks.

The one-step parity, ``encode_prompt`` round trip, ``from_pipe``, offload, compile and LoRA tests run for sd3 through
their ``TINY_FAMILIES`` parametrization; these are what only SD3 has.
"""

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

from diffusers_onestep import OneStepPipeline, OneStepScheduler
from diffusers_onestep.families import SD3Adapter
from diffusers_onestep.testing import (
    native_one_step_setup,
    save_tiny_native_pipeline,
    tiny_components,
    tiny_sd3_components,
)


FAMILY = "sd3"


@pytest.fixture(scope="module")
def no_t5_folder(tmp_path_factory):
    """A tiny SD3 folder saved without T5, as ``StableDiffusion3Pipeline(..., text_encoder_3=None)`` saves it."""
    folder = str(tmp_path_factory.mktemp("sd3-no-t5"))
    pipe = StableDiffusion3Pipeline(**{**tiny_components(FAMILY), "text_encoder_3": None, "tokenizer_3": None})
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def with_scheduler(folder, scheduler, **kwargs):
    pipe = OneStepPipeline.from_pretrained(folder, scheduler=scheduler, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def native_sigmas(config, steps):
    """The sigmas StableDiffusion3Pipeline's own FlowMatchEulerDiscreteScheduler runs at ``steps`` steps."""
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    scheduler.set_timesteps(steps)
    return [float(s) for s in scheduler.sigmas[:-1]]


def test_the_noise_path_is_the_schedulers_shifted_flow():
    # FlowMatchEulerDiscreteScheduler(shift=3) trains at sigma = 3u / (1 + 2u), u = t / 1000 (Esser et al. 2024,
    # eq. 23): the path's training_time must give exactly its training sigmas, and alpha, sigma = 1 - t, t.
    components = tiny_components(FAMILY)
    scheduler = components["scheduler"]
    adapter = SD3Adapter(components)
    path = adapter.noise_path
    assert path.kind == "flow" and path.shift == 3.0 and adapter.prediction_type == "flow_prediction"
    u = torch.arange(1, 1001, dtype=torch.float64).flip(0) / 1000
    assert torch.allclose(path.training_time(u), scheduler.sigmas.to(torch.float64), atol=1e-6)
    alpha, sigma = path.alpha_sigma(torch.tensor([0.25, 0.857]))
    assert torch.allclose(alpha, torch.tensor([0.75, 0.143], dtype=torch.float64))
    assert torch.allclose(sigma, torch.tensor([0.25, 0.857], dtype=torch.float64))
    # negative control: a shift-1 path draws other times
    assert not torch.allclose(
        SD3Adapter({**components, "scheduler": FlowMatchEulerDiscreteScheduler()}).noise_path.training_time(u),
        scheduler.sigmas.to(torch.float64),
        atol=1e-3,
    )


def test_four_euler_steps_of_the_native_shifted_schedule(native_folder, load_student, run):
    """Four steps at the native pipeline's own shift-3 sigmas (SD3.5-Large-Turbo's call: num_inference_steps=4,
    guidance 0) with the `ode` solver equal the native pipeline's Euler steps; the `sde` solver (fresh noise) does
    not."""
    folder = native_folder(FAMILY)
    native = StableDiffusion3Pipeline.from_pretrained(folder)
    native.set_progress_bar_config(disable=True)
    sigmas = native_sigmas(native.scheduler.config, 4)
    assert sigmas[0] == 1.0 and 0.85 < sigmas[1] < 0.86  # shifted: 3u / (1 + 2u) at u = 2/3
    expected = run(native, num_inference_steps=4, guidance_scale=0.0)

    scheduler = OneStepScheduler.from_config(native.scheduler.config, conditioning_timesteps=sigmas, solver="ode")
    student = with_scheduler(folder, scheduler)
    images = run(student)
    assert np.abs(images - expected).max() <= 1e-5
    # one step of the same student is the native one-step call
    assert (
        np.abs(run(student, num_inference_steps=1) - run(native, num_inference_steps=1, guidance_scale=0.0)).max()
        <= 1e-5
    )
    sde = OneStepScheduler.from_config(native.scheduler.config, conditioning_timesteps=sigmas, solver="sde")
    assert np.abs(run(with_scheduler(folder, sde)) - expected).max() > 1e-3


@pytest.mark.parametrize("timesteps", [[1.0], [1.0, 0.75, 0.5, 0.25]])
def test_without_t5_equals_the_native_pipeline_without_t5(timesteps, native_folder, load_student, run):
    # diffusers' documented way to drop T5: from_pretrained(..., text_encoder_3=None, tokenizer_3=None)
    no_t5 = {"text_encoder_3": None, "tokenizer_3": None}
    student = load_student(native_folder(FAMILY), FAMILY, conditioning_timesteps=timesteps, **no_t5)
    assert student.text_encoder_3 is None and student.adapter.has_text_encoders
    student.scheduler = OneStepScheduler.from_config(student.scheduler.config, solver="ode")  # Euler between steps
    native = StableDiffusion3Pipeline.from_pretrained(native_folder(FAMILY), **no_t5)
    native, kwargs = native_one_step_setup(FAMILY, native, timesteps)
    images = run(student)
    assert np.abs(images - run(native, **kwargs)).max() <= 1e-5
    # T5 is really dropped: the same weights with T5 give another image, and T5's tokens are zeros
    with_t5 = load_student(native_folder(FAMILY), FAMILY, conditioning_timesteps=timesteps)
    with_t5.scheduler = OneStepScheduler.from_config(with_t5.scheduler.config, solver="ode")
    assert np.abs(run(with_t5) - images).max() > 1e-3
    embeds, mask, pooled = student.encode_prompt("a photo of a cat")
    native_embeds, _, native_pooled, _ = native.encode_prompt(
        "a photo of a cat", None, None, do_classifier_free_guidance=False
    )
    assert mask is None and torch.equal(embeds, native_embeds) and torch.equal(pooled, native_pooled)
    # [CLIP-L ‖ CLIP-G zero-padded to the T5 width; zeros for T5] (diffusers 0.34 sizes the zeros at the CLIP length, 0.42 at max_sequence_length)
    clip_tokens = student.tokenizer.model_max_length
    assert embeds.shape[1] > clip_tokens and embeds.shape[2] == 28 and pooled.shape == (1, 20)
    assert torch.count_nonzero(embeds[:, clip_tokens:]) == 0 and torch.count_nonzero(embeds[:, :clip_tokens, :20]) > 0
    assert torch.count_nonzero(embeds[:, :, 20:]) == 0


def test_a_folder_saved_without_t5_loads(native_folder, load_student, run, no_t5_folder):
    # a folder whose model_index.json has text_encoder_3 = [null, null] loads as is (plain diffusers needs
    # `text_encoder_3=None` passed again), and computes what dropping T5 at load time computes
    dropped = load_student(native_folder(FAMILY), FAMILY, text_encoder_3=None, tokenizer_3=None)
    assert dropped.text_encoder_3 is None
    assert np.abs(run(dropped) - run(load_student(no_t5_folder, FAMILY))).max() <= 1e-6


def test_missing_clip_encoders_ask_for_embeddings(native_folder, load_student):
    pipe = load_student(native_folder(FAMILY), FAMILY, text_encoder_2=None, tokenizer_2=None)
    with pytest.raises(ValueError, match=r"^This SD3 model has no tokenizer_2, text_encoder_2; pass `prompt_embeds`"):
        pipe("a photo of a cat")


def test_discriminator_features_are_the_image_stream_of_the_middle_joint_block():
    adapter = SD3Adapter(tiny_components(FAMILY))
    x_t = torch.randn(2, 6, 8, 8, generator=torch.Generator().manual_seed(0))
    condition = adapter.encode_prompt(["a photo of a cat", "a red car"])
    prediction, features = adapter.denoise(x_t, torch.tensor([1.0, 0.5]), condition, return_features=True)
    # [B, heads x head dim, H / patch, W / patch]: image tokens, not the 333 text tokens of the other stream
    assert prediction.shape == x_t.shape and features.shape == (2, adapter.feature_channels(), 4, 4)
    assert adapter.feature_channels() == 12
    # they depend on the image: another x_t gives other features
    _, other = adapter.denoise(x_t.flip(0), torch.tensor([1.0, 0.5]), condition, return_features=True)
    assert (features - other).abs().max() > 1e-4


def test_saved_student_loads_in_plain_diffusers(student, run, tmp_path):
    """A saved one-step SD3 student names StableDiffusion3Pipeline: plain diffusers runs it (one Euler step from
    sigma 1, guidance off) to the same image."""
    pipe = student(FAMILY)
    pipe.save_pretrained(tmp_path / "student")
    native = StableDiffusion3Pipeline.from_pretrained(tmp_path / "student")
    native.set_progress_bar_config(disable=True)
    assert np.abs(run(native, **SD3Adapter.native_interop_call_kwargs) - run(pipe)).max() <= 1e-5
    folder = save_tiny_native_pipeline(FAMILY, str(tmp_path / "again"))  # the fixture's own folder round-trips
    assert OneStepPipeline.from_pretrained(folder).config.family == FAMILY


@pytest.mark.parametrize("sd35", [False, True])
def test_fused_qkv_projections_keep_the_output(sd35):
    """SD3-Medium's attention fuses (diffusers' fused joint processor); SD3.5's QK-normed attention, which that
    processor would compute without its norms, is left unfused. Either way the output is unchanged."""
    components = tiny_sd3_components(sd35=sd35)
    adapter = SD3Adapter(components)
    x_t = torch.randn(1, 6, 8, 8, generator=torch.Generator().manual_seed(0))
    condition = adapter.encode_prompt(["a photo of a cat"])
    expected = adapter.denoise(x_t, 1.0, condition)
    adapter.fuse_qkv_projections(adapter.denoiser)
    fused = any(hasattr(m, "to_qkv") for m in adapter.denoiser.modules())
    assert fused is not sd35
    assert (adapter.denoise(x_t, 1.0, condition) - expected).abs().max() <= 1e-5


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"prompt": "a cat", "height": 10},
            r"^`height` must be a positive multiple of 4 \(VAE factor 2 × patch size 2\)",
        ),
        ({"prompt_embeds": torch.zeros(1, 333, 28)}, r"^SD3 students need `pooled_prompt_embeds` together with"),
        (
            {"prompt_embeds": torch.zeros(1, 333, 32), "pooled_prompt_embeds": torch.zeros(1, 20)},
            r"^`prompt_embeds` must be 28 wide for this SD3 student's transformer",
        ),
        (
            {"prompt_embeds": torch.zeros(1, 333, 28), "pooled_prompt_embeds": torch.zeros(1, 16)},
            r"^`pooled_prompt_embeds` must be 20 wide",
        ),
        (
            {"prompt": "a cat", "negative_prompt_embeds": torch.zeros(1, 333, 28)},
            r"^SD3 students need `negative_pooled_prompt_embeds` together with `negative_prompt_embeds`",
        ),
        ({"prompt": "a cat", "guidance_scale": 4.5}, r"^This SD3 student was distilled with its guidance built in"),
    ],
)
def test_bad_calls_are_one_sentence_before_any_model_runs(kwargs, message, student):
    pipe = student(FAMILY)
    with pytest.raises(ValueError, match=message) as info:
        pipe(**kwargs)
    text = str(info.value)
    assert "\n" not in text and text.endswith(".")
