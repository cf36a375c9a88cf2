"""How :class:`OneStepPipeline` finds and assembles a student from a folder, a Hub id, a preset or a base + weights.

All Hub access goes through ``huggingface_hub`` (``hf_hub_download``) and diffusers' own ``from_pretrained``, so the
same code runs against the Hub, a local folder, or the local Hub cache with ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, Optional, Sequence

import torch

from ..families import detect_family, get_adapter_class
from ..schedulers import OneStepScheduler

#: config file of a LoRA student folder (beside ``pytorch_lora_weights.safetensors`` and ``scheduler/``)
LORA_STUDENT_CONFIG = "onestep_lora.json"
HUB_KWARGS = ("cache_dir", "revision", "token", "local_files_only", "force_download", "proxies")


def hub_kwargs_of(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    return {k: kwargs[k] for k in HUB_KWARGS if k in kwargs}


def check_repo_id(source: str) -> None:
    """Refuse strings that are neither an existing folder nor a syntactically valid Hub repo id."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(source)
    except HFValidationError:
        raise ValueError(
            f"{source!r} is neither an existing folder nor a valid Hub repo id (expected 'org/name')."
        ) from None


def read_json(source: str, filename: str, hub_kwargs: Optional[Dict[str, Any]] = None) -> Optional[Dict[str, Any]]:
    """``filename`` of a local folder or Hub repo as a dict, or ``None`` when the repo has no such file."""
    if os.path.isdir(source):
        path = os.path.join(source, filename)
        if not os.path.isfile(path):
            return None
    else:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

        check_repo_id(source)
        try:
            path = hf_hub_download(source, filename, **(hub_kwargs or {}))
        except (EntryNotFoundError, LocalEntryNotFoundError):
            return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_onestep_settings(source: str) -> Dict[str, Any]:
    """The ``"_onestep"`` settings of a saved folder's ``model_index.json`` (local, or already in the Hub cache)."""
    try:
        index = read_json(source, "model_index.json", {"local_files_only": True})
    except ValueError:  # not a folder and not a repo id
        return {}
    return dict((index or {}).get("_onestep") or {})


def pure_noise_time(noise_path) -> float:
    """The conditioning timestep of a student that starts from pure noise (VP: 999, flow: 1, TrigFlow: pi/2)."""
    if noise_path.kind == "trigflow":
        return round(math.pi / 2, 5)  # diffusers' SCMScheduler stores pi/2 as 1.57080
    return noise_path.t_max


def scheduler_for(family: str, scheduler_config: Dict[str, Any], conditioning_timesteps: Optional[Sequence[float]],
                  prediction_type: Optional[str]) -> OneStepScheduler:
    """A OneStepScheduler on the noise path of ``scheduler_config`` (a native or OneStep scheduler config)."""
    adapter_cls = get_adapter_class(family)
    path = adapter_cls.default_noise_path(scheduler_config)
    if prediction_type is None:
        # A OneStepScheduler config names the student's parameterization; a native one the teacher's.
        if "noise_path" in scheduler_config:
            prediction_type = scheduler_config.get("prediction_type", "epsilon")
        else:
            prediction_type = adapter_cls.default_prediction_type(scheduler_config)
    timesteps = conditioning_timesteps
    if timesteps is None:
        timesteps = scheduler_config.get("conditioning_timesteps") or [pure_noise_time(path)]
    return OneStepScheduler.from_noise_path(path, timesteps, prediction_type)


