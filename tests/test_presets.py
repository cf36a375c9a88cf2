"""Presets of public one- and few-step checkpoints, resolved through the real Hub code path (hf_hub_download,
diffusers' from_pretrained) on tiny stand-ins laid out in a Hub cache (testing.save_to_hub_cache), offline.

Each stand-in reproduces its repo's file layout and file-name case as far as the sources show it (the Hyper-SD file
listing, the DMD repo's legacy .bin transformer, DI*'s fp16-only weights, the SDXL base's scheduler config). Each
preset row is checked against its source's recipe assembled by hand with plain diffusers: the same scheduler timesteps
and parameterization, and the same images, or exactly the difference its notes name.
"""

import json
import os
import re

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FluxPipeline,
    LCMScheduler,
    PixArtAlphaPipeline,
    PixArtTransformer2DModel,
    SanaSprintPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    TCDScheduler,
    UNet2DConditionModel,
)
from safetensors.torch import save_file

from diffusers_onestep import OneStepPipeline
from diffusers_onestep.families import FluxAdapter, SDXLAdapter, StableDiffusionAdapter, get_adapter_class
from diffusers_onestep.hub import resolve_weight_name
from diffusers_onestep.pipelines import PRESETS, find_preset
from diffusers_onestep.pipelines.loading import load_state_dict_file
from diffusers_onestep.pipelines.presets import (
    DMD2_SD15_CHECKPOINTS,
    SD15_BASE,
    SOURCE_KINDS,
    TRAILING,
    flow_euler_sigmas,
)
from diffusers_onestep.schedulers.scheduling_onestep import MAX_STEPS, SOLVERS
from diffusers_onestep.testing import (
    random_lora_state_dict,
    save_to_hub_cache,
    tiny_fixture,
    tiny_flux_components,
    tiny_native_pipeline,
    tiny_pixart_components,
)


SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"
PIXART_BASE = "PixArt-alpha/PixArt-XL-2-1024-MS"
PIXART_DMD = "PixArt-alpha/PixArt-Alpha-DMD-XL-2-512x512"
SPRINT_REPOS = (
    "Efficient-Large-Model/Sana_Sprint_0.6B_1024px_diffusers",
    "Efficient-Large-Model/Sana_Sprint_1.6B_1024px_diffusers",
)
SD35_TURBO = "stabilityai/stable-diffusion-3.5-large-turbo"
PROMPT = "a photo of a cat"
INSTAFLOW = "XCLiu/instaflow_0_9B_from_sd_1_5"
#: stabilityai/stable-diffusion-xl-base-1.0's scheduler/scheduler_config.json as the Hub serves it: the keys of the
#: schedulers it is compatible with ride along, and the N-step recipes' DDIMScheduler.from_config reads
#: set_alpha_to_one=False from it
SDXL_BASE_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    "_diffusers_version": "0.19.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}
#: the SD 1.5 base's scheduler/scheduler_config.json (PNDMScheduler, as stable-diffusion-v1-5 ships it): the recipes'
#: DDIMScheduler.from_config and TCDScheduler.from_config read its schedule and set_alpha_to_one=False
SD15_BASE_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
#: the SD 1.5 LoRAs of ByteDance/Hyper-SD, as its card names them
HYPER_SD15_FILES = tuple(f"Hyper-SD15-{n}step{'s' if n > 1 else ''}-lora.safetensors" for n in (1, 2, 4, 8))
HYPER_SD = "ByteDance/Hyper-SD"
FLUX_DEV = "black-forest-labs/FLUX.1-dev"
FLUX_SCHNELL = "black-forest-labs/FLUX.1-schnell"
#: scheduler/scheduler_config.json of black-forest-labs/FLUX.1-dev and -schnell (FlowMatchEulerDiscreteScheduler):
#: dev shifts dynamically (mu from the image sequence length), schnell has a fixed shift of 1
FLUX_SCHEDULERS = {
    FLUX_DEV: {"shift": 3.0, "use_dynamic_shifting": True},
    FLUX_SCHNELL: {"shift": 1.0, "use_dynamic_shifting": False},
}
HYPER_FLUX_FILES = tuple(f"Hyper-FLUX.1-dev-{n}steps-lora.safetensors" for n in (8, 16))
#: the files of ByteDance/Hyper-SD's SDXL rows in the Hub listing (tree 52d483a): the 1-step UNet is spelt "-Unet"
HYPER_FILES = (
    "Hyper-SDXL-1step-Unet.safetensors",
    "Hyper-SDXL-1step-Unet-Comfyui.fp16.safetensors",
    "Hyper-SDXL-1step-lora.safetensors",
    "Hyper-SDXL-2steps-lora.safetensors",
    "Hyper-SDXL-4steps-lora.safetensors",
    "Hyper-SDXL-8steps-lora.safetensors",
)


def _student_unet_state(base_unet_config, seed):
    torch.manual_seed(seed)
    return UNet2DConditionModel.from_config(base_unet_config).state_dict()


def _sdxl_lora_file(folder, unet, weight_name, seed):
    # peft key names throughout: diffusers' load_lora_weights (the card recipe) drops the attention weights of the
    # mixed names `convert_state_dict_to_diffusers` writes (test_lora_loading.py covers that format for our loader)
    state = random_lora_state_dict(unet, SDXLAdapter.default_lora_target_modules, rank=4, seed=seed, scale=0.2)
    StableDiffusionXLPipeline.save_lora_weights(folder, unet_lora_layers=state, weight_name=weight_name)


def _save_sdxl_base(folder):
    tiny_native_pipeline("sdxl").save_pretrained(folder)
    with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(SDXL_BASE_SCHEDULER, f, indent=2)


def _save_sd15_base(folder):
    tiny_native_pipeline("sd").save_pretrained(folder)
    with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(SD15_BASE_SCHEDULER, f, indent=2)


def _save_flux(folder, repo_id, seed):
    """A tiny FLUX.1 pipeline repo: dev-like (guidance embedded) or schnell-like, with the repo's scheduler config."""
    guidance_embeds = FLUX_SCHEDULERS[repo_id]["use_dynamic_shifting"]
    FluxPipeline(**tiny_flux_components(seed=seed, guidance_embeds=guidance_embeds)).save_pretrained(folder)
    path = os.path.join(folder, "scheduler", "scheduler_config.json")
    with open(path) as f:
        config = json.load(f)
    config.update(FLUX_SCHEDULERS[repo_id], base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096)
    config.update(max_shift=1.15, num_train_timesteps=1000)
    with open(path, "w") as f:
        json.dump(config, f, indent=2)


def _save_hyper_flux(folder, transformer):
    # FluxPipeline's own LoRA layout (`transformer.` keys), without adapter metadata: alpha = rank, as in files
    # written before diffusers stored metadata
    for i, name in enumerate(HYPER_FLUX_FILES):
        state = random_lora_state_dict(transformer, FluxAdapter.default_lora_target_modules, rank=4, seed=60 + i)
        FluxPipeline.save_lora_weights(folder, transformer_lora_layers=state, weight_name=name)


