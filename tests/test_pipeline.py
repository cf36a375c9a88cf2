"""OneStepPipeline: parity with the native diffusers pipelines of every family, check_inputs, and call features."""

import re

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import LCMScheduler

from diffusers_onestep import OneStepPipeline, OneStepScheduler
from diffusers_onestep.testing import TINY_FAMILIES, native_one_step_pipeline, tiny_components


PROMPT = "a photo of a cat"


# ---------------------------------------------------------------------------------------------------------------------
# parity oracles: the same images as the family's own pipeline run the way the student's card runs it
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.oldest
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_one_step_parity_with_native_pipeline(family, native_folder, student, run):
    native, kwargs = native_one_step_pipeline(family, native_folder(family))
    expected = run(native, **kwargs)
    images = run(student(family))
    assert images.shape == expected.shape and images.shape[0] == 1
    assert np.abs(images - expected).max() <= 1e-5
    assert images.std() > 1e-3  # a real image, not a constant


def test_batched_prompts_parity(native_folder, student, run):
    native, kwargs = native_one_step_pipeline("pixart_sigma", native_folder("pixart_sigma"))
    prompts = ["a photo of a cat", "a red car on the road"]
    expected = run(native, prompts, **kwargs)
    images = run(student("pixart_sigma"), prompts)
    assert images.shape[0] == 2 and np.abs(images - expected).max() <= 1e-5
    assert np.abs(images[0] - images[1]).max() > 1e-4


@pytest.fixture(scope="module")
def sdxl_four_step(native_folder, load_student):
    return load_student(native_folder("sdxl"), "sdxl", conditioning_timesteps=[999, 749, 499, 249])


@pytest.mark.parametrize("steps, lcm_timesteps", [(4, [999, 749, 499, 249]), (2, [999, 499])])
def test_multi_step_parity_with_lcm_scheduler(steps, lcm_timesteps, sdxl_four_step, native_folder, run):
    # DMD2 4-step: LCMScheduler with timesteps=[999, 749, 499, 249], guidance 0 (diffusers-facts §3)
    native, kwargs = native_one_step_pipeline("sdxl", native_folder("sdxl"), timesteps=lcm_timesteps)
    assert isinstance(native.scheduler, LCMScheduler)
    expected = run(native, **kwargs)
    images = run(sdxl_four_step, num_inference_steps=None if steps == 4 else steps)
    assert np.abs(images - expected).max() <= 1e-5


def test_explicit_timesteps_override(sdxl_four_step, native_folder, run):
    native, kwargs = native_one_step_pipeline("sdxl", native_folder("sdxl"), timesteps=[800, 300])
    assert np.abs(run(sdxl_four_step, timesteps=[800, 300]) - run(native, **kwargs)).max() <= 1e-5
    assert sdxl_four_step.scheduler.config.conditioning_timesteps == [999, 749, 499, 249]


# ---------------------------------------------------------------------------------------------------------------------
# check_inputs: one actionable sentence, raised before any model runs
# ---------------------------------------------------------------------------------------------------------------------


def assert_one_sentence(message: str) -> None:
    assert "\n" not in message and message.endswith("."), message
    assert not re.search(r"[.;!?]\s+[A-Z]", message[:-1]), f"more than one sentence: {message}"
    assert len(message) < 260, message


class ForwardCounter:
    """Counts forwards of every model component (and VAE decodes) of a pipeline."""

    def __init__(self, pipe):
        self.calls = 0
        self.handles = [
            m.register_forward_pre_hook(self._count)
            for m in pipe.components.values()
            if isinstance(m, torch.nn.Module)
        ]
        self.handles.append(pipe.vae.decoder.register_forward_pre_hook(self._count))

    def _count(self, *_):
        self.calls += 1

    def remove(self):
        for handle in self.handles:
            handle.remove()


@pytest.fixture(scope="module")
def counted(native_folder, load_student):
    """Fresh students of three families with forward counters."""
    pipes = {}
    for family in ("sdxl", "pixart_alpha", "sana_sprint"):
        pipe = load_student(native_folder(family), family)
        pipes[family] = (pipe, ForwardCounter(pipe))
    yield pipes
    for _, counter in pipes.values():
        counter.remove()


def _embeds(batch=1, length=77, dim=64):
    return torch.zeros(batch, length, dim)