def load_pipeline(cls, source, **kwargs):
    """Implementation of :meth:`OneStepPipeline.from_pretrained` (see its docstring)."""
    from . import presets

    source = os.fspath(source)
    conditioning_timesteps = kwargs.pop("conditioning_timesteps", None)
    prediction_type = kwargs.pop("prediction_type", None)
    weight_name = kwargs.pop("weight_name", None)
    hub_kwargs = hub_kwargs_of(kwargs)

    if not os.path.isdir(source):
        preset = presets.find_preset(source, weight_name)
        if preset is not None:
            return presets.load_preset(cls, preset, conditioning_timesteps=conditioning_timesteps, **kwargs)
        if weight_name is not None:
            raise ValueError(f"`weight_name` selects a variant of a known preset, and {source!r} is not one; "
                             f"known presets: {', '.join(presets.preset_ids())}.")

    model_index = read_json(source, "model_index.json", hub_kwargs)
    if model_index is None:
        lora_config = read_json(source, LORA_STUDENT_CONFIG, hub_kwargs)
        if lora_config is not None:
            return load_lora_student(cls, source, lora_config, **kwargs)
        raise ValueError(
            f"{source} is neither a diffusers pipeline (no model_index.json) nor a diffusers-onestep LoRA student "
            f"(no {LORA_STUDENT_CONFIG})."
        )
    configs = {}
    for name in ("unet", "transformer"):
        if isinstance(model_index.get(name), list) and model_index[name][0] is not None:
            configs[name] = read_json(source, f"{name}/config.json", hub_kwargs) or {}
    # Settings a native-class folder keeps under "_onestep" (OneStepPipeline.save_pretrained) -- callers' win.
    for key, value in (model_index.get("_onestep") or {}).items():
        kwargs.setdefault(key, value)
    family = kwargs.get("family") or detect_family(model_index, configs)
    kwargs["family"] = family

    if "scheduler" not in kwargs:
        entry = model_index.get("scheduler") or [None, None]
        is_onestep = entry[1] == "OneStepScheduler"
        if not is_onestep or conditioning_timesteps is not None or prediction_type is not None:
            scheduler_config = read_json(source, "scheduler/scheduler_config.json", hub_kwargs) or {}
            kwargs["scheduler"] = scheduler_for(family, scheduler_config, conditioning_timesteps, prediction_type)
    return cls._from_pretrained_folder(source, **kwargs)


def load_lora_student(cls, source: str, lora_config: Dict[str, Any], **kwargs):
    """A LoRA student folder: the base pipeline, the stored scheduler, and the LoRA fused into the denoiser."""
    hub_kwargs = hub_kwargs_of(kwargs)
    base_override = kwargs.pop("base_model", None)
    base = base_override or lora_config["base_model"]
    scheduler = OneStepScheduler.from_pretrained(source, subfolder="scheduler", **hub_kwargs)
    # `revision` names a revision of the LoRA repo; the base is pinned by the revision the student was trained on
    base_kwargs = {k: v for k, v in kwargs.items() if k != "revision"}
    if lora_config.get("base_revision") and base_override is None and not os.path.isdir(base):
        base_kwargs["revision"] = lora_config["base_revision"]
    pipe = cls.from_pretrained(base, scheduler=scheduler, family=lora_config.get("family"), **base_kwargs)
    pipe.load_student_lora(
        source,
        weight_name=lora_config.get("weight_name"),
        lora_scale=float(lora_config.get("lora_scale", 1.0)),
        **hub_kwargs,
    )
    return pipe


def resolve_file(source: str, weight_name: Optional[str] = None, subfolder: Optional[str] = None, **hub_kwargs) -> str:
    """A local file for ``source`` (a file path, a folder + ``weight_name``, or a Hub repo + ``weight_name``)."""
    if os.path.isfile(source):
        return source
    if weight_name is None:
        raise ValueError(f"{source} is not a file; pass `weight_name` to pick the file inside it.")
    if os.path.isdir(source):
        path = os.path.join(source, subfolder or "", weight_name)
        if not os.path.isfile(path):
            raise ValueError(f"{path} does not exist.")
        return path
    from huggingface_hub import hf_hub_download

    check_repo_id(source)
    return hf_hub_download(source, weight_name, subfolder=subfolder, **hub_kwargs)