def _save_hyper_sd(folder, unet, unet_config, unet_file="Hyper-SDXL-1step-Unet.safetensors", sd15_unet=None):
    if sd15_unet is not None:
        for i, name in enumerate(HYPER_SD15_FILES):
            state = random_lora_state_dict(
                sd15_unet, StableDiffusionAdapter.default_lora_target_modules, rank=4, seed=60 + i, scale=0.2
            )
            StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=state, weight_name=name)
    for i, name in enumerate(HYPER_FILES):
        if name == "Hyper-SDXL-1step-Unet.safetensors":
            save_file(_student_unet_state(unet_config, 30), os.path.join(folder, unet_file))
        elif "Comfyui" in name:  # a single-file checkpoint for ComfyUI: present, never read
            save_file({"placeholder": torch.zeros(1)}, os.path.join(folder, name))
        else:
            _sdxl_lora_file(folder, unet, name, seed=31 + i)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A Hub cache holding tiny stand-ins of every preset's repos; HF_HUB_CACHE points at it for this module."""
    import huggingface_hub.constants

    root = tmp_path_factory.mktemp("presets")
    cache = str(root / "hub")
    staging = root / "staging"

    def put(repo_id, build):
        folder = staging / repo_id.replace("/", "--")
        folder.mkdir(parents=True)
        build(str(folder))
        save_to_hub_cache(str(folder), repo_id, cache_dir=cache)

    sdxl = tiny_native_pipeline("sdxl")
    unet_config = sdxl.unet.config
    sd15_unet = tiny_native_pipeline("sd").unet
    put(SDXL_BASE, _save_sdxl_base)

    def turbo(d):  # a full pipeline repo with the card's scheduler
        pipe = tiny_native_pipeline("sdxl", seed=1)
        pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(
            pipe.scheduler.config, timestep_spacing="trailing"
        )
        pipe.save_pretrained(d)

    put("stabilityai/sdxl-turbo", turbo)
    # only fp16-variant weights, as the sibling XDG-XHS/diff_instruct_1step ships them
    put(
        "XDG-XHS/distar_long_1step",
        lambda d: tiny_native_pipeline("sdxl", seed=2).to(torch.float16).save_pretrained(d, variant="fp16"),
    )

    def dmd2(d):
        # legacy pickled fp16 state dicts, as the DMD2 repo ships them
        for i, name in enumerate(("dmd2_sdxl_1step_unet_fp16.bin", "dmd2_sdxl_4step_unet_fp16.bin")):
            state = {k: v.half() for k, v in _student_unet_state(unet_config, 10 + i).items()}
            torch.save(state, os.path.join(d, name))
        _sdxl_lora_file(d, sdxl.unet, "dmd2_sdxl_4step_lora_fp16.safetensors", seed=12)
        # the SD 1.5 generators: a plain UNet state dict (pickled) in each model-zoo folder's pytorch_model.bin
        for i, folder in enumerate(DMD2_SD15_CHECKPOINTS):
            os.makedirs(os.path.join(d, "model", "sdv1.5", folder))
            state = _student_unet_state(sd15_unet.config, 13 + i)
            torch.save(state, os.path.join(d, "model", "sdv1.5", folder, "pytorch_model.bin"))

    put("tianweiy/DMD2", dmd2)

    def lightning(d):
        save_file(_student_unet_state(unet_config, 20), os.path.join(d, "sdxl_lightning_1step_unet_x0.safetensors"))
        for steps in (2, 4, 8):
            save_file(
                _student_unet_state(unet_config, 20 + steps),
                os.path.join(d, f"sdxl_lightning_{steps}step_unet.safetensors"),
            )
            _sdxl_lora_file(d, sdxl.unet, f"sdxl_lightning_{steps}step_lora.safetensors", seed=40 + steps)

    put("ByteDance/SDXL-Lightning", lightning)
    put(SD15_BASE, _save_sd15_base)
    flux_transformer = tiny_flux_components(seed=7)["transformer"]

    def hyper_sd(d):  # the SDXL, SD 1.5 and FLUX.1-dev files of ByteDance/Hyper-SD
        _save_hyper_sd(d, sdxl.unet, unet_config, sd15_unet=sd15_unet)
        _save_hyper_flux(d, flux_transformer)

    put("ByteDance/Hyper-SD", hyper_sd)

    def sd_turbo(d):  # a full pipeline repo whose scheduler takes one step from t=999 (trailing Euler)
        pipe = tiny_native_pipeline("sd", seed=4)
        pipe.scheduler = EulerDiscreteScheduler.from_config(SD15_BASE_SCHEDULER, timestep_spacing="trailing")
        pipe.save_pretrained(d)

    put("stabilityai/sd-turbo", sd_turbo)

    def instaflow(d):  # a full SD 1.5-layout repo holding the rectified-flow UNet, with SD 1.5's PNDM scheduler config
        tiny_native_pipeline("sd", seed=7).save_pretrained(d)
        with open(os.path.join(d, "scheduler", "scheduler_config.json"), "w") as f:
            json.dump(SD15_BASE_SCHEDULER, f, indent=2)

    put(INSTAFLOW, instaflow)
    put(FLUX_DEV, lambda d: _save_flux(d, FLUX_DEV, seed=7))
    put(FLUX_SCHNELL, lambda d: _save_flux(d, FLUX_SCHNELL, seed=8))

    def nitro(d):
        for i, name in enumerate(("nitrosd-realism_unet.safetensors", "nitrosd-vibrant_unet.safetensors")):
            save_file(_student_unet_state(unet_config, 50 + i), os.path.join(d, name))

    put("ChenDY/NitroFusion", nitro)
    put(PIXART_BASE, lambda d: tiny_native_pipeline("pixart_alpha").save_pretrained(d))

    def pixart_dmd(d):
        # the Hub repo (57df7bb): model_index.json, transformer/ with a legacy .bin, scheduler/ (a DDPMScheduler the
        # demo loads), and a README.md with license metadata only. The scheduler's contents were not readable: PixArt's
        # betas and epsilon, clip_sample off (the preset's documented assumption)
        tiny_pixart_components(seed=5)["transformer"].save_pretrained(
            os.path.join(d, "transformer"), safe_serialization=False
        )
        DDPMScheduler(clip_sample=False).save_pretrained(os.path.join(d, "scheduler"))
        index = {
            "_class_name": "PixArtAlphaPipeline",
            "scheduler": ["diffusers", "DDPMScheduler"],
            "transformer": ["diffusers", "Transformer2DModel"],
        }
        with open(os.path.join(d, "model_index.json"), "w") as f:
            json.dump(index, f)
        with open(os.path.join(d, "README.md"), "w") as f:
            f.write("---\nlicense: openrail\n---\n")

    put(PIXART_DMD, pixart_dmd)
    for i, repo in enumerate(SPRINT_REPOS):
        put(repo, lambda d, i=i: tiny_native_pipeline("sana_sprint", seed=6 + i).save_pretrained(d))
    # a full SD3.5 pipeline repo with FlowMatchEulerDiscreteScheduler(shift=3.0), sd3_infer.py's shift for the model
    put(SD35_TURBO, lambda d: tiny_native_pipeline("sd3", seed=8).save_pretrained(d))

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_CACHE", cache)
        mp.setattr(huggingface_hub.constants, "HF_HUB_CACHE", cache)
        yield cache


