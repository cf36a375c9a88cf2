"""One tiny-fixture record per family: how tests, benchmarks and docs build a tiny random model of it and run the
family's own diffusers pipeline as the reference a one-step student must equal.

A family added outside the library registers its adapter (:func:`diffusers_onestep.families.register_family`) and
its record (:func:`register_tiny_fixture`); everything below then works for it unchanged.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from ..families import get_adapter_class
from .components import (
    tiny_flux_components,
    tiny_pixart_components,
    tiny_sana_components,
    tiny_sd3_components,
    tiny_sd_components,
    tiny_sdxl_components,
)


@dataclass(frozen=True)
class TinyFixture:
    """How to build and run a tiny model of one family.

    Attributes:
        components: ``components(seed)`` -> the native components (with the family's own scheduler) of a tiny random
            model, as the native pipeline class takes them.
        parity_timesteps: the conditioning timesteps the parity oracles, the benchmarks and the docs run the tiny
            family at (natural units of its noise path); ``None``: the loader's default, the pure-noise end.
        one_step_setup: ``one_step_setup(pipe, timesteps)`` -> call kwargs: sets up a native pipeline (swapping its
            scheduler where needed) so that ``pipe(prompt, **kwargs)`` computes the one-step student's image;
            ``timesteps`` is never ``None`` unless ``parity_timesteps`` is.
        native_call_kwargs: keyword arguments that make the native pipeline run on the tiny components without
            warnings (resolution binning and caption cleaning off, ...).
        model_index_entries: entries :func:`save_tiny_native_pipeline` adds to ``model_index.json``, for a family
            whose native pipeline class another family also names (e.g. ``{"_onestep": {"family": ...}}``, the mark
            our own folders carry).
    """

    components: Callable[[int], Dict[str, Any]]
    parity_timesteps: Optional[List[float]]
    one_step_setup: Callable[[Any, Optional[List[float]]], Dict[str, Any]]
    native_call_kwargs: Dict[str, Any] = field(default_factory=dict)
    model_index_entries: Dict[str, Any] = field(default_factory=dict)


#: tiny-fixture records by family name, in registration order
TINY_FIXTURES: Dict[str, TinyFixture] = {}


def register_tiny_fixture(family: str, fixture: TinyFixture) -> TinyFixture:
    """Register the tiny fixture of ``family`` (a registered family); registering the same record again is a no-op."""
    get_adapter_class(family)  # the one-sentence error for unknown names
    registered = TINY_FIXTURES.get(family)
    if registered is not None and registered is not fixture:
        raise ValueError(f"The family {family!r} already has a tiny fixture.")
    TINY_FIXTURES[family] = fixture
    return fixture


def tiny_fixture(family: str) -> TinyFixture:
    """The tiny-fixture record of ``family``."""
    get_adapter_class(family)
    try:
        return TINY_FIXTURES[family]
    except KeyError:
        raise ValueError(f"No tiny components for {family!r}.") from None


def tiny_families() -> Tuple[str, ...]:
    """The families with a tiny fixture now, in registration order."""
    return tuple(TINY_FIXTURES)


# ------------------------------------------------------------------------------------------------------------------
# how each family's own pipeline runs a one-step student (the schedulers and timesteps of the public model cards)
# ------------------------------------------------------------------------------------------------------------------


def lcm_timesteps_setup(pipe, timesteps):
    """``LCMScheduler`` with ``timesteps=[...]`` at guidance 0: one LCM step returns the epsilon model's x0 (SDXL)."""
    from diffusers import LCMScheduler

    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    return {"timesteps": [int(t) for t in timesteps], "guidance_scale": 0.0}


def ddpm_timesteps_setup(pipe, timesteps):
    """``DDPMScheduler(clip_sample=False)`` with ``timesteps=[...]`` at guidance 1: one step's x0 (PixArt)."""
    from diffusers import DDPMScheduler

    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    return {"timesteps": [int(t) for t in timesteps], "guidance_scale": 1.0}


def flow_pure_noise_setup(pipe, timesteps):
    """One ``FlowMatchEulerDiscreteScheduler`` step from sigma 1 at guidance 1 (SANA)."""
    if list(timesteps) != [1.0]:
        raise ValueError("SanaPipeline runs a one-step student only from pure noise: timesteps must be [1.0].")
    return {"num_inference_steps": 1, "guidance_scale": 1.0}


def sana_sprint_setup(pipe, timesteps):
    """``num_inference_steps=1, intermediate_timesteps=None``: SANA-Sprint's own one-step call."""
    if timesteps is not None:
        raise ValueError("SanaSprintPipeline cannot take custom timesteps in diffusers 0.42.1; pass None.")
    return {"num_inference_steps": 1, "intermediate_timesteps": None}


def flux_sigmas_setup(pipe, timesteps):
    """FluxPipeline's own FlowMatchEulerDiscreteScheduler at ``sigmas=timesteps`` (its default schedule is
    ``linspace(1, 1/N, N)``), which it shifts at the image's resolution where the scheduler uses dynamic shifting, at
    the embedded guidance OneStepPipeline defaults to (FluxPipeline's 3.5; ignored without a guidance embedding): one
    Euler step from sigma 1 is the student's x0, several are the deterministic `ode` solver (FLUX.1)."""
    return {"sigmas": [float(t) for t in timesteps], "num_inference_steps": len(timesteps), "guidance_scale": 3.5}


def sd3_sigmas_setup(pipe, timesteps):
    """``FlowMatchEulerDiscreteScheduler(shift=1)`` with ``sigmas=[...]`` at guidance 0 (SD3): the scheduler shifts the
    sigmas it is given, so with shift 1 it runs exactly the student's; its Euler steps from sigma ``s`` to ``s'`` are
    ``x + (s' - s) v``, the deterministic re-noising of the `ode` solver, and the last step (to sigma 0) returns x0."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=1.0)
    return {"sigmas": [float(t) for t in timesteps], "guidance_scale": 0.0}


_PIXART_CALL = {"use_resolution_binning": False, "clean_caption": False}
_SANA_CALL = {**_PIXART_CALL, "complex_human_instruction": None}

register_tiny_fixture("sdxl", TinyFixture(tiny_sdxl_components, [399], lcm_timesteps_setup))
register_tiny_fixture("pixart_alpha", TinyFixture(tiny_pixart_components, [400], ddpm_timesteps_setup, _PIXART_CALL))
register_tiny_fixture("pixart_sigma", TinyFixture(tiny_pixart_components, [400], ddpm_timesteps_setup, _PIXART_CALL))
register_tiny_fixture("sana", TinyFixture(tiny_sana_components, [1.0], flow_pure_noise_setup, _SANA_CALL))
register_tiny_fixture(
    "sana_sprint",
    TinyFixture(lambda seed: tiny_sana_components(seed, sprint=True), None, sana_sprint_setup, _SANA_CALL),
)
# SD 1.5 students start from pure noise at t=999 (DMD2's SD 1.5 generator, SD-Turbo); LCMScheduler with timesteps=[999]
# at guidance 0 returns that one step's x0 (the v-prediction SD 2.x case is tests/test_sd_family.py's)
register_tiny_fixture("sd", TinyFixture(tiny_sd_components, [999], lcm_timesteps_setup))

register_tiny_fixture("flux", TinyFixture(tiny_flux_components, [1.0], flux_sigmas_setup))

register_tiny_fixture("sd3", TinyFixture(tiny_sd3_components, [1.0], sd3_sigmas_setup))

#: the families with a tiny fixture when this module was imported (the built-in ones; tests parametrize over it)
TINY_FAMILIES = tiny_families()


# ------------------------------------------------------------------------------------------------------------------
# generic helpers over the records
# ------------------------------------------------------------------------------------------------------------------


def tiny_components(family: str, seed: int = 0) -> Dict[str, object]:
    """Native components (with the family's own scheduler) of a tiny random model of ``family``."""
    return tiny_fixture(family).components(seed)


def native_pipeline_class(family: str):
    """The family's own diffusers pipeline class."""
    import diffusers

    return getattr(diffusers, get_adapter_class(family).native_pipeline_class_name)


def native_one_step_pipeline(family: str, folder: str, timesteps: Optional[Sequence[float]] = None):
    """The family's own diffusers pipeline from ``folder``, set up to run the student the way its card would.

    Returns ``(pipe, call_kwargs)``: ``pipe(prompt, **call_kwargs)`` computes what
    ``OneStepPipeline.from_pretrained(folder, conditioning_timesteps=timesteps)`` computes (the family's
    :attr:`TinyFixture.one_step_setup`). Height and width are the denoiser's native size.
    """
    pipe = native_pipeline_class(family).from_pretrained(folder, **get_adapter_class(family).native_pipeline_kwargs)
    return native_one_step_setup(family, pipe, timesteps)


def native_one_step_setup(family: str, pipe, timesteps: Optional[Sequence[float]] = None):
    """:func:`native_one_step_pipeline` for a native pipeline already built (e.g. from components in memory): swaps
    its scheduler where the recipe needs it and returns ``(pipe, call_kwargs)``."""
    fixture = tiny_fixture(family)
    timesteps = fixture.parity_timesteps if timesteps is None else list(timesteps)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(fixture.native_call_kwargs)
    kwargs.update(fixture.one_step_setup(pipe, timesteps))
    size = get_adapter_class(family).from_pipeline(pipe).default_resolution  # the denoiser's native size
    kwargs.update(height=size, width=size)
    return pipe, kwargs


def tiny_native_pipeline(family: str, seed: int = 0):
    """The family's own diffusers pipeline over :func:`tiny_components`."""
    components = tiny_components(family, seed)
    pipe = native_pipeline_class(family)(**components, **get_adapter_class(family).native_pipeline_kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_native_pipeline(family: str, folder: str, seed: int = 0) -> str:
    """Write a tiny native pipeline folder (safetensors, tokenizers included) and return its path."""
    tiny_native_pipeline(family, seed).save_pretrained(folder, safe_serialization=True)
    entries = tiny_fixture(family).model_index_entries
    if entries:
        path = os.path.join(folder, "model_index.json")
        with open(path, encoding="utf-8") as f:
            model_index = json.load(f)
        model_index.update(entries)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(model_index, f, indent=2, sort_keys=True)
    return folder
