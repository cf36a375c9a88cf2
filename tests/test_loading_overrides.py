"""Keyword arguments of ``OneStepPipeline.from_pretrained`` / ``from_base`` are honoured or refused for every kind of
student.

Kinds: a full student folder, a LoRA student folder, the three kinds of preset (full pipeline, denoiser weights on a
base, LoRA on a base; Hub ids resolved offline from tiny stand-ins in a local Hub cache), a base plus denoiser weights
(``from_base``, on a native folder and on a saved student), and a native pipeline folder run as a one-step model.
"""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from diffusers_onestep import OneStepPipeline, OneStepScheduler
from diffusers_onestep.lora import LORA_WEIGHT_NAME
from diffusers_onestep.testing import (
    random_lora_state_dict,
    save_tiny_native_pipeline,
    save_to_hub_cache,
    tiny_native_pipeline,
)


SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"
DMD2_LORA = "dmd2_sdxl_4step_lora_fp16.safetensors"
VARIANT_SEED, OTHER_BASE_SEED = 1, 2


def _save_lora(folder, unet, weight_name, seed):
    # attention projections only: enough to change every image, and quick to inject and fuse
    state = random_lora_state_dict(unet, ["to_q", "to_v"], rank=2, seed=seed, scale=0.2)
    StableDiffusionXLPipeline.save_lora_weights(folder, unet_lora_layers=state, weight_name=weight_name)