def _ours(repo_id, run, **kwargs):
    pipe = OneStepPipeline.from_pretrained(repo_id, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe, run(pipe)


def _native_sdxl(repo_id=SDXL_BASE, unet_weights=None, scheduler_cls=LCMScheduler, **scheduler_kwargs):
    """The card recipe: StableDiffusionXLPipeline on the base (+ a UNet loaded with from_config/load_state_dict)."""
    from huggingface_hub import hf_hub_download

    kwargs = {}
    if unet_weights is not None:
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(repo_id, subfolder="unet"))
        repo, name = unet_weights
        path = hf_hub_download(repo, name)
        state = torch.load(path, weights_only=True) if name.endswith(".bin") else load_state_dict_file(path)
        unet.load_state_dict(state)
        kwargs["unet"] = unet
    pipe = StableDiffusionXLPipeline.from_pretrained(repo_id, add_watermarker=False, **kwargs)
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config, **scheduler_kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _native_lora(pipe, repo_id, weight_name, **fuse_kwargs):
    """The cards' LoRA lines: load_lora_weights(hf_hub_download(repo, file)) + fuse_lora(...)."""
    from huggingface_hub import hf_hub_download

    pipe.load_lora_weights(hf_hub_download(repo_id, weight_name))
    pipe.fuse_lora(**fuse_kwargs)
    return pipe


def _assert_scheduler(pipe, preset):
    assert pipe.scheduler.config.conditioning_timesteps == [float(t) for t in preset.conditioning_timesteps]
    assert pipe.scheduler.config.prediction_type == preset.prediction_type
    assert pipe.scheduler.config.solver == preset.solver
    assert pipe.config.family == preset.family


#: (repo id, weight_name or subfolder) of each preset row -> the test that checks it against its source
CHECKED = {}


def checks(*rows):
    """Register the preset rows a test checks against its source (at import, so that the coverage test below holds
    whatever subset of tests runs)."""

    def register(test):
        for row in rows:
            CHECKED[row] = test.__name__
        return test

    return register


LIGHTNING_FILES = [f"sdxl_lightning_{n}step_{kind}.safetensors" for kind in ("unet", "lora") for n in (2, 4, 8)]


# ---------------------------------------------------------------------------------------------------------------------
# the preset data: every row cites its source, pinned to a revision
# ---------------------------------------------------------------------------------------------------------------------


def test_every_row_cites_a_pinned_source_and_holds_a_runnable_recipe():
    pinned = re.compile(r"https://(github\.com|huggingface\.co)/[^/]+/[^/]+/(blob|tree)/[0-9a-f]{40}(/\S+)?$")
    for p in PRESETS:
        assert p.sources and all(pinned.match(url) for url in p.sources), p
        assert p.source_kind in SOURCE_KINDS and p.recipe, p
        assert p.solver in SOLVERS and 1 <= len(p.conditioning_timesteps) <= MAX_STEPS, p
        assert p.variant is None or p.kind == "pipeline", "a variant names the files of a full-pipeline repo"
        assert not p.weight_name_spellings or p.weight_name, p
        if p.solver == "ode" and p.family == "flux":  # FluxPipeline's default sigmas, shifted at each size
            assert p.conditioning_timesteps == flow_euler_sigmas(len(p.conditioning_timesteps)), p
        elif p.solver == "ode" and get_adapter_class(p.family).noise_path_kind == "vp":
            # trailing Euler / DDIM: the trailing grid of as many steps (other flow presets: their scheduler's sigmas,
            # checked against it in their own test)
            assert p.conditioning_timesteps == TRAILING[len(p.conditioning_timesteps)], p
    ids = [(p.repo_id, p.weight_name or p.subfolder) for p in PRESETS]
    assert len(ids) == len(set(ids))
    for repo_id in {p.repo_id for p in PRESETS}:
        assert sum(p.default for p in PRESETS if p.repo_id == repo_id) == 1, repo_id


# ---------------------------------------------------------------------------------------------------------------------
# SDXL students run with LCMScheduler and fixed timesteps on their cards
# ---------------------------------------------------------------------------------------------------------------------


LCM_UNET_ROWS = [
    ("tianweiy/DMD2", "dmd2_sdxl_1step_unet_fp16.bin", [399]),
    ("tianweiy/DMD2", "dmd2_sdxl_4step_unet_fp16.bin", [999, 749, 499, 249]),
    ("ByteDance/Hyper-SD", "Hyper-SDXL-1step-Unet.safetensors", [800]),
]


@checks(*(row[:2] for row in LCM_UNET_ROWS))
@pytest.mark.parametrize("repo_id, weight_name, timesteps", LCM_UNET_ROWS)
def test_sdxl_unet_presets_equal_the_card_recipe(repo_id, weight_name, timesteps, hub, run):
    preset = find_preset(repo_id, weight_name)
    pipe, images = _ours(repo_id, run, **({} if preset.default else {"weight_name": weight_name}))
    _assert_scheduler(pipe, preset)
    assert pipe.scheduler.timesteps.tolist() == timesteps
    native = _native_sdxl(unet_weights=(repo_id, weight_name))
    expected = run(native, timesteps=timesteps, guidance_scale=0.0)
    assert np.abs(images - expected).max() <= 1e-5
    # the student weights were really loaded (the base UNet gives another image)
    base = run(_native_sdxl(), timesteps=timesteps, guidance_scale=0.0)
    assert np.abs(images - base).max() > 1e-3


NITRO_ROWS = [("nitrosd-realism_unet.safetensors", 250), ("nitrosd-vibrant_unet.safetensors", 500)]


@checks(*(("ChenDY/NitroFusion", name) for name, _ in NITRO_ROWS))
@pytest.mark.parametrize("weight_name, shift", NITRO_ROWS)
def test_nitrofusion_presets_equal_the_card_recipe(weight_name, shift, hub, run):
    preset = find_preset("ChenDY/NitroFusion", weight_name)
    # the card's TimestepShiftLCMScheduler: LCMScheduler's 1-step grid with original_inference_steps=4, shifted by
    # (t * shifted_timestep / num_train_timesteps).long(), a truncation -- the UNet gets 249 / 499, not 249.75 / 499.5
    lcm = LCMScheduler.from_config(SDXL_BASE_SCHEDULER, original_inference_steps=4)
    lcm.set_timesteps(1)
    shifted = (lcm.timesteps * shift / lcm.config.num_train_timesteps).long().tolist()
    assert lcm.timesteps.tolist() == [999] and shifted == list(preset.conditioning_timesteps)
    pipe, images = _ours("ChenDY/NitroFusion", run, **({} if preset.default else {"weight_name": weight_name}))
    _assert_scheduler(pipe, preset)
    seen = []

    def record_timestep(module, args, kwargs):
        seen.append(float(torch.as_tensor(args[1] if len(args) > 1 else kwargs["timestep"]).flatten()[0]))

    pipe.unet.register_forward_pre_hook(record_timestep, with_kwargs=True)
    run(pipe)
    assert seen == [float(shifted[0])]
    native = _native_sdxl(unet_weights=("ChenDY/NitroFusion", weight_name))
    assert np.abs(images - run(native, timesteps=shifted, guidance_scale=0.0)).max() <= 1e-5