ERROR_CASES = [
    # (family, call kwargs, message regex)
    (
        "sdxl",
        {"prompt": PROMPT, "height": 63},
        r"`height` must be a positive multiple of 2 \(VAE factor 2 × patch "
        r"size 1\) for this SDXL student, got 63",
    ),
    ("sdxl", {"prompt": PROMPT, "width": 0}, r"`width` must be a positive multiple of 2"),
    (
        "pixart_alpha",
        {"prompt": PROMPT, "height": 7},
        r"multiple of 2 \(VAE factor 1 × patch size 2\) for this "
        r"PixArt-α student, got 7",
    ),
    (
        "sdxl",
        {"prompt": PROMPT, "num_inference_steps": 0},
        r"This student supports 1 to 1 inference steps \(it was "
        r"trained at timesteps \[399.0\]\), got num_inference_steps=0",
    ),
    (
        "sdxl",
        {"prompt": PROMPT, "num_inference_steps": 2},
        r"supports 1 to 1 inference steps .* got num_inference_"
        r"steps=2",
    ),
    (
        "sdxl",
        {"prompt": PROMPT, "timesteps": [999, 499], "num_inference_steps": 1},
        r"Pass either `num_inference_steps` or `timesteps`, not both",
    ),
    (
        "sdxl",
        {"prompt": PROMPT, "timesteps": list(range(999, 150, -50))},
        r"`timesteps` must hold 1 to 16 timesteps",
    ),
    ("sdxl", {"prompt": PROMPT, "timesteps": [1000]}, r"`timesteps` of a vp student must lie in \(0, 999\]"),
    ("sdxl", {"prompt": PROMPT, "num_images_per_prompt": 0}, r"`num_images_per_prompt` must be a positive integer"),
    (
        "sdxl",
        {"prompt": PROMPT, "prompt_embeds": _embeds(), "pooled_prompt_embeds": torch.zeros(1, 32)},
        r"Pass exactly one of `prompt` and `prompt_embeds`, got both",
    ),
    ("sdxl", {}, r"Pass exactly one of `prompt` and `prompt_embeds`, got neither"),
    ("sdxl", {"prompt": 3}, r"`prompt` must be a string or a non-empty list of strings, got int"),
    ("sdxl", {"prompt": []}, r"`prompt` must be a string or a non-empty list of strings"),
    (
        "sdxl",
        {"prompt_embeds": _embeds()},
        r"SDXL students need `pooled_prompt_embeds` together with "
        r"`prompt_embeds`",
    ),
    (
        "pixart_alpha",
        {"prompt_embeds": _embeds(1, 120, 32)},
        r"PixArt-α students need `prompt_attention_mask` "
        r"together with `prompt_embeds`",
    ),
    ("sana_sprint", {"prompt_embeds": _embeds(1, 300, 8)}, r"SANA-Sprint students need `prompt_attention_mask`"),
    (
        "sdxl",
        {"prompt_embeds": _embeds(2), "pooled_prompt_embeds": torch.zeros(1, 32)},
        r"`pooled_prompt_embeds` has batch size 1 but `prompt_embeds` has 2",
    ),
    (
        "pixart_alpha",
        {"prompt_embeds": _embeds(1, 120, 32), "prompt_attention_mask": torch.ones(3, 120)},
        r"`prompt_attention_mask` has batch size 3 but `prompt_embeds` has 1",
    ),
    (
        "sdxl",
        {"prompt": [PROMPT, PROMPT], "num_images_per_prompt": 2, "generator": [torch.Generator()] * 3},
        r"Got 3 generators for a batch of 4 images; pass one per image",
    ),
    (
        "sdxl",
        {"prompt": PROMPT, "latents": torch.zeros(1, 4, 16, 16)},
        r"`latents` must have shape \(1, 4, 32, 32\), got \(1, 4, 16, 16\)",
    ),
    (
        "sdxl",
        {"prompt": PROMPT, "num_images_per_prompt": 2, "latents": torch.zeros(1, 4, 32, 32)},
        r"`latents` must have shape \(2, 4, 32, 32\)",
    ),
    (
        "sdxl",
        {"prompt": PROMPT, "output_type": "jpeg"},
        r"`output_type` must be one of pil, np, pt, latent, got 'jpeg'",
    ),
    (
        "sana_sprint",
        {"prompt": PROMPT, "negative_prompt": "blurry", "negative_scale": float("nan")},
        r"`negative_scale` must be a finite number >= 0, got nan",
    ),
    (
        "sdxl",
        {"prompt": PROMPT, "negative_scale": 2.0},
        r"`negative_scale` weighs the negative prompt's attention \(NASA\) and needs `negative_prompt`",
    ),
    (
        "pixart_alpha",
        {"prompt": PROMPT, "negative_prompt": "blurry", "negative_prompt_embeds": _embeds(1, 120, 32)},
        r"Pass at most one of `negative_prompt` and `negative_prompt_embeds`, got both",
    ),
    (
        "sdxl",
        {"prompt": PROMPT, "guidance_scale": 7.5},
        r"This SDXL student was distilled with its guidance built in and takes no `guidance_scale` \(got 7.5\); "
        r"remove the argument",
    ),
    ("pixart_alpha", {"prompt": PROMPT, "guidance_scale": 4.5}, r"PixArt-α student was distilled with its guidance"),
    ("sana_sprint", {"prompt": PROMPT, "guidance_scale": -1.0}, r"`guidance_scale` must be non-negative, got -1.0"),
    (
        "sdxl",
        {"prompt": PROMPT, "callback_on_step_end": lambda *a: {}, "callback_on_step_end_tensor_inputs": ["noise"]},
        r"`callback_on_step_end_tensor_inputs` may name latents, denoised, prompt_embeds, prompt_attention_mask, "
        r"pooled_prompt_embeds, got 'noise'",
    ),
]


