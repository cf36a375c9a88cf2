"""Backbone-family adapters: the only backbone-specific code in the project.

Each family is one :class:`FamilyAdapter` subclass whose class attributes carry everything the project knows about it;
:func:`register_family` puts it in :data:`FAMILIES`, from which detection, the supported-families text and the
``--family`` choices are generated. Adding a family (SD 1.5, SD3, FLUX) means one adapter file registered here, and
its tiny fixture in :mod:`diffusers_onestep.testing`.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional, Type

from ..hub import read_json
from .base import Condition, FamilyAdapter, JointTokenLayout
from .flux import FluxAdapter
from .pixart import PixArtAlphaAdapter, PixArtSigmaAdapter
from .sana import SanaAdapter, SanaSprintAdapter
from .sd import StableDiffusionAdapter
from .sd3 import SD3Adapter
from .sdxl import SDXLAdapter


#: registered families by name, in registration order (the order of detection and of every listing)
FAMILIES: Dict[str, Type[FamilyAdapter]] = {}
#: ``model_index.json`` key under which a student saved with a native pipeline class keeps OneStepPipeline's own
#: settings (``"family"`` among them); a ``"_"`` key, which the native class ignores without a warning
ONESTEP_INDEX_KEY = "_onestep"


def register_family(adapter_cls: Type[FamilyAdapter]) -> Type[FamilyAdapter]:
    """Add a family to :data:`FAMILIES` (usable as a class decorator); registering the same class again is a no-op.

    The adapter must name itself, its native pipeline class and its LoRA saver: nothing falls back to another
    family's.
    """
    for attribute in ("name", "display_name", "native_pipeline_class_name", "lora_pipeline_class_name"):
        if not getattr(adapter_cls, attribute, None):
            raise ValueError(f"{adapter_cls.__name__} must set `{attribute}` to be registered as a family.")
    registered = FAMILIES.get(adapter_cls.name)
    if registered is not None and registered is not adapter_cls:
        raise ValueError(f"The family name {adapter_cls.name!r} is already registered by {registered.__name__}.")
    FAMILIES[adapter_cls.name] = adapter_cls
    return adapter_cls


for _adapter_cls in (
    SDXLAdapter,
    PixArtAlphaAdapter,
    PixArtSigmaAdapter,
    SanaAdapter,
    SanaSprintAdapter,
    StableDiffusionAdapter,
    FluxAdapter,
    SD3Adapter,
):
    register_family(_adapter_cls)


def supported_families_text() -> str:
    """``"SDXL (sdxl), PixArt-α (pixart_alpha), ... and SANA-Sprint (sana_sprint)"`` for messages and help, from the
    registry at call time (a family registered later is listed)."""
    names = [f"{cls.display_name} ({name})" for name, cls in FAMILIES.items()]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def get_adapter_class(family: str) -> Type[FamilyAdapter]:
    try:
        return FAMILIES[family]
    except KeyError:
        raise ValueError(f"Unknown family {family!r}; supported families are {supported_families_text()}.") from None


def denoiser_component_names() -> tuple:
    """The denoiser components of every registered family (``"unet"``, ``"transformer"``), whose configs detection
    reads."""
    return tuple(dict.fromkeys(cls.denoiser_name for cls in FAMILIES.values()))


def detect_family(model_index: Dict[str, Any], component_configs: Optional[Dict[str, Dict[str, Any]]] = None) -> str:
    """The family of a pipeline from its ``model_index.json`` (and, if needed, its denoiser's config).

    Our own folders name the family (a ``"family"`` key, or one under ``"_onestep"`` in folders saved with a native
    class name); native folders are recognised by their pipeline class (every family's
    :attr:`~FamilyAdapter.pipeline_class_names`) and, failing that, by the first family in registry order whose
    :meth:`~FamilyAdapter.matches` accepts the folder.
    """
    own = model_index.get("family") or (model_index.get(ONESTEP_INDEX_KEY) or {}).get("family")
    if own:
        return get_adapter_class(own).name
    class_name = model_index.get("_class_name", "")
    for cls in FAMILIES.values():
        if class_name in cls.pipeline_class_names:
            return cls.name
    component_configs = component_configs or {}
    for cls in FAMILIES.values():
        if cls.matches(model_index, component_configs):
            return cls.name
    denoiser_classes = [(component_configs.get(n) or {}).get("_class_name") for n in denoiser_component_names()]
    what = class_name or next((c for c in denoiser_classes if c), None) or "an unknown model"
    raise ValueError(f"{what} is not a supported backbone; diffusers-onestep supports {supported_families_text()}.")


def read_pipeline_configs(
    source: str, model_index: Dict[str, Any], hub_kwargs: Optional[Dict[str, Any]] = None
) -> Dict[str, Dict[str, Any]]:
    """The configs of the denoiser components ``model_index`` lists, read from ``source`` (a folder or Hub repo):
    what :func:`detect_family` needs beside ``model_index.json``."""
    configs = {}
    for name in denoiser_component_names():
        entry = model_index.get(name)
        if isinstance(entry, list) and entry[0] is not None:
            configs[name] = read_json(source, f"{name}/config.json", hub_kwargs) or {}
    return configs


def read_model_index(folder: str) -> Dict[str, Any]:
    model_index = read_json(folder, "model_index.json") if os.path.isdir(folder) else None
    if model_index is None:
        raise ValueError(f"{folder} has no model_index.json, so it is not a diffusers pipeline folder.")
    return model_index


def detect_family_from_folder(folder: str) -> str:
    """Detect the family of a local pipeline folder in the diffusers layout."""
    model_index = read_model_index(folder)
    return detect_family(model_index, read_pipeline_configs(folder, model_index))


def adapter_for_pipeline(pipeline, family: Optional[str] = None, **kwargs) -> FamilyAdapter:
    """Build the adapter for a loaded diffusers pipeline (native or :class:`OneStepPipeline`)."""
    if family is None:
        family = getattr(pipeline.config, "family", None) if hasattr(pipeline, "config") else None
    if family is None:
        configs = {}
        for name in denoiser_component_names():
            module = getattr(pipeline, name, None)
            if module is not None:
                configs[name] = {"_class_name": type(module).__name__, **dict(module.config)}
        family = detect_family({"_class_name": type(pipeline).__name__}, configs)
    return get_adapter_class(family).from_pipeline(pipeline, **kwargs)


__all__ = [
    "Condition",
    "FamilyAdapter",
    "FAMILIES",
    "FluxAdapter",
    "JointTokenLayout",
    "ONESTEP_INDEX_KEY",
    "SDXLAdapter",
    "PixArtAlphaAdapter",
    "PixArtSigmaAdapter",
    "SanaAdapter",
    "SanaSprintAdapter",
    "StableDiffusionAdapter",
    "SD3Adapter",
    "adapter_for_pipeline",
    "denoiser_component_names",
    "detect_family",
    "detect_family_from_folder",
    "get_adapter_class",
    "read_model_index",
    "read_pipeline_configs",
    "register_family",
    "supported_families_text",
]
