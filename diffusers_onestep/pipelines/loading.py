"""How :class:`OneStepPipeline` finds and assembles a student from a folder, a Hub id, a preset or a base + weights.

All Hub access goes through :mod:`diffusers_onestep.hub` (``huggingface_hub``'s ``hf_hub_download``) and diffusers'
own ``from_pretrained``, so the same code runs against the Hub, a local folder, or the local Hub cache with
``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import math
import os
from typing import Any, Dict, Optional, Sequence

import torch

from ..families import ONESTEP_INDEX_KEY, detect_family, get_adapter_class, read_pipeline_configs
from ..hub import hub_kwargs_of, read_json, resolve_file
from ..schedulers import OneStepScheduler
from . import presets, serving
from .presets import Preset


#: config file of a LoRA student folder (beside ``pytorch_lora_weights.safetensors`` and ``scheduler/``)
LORA_STUDENT_CONFIG = "onestep_lora.json"


def pure_noise_time(noise_path) -> float:
    """The conditioning timestep of a student that starts from pure noise (VP: 999, flow: 1, TrigFlow: pi/2)."""
    if noise_path.kind == "trigflow":
        return round(math.pi / 2, 5)  # diffusers' SCMScheduler stores pi/2 as 1.57080
    return noise_path.t_max


def scheduler_for(
    family: str,
    scheduler_config: Dict[str, Any],
    conditioning_timesteps: Optional[Sequence[float]],
    prediction_type: Optional[str],
    solver: Optional[str] = None,
) -> OneStepScheduler:
    """A OneStepScheduler on the noise path of ``scheduler_config`` (a native or OneStep scheduler config)."""
    adapter_cls = get_adapter_class(family)
    path = adapter_cls.default_noise_path(scheduler_config)
    if prediction_type is None:
        # A OneStepScheduler config names the student's parameterization; a native one the teacher's.
        prediction_type = adapter_cls.default_prediction_type(scheduler_config)
    timesteps = conditioning_timesteps
    if timesteps is None:
        timesteps = scheduler_config.get("conditioning_timesteps") or [pure_noise_time(path)]
    if solver is None and scheduler_config.get("_class_name") == OneStepScheduler.__name__:
        solver = scheduler_config.get("solver")
    return OneStepScheduler.from_noise_path(path, timesteps, prediction_type, solver=solver or "sde")


def apply_dmd2_config(
    source: str,
    model_index: Dict[str, Any],
    family: str,
    scheduler_config: Dict[str, Any],
    kwargs: Dict[str, Any],
    conditioning_timesteps: Optional[Sequence[float]],
):
    """The student settings of a serving folder's ``dmd2_config`` block (:mod:`.serving`): ``(conditioning
    timesteps, solver)`` for :func:`scheduler_for`, the guidance put into ``kwargs``; callers' arguments win."""
    block = serving.read_dmd2_config(model_index[serving.DMD2_CONFIG_KEY], source)
    adapter_cls = get_adapter_class(family)
    path = adapter_cls.default_noise_path(scheduler_config)
    if path.kind != "flow":
        raise ValueError(
            f"{source}: `{serving.DMD2_CONFIG_KEY}` describes flow-matching students, but this {family} folder's "
            f"scheduler is on the {path.kind} noise path."
        )
    guidance = block["guidance_scale"]
    if adapter_cls.has_embedded_guidance:
        kwargs.setdefault("embedded_guidance_scale", guidance)
    elif guidance != 1.0:
        raise ValueError(
            f"{source}: `{serving.DMD2_CONFIG_KEY}` runs the student at guidance_scale={guidance:g}, but {family} "
            "students have no embedded guidance and OneStepPipeline runs no classifier-free guidance."
        )
    if conditioning_timesteps is None:
        conditioning_timesteps = serving.conditioning_sigmas(block, path.num_train_timesteps)
    return conditioning_timesteps, block["solver"]