@checks(("tianweiy/DMD2", "dmd2_sdxl_4step_lora_fp16.safetensors"))
def test_dmd2_four_step_lora_preset(hub, run):
    pipe, images = _ours("tianweiy/DMD2", run, weight_name="dmd2_sdxl_4step_lora_fp16.safetensors")
    _assert_scheduler(pipe, find_preset("tianweiy/DMD2", "dmd2_sdxl_4step_lora_fp16.safetensors"))
    assert not any("lora" in name for name, _ in pipe.unet.named_modules())  # fused and removed
    native = _native_lora(_native_sdxl(), "tianweiy/DMD2", "dmd2_sdxl_4step_lora_fp16.safetensors", lora_scale=1.0)
    expected = run(native, timesteps=[999, 749, 499, 249], guidance_scale=0.0)
    assert np.abs(images - expected).max() <= 1e-5


@checks(("XDG-XHS/distar_long_1step", None))
def test_distar_ships_only_fp16_weights_and_loads_without_naming_the_variant(hub, run):
    repo = "XDG-XHS/distar_long_1step"
    # the stand-in's layout: plain diffusers finds no weights unless told the variant (what a user would hit)
    with pytest.raises(OSError, match=r"diffusion_pytorch_model|model\.safetensors|no file named"):
        DiffusionPipeline.from_pretrained(repo)
    pipe, images = _ours(repo, run)  # runs as loaded: fp16 text encoders (transformers keeps them), fp32 UNet
    _assert_scheduler(pipe, find_preset(repo))
    assert np.isfinite(images).all()
    # the README's recipe: variant="fp16", LCMScheduler, timesteps=[399], guidance 0 -- in float32 on the CPU, where
    # diffusers' own pipeline cannot mix fp16 text encoders with an fp32 UNet
    pipe, images = _ours(repo, run, torch_dtype=torch.float32)
    native = StableDiffusionXLPipeline.from_pretrained(
        repo, variant="fp16", torch_dtype=torch.float32, add_watermarker=False
    )
    native.scheduler = LCMScheduler.from_config(native.scheduler.config)
    native.set_progress_bar_config(disable=True)
    expected = run(native, timesteps=[399], guidance_scale=0.0)
    assert np.abs(images - expected).max() <= 1e-5
    # an explicit variant= is the caller's: variant=None finds no weights, as in plain diffusers
    with pytest.raises(OSError):
        OneStepPipeline.from_pretrained(repo, variant=None)


def _unit_noise_latents(pipe, seed=0):
    """The Euler recipe's noise rescaled so its UNet input is the unit noise OneStepPipeline feeds (the documented
    difference: trailing Euler feeds sqrt(1 - alphā_999) = 0.998 times unit noise)."""
    pipe.scheduler.set_timesteps(1)
    sigma = float(pipe.scheduler.sigmas[0])
    scale = (sigma**2 + 1) ** 0.5 / float(pipe.scheduler.init_noise_sigma)
    assert 0.99 < sigma / (sigma**2 + 1) ** 0.5 < 1  # the 0.2% the preset notes mention
    size = pipe.unet.config.sample_size
    return torch.randn(1, 4, size, size, generator=torch.Generator().manual_seed(seed)) * scale


@checks(("ByteDance/SDXL-Lightning", "sdxl_lightning_1step_unet_x0.safetensors"))
def test_sdxl_lightning_x0_preset(hub, run):
    preset = find_preset("ByteDance/SDXL-Lightning")
    pipe, images = _ours("ByteDance/SDXL-Lightning", run)
    _assert_scheduler(pipe, preset)
    assert pipe.scheduler.config.prediction_type == "sample" and pipe.scheduler.timesteps.tolist() == [999]
    native = _native_sdxl(
        unet_weights=("ByteDance/SDXL-Lightning", preset.weight_name),
        scheduler_cls=EulerDiscreteScheduler,
        timestep_spacing="trailing",
        prediction_type="sample",
    )
    expected = native(
        PROMPT, num_inference_steps=1, guidance_scale=0.0, latents=_unit_noise_latents(native), output_type="np"
    ).images
    assert np.abs(images - expected).max() <= 1e-5


@checks(("stabilityai/sdxl-turbo", None))
def test_sdxl_turbo_preset(hub, run):
    pipe, images = _ours("stabilityai/sdxl-turbo", run)
    _assert_scheduler(pipe, find_preset("stabilityai/sdxl-turbo"))
    native = StableDiffusionXLPipeline.from_pretrained("stabilityai/sdxl-turbo", add_watermarker=False)
    assert isinstance(native.scheduler, EulerAncestralDiscreteScheduler)  # the repo's own scheduler
    expected = native(
        PROMPT, num_inference_steps=1, guidance_scale=0.0, latents=_unit_noise_latents(native), output_type="np"
    ).images
    assert np.abs(images - expected).max() <= 1e-5