def load_state_dict_file(path: str) -> Dict[str, torch.Tensor]:
    """Weights from ``.safetensors``; legacy ``.bin``/``.pt``/``.pth`` only through ``torch.load(weights_only=True)``."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    if path.endswith((".bin", ".pt", ".pth", ".ckpt")):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # pickle payloads are refused here, by design
            reason = str(error).splitlines()[0].split(". ")[0].rstrip(".")
            raise ValueError(
                f"{path} could not be loaded safely (torch.load(weights_only=True) refused it: {reason}); "
                "convert it to .safetensors."
            ) from error
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        return state
    raise ValueError(f"{path} has an unknown weight format; expected .safetensors (or a legacy .bin).")


def build_denoiser(base_model: str, family: str, weights: Optional[str] = None, weight_name: Optional[str] = None,
                   subfolder: Optional[str] = None, torch_dtype=None, **hub_kwargs):
    """The base model's denoiser architecture with the student's weights."""
    import diffusers

    adapter_cls = get_adapter_class(family)
    name = adapter_cls.denoiser_name
    index = read_json(base_model, "model_index.json", hub_kwargs) or {}
    class_name = (index.get(name) or [None, None])[1]
    if class_name is None:
        raise ValueError(f"{base_model} has no `{name}` component to load student weights into.")
    model_cls = getattr(diffusers, class_name)
    if weights is not None and weight_name is None and subfolder is not None:
        # A full denoiser folder in the student repo (PixArt-α DMD ships `transformer/`).
        model = model_cls.from_pretrained(weights, subfolder=subfolder, **hub_kwargs)
    else:
        config = model_cls.load_config(base_model, subfolder=name, **hub_kwargs)
        model = model_cls.from_config(config)
        if weights is not None:
            state = load_state_dict_file(resolve_file(weights, weight_name, subfolder, **hub_kwargs))
            missing, unexpected = model.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise ValueError(
                    f"The student weights do not fit the {class_name} of {base_model}: {len(missing)} missing and "
                    f"{len(unexpected)} unexpected keys (e.g. {(list(missing) + list(unexpected))[0]})."
                )
    if torch_dtype is not None:
        model = model.to(torch_dtype)
    return model.eval()


def load_from_base(
    cls,
    base_model: str,
    *,
    conditioning_timesteps: Sequence[float],
    prediction_type: Optional[str] = None,
    student_weights: Optional[str] = None,
    weight_name: Optional[str] = None,
    subfolder: Optional[str] = None,
    lora: Optional[str] = None,
    lora_weight_name: Optional[str] = None,
    lora_scale: float = 1.0,
    **kwargs,
):
    """Build a student from a base pipeline plus denoiser-only weights and/or a LoRA.

    Args:
        base_model: the base pipeline (Hub id or folder), e.g. ``"stabilityai/stable-diffusion-xl-base-1.0"``.
        conditioning_timesteps: the student's timesteps (DMD2 1-step ``[399]``, 4-step ``[999, 749, 499, 249]``).
        prediction_type: the student's output parameterization (default: the base's, e.g. ``"sample"`` for
            SDXL-Lightning's ``x0`` UNet).
        student_weights: file, folder or Hub repo holding the denoiser weights (DMD2, Lightning, Hyper-SD,
            NitroFusion ship UNet-only files); ``weight_name``/``subfolder`` select inside it.
        lora, lora_weight_name, lora_scale: a LoRA student (Hyper-SD, DMD2 4-step LoRA), fused after loading.
        **kwargs: passed to ``from_pretrained`` of the base (``torch_dtype``, ``cache_dir``, ...).
    """
    hub_kwargs = hub_kwargs_of(kwargs)
    index = read_json(base_model, "model_index.json", hub_kwargs)
    if index is None:
        raise ValueError(f"{base_model} is not a diffusers pipeline (no model_index.json).")
    configs = {}
    for name in ("unet", "transformer"):
        if isinstance(index.get(name), list) and index[name][0] is not None:
            configs[name] = read_json(base_model, f"{name}/config.json", hub_kwargs) or {}
    family = kwargs.pop("family", None) or detect_family(index, configs)
    scheduler_config = read_json(base_model, "scheduler/scheduler_config.json", hub_kwargs) or {}
    scheduler = scheduler_for(family, scheduler_config, conditioning_timesteps, prediction_type)
    if student_weights is not None:
        denoiser = build_denoiser(base_model, family, student_weights, weight_name, subfolder,
                                  torch_dtype=kwargs.get("torch_dtype"), **hub_kwargs)
        kwargs[get_adapter_class(family).denoiser_name] = denoiser
    pipe = cls.from_pretrained(base_model, scheduler=scheduler, family=family, **kwargs)
    if lora is not None:
        pipe.load_student_lora(lora, weight_name=lora_weight_name, lora_scale=lora_scale, **hub_kwargs)
    return pipe