def _copy_variant_files(source, target):
    """The ``*.fp16.*`` weight files of ``source``'s components into the same components of ``target``."""
    for component in os.listdir(source):
        folder = os.path.join(source, component)
        if os.path.isdir(folder):
            for name in os.listdir(folder):
                if ".fp16." in name:
                    shutil.copy(os.path.join(folder, name), os.path.join(target, component, name))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Every kind of student over one tiny SDXL, and a Hub cache (HF_HUB_CACHE for this module) holding the base and
    the preset repos. The native folder also holds an ``fp16`` variant of other weights (seed 1), so a loaded VAE
    tells which files were read."""
    import huggingface_hub.constants

    root = tmp_path_factory.mktemp("overrides")
    cache = str(root / "hub")
    native = save_tiny_native_pipeline("sdxl", str(root / "native"))
    tiny_native_pipeline("sdxl", seed=VARIANT_SEED).save_pretrained(native, variant="fp16")
    other_base = save_tiny_native_pipeline("sdxl", str(root / "other-base"), seed=OTHER_BASE_SEED)

    student = str(root / "student")
    OneStepPipeline.from_pretrained(native, conditioning_timesteps=[399]).save_pretrained(student)
    _copy_variant_files(native, student)
    unet_weights = os.path.join(student, "unet", "diffusion_pytorch_model.safetensors")

    unet = tiny_native_pipeline("sdxl").unet
    lora_student = root / "lora-student"
    _save_lora(str(lora_student), unet, LORA_WEIGHT_NAME, seed=3)
    OneStepScheduler(conditioning_timesteps=[399]).save_pretrained(str(lora_student / "scheduler"))
    lora_config = {"base_model": native, "family": "sdxl", "weight_name": LORA_WEIGHT_NAME, "lora_scale": 1.0}
    (lora_student / "onestep_lora.json").write_text(json.dumps(lora_config))

    dmd2 = root / "dmd2"
    dmd2.mkdir()
    torch.save({k: v.half() for k, v in unet.state_dict().items()}, dmd2 / "dmd2_sdxl_1step_unet_fp16.bin")
    _save_lora(str(dmd2), unet, DMD2_LORA, seed=4)
    save_to_hub_cache(native, SDXL_BASE, cache_dir=cache)
    save_to_hub_cache(native, "stabilityai/sdxl-turbo", cache_dir=cache)
    save_to_hub_cache(str(dmd2), "tianweiy/DMD2", cache_dir=cache)

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_CACHE", cache)
        mp.setattr(huggingface_hub.constants, "HF_HUB_CACHE", cache)
        yield {
            "root": root,
            "cache": cache,
            "native": native,
            "other_base": other_base,
            "student": student,
            "unet_weights": unet_weights,
            "lora_student": str(lora_student),
        }


#: kind -> (how it loads, its conditioning timesteps when none are given)
KINDS = {
    "full student folder": (lambda w, **kw: OneStepPipeline.from_pretrained(w["student"], **kw), [399]),
    "LoRA student folder": (lambda w, **kw: OneStepPipeline.from_pretrained(w["lora_student"], **kw), [399]),
    "preset: full pipeline": (lambda w, **kw: OneStepPipeline.from_pretrained("stabilityai/sdxl-turbo", **kw), [999]),
    "preset: denoiser weights": (lambda w, **kw: OneStepPipeline.from_pretrained("tianweiy/DMD2", **kw), [399]),
    "preset: LoRA": (
        lambda w, **kw: OneStepPipeline.from_pretrained("tianweiy/DMD2", weight_name=DMD2_LORA, **kw),
        [999, 749, 499, 249],
    ),
    "base + denoiser weights": (
        lambda w, **kw: OneStepPipeline.from_base(w["native"], student_weights=w["unet_weights"], **kw),
        [999],
    ),
    "saved student as the base": (
        lambda w, **kw: OneStepPipeline.from_base(w["student"], student_weights=w["unet_weights"], **kw),
        [399],
    ),
    "native pipeline folder": (lambda w, **kw: OneStepPipeline.from_pretrained(w["native"], **kw), [999]),
}
FROM_BASE_KINDS = ("base + denoiser weights", "saved student as the base")


def _load(world, kind, **overrides):
    pipe = KINDS[kind][0](world, **overrides)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _first_weight(module):
    return next(iter(module.state_dict().values()))


def _images(pipe, **kwargs):
    return pipe("a photo of a cat", generator=torch.Generator().manual_seed(0), output_type="np", **kwargs).images


# ---------------------------------------------------------------------------------------------------------------------
# the matrix: kind x override
# ---------------------------------------------------------------------------------------------------------------------


def _check_timesteps(world, kind, pipe):
    assert pipe.scheduler.config.conditioning_timesteps == [200.0]
    assert pipe.scheduler.config.prediction_type == "epsilon"  # only the timesteps changed
    # the same student as without the override: its images equal the default load's run at those timesteps
    default = _load(world, kind)
    assert default.scheduler.config.conditioning_timesteps == KINDS[kind][1]
    assert np.array_equal(_images(pipe), _images(default, timesteps=[200]))


def _check_prediction_type(world, kind, pipe):
    assert pipe.scheduler.config.prediction_type == "sample"
    assert pipe.scheduler.config.conditioning_timesteps == KINDS[kind][1]


def _check_dtype(world, kind, pipe):
    assert pipe.unet.dtype == torch.float16 and pipe.vae.dtype == torch.float16


def _check_variant(world, kind, pipe):
    variant_vae = tiny_native_pipeline("sdxl", seed=VARIANT_SEED).vae
    assert torch.equal(_first_weight(pipe.vae), _first_weight(variant_vae))


def _check_scheduler(world, kind, pipe):
    assert pipe.scheduler.config.conditioning_timesteps == [500]


def _check_family(world, kind, pipe):
    assert pipe.config.family == "sdxl"


def _check_component(world, kind, pipe):
    assert pipe.vae is world["vae"]


OVERRIDES = {
    "conditioning_timesteps": (lambda w: {"conditioning_timesteps": [200]}, _check_timesteps),
    "prediction_type": (lambda w: {"prediction_type": "sample"}, _check_prediction_type),
    "torch_dtype": (lambda w: {"torch_dtype": torch.float16}, _check_dtype),
    "variant": (lambda w: {"variant": "fp16"}, _check_variant),
    "scheduler": (lambda w: {"scheduler": OneStepScheduler(conditioning_timesteps=[500])}, _check_scheduler),
    "family": (lambda w: {"family": "sdxl"}, _check_family),
    "a component": (lambda w: {"vae": w["vae"]}, _check_component),
}


@pytest.fixture(scope="module")
def other_vae():
    return tiny_native_pipeline("sdxl", seed=OTHER_BASE_SEED).vae


@pytest.mark.parametrize("override", list(OVERRIDES))
@pytest.mark.parametrize("kind", list(KINDS))
def test_override_is_honoured(kind, override, world, other_vae):
    kwargs, check = OVERRIDES[override]
    world = {**world, "vae": other_vae}
    check(world, kind, _load(world, kind, **kwargs(world)))


@pytest.mark.parametrize("kind", list(KINDS))
def test_unknown_keyword_is_refused_before_loading(kind, world, monkeypatch):
    import diffusers

    def refuse(*args, **kwargs):
        raise AssertionError("a pipeline was loaded before the keyword was refused")

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", refuse)
    method = "from_base" if kind in FROM_BASE_KINDS else "from_pretrained"
    with pytest.raises(
        ValueError,
        match=rf"^OneStepPipeline\.{method} got the unknown keyword argument `conditioning_timestep` \(did you mean "
        r"`conditioning_timesteps`\?\)",
    ):
        _load(world, kind, conditioning_timestep=[200])


def test_every_keyword_of_diffusers_from_pretrained_is_passed_on_or_refused_by_name():
    # the accepted list is ours; diffusers' own grows with its releases (a new one would otherwise be refused as unknown)
    import inspect
    import re

    from diffusers import DiffusionPipeline

    from diffusers_onestep.pipelines.loading import DIFFUSERS_KWARGS, OTHER_PIPELINE_KWARGS

    popped = set(re.findall(r'kwargs\.pop\(\s*"(\w+)"', inspect.getsource(DiffusionPipeline.from_pretrained)))
    assert "torch_dtype" in popped and popped <= set(DIFFUSERS_KWARGS) | set(OTHER_PIPELINE_KWARGS)


# which kinds have a base model for `base_model` to replace; the others refuse it
BASE_MODEL = {
    "LoRA student folder": True,
    "preset: denoiser weights": True,
    "preset: LoRA": True,
    "full student folder": r"`base_model` replaces the base model of a LoRA student or of a preset, and .* is a full",
    "native pipeline folder": r"`base_model` replaces the base model of a LoRA student or of a preset",
    "preset: full pipeline": r"stabilityai/sdxl-turbo is a full pipeline, with no base model for `base_model`",
}


@pytest.mark.parametrize("kind", list(BASE_MODEL))  # from_base takes the base as its first argument
def test_base_model_replaces_the_base_or_is_refused(kind, world, other_vae):
    expected = BASE_MODEL[kind]
    if expected is True:
        pipe = _load(world, kind, base_model=world["other_base"])
        assert torch.equal(_first_weight(pipe.vae), _first_weight(other_vae))
    else:
        with pytest.raises(ValueError, match=expected):
            _load(world, kind, base_model=world["other_base"])


def test_the_card_timesteps_of_a_preset_stay_unless_overridden(world):
    # the override replaces the card's timesteps; the card's prediction type stays, and the LoRA is still fused
    pipe = _load(world, "preset: LoRA", conditioning_timesteps=[999, 499])
    assert pipe.scheduler.config.conditioning_timesteps == [999.0, 499.0]
    assert not any("lora" in name for name, _ in pipe.unet.named_modules())
    base = OneStepPipeline.from_pretrained(SDXL_BASE, conditioning_timesteps=[999, 499])
    base.set_progress_bar_config(disable=True)
    assert np.abs(_images(pipe) - _images(base)).max() > 1e-3  # the LoRA changed the images