@checks(("ByteDance/Hyper-SD", "Hyper-SDXL-1step-lora.safetensors"))
def test_hyper_sd_lora_preset_against_tcd(hub, run):
    # One TCD step at t=999 returns x0 re-noised to t=0 with its own noise estimate; the preset returns x0 (notes).
    pipe, _ = _ours("ByteDance/Hyper-SD", run, weight_name="Hyper-SDXL-1step-lora.safetensors")
    pipe_preset = find_preset("ByteDance/Hyper-SD", "Hyper-SDXL-1step-lora.safetensors")
    assert "3% of eps" in pipe_preset.notes
    _assert_scheduler(pipe, pipe_preset)
    latents = run(pipe, output_type="latent")
    native = _native_lora(_native_sdxl(scheduler_cls=TCDScheduler), "ByteDance/Hyper-SD", pipe_preset.weight_name)
    tcd = run(native, num_inference_steps=1, guidance_scale=0.0, eta=1.0, output_type="latent")
    assert native.scheduler.timesteps.tolist() == [999]
    ac = native.scheduler.alphas_cumprod.double()
    noise = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0)).double()
    eps = (noise - ac[999].sqrt() * latents.double()) / (1 - ac[999]).sqrt()
    expected = ac[0].sqrt() * latents.double() + (1 - ac[0]).sqrt() * eps
    torch.testing.assert_close(tcd.double(), expected, rtol=0, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------------
# few-step SDXL students: SDXL-Lightning (trailing Euler) and Hyper-SD's N-step LoRAs (trailing DDIM)
# ---------------------------------------------------------------------------------------------------------------------


def _steps_recorder(store):
    def callback(pipe, i, t, tensors):
        store.append(tensors["latents"].clone())
        return {}

    return callback


@checks(*(("ByteDance/SDXL-Lightning", name) for name in LIGHTNING_FILES))
@pytest.mark.parametrize("weight_name", LIGHTNING_FILES)
def test_sdxl_lightning_few_step_presets_equal_trailing_euler(weight_name, hub, run):
    repo = "ByteDance/SDXL-Lightning"
    preset = find_preset(repo, weight_name)
    steps = len(preset.conditioning_timesteps)
    pipe, images = _ours(repo, run, weight_name=weight_name)
    _assert_scheduler(pipe, preset)
    # the card: EulerDiscreteScheduler.from_config(..., timestep_spacing="trailing"), N steps, guidance_scale=0
    if preset.kind == "lora":
        native = _native_lora(
            _native_sdxl(scheduler_cls=EulerDiscreteScheduler, timestep_spacing="trailing"), repo, weight_name
        )
    else:
        native = _native_sdxl(
            unet_weights=(repo, weight_name), scheduler_cls=EulerDiscreteScheduler, timestep_spacing="trailing"
        )
    latents = _unit_noise_latents(native)
    native.scheduler.set_timesteps(steps)
    assert native.scheduler.timesteps.tolist() == list(preset.conditioning_timesteps)
    expected = native(PROMPT, num_inference_steps=steps, guidance_scale=0, latents=latents, output_type="np").images
    assert np.abs(images - expected).max() <= 1e-5
    # fewer steps pick from the top of the stored ones
    assert pipe(PROMPT, num_inference_steps=1, output_type="latent").images.shape == (1, 4, 32, 32)


@checks(*(("ByteDance/Hyper-SD", f"Hyper-SDXL-{n}steps-lora.safetensors") for n in (2, 4, 8)))
@pytest.mark.parametrize("steps", [2, 4, 8])
def test_hyper_sd_few_step_lora_presets_against_trailing_ddim(steps, hub, run):
    repo, weight_name = "ByteDance/Hyper-SD", f"Hyper-SDXL-{steps}steps-lora.safetensors"
    preset = find_preset(repo, weight_name)
    pipe = OneStepPipeline.from_pretrained(repo, weight_name=weight_name)
    pipe.set_progress_bar_config(disable=True)
    _assert_scheduler(pipe, preset)
    ours = []
    x0 = run(pipe, output_type="latent", callback_on_step_end=_steps_recorder(ours)).double()
    # the card: DDIMScheduler.from_config(..., timestep_spacing="trailing"), N steps, guidance_scale=0 (eta 0)
    native = _native_lora(_native_sdxl(scheduler_cls=DDIMScheduler, timestep_spacing="trailing"), repo, weight_name)
    assert native.scheduler.config.set_alpha_to_one is False  # from the SDXL base's scheduler config
    theirs = []
    final = run(
        native,
        num_inference_steps=steps,
        guidance_scale=0,
        output_type="latent",
        callback_on_step_end=_steps_recorder(theirs),
    )
    assert native.scheduler.timesteps.tolist() == list(preset.conditioning_timesteps)
    # every step but the last is the same deterministic step
    # (latents of a tiny random UNet reach |x| ~ 60: float32 DDIM against float64 conversions, to 1e-6 relative)
    for a, b in zip(ours[:-1], theirs[:-1]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-5)
    # the last: DDIM re-noises x0 to t=0 with the predicted noise (set_alpha_to_one=False), OneStepPipeline returns x0
    ac = native.scheduler.alphas_cumprod.double()
    t = int(preset.conditioning_timesteps[-1])
    eps = (ours[-2].double() - ac[t].sqrt() * x0) / (1 - ac[t]).sqrt()
    torch.testing.assert_close(final.double(), ac[0].sqrt() * x0 + (1 - ac[0]).sqrt() * eps, rtol=1e-6, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# SD 1.5 / 2.x students: SD-Turbo (its repo's trailing Euler) and Hyper-SD's SD 1.5 LoRAs (trailing DDIM, TCD)
# ---------------------------------------------------------------------------------------------------------------------


def _native_sd15(scheduler_cls, **scheduler_kwargs):
    """The card's base: StableDiffusionPipeline (what DiffusionPipeline.from_pretrained builds for it) with the
    recipe's scheduler made from the base's scheduler config."""
    pipe = StableDiffusionPipeline.from_pretrained(SD15_BASE)
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config, **scheduler_kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@checks((INSTAFLOW, None))
def test_instaflow_preset_equals_its_rectified_flow_pipeline(hub, run, tmp_path):
    from diffusers.utils.torch_utils import randn_tensor

    pipe, images = _ours(INSTAFLOW, run)
    _assert_scheduler(pipe, find_preset(INSTAFLOW))
    assert pipe.scheduler.path.kind == "flow" and pipe.scheduler.timesteps.tolist() == [1000.0]
    seen = []
    pipe.unet.register_forward_pre_hook(lambda module, args: seen.append(float(args[1].flatten()[0])))
    latents = run(pipe, output_type="latent")
    assert seen == [1000.0]  # the UNet is called at RectifiedFlowPipeline's t = 1000
    # code/pipeline_rf.py with num_inference_steps=1, guidance_scale=0.0, by hand on the repo's components: SD's
    # encode_prompt, latents = randn * scheduler.init_noise_sigma, v = unet(latents, 1000), latents + dt * v (dt = 1)
    native = StableDiffusionPipeline.from_pretrained(INSTAFLOW, **StableDiffusionAdapter.native_pipeline_kwargs)
    assert native.scheduler.init_noise_sigma == 1.0  # PNDMScheduler's
    with torch.no_grad():
        embeds, _ = native.encode_prompt(PROMPT, "cpu", 1, False)
        noise = (
            randn_tensor(latents.shape, generator=torch.Generator().manual_seed(0)) * native.scheduler.init_noise_sigma
        )
        v_pred = native.unet(noise, torch.ones(1) * 1000.0, encoder_hidden_states=embeds).sample
        expected_latents = noise + 1.0 * v_pred
        image = native.vae.decode(expected_latents / native.vae.config.scaling_factor, return_dict=False)[0]
    torch.testing.assert_close(latents, expected_latents, rtol=0, atol=1e-5)
    expected = native.image_processor.postprocess(image, output_type="np")
    assert np.abs(images - expected).max() <= 1e-5
    # a negative control: diffusers' flow_prediction (noise - x0) on the same UNet is the opposite velocity
    flipped = OneStepPipeline.from_pretrained(INSTAFLOW, prediction_type="flow_prediction")
    flipped.set_progress_bar_config(disable=True)
    torch.testing.assert_close(run(flipped, output_type="latent"), noise - v_pred, rtol=0, atol=1e-5)
    # saved, it names StableDiffusionPipeline and carries no serving block (the engines integrate eps - x0)
    pipe.save_pretrained(tmp_path / "instaflow")
    with open(tmp_path / "instaflow" / "model_index.json") as f:
        index = json.load(f)
    assert index["_class_name"] == "StableDiffusionPipeline" and "dmd2_config" not in index
    reloaded, again = _ours(str(tmp_path / "instaflow"), run)
    assert reloaded.scheduler.config.prediction_type == "data_velocity" and np.array_equal(again, images)


DMD2_SD15_FILES = [f"model/sdv1.5/{folder}/pytorch_model.bin" for folder in DMD2_SD15_CHECKPOINTS]


@checks(*(("tianweiy/DMD2", name) for name in DMD2_SD15_FILES))
@pytest.mark.parametrize("weight_name", DMD2_SD15_FILES)
def test_dmd2_sd15_presets_equal_the_evaluation_script(weight_name, hub, run):
    from huggingface_hub import hf_hub_download

    preset = find_preset("tianweiy/DMD2", weight_name)
    pipe, images = _ours("tianweiy/DMD2", run, weight_name=weight_name)
    _assert_scheduler(pipe, preset)
    latents = run(pipe, output_type="latent")
    # main/test_folder_sd.py: create_generator (the SD 1.5 UNet, load_state_dict(torch.load(...), strict=True)), then
    # sample: text_encoder(input_ids)[0], unit noise, unet(noise, 999, embedding), get_x0_from_noise, vae.decode
    base = StableDiffusionPipeline.from_pretrained(SD15_BASE)
    generator = UNet2DConditionModel.from_pretrained(SD15_BASE, subfolder="unet")
    generator.load_state_dict(
        torch.load(hf_hub_download("tianweiy/DMD2", weight_name), weights_only=True), strict=True
    )
    tokenizer = base.tokenizer
    ids = tokenizer([PROMPT], max_length=tokenizer.model_max_length, padding="max_length", truncation=True)
    with torch.no_grad():
        embedding = base.text_encoder(torch.tensor(ids.input_ids))[0]
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))
        eps = generator(noise, torch.full((1,), 999, dtype=torch.long), embedding).sample.double()

        def x0(alpha_prod):
            return (noise.double() - (1 - alpha_prod) ** 0.5 * eps) / alpha_prod**0.5

        exact = float(base.scheduler.alphas_cumprod.double()[999])
        assert abs(exact - 0.0047) / 0.0047 < 0.01  # the script's rounded constant, 0.9% off
        # OneStepPipeline computes the script's x0 with the schedule's own alphā_999 ...
        torch.testing.assert_close(latents.double(), x0(exact), rtol=1e-5, atol=1e-5)
        # ... which is the script's, rounded constant and all, within the 0.4% (under 0.5%) the preset's notes give
        script = x0(0.0047)
        assert 0 < (latents.double() - script).abs().max() <= 0.005 * script.abs().max()
        image = base.vae.decode(x0(exact).float() / base.vae.config.scaling_factor).sample
    assert np.abs(images - base.image_processor.postprocess(image, output_type="np")).max() <= 1e-5