def load_pipeline(cls, source, **kwargs):
    """Implementation of :meth:`OneStepPipeline.from_pretrained` (see its docstring)."""
    source = os.fspath(source)
    conditioning_timesteps = kwargs.pop("conditioning_timesteps", None)
    prediction_type = kwargs.pop("prediction_type", None)
    weight_name = kwargs.pop("weight_name", None)
    hub_kwargs = hub_kwargs_of(kwargs)

    if not os.path.isdir(source):
        preset = presets.find_preset(source, weight_name)
        if preset is not None:
            return load_preset(cls, preset, conditioning_timesteps=conditioning_timesteps, **kwargs)
        if weight_name is not None:
            raise ValueError(
                f"`weight_name` selects a variant of a known preset, and {source!r} is not one; "
                f"known presets: {', '.join(presets.preset_ids())}."
            )

    model_index = read_json(source, "model_index.json", hub_kwargs)
    if model_index is None:
        lora_config = read_json(source, LORA_STUDENT_CONFIG, hub_kwargs)
        if lora_config is not None:
            return load_lora_student(cls, source, lora_config, **kwargs)
        raise ValueError(
            f"{source} is neither a diffusers pipeline (no model_index.json) nor a diffusers-onestep LoRA student "
            f"(no {LORA_STUDENT_CONFIG})."
        )
    # Settings a native-class folder keeps under "_onestep" (OneStepPipeline.save_pretrained) -- callers' win.
    for key, value in (model_index.get(ONESTEP_INDEX_KEY) or {}).items():
        kwargs.setdefault(key, value)
    family = kwargs.get("family") or detect_family(model_index, read_pipeline_configs(source, model_index, hub_kwargs))
    kwargs["family"] = family

    if "scheduler" not in kwargs:
        entry = model_index.get("scheduler") or [None, None]
        is_onestep = entry[1] == "OneStepScheduler"
        if not is_onestep or conditioning_timesteps is not None or prediction_type is not None:
            scheduler_config = read_json(source, "scheduler/scheduler_config.json", hub_kwargs) or {}
            solver = None
            # Our own folders also carry the block, written from their OneStepScheduler: that stays authoritative.
            if not is_onestep and serving.DMD2_CONFIG_KEY in model_index:
                conditioning_timesteps, solver = apply_dmd2_config(
                    source, model_index, family, scheduler_config, kwargs, conditioning_timesteps
                )
            kwargs["scheduler"] = scheduler_for(
                family, scheduler_config, conditioning_timesteps, prediction_type, solver
            )
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


def load_preset(cls, preset: Preset, conditioning_timesteps=None, **kwargs):
    """Assemble the student of ``preset`` (:data:`~.presets.PRESETS`) with :class:`OneStepPipeline` ``cls``."""
    timesteps = list(conditioning_timesteps or preset.conditioning_timesteps)
    if preset.embedded_guidance_scale is not None:
        kwargs.setdefault("embedded_guidance_scale", preset.embedded_guidance_scale)
    if preset.kind == "pipeline":
        config = read_json(preset.repo_id, "scheduler/scheduler_config.json", hub_kwargs_of(kwargs)) or {}
        kwargs.setdefault("scheduler", scheduler_for(preset.family, config, timesteps, preset.prediction_type))
        kwargs.setdefault("family", preset.family)
        return cls._from_pretrained_folder(preset.repo_id, **kwargs)
    common = {"conditioning_timesteps": timesteps, "prediction_type": preset.prediction_type, "family": preset.family}
    if preset.kind == "denoiser":
        return load_from_base(
            cls,
            preset.base_model,
            student_weights=preset.repo_id,
            weight_name=preset.weight_name,
            subfolder=preset.subfolder,
            **common,
            **kwargs,
        )
    if preset.kind == "lora":
        return load_from_base(
            cls,
            preset.base_model,
            lora=preset.repo_id,
            lora_weight_name=preset.weight_name,
            lora_scale=preset.lora_scale,
            **common,
            **kwargs,
        )
    raise ValueError(f"Unknown preset kind {preset.kind!r}.")  # pragma: no cover - PRESETS is static


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


def build_denoiser(
    base_model: str,
    family: str,
    weights: Optional[str] = None,
    weight_name: Optional[str] = None,
    subfolder: Optional[str] = None,
    torch_dtype=None,
    **hub_kwargs,
):
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
    family = kwargs.pop("family", None) or detect_family(index, read_pipeline_configs(base_model, index, hub_kwargs))
    scheduler_config = read_json(base_model, "scheduler/scheduler_config.json", hub_kwargs) or {}
    scheduler = scheduler_for(family, scheduler_config, conditioning_timesteps, prediction_type)
    if student_weights is not None:
        denoiser = build_denoiser(
            base_model,
            family,
            student_weights,
            weight_name,
            subfolder,
            torch_dtype=kwargs.get("torch_dtype"),
            **hub_kwargs,
        )
        kwargs[get_adapter_class(family).denoiser_name] = denoiser
    pipe = cls.from_pretrained(base_model, scheduler=scheduler, family=family, **kwargs)
    if lora is not None:
        pipe.load_student_lora(lora, weight_name=lora_weight_name, lora_scale=lora_scale, **hub_kwargs)
    return pipe