@pytest.mark.parametrize(
    "family, kwargs, message", ERROR_CASES, ids=[f"{f}-{'-'.join(k) or 'none'}" for f, k, _ in ERROR_CASES]
)
def test_check_inputs_errors(family, kwargs, message, counted):
    pipe, counter = counted[family]
    before = counter.calls
    with pytest.raises(ValueError, match=message) as info:
        pipe(**kwargs)
    assert_one_sentence(str(info.value))
    assert counter.calls == before, "a model ran before the error"


def test_missing_text_encoders_ask_for_embeddings(native_folder, run):
    pipe = OneStepPipeline.from_pretrained(
        native_folder("pixart_alpha"), conditioning_timesteps=[400], text_encoder=None, tokenizer=None
    )
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(ValueError, match=r"This PixArt-α model has no tokenizer, text_encoder; pass `prompt_embeds`"):
        run(pipe)


def test_guidance_up_to_one_is_accepted_and_ignored_by_guidance_distilled_students(student, run):
    pipe = student("pixart_alpha")
    reference = run(pipe)
    for scale in (0.0, 1.0):
        assert np.array_equal(run(pipe, guidance_scale=scale), reference)


def test_embedded_guidance_changes_sana_sprint_output(student, run):
    pipe = student("sana_sprint")
    default = run(pipe)
    assert np.array_equal(run(pipe, guidance_scale=4.5), default)  # the family's default
    assert np.abs(run(pipe, guidance_scale=1.0) - default).max() > 1e-4


def test_constructor_errors():
    components = tiny_components("sdxl")
    with pytest.raises(ValueError, match=r"OneStepPipeline needs a OneStepScheduler, got EulerDiscreteScheduler"):
        OneStepPipeline(vae=components["vae"], unet=components["unet"], scheduler=components["scheduler"])
    scheduler = OneStepScheduler(conditioning_timesteps=[399])
    with pytest.raises(ValueError, match=r"needs exactly one denoiser"):
        OneStepPipeline(vae=components["vae"], scheduler=scheduler)
    with pytest.raises(ValueError, match=r"Unknown family 'kandinsky'"):
        OneStepPipeline(vae=components["vae"], unet=components["unet"], scheduler=scheduler, family="kandinsky")