@checks(("stabilityai/sd-turbo", None))
def test_sd_turbo_preset(hub, run):
    from diffusers import AutoPipelineForText2Image

    pipe, images = _ours("stabilityai/sd-turbo", run)
    _assert_scheduler(pipe, find_preset("stabilityai/sd-turbo"))
    assert pipe.scheduler.timesteps.tolist() == [999]
    # the card: AutoPipelineForText2Image.from_pretrained(repo), pipe(prompt, num_inference_steps=1, guidance_scale=0)
    native = AutoPipelineForText2Image.from_pretrained("stabilityai/sd-turbo")
    native.set_progress_bar_config(disable=True)
    assert isinstance(native, StableDiffusionPipeline) and isinstance(native.scheduler, EulerDiscreteScheduler)
    latents = _unit_noise_latents(native)
    expected = native(PROMPT, num_inference_steps=1, guidance_scale=0.0, latents=latents, output_type="np").images
    assert native.scheduler.timesteps.tolist() == [999]
    assert np.abs(images - expected).max() <= 1e-5
    # the documented difference: with the card's own noise scaling the UNet sees 0.998 times unit noise
    unscaled = native(PROMPT, num_inference_steps=1, guidance_scale=0.0, output_type="np").images
    assert np.abs(unscaled - expected).max() > 1e-5


@checks(("ByteDance/Hyper-SD", "Hyper-SD15-1step-lora.safetensors"))
def test_hyper_sd15_one_step_lora_preset_against_tcd(hub, run):
    repo, weight_name = "ByteDance/Hyper-SD", "Hyper-SD15-1step-lora.safetensors"
    preset = find_preset(repo, weight_name)
    pipe, _ = _ours(repo, run, weight_name=weight_name)
    _assert_scheduler(pipe, preset)
    assert pipe.config.family == "sd" and not any("lora" in n for n, _ in pipe.unet.named_modules())
    latents = run(pipe, output_type="latent")
    # the card: the SD 1.5 base + load_lora_weights + fuse_lora(), TCDScheduler, 1 step, guidance 0, eta 1
    native = _native_lora(_native_sd15(TCDScheduler), repo, weight_name)
    tcd = run(native, num_inference_steps=1, guidance_scale=0.0, eta=1.0, output_type="latent")
    assert native.scheduler.timesteps.tolist() == [999]
    ac = native.scheduler.alphas_cumprod.double()
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0)).double()
    eps = (noise - ac[999].sqrt() * latents.double()) / (1 - ac[999]).sqrt()
    expected = ac[0].sqrt() * latents.double() + (1 - ac[0]).sqrt() * eps
    torch.testing.assert_close(tcd.double(), expected, rtol=0, atol=1e-4)
    # the LoRA was really fused: the base alone gives other latents
    base = run(_native_sd15(TCDScheduler), num_inference_steps=1, guidance_scale=0.0, eta=1.0, output_type="latent")
    assert (base - tcd).abs().max() > 1e-3


@checks(*(("ByteDance/Hyper-SD", f"Hyper-SD15-{n}steps-lora.safetensors") for n in (2, 4, 8)))
@pytest.mark.parametrize("steps", [2, 4, 8])
def test_hyper_sd15_few_step_lora_presets_against_trailing_ddim(steps, hub, run):
    repo, weight_name = "ByteDance/Hyper-SD", f"Hyper-SD15-{steps}steps-lora.safetensors"
    preset = find_preset(repo, weight_name)
    pipe = OneStepPipeline.from_pretrained(repo, weight_name=weight_name)
    pipe.set_progress_bar_config(disable=True)
    _assert_scheduler(pipe, preset)
    ours = []
    x0 = run(pipe, output_type="latent", callback_on_step_end=_steps_recorder(ours)).double()
    # the card: DDIMScheduler.from_config(..., timestep_spacing="trailing"), N steps, guidance_scale=0 (eta 0)
    native = _native_lora(_native_sd15(DDIMScheduler, timestep_spacing="trailing"), repo, weight_name)
    assert native.scheduler.config.set_alpha_to_one is False  # from the SD 1.5 base's scheduler config
    theirs = []
    final = run(
        native,
        num_inference_steps=steps,
        guidance_scale=0,
        output_type="latent",
        callback_on_step_end=_steps_recorder(theirs),
    )
    assert native.scheduler.timesteps.tolist() == list(preset.conditioning_timesteps)
    for a, b in zip(ours[:-1], theirs[:-1]):  # every step but the last is the same deterministic step
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-5)
    # the last: DDIM re-noises x0 to t=0 with the predicted noise (set_alpha_to_one=False), OneStepPipeline returns x0
    ac = native.scheduler.alphas_cumprod.double()
    t = int(preset.conditioning_timesteps[-1])
    eps = (ours[-2].double() - ac[t].sqrt() * x0) / (1 - ac[t]).sqrt()
    torch.testing.assert_close(final.double(), ac[0].sqrt() * x0 + (1 - ac[0]).sqrt() * eps, rtol=1e-6, atol=1e-5)


