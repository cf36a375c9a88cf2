"""Backbone-family adapters: the only backbone-specific code in the project.

Adding a family (SD 1.5, SD3, FLUX) means one adapter file, one entry in :data:`FAMILIES`, and its tiny fixture in
:mod:`diffusers_onestep.testing`.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional, Type

from .base import Condition, FamilyAdapter
from .pixart import PixArtAlphaAdapter, PixArtSigmaAdapter
from .sana import SanaAdapter, SanaSprintAdapter
from .sdxl import SDXLAdapter

FAMILIES: Dict[str, Type[FamilyAdapter]] = {
    cls.name: cls for cls in (SDXLAdapter, PixArtAlphaAdapter, PixArtSigmaAdapter, SanaAdapter, SanaSprintAdapter)
}
SUPPORTED_FAMILIES_TEXT = "SDXL (sdxl), PixArt-α (pixart_alpha), PixArt-Σ (pixart_sigma), SANA (sana) and SANA-Sprint (sana_sprint)"


def get_adapter_class(family: str) -> Type[FamilyAdapter]:
    try:
        return FAMILIES[family]
    except KeyError:
        raise ValueError(f"Unknown family {family!r}; supported families are {SUPPORTED_FAMILIES_TEXT}.") from None


def detect_family(model_index: Dict[str, Any], component_configs: Optional[Dict[str, Dict[str, Any]]] = None) -> str:
    """The family of a pipeline from its ``model_index.json`` (and, if needed, its component configs).

    Our own folders name the family (``"family"`` key); native folders are recognised by their pipeline class and,
    failing that, by the denoiser's class and config.
    """
    if model_index.get("family"):
        return get_adapter_class(model_index["family"]).name
    class_name = model_index.get("_class_name", "")
    for cls in FAMILIES.values():
        if class_name in cls.pipeline_class_names:
            return cls.name
    component_configs = component_configs or {}
    unet = component_configs.get("unet") or {}
    transformer = component_configs.get("transformer") or {}
    if unet.get("addition_embed_type") == "text_time":
        return "sdxl"
    if transformer.get("_class_name") == "PixArtTransformer2DModel":
        return "pixart_sigma" if "Sigma" in class_name else "pixart_alpha"
    if transformer.get("_class_name") == "SanaTransformer2DModel":
        return "sana_sprint" if transformer.get("guidance_embeds") else "sana"
    what = class_name or unet.get("_class_name") or transformer.get("_class_name") or "an unknown model"
    raise ValueError(f"{what} is not a supported backbone; diffusers-onestep supports {SUPPORTED_FAMILIES_TEXT}.")


def read_model_index(folder: str) -> Dict[str, Any]:
    path = os.path.join(folder, "model_index.json")
    if not os.path.isfile(path):
        raise ValueError(f"{folder} has no model_index.json, so it is not a diffusers pipeline folder.")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def detect_family_from_folder(folder: str) -> str:
    """Detect the family of a local pipeline folder in the diffusers layout."""
    model_index = read_model_index(folder)
    configs = {}
    for name in ("unet", "transformer"):
        path = os.path.join(folder, name, "config.json")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                configs[name] = json.load(f)
    return detect_family(model_index, configs)


def adapter_for_pipeline(pipeline, family: Optional[str] = None, **kwargs) -> FamilyAdapter:
    """Build the adapter for a loaded diffusers pipeline (native or :class:`OneStepPipeline`)."""
    if family is None:
        family = getattr(pipeline.config, "family", None) if hasattr(pipeline, "config") else None
    if family is None:
        configs = {}
        for name in ("unet", "transformer"):
            module = getattr(pipeline, name, None)
            if module is not None:
                configs[name] = {"_class_name": type(module).__name__, **dict(module.config)}
        family = detect_family({"_class_name": type(pipeline).__name__}, configs)
    return get_adapter_class(family).from_pipeline(pipeline, **kwargs)


__all__ = [
    "Condition",
    "FamilyAdapter",
    "FAMILIES",
    "SDXLAdapter",
    "PixArtAlphaAdapter",
    "PixArtSigmaAdapter",
    "SanaAdapter",
    "SanaSprintAdapter",
    "adapter_for_pipeline",
    "detect_family",
    "detect_family_from_folder",
    "get_adapter_class",
    "read_model_index",
]


def supported_families_text() -> str:
    return SUPPORTED_FAMILIES_TEXT