# ---------------------------------------------------------------------------------------------------------------------
# call features
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_encode_prompt_then_call_with_the_embeddings_equals_calling_with_the_prompt(family, student, run):
    pipe = student(family)
    prompt_embeds, prompt_attention_mask, pooled_prompt_embeds = pipe.encode_prompt(PROMPT)
    adapter_cls = type(pipe.adapter)
    assert (prompt_attention_mask is not None) == ("mask" in adapter_cls.required_condition_fields)
    assert (pooled_prompt_embeds is not None) == ("pooled" in adapter_cls.required_condition_fields)
    images = pipe(
        prompt_embeds=prompt_embeds,
        prompt_attention_mask=prompt_attention_mask,
        pooled_prompt_embeds=pooled_prompt_embeds,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert np.array_equal(images, run(pipe))
    # the family's own pipeline computes the same tensors
    condition = pipe.adapter.encode_prompt([PROMPT])
    assert torch.equal(prompt_embeds, condition.embeds)


def test_encode_prompt_repeats_for_several_images_per_prompt(student):
    pipe = student("pixart_sigma")
    prompts = ["a photo of a cat", "a red car on the road"]
    embeds, mask, pooled = pipe.encode_prompt(prompts, num_images_per_prompt=2)
    single, single_mask, _ = pipe.encode_prompt(prompts)
    assert pooled is None and embeds.shape[0] == mask.shape[0] == 4
    assert torch.equal(embeds[[0, 1]], single[[0, 0]]) and torch.equal(embeds[[2, 3]], single[[1, 1]])
    assert torch.equal(mask[[2, 3]], single_mask[[1, 1]])

    def call(**kwargs):
        generators = [torch.Generator().manual_seed(s) for s in range(4)]
        return pipe(generator=generators, output_type="np", **kwargs).images

    assert np.array_equal(
        call(prompt_embeds=embeds, prompt_attention_mask=mask), call(prompt=prompts, num_images_per_prompt=2)
    )
    with pytest.raises(ValueError, match=r"`prompt` must be a string or a non-empty list of strings, got int"):
        pipe.encode_prompt(3)


def test_num_images_per_prompt_and_generator_lists(student, run):
    pipe = student("sana")
    prompts = ["a photo of a cat", "a bowl of fruit"]
    seeds = [11, 12, 13, 14]
    images = pipe(
        prompts, num_images_per_prompt=2, output_type="np", generator=[torch.Generator().manual_seed(s) for s in seeds]
    ).images
    assert images.shape == (4, 64, 64, 3)
    for k, seed in enumerate(seeds):  # image k: prompt k // 2 with its own generator
        assert np.abs(images[k] - run(pipe, prompts[k // 2], seed=seed)[0]).max() <= 1e-6
    assert np.abs(images[0] - images[1]).max() > 1e-4


def test_determinism(student, run):
    pipe = student("sdxl")
    assert np.array_equal(run(pipe, seed=3), run(pipe, seed=3))
    assert np.abs(run(pipe, seed=3) - run(pipe, seed=4)).max() > 1e-4


def test_given_latents_are_used(student, run):
    pipe = student("pixart_alpha")
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    images = pipe(PROMPT, latents=latents, output_type="np").images
    assert np.array_equal(images, run(pipe, seed=0))  # the same noise as the seeded generator draws


def test_output_types(student):
    pipe = student("sdxl")

    def call(output_type, **kwargs):
        return pipe(PROMPT, generator=torch.Generator().manual_seed(0), output_type=output_type, **kwargs)

    np_images = call("np").images
    assert isinstance(np_images, np.ndarray) and np_images.shape == (1, 64, 64, 3)
    assert np_images.dtype == np.float32 and 0 <= np_images.min() and np_images.max() <= 1
    pt = call("pt").images
    assert isinstance(pt, torch.Tensor) and pt.shape == (1, 3, 64, 64)
    np.testing.assert_allclose(pt.permute(0, 2, 3, 1).numpy(), np_images, atol=1e-7)
    pil = call("pil").images
    assert isinstance(pil, list) and isinstance(pil[0], PIL.Image.Image) and pil[0].size == (64, 64)
    assert np.abs(np.asarray(pil[0]) / 255.0 - np_images[0]).max() <= 1 / 255 + 1e-6
    latents = call("latent").images
    assert latents.shape == (1, 4, 32, 32)
    with torch.no_grad():
        decoded = pipe.image_processor.postprocess(pipe.adapter.decode(latents), output_type="np")
    assert np.abs(decoded - np_images).max() <= 1e-6
    (tuple_images,) = call("np", return_dict=False)
    assert np.array_equal(tuple_images, np_images)


def test_callback_on_step_end(sdxl_four_step, run):
    pipe = sdxl_four_step
    seen = []

    def record(p, i, t, tensors):
        seen.append((i, int(t), sorted(tensors)))
        return {}

    reference = run(pipe)
    images = run(pipe, callback_on_step_end=record, callback_on_step_end_tensor_inputs=["latents", "denoised"])
    assert np.array_equal(images, reference)  # a callback returning nothing changes nothing
    assert seen == [(i, t, ["denoised", "latents"]) for i, t in enumerate([999, 749, 499, 249])]
    assert pipe.num_timesteps == 4

    def zero_last(p, i, t, tensors):
        return {"denoised": torch.zeros_like(tensors["denoised"])} if i == 3 else {}

    latents = run(
        pipe, output_type="latent", callback_on_step_end=zero_last, callback_on_step_end_tensor_inputs=["denoised"]
    )
    assert torch.count_nonzero(latents) == 0


def test_height_and_width_default_to_the_native_size_and_can_change(student, run):
    pipe = student("sana")
    assert run(pipe).shape == (1, 64, 64, 3)
    assert run(pipe, height=32, width=48).shape == (1, 32, 48, 3)


def test_disabled_progress_bar_builds_no_tqdm(native_folder, load_student, run):
    from tqdm.auto import tqdm

    pipe = load_student(native_folder("pixart_alpha"), "pixart_alpha")  # set_progress_bar_config(disable=True)
    assert not isinstance(pipe.progress_bar(total=1), tqdm)
    reference = run(pipe)
    pipe.set_progress_bar_config(disable=False)
    bar = pipe.progress_bar(total=1)
    assert isinstance(bar, tqdm)
    bar.close()
    pipe.set_progress_bar_config(leave=False)  # "disable" unset: diffusers decides, as before
    bar = pipe.progress_bar(total=1)
    assert isinstance(bar, tqdm)
    bar.close()
    assert np.array_equal(run(pipe), reference)


# ---------------------------------------------------------------------------------------------------------------------
# family data: the pipeline's slots, detection and the noise path all come from the adapter classes
# ---------------------------------------------------------------------------------------------------------------------


def test_component_slots_and_offload_chain_cover_every_family():
    import inspect

    from diffusers_onestep.families import FAMILIES

    slots = set(inspect.signature(OneStepPipeline.__init__).parameters) - {"self", "scheduler"}
    offload_chain = OneStepPipeline.model_cpu_offload_seq.split("->")
    for adapter_cls in FAMILIES.values():
        names = set(adapter_cls.component_names())
        assert names <= slots, f"{adapter_cls.name} needs slots {sorted(names - slots)} OneStepPipeline lacks"
        assert names - {"vae"} <= set(OneStepPipeline._optional_components)
        # every model a family brings is moved by enable_model_cpu_offload in the chain's order
        assert {n for n in names if not n.startswith("tokenizer")} <= set(offload_chain)
    assert {"text_encoder_3", "tokenizer_3"} <= slots  # room for SD3's third text encoder


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_a_native_scheduler_config_becomes_one_noise_path(family):
    # the adapter, OneStepScheduler.from_config and the loader read a teacher's scheduler config the same way
    from diffusers_onestep.families import get_adapter_class
    from diffusers_onestep.pipelines.loading import scheduler_for

    components = tiny_components(family)
    config = dict(components["scheduler"].config)
    adapter = get_adapter_class(family)(components)
    timesteps = scheduler_for(family, config, None, None).config.conditioning_timesteps
    from_config = OneStepScheduler.from_config(config, conditioning_timesteps=timesteps)
    loaded = scheduler_for(family, config, None, None)
    assert adapter.noise_path.describe() == from_config.path.describe() == loaded.path.describe()
    assert adapter.prediction_type == from_config.config.prediction_type == loaded.config.prediction_type


@pytest.mark.parametrize(
    "model_index, configs, family",
    [
        (
            {"_class_name": "StableDiffusionXLControlNetPipeline"},
            {"unet": {"addition_embed_type": "text_time"}},
            "sdxl",
        ),
        ({}, {"transformer": {"_class_name": "PixArtTransformer2DModel"}}, "pixart_alpha"),
        (
            {"_class_name": "PixArtSigmaPAGPipeline"},
            {"transformer": {"_class_name": "PixArtTransformer2DModel"}},
            "pixart_sigma",
        ),
        ({}, {"transformer": {"_class_name": "SanaTransformer2DModel"}}, "sana"),
        ({}, {"transformer": {"_class_name": "SanaTransformer2DModel", "guidance_embeds": True}}, "sana_sprint"),
        ({"_class_name": "FluxPipeline"}, {}, "flux"),
        (
            {"_class_name": "FluxControlNetPipeline"},
            {"transformer": {"_class_name": "FluxTransformer2DModel"}},
            "flux",
        ),
        ({"_class_name": "StableDiffusion3Pipeline"}, {}, "sd3"),
        # any pipeline around an SD3 transformer (ControlNet, inpainting, ...)
        (
            {"_class_name": "StableDiffusion3ControlNetPipeline"},
            {"transformer": {"_class_name": "SD3Transformer2DModel"}},
            "sd3",
        ),
        # a pipeline class a family names wins over what the denoiser looks like
        (
            {"_class_name": "SanaPipeline"},
            {"transformer": {"_class_name": "SanaTransformer2DModel", "guidance_embeds": True}},
            "sana",
        ),
        # SD 1.x/2.x: any plain text-to-image UNet2DConditionModel; SDXL's micro-conditioning UNet stays SDXL's
        ({"_class_name": "StableDiffusionPipeline"}, {"unet": {"_class_name": "UNet2DConditionModel"}}, "sd"),
        (
            {"_class_name": "StableDiffusionControlNetPipeline"},
            {"unet": {"_class_name": "UNet2DConditionModel", "cross_attention_dim": 1024}},
            "sd",
        ),
        (
            {"_class_name": "StableDiffusionXLPipeline"},
            {"unet": {"_class_name": "UNet2DConditionModel", "addition_embed_type": "text_time"}},
            "sdxl",
        ),
        (
            {"_class_name": "LatentConsistencyModelPipeline"},
            {"unet": {"_class_name": "UNet2DConditionModel", "time_cond_proj_dim": 256}},
            "sd",
        ),
        # our own folders name their family, also under "_onestep" in folders saved with a native class name
        ({"_class_name": "PixArtAlphaPipeline", "_onestep": {"family": "pixart_sigma"}}, {}, "pixart_sigma"),
        ({"_class_name": "OneStepPipeline", "family": "sana_sprint"}, {}, "sana_sprint"),
    ],
)
def test_detect_family(model_index, configs, family):
    from diffusers_onestep.families import detect_family

    assert detect_family(model_index, configs) == family


def test_detect_family_refuses_unknown_backbones_naming_the_supported_ones():
    from diffusers_onestep.families import detect_family, supported_families_text

    listed = supported_families_text()
    assert listed.startswith("SDXL (sdxl), PixArt-α (pixart_alpha), PixArt-Σ (pixart_sigma), SANA (sana), ")
    for family in ("SANA-Sprint (sana_sprint)", "Stable Diffusion 1.x/2.x (sd)", "FLUX.1 (flux)", "SD3 (sd3)"):
        assert family in listed
    with pytest.raises(
        ValueError, match=re.escape(f"UNet2DModel is not a supported backbone; diffusers-onestep supports {listed}.")
    ):
        detect_family({}, {"unet": {"_class_name": "UNet2DModel"}})
    # UNets of the SD lineage that are no text-to-image backbone: inpainting (9 input channels), DeepFloyd IF (T5
    # embeddings through encoder_hid_dim), Kandinsky (image embeddings), the x4 upscaler (noise-level class embedding)
    for name, unet in (
        ("StableDiffusionInpaintPipeline", {"in_channels": 9, "out_channels": 4}),
        ("IFPipeline", {"encoder_hid_dim": 4096, "addition_embed_type": "text"}),
        ("KandinskyV22Pipeline", {"addition_embed_type": "image", "encoder_hid_dim": 1280}),
        ("StableDiffusionUpscalePipeline", {"class_embed_type": None, "num_class_embeds": 1000, "in_channels": 7}),
    ):
        with pytest.raises(ValueError, match=f"{name} is not a supported backbone"):
            detect_family({"_class_name": name}, {"unet": {"_class_name": "UNet2DConditionModel", **unet}})


def test_every_family_names_its_own_lora_saver():
    import diffusers

    from diffusers_onestep.families import FAMILIES, FamilyAdapter

    assert FamilyAdapter.lora_pipeline_class_name == ""  # no silent default borrowed from another family
    for adapter_cls in FAMILIES.values():
        assert "lora_pipeline_class_name" in vars(adapter_cls), adapter_cls.name
        saver = getattr(diffusers, adapter_cls.lora_pipeline_class_name)
        assert hasattr(saver, "save_lora_weights") and hasattr(saver, "lora_state_dict")