def test_hyper_sd_unet_loads_in_either_spelling_of_its_file_name(hub_cache, tmp_path, run):
    # The card's checkpoint list says "-unet", its code and the Hub listing "-Unet": a repo with the other spelling
    # loads too, resolved against the files the repo has (here: the local cache, offline)
    sdxl = tiny_native_pipeline("sdxl")
    base = tmp_path / "base"
    _save_sdxl_base(str(base))
    save_to_hub_cache(str(base), SDXL_BASE)
    repo = tmp_path / "hyper"
    repo.mkdir()
    _save_hyper_sd(str(repo), sdxl.unet, sdxl.unet.config, unet_file="Hyper-SDXL-1step-unet.safetensors")
    save_to_hub_cache(str(repo), "ByteDance/Hyper-SD")
    pipe, images = _ours("ByteDance/Hyper-SD", run)
    native = _native_sdxl(unet_weights=("ByteDance/Hyper-SD", "Hyper-SDXL-1step-unet.safetensors"))
    assert np.abs(images - run(native, timesteps=[800], guidance_scale=0.0)).max() <= 1e-5
    # either spelling selects the preset
    assert find_preset("ByteDance/Hyper-SD", "Hyper-SDXL-1step-unet.safetensors") is find_preset("ByteDance/Hyper-SD")


def test_weight_name_resolution_reads_the_repo_file_listing(hub_cache, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    spellings = ("Hyper-SDXL-1step-Unet.safetensors", "Hyper-SDXL-1step-unet.safetensors")
    # offline and nothing cached: the expected spelling, whose download then says what is missing
    assert resolve_weight_name("ByteDance/Hyper-SD", spellings) == spellings[0]
    # online: the Hub's file listing decides (case-sensitive), through huggingface_hub's public HfApi
    asked = []

    def list_repo_files(self, repo_id, revision=None, token=None, **kwargs):
        asked.append((repo_id, revision))
        return ["README.md", "Hyper-SDXL-1step-unet.safetensors", "Hyper-SDXL-1step-Unet-Comfyui.fp16.safetensors"]

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", list_repo_files)
    assert resolve_weight_name("ByteDance/Hyper-SD", spellings, revision="abc") == spellings[1]
    assert asked == [("ByteDance/Hyper-SD", "abc")]


# ---------------------------------------------------------------------------------------------------------------------
# PixArt-α DMD and SANA-Sprint
# ---------------------------------------------------------------------------------------------------------------------


@checks((PIXART_DMD, "transformer"))
def test_pixart_dmd_preset_equals_the_demo_script(hub, run):
    pipe, images = _ours(PIXART_DMD, run)
    _assert_scheduler(pipe, find_preset(PIXART_DMD))
    assert pipe.scheduler.timesteps.tolist() == [400]
    # app/app_pixart_dmd.py: the 1024 base without its transformer, the DMD repo's transformer (a legacy .bin here) and
    # scheduler, timesteps=[400], guidance_scale=1
    transformer = PixArtTransformer2DModel.from_pretrained(PIXART_DMD, subfolder="transformer")
    scheduler = DDPMScheduler.from_pretrained(PIXART_DMD, subfolder="scheduler")
    native = PixArtAlphaPipeline.from_pretrained(PIXART_BASE, transformer=transformer, scheduler=scheduler)
    native.set_progress_bar_config(disable=True)
    call = tiny_fixture("pixart_alpha").native_call_kwargs
    expected = run(native, timesteps=[400], num_inference_steps=1, guidance_scale=1, **call)
    assert np.abs(images - expected).max() <= 1e-5
    base = run(
        PixArtAlphaPipeline.from_pretrained(PIXART_BASE, scheduler=scheduler),
        timesteps=[400],
        guidance_scale=1.0,
        **call,
    )
    assert np.abs(images - base).max() > 1e-3


@checks(*((repo, None) for repo in SPRINT_REPOS))
@pytest.mark.parametrize("repo", SPRINT_REPOS)
def test_sana_sprint_presets_default_to_the_two_step_schedule(repo, hub, run):
    pipe, images = _ours(repo, run)
    _assert_scheduler(pipe, find_preset(repo))
    assert pipe.config.embedded_guidance_scale == 4.5
    assert pipe.scheduler.timesteps.tolist() == pytest.approx([1.5708, 1.3])
    native = SanaSprintPipeline.from_pretrained(repo)
    native.set_progress_bar_config(disable=True)
    call = {"height": 64, "width": 64, **tiny_fixture("sana_sprint").native_call_kwargs}
    # the docs' call: pipeline(prompt) with SanaSprintPipeline's defaults (2 steps: 1.5708, 1.3; guidance 4.5)
    assert np.abs(images - run(native, **call)).max() <= 1e-5
    # num_inference_steps=1 is SANA-Sprint's own one-step call
    one_step = run(pipe, num_inference_steps=1)
    expected = run(native, num_inference_steps=1, intermediate_timesteps=None, **call)
    assert np.abs(one_step - expected).max() <= 1e-5
    assert np.abs(one_step - images).max() > 1e-3


# ---------------------------------------------------------------------------------------------------------------------
# FLUX.1: FluxPipeline's FlowMatchEuler steps at linspace(1, 1/N, N), shifted at the resolution where the repo's
# scheduler shifts dynamically (FLUX.1-dev); a square and a non-square size
# ---------------------------------------------------------------------------------------------------------------------

FLUX_SIZES = ((32, 32), (32, 64))


@checks((FLUX_SCHNELL, None))
def test_flux_schnell_preset_equals_the_card_recipe(hub, run):
    preset = find_preset(FLUX_SCHNELL)
    pipe, images = _ours(FLUX_SCHNELL, run)
    _assert_scheduler(pipe, preset)
    assert pipe.adapter.max_sequence_length == 256 and not pipe.scheduler.path.resolution_dependent
    native = FluxPipeline.from_pretrained(FLUX_SCHNELL)
    native.set_progress_bar_config(disable=True)
    # the card's call: pipe(prompt, guidance_scale=0.0, num_inference_steps=4, max_sequence_length=256)
    card = {"guidance_scale": 0.0, "num_inference_steps": 4, "max_sequence_length": 256}
    for height, width in FLUX_SIZES:
        expected = run(native, height=height, width=width, **card)
        ours = images if (height, width) == (32, 32) else run(pipe, height=height, width=width)
        assert np.abs(ours - expected).max() <= 1e-5
    assert np.abs(run(pipe, num_inference_steps=1) - images).max() > 1e-3  # 4 steps by default, not 1


@checks(*((HYPER_SD, name) for name in HYPER_FLUX_FILES))
@pytest.mark.parametrize("weight_name", HYPER_FLUX_FILES)
def test_hyper_flux_lora_presets_equal_the_card_recipe(weight_name, hub, run):
    steps = int(re.search(r"(\d+)steps", weight_name).group(1))
    preset = find_preset(HYPER_SD, weight_name)
    pipe, images = _ours(HYPER_SD, run, weight_name=weight_name)
    _assert_scheduler(pipe, preset)
    assert len(preset.conditioning_timesteps) == steps and pipe.scheduler.path.resolution_dependent
    assert pipe.config.embedded_guidance_scale == 3.5
    # the card: FluxPipeline on FLUX.1-dev, load_lora_weights + fuse_lora(lora_scale=0.125), 8 (16) steps, guidance 3.5
    native = _native_lora(FluxPipeline.from_pretrained(FLUX_DEV), HYPER_SD, weight_name, lora_scale=0.125)
    native.set_progress_bar_config(disable=True)
    for height, width in FLUX_SIZES:
        expected = run(native, num_inference_steps=steps, guidance_scale=3.5, height=height, width=width)
        ours = images if (height, width) == (32, 32) else run(pipe, height=height, width=width)
        assert np.abs(ours - expected).max() <= 1e-5
    base, _ = _ours(FLUX_DEV, run, conditioning_timesteps=list(preset.conditioning_timesteps))
    assert np.abs(run(base) - images).max() > 1e-3  # the LoRA is fused


@checks((SD35_TURBO, None))
def test_sd35_large_turbo_preset_equals_the_card_call(hub, run):
    """The card's call, StableDiffusion3Pipeline.from_pretrained(repo) and pipe(prompt, num_inference_steps=4,
    guidance_scale=0.0): four Euler steps of the repo's shift-3 FlowMatchEulerDiscreteScheduler, equal to
    OneStepPipeline.from_pretrained(repo) with the preset's stored sigmas and its `ode` solver."""
    pipe, images = _ours(SD35_TURBO, run)
    preset = find_preset(SD35_TURBO)
    _assert_scheduler(pipe, preset)
    assert pipe.scheduler.path.shift == 3.0  # the repo's noise path (training-time sampling) is read from its config
    native = StableDiffusion3Pipeline.from_pretrained(SD35_TURBO)
    native.set_progress_bar_config(disable=True)
    native.scheduler.set_timesteps(4)
    assert [float(s) for s in native.scheduler.sigmas[:-1]] == list(preset.conditioning_timesteps)
    assert np.abs(images - run(native, num_inference_steps=4, guidance_scale=0.0)).max() <= 1e-5
    one_step = run(pipe, num_inference_steps=1)
    assert np.abs(one_step - run(native, num_inference_steps=1, guidance_scale=0.0)).max() <= 1e-5
    assert np.abs(one_step - images).max() > 1e-3


def test_every_preset_row_is_checked_against_its_source():
    rows = {(p.repo_id, p.weight_name or p.subfolder) for p in PRESETS}
    assert set(CHECKED) == rows, sorted(rows ^ set(CHECKED), key=str)


# ---------------------------------------------------------------------------------------------------------------------
# variants, overrides, errors
# ---------------------------------------------------------------------------------------------------------------------


def test_conditioning_timesteps_override_a_preset(hub):
    pipe = OneStepPipeline.from_pretrained("tianweiy/DMD2", conditioning_timesteps=[500])
    assert pipe.scheduler.config.conditioning_timesteps == [500.0]


def test_unknown_variant_lists_the_known_ones(hub):
    with pytest.raises(
        ValueError,
        match=r"tianweiy/DMD2 has no preset for weight_name='dmd2_sd15.bin'; known "
        r"variants: dmd2_sdxl_1step_unet_fp16.bin, dmd2_sdxl_4step_unet_fp16.bin",
    ):
        OneStepPipeline.from_pretrained("tianweiy/DMD2", weight_name="dmd2_sd15.bin")
    with pytest.raises(
        ValueError,
        match=r"`weight_name` selects a variant of a known preset, and 'org/not-cached' "
        r"is not one",
    ):
        OneStepPipeline.from_pretrained("org/not-cached", weight_name="x.safetensors")


def test_unknown_repo_and_bad_ids_are_refused(hub):
    with pytest.raises(
        ValueError,
        match=r"org/not-cached is not in the local Hugging Face cache and offline mode is set \(HF_HUB_OFFLINE\), so "
        r"it cannot be downloaded",
    ):
        OneStepPipeline.from_pretrained("org/not-cached")
    with pytest.raises(ValueError, match=r"'no such/folder!' is neither an existing folder nor a valid Hub repo id"):
        OneStepPipeline.from_pretrained("no such/folder!")


class _Payload:
    """Unpickling this object would call ``open(marker, "w")``: code execution from a weights file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_payloads_in_legacy_bin_files_are_refused(hub_cache, tmp_path, native_folder):
    marker = tmp_path / "payload-ran"
    repo = tmp_path / "dmd2"
    repo.mkdir()
    torch.save(
        {"conv_in.weight": torch.zeros(1), "evil": _Payload(str(marker))}, repo / "dmd2_sdxl_1step_unet_fp16.bin"
    )
    save_to_hub_cache(str(repo), "tianweiy/DMD2")
    save_to_hub_cache(native_folder("sdxl"), SDXL_BASE)
    with pytest.raises(
        ValueError,
        match=r"dmd2_sdxl_1step_unet_fp16.bin could not be loaded safely "
        r"\(torch.load\(weights_only=True\) refused it: .*\); convert it to "
        r".safetensors",
    ) as info:
        OneStepPipeline.from_pretrained("tianweiy/DMD2")
    assert "\n" not in str(info.value)
    assert not marker.exists(), "the pickle payload ran"
    # the same file does run code under a plain torch.load: the refusal is what protects the user
    torch.load(repo / "dmd2_sdxl_1step_unet_fp16.bin", weights_only=False)
    assert marker.exists()


# ---------------------------------------------------------------------------------------------------------------------
# layering: presets are data, Hub reads live in hub.py, and no module imports one that imports it back
# ---------------------------------------------------------------------------------------------------------------------


def _package_modules():
    import ast

    import diffusers_onestep

    root = os.path.dirname(os.path.dirname(os.path.abspath(diffusers_onestep.__file__)))
    paths = {}
    for folder, _, files in os.walk(os.path.join(root, "diffusers_onestep")):
        for name in files:
            if name.endswith(".py") and name != "__main__.py":
                path = os.path.join(folder, name)
                module = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
                paths[module.removesuffix(".__init__")] = path
    graph = {}
    for module, path in paths.items():
        package = module.split(".") if path.endswith("__init__.py") else module.split(".")[:-1]
        targets = set()
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):  # top-level and function-level imports alike
            if isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                for alias in node.names:
                    targets.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in paths else target)
            elif isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
        graph[module] = {t for t in targets if t in paths and t != module}
    return graph


def test_package_has_no_import_cycle():
    graph = _package_modules()
    assert "diffusers_onestep.pipelines.loading" not in graph["diffusers_onestep.pipelines.presets"]
    visiting, done = [], set()

    def visit(module):
        if module in done:
            return
        assert module not in visiting, "import cycle: " + " -> ".join(visiting[visiting.index(module) :] + [module])
        visiting.append(module)
        for target in sorted(graph[module]):
            visit(target)
        visiting.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)


def test_every_module_imports_first():
    # each module imported on its own, as the first of the package (a fresh interpreter for our code; the heavy
    # third-party modules stay loaded so that this takes seconds)
    import subprocess
    import sys

    modules = sorted(_package_modules())
    script = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    for loaded in [m for m in sys.modules if m == 'diffusers_onestep' or m.startswith('diffusers_onestep.')]:\n"
        "        del sys.modules[loaded]\n"
        "    importlib.import_module(name)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert result.returncode == 0, result.stderr[-2000:]
