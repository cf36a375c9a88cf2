"""How :class:`OneStepPipeline` finds and assembles a student from a folder, a Hub id, a preset or a base + weights.

All Hub access goes through :mod:`diffusers_onestep.hub` (``huggingface_hub``'s ``hf_hub_download``) and diffusers'
own ``from_pretrained``, so the same code runs against the Hub, a local folder, or the local Hub cache with
``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import json
import math
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from .. import storage
from ..errors import reason_of
from ..families import FAMILIES, ONESTEP_INDEX_KEY, detect_family, get_adapter_class, read_pipeline_configs
from ..hub import (
    hub_kwargs_of,
    offline_cache_miss,
    read_json,
    resolve_file,
    resolve_weight_name,
    uncached_while_offline,
)
from ..parameterization import check_prediction_type
from ..schedulers import OneStepScheduler
from ..schedulers.scheduling_onestep import timestep_values
from . import presets, serving
from .presets import Preset


#: config file of a LoRA student folder (beside ``pytorch_lora_weights.safetensors`` and ``scheduler/``)
LORA_STUDENT_CONFIG = "onestep_lora.json"

#: keyword arguments of ``OneStepPipeline.from_pretrained`` that this module reads (besides components by name and the
#: pipeline's own settings); the rest go to ``DiffusionPipeline.from_pretrained``
STUDENT_KWARGS = ("conditioning_timesteps", "prediction_type", "weight_name", "base_model")
#: keyword arguments of ``OneStepPipeline.from_base`` (:func:`load_from_base`) besides those
FROM_BASE_KWARGS = (
    "conditioning_timesteps",
    "prediction_type",
    "student_weights",
    "weight_name",
    "subfolder",
    "lora",
    "lora_weight_name",
    "lora_scale",
)
#: ``DiffusionPipeline.from_pretrained``'s own keyword arguments that apply to a student, passed on to it (a test keeps
#: this covering the installed diffusers' together with :data:`OTHER_PIPELINE_KWARGS`)
DIFFUSERS_KWARGS = (
    "cache_dir",
    "force_download",
    "proxies",
    "local_files_only",
    "token",
    "revision",
    "torch_dtype",
    "dtype",
    "device_map",
    "max_memory",
    "offload_folder",
    "offload_state_dict",
    "low_cpu_mem_usage",
    "variant",
    "use_safetensors",
    "disable_mmap",
    "quantization_config",
    "use_flashpack",
    "load_connected_pipeline",
    "trust_remote_code",
)
#: ``DiffusionPipeline.from_pretrained`` keyword arguments that load another pipeline class or another format (ONNX,
#: Flax) than a student's: refused, since diffusers would build something that is not a OneStepPipeline or fail late
OTHER_PIPELINE_KWARGS = (
    "custom_pipeline",
    "custom_revision",
    "use_onnx",
    "provider",
    "provider_options",
    "sess_options",
    "from_flax",
)


def check_loading_kwargs(cls, kwargs: Dict[str, Any], method: str, own: Sequence[str]) -> None:
    """Refuse, with one sentence, a keyword argument that nothing reads (``DiffusionPipeline.from_pretrained`` only logs
    that it ignores it, so a typo such as ``conditioning_timestep=`` would go unnoticed) or that loads another kind of
    pipeline. Accepted: ``own`` (the method's arguments), :data:`DIFFUSERS_KWARGS`, and the parameters of ``cls``'s
    ``__init__`` (components by name and the pipeline's settings)."""
    accepted = set(own) | set(DIFFUSERS_KWARGS)
    accepted |= {n for n, p in inspect.signature(cls.__init__).parameters.items() if p.kind == p.POSITIONAL_OR_KEYWORD}
    accepted.discard("self")
    for name in kwargs:
        if name in OTHER_PIPELINE_KWARGS:
            raise ValueError(
                f"`{name}` loads another pipeline class or format than {cls.__name__}.{method} builds; drop it, or "
                f"load that pipeline with DiffusionPipeline.from_pretrained(..., {name}=...)."
            )
        if name not in accepted:
            close = difflib.get_close_matches(name, sorted(accepted), n=1)
            hint = f" (did you mean `{close[0]}`?)" if close else ""
            raise ValueError(
                f"{cls.__name__}.{method} got the unknown keyword argument `{name}`{hint}; it takes {', '.join(own)}, "
                "components by name and DiffusionPipeline.from_pretrained's arguments such as torch_dtype and variant."
            )


def check_scheduler_overrides(
    conditioning_timesteps, prediction_type, kwargs: Dict[str, Any]
) -> Tuple[Optional[List[float]], Optional[str]]:
    """The caller's ``conditioning_timesteps`` (as floats) and ``prediction_type``, checked before anything loads; both
    build the student's scheduler, so together with a ``scheduler=`` one of them would be ignored: refused."""
    if conditioning_timesteps is not None:
        conditioning_timesteps = timestep_values(conditioning_timesteps, "conditioning_timesteps")
    if prediction_type is not None:
        check_prediction_type(prediction_type)
    given = [
        name
        for name, value in (("conditioning_timesteps", conditioning_timesteps), ("prediction_type", prediction_type))
        if value is not None
    ]
    if given and kwargs.get("scheduler") is not None:
        raise ValueError(
            f"`scheduler` and `{given[0]}` both set the student's scheduler; pass one of them (a scheduler of your own "
            f"with OneStepScheduler.from_config(scheduler.config, {given[0]}=...))."
        )
    return conditioning_timesteps, prediction_type


def check_family_kwargs(family: str, kwargs: Dict[str, Any]) -> None:
    """Refuse a caller's setting that a student of ``family`` has no use for (it would be stored and ignored)."""
    adapter_cls = get_adapter_class(family)
    if kwargs.get("embedded_guidance_scale") is not None and not adapter_cls.has_embedded_guidance:
        embedded = ", ".join(c.display_name for c in FAMILIES.values() if c.has_embedded_guidance)
        raise ValueError(
            f"`embedded_guidance_scale` applies to students with embedded guidance ({embedded}), not to this "
            f"{adapter_cls.display_name} one; drop it."
        )


#: weight files of the diffusers and transformers layouts (a sharded checkpoint is its index plus the shards it names)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")


def weight_variant(filename: str) -> Optional[str]:
    """The variant of a weight file name (``fp16`` of ``diffusion_pytorch_model.fp16.safetensors`` and of
    ``model.fp16-00001-of-00002.safetensors``), ``None`` for the plain weights."""
    parts = [p for p in filename.split(".")[1:] if p not in ("safetensors", "bin", "index", "json")]
    return parts[0].split("-")[0] if parts else None


def check_folder_files(
    folder: str,
    model_index: Dict[str, Any],
    skip: Sequence[str] = (),
    variant: Optional[str] = None,
    remedy: str = "save or download it again, or pass `{name}=` yourself",
) -> None:
    """Check, before diffusers loads anything, that every component a local pipeline folder lists is there: each
    model (a ``torch.nn.Module`` class) with a config that parses and weights of ``variant`` (the plain ones without
    it) whose safetensors headers are whole and whose shards exist; every other component's config parses.

    diffusers' own errors name the wrong file for a missing one (``diffusion_pytorch_model.bin`` when the safetensors
    file is gone, ``config.json`` of the parent folder when a component folder is gone) and no file at all for a
    damaged one. ``skip`` names components passed in instead of read; ``remedy`` ends each message (``{name}``: the
    component)."""
    for name, entry in model_index.items():
        if name.startswith("_") or name in skip or not isinstance(entry, list) or len(entry) != 2:
            continue
        library, class_name = entry
        if library is None or class_name is None:
            continue
        try:
            component_cls = getattr(importlib.import_module(library), class_name)
        except (ImportError, AttributeError):
            continue  # diffusers says which class it cannot find
        is_model = isinstance(component_cls, type) and issubclass(component_cls, torch.nn.Module)
        subfolder = os.path.join(folder, name)
        fix = remedy.format(name=name)
        if not os.path.isdir(subfolder):
            raise ValueError(f"{folder} lists a {name} ({class_name}) but has no {name} folder; {fix}.")
        files = sorted(os.listdir(subfolder))
        for config_name in ("config.json", "scheduler_config.json", "tokenizer_config.json"):
            if config_name in files:
                _check_json(os.path.join(subfolder, config_name), fix)
        if not is_model:
            continue  # schedulers, tokenizers: configs and vocabularies, which diffusers reports well
        if "config.json" not in files:
            raise ValueError(f"{folder} lists a {name} ({class_name}) whose config.json is missing; {fix}.")
        _check_weights(subfolder, [f for f in files if f.endswith(WEIGHT_SUFFIXES)], variant, fix)


def _check_json(path: str, fix: str) -> None:
    try:
        with open(path, encoding="utf-8") as f:
            json.load(f)
    except (OSError, ValueError) as error:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{path} could not be read as JSON ({reason_of(error)}); {fix}.") from None


def _check_weights(subfolder: str, weights: List[str], variant: Optional[str], fix: str) -> None:
    # with a variant, a component that lacks it loads its plain weights (diffusers falls back to them too)
    usable = [f for f in weights if weight_variant(f) == variant] or [f for f in weights if weight_variant(f) is None]
    if not usable:
        others = sorted({weight_variant(f) for f in weights} - {None, variant})
        if others and variant is None:
            raise ValueError(
                f"{subfolder} holds only {others[0]} weights ({weights[0]}); pass variant={others[0]!r} "
                "(--variant in training)."
            )
        wanted = f"{variant} weights" if variant else "weights file"
        held = f" (it holds {', '.join(others)} weights)" if others else ""
        raise ValueError(f"{subfolder} has no {wanted}{held}; {fix}.")
    shards = []
    for index_name in (f for f in usable if f.endswith(".index.json")):
        _check_json(os.path.join(subfolder, index_name), fix)
        with open(os.path.join(subfolder, index_name), encoding="utf-8") as f:
            shards += sorted(set((json.load(f).get("weight_map") or {}).values()))
    for shard in shards:
        if not os.path.isfile(os.path.join(subfolder, shard)):
            raise ValueError(f"{subfolder} is missing the weights shard {shard}; {fix}.")
    for weight_file in sorted({f for f in usable + shards if f.endswith(".safetensors")}):
        path = os.path.join(subfolder, weight_file)
        problem = storage.safetensors_problem(path)
        if problem is not None:
            raise ValueError(f"{path} is damaged ({problem}); {fix}.")


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
        if path.resolution_dependent and len(conditioning_timesteps) > 1:
            raise ValueError(
                f"{source}: `{serving.DMD2_CONFIG_KEY}` lists final (shifted) timesteps, but this {family} folder's "
                "scheduler shifts them with the resolution (use_dynamic_shifting); pass `conditioning_timesteps=` "
                "with the unshifted sigmas."
            )
    return conditioning_timesteps, block["solver"]


def load_pipeline(cls, source, **kwargs):
    """Implementation of :meth:`OneStepPipeline.from_pretrained` (see its docstring).

    The caller's ``conditioning_timesteps`` and ``prediction_type`` set the student's scheduler whatever the source: a
    full student or native pipeline folder, a LoRA student folder, a preset, or (through :func:`load_from_base`) a base
    with denoiser weights. Every other keyword argument is checked against what some loader reads
    (:func:`check_loading_kwargs`) before anything is loaded.
    """
    source = os.fspath(source)
    check_loading_kwargs(cls, kwargs, "from_pretrained", STUDENT_KWARGS)
    conditioning_timesteps, prediction_type = check_scheduler_overrides(
        kwargs.pop("conditioning_timesteps", None), kwargs.pop("prediction_type", None), kwargs
    )
    weight_name = kwargs.pop("weight_name", None)
    base_model = kwargs.pop("base_model", None)
    hub_kwargs = hub_kwargs_of(kwargs)

    preset = None if os.path.isdir(source) else presets.find_preset(source, weight_name)
    if preset is not None:
        return load_preset(cls, preset, conditioning_timesteps, prediction_type, base_model, **kwargs)
    if weight_name is not None:
        raise ValueError(
            f"`weight_name` selects a variant of a known preset, and {source!r} is not one; "
            f"known presets: {', '.join(presets.preset_ids())}."
        )

    model_index = read_json(source, "model_index.json", hub_kwargs)
    if model_index is None:
        lora_config = read_json(source, LORA_STUDENT_CONFIG, hub_kwargs)
        if lora_config is not None:
            return load_lora_student(
                cls, source, lora_config, conditioning_timesteps, prediction_type, base_model, **kwargs
            )
        if not os.path.isdir(source) and uncached_while_offline(source, "model_index.json", **hub_kwargs):
            raise ValueError(offline_cache_miss(source))
        raise ValueError(
            f"{source} is neither a diffusers pipeline (no model_index.json) nor a diffusers-onestep LoRA student "
            f"(no {LORA_STUDENT_CONFIG})."
        )
    if base_model is not None:
        raise ValueError(
            f"`base_model` replaces the base model of a LoRA student or of a preset, and {source} is a full pipeline "
            "with no base model; drop it."
        )
    caller_settings = dict(kwargs)
    # Settings a native-class folder keeps under "_onestep" (OneStepPipeline.save_pretrained) -- callers' win.
    for key, value in (model_index.get(ONESTEP_INDEX_KEY) or {}).items():
        kwargs.setdefault(key, value)
    family = kwargs.get("family") or detect_family(model_index, read_pipeline_configs(source, model_index, hub_kwargs))
    kwargs["family"] = family
    check_family_kwargs(family, caller_settings)
    if os.path.isdir(source):
        check_folder_files(source, model_index, skip=tuple(kwargs), variant=kwargs.get("variant"))

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


def load_lora_student(
    cls,
    source: str,
    lora_config: Dict[str, Any],
    conditioning_timesteps: Optional[Sequence[float]] = None,
    prediction_type: Optional[str] = None,
    base_model: Optional[str] = None,
    **kwargs,
):
    """A LoRA student folder: the base pipeline, the stored scheduler (with the caller's ``conditioning_timesteps`` and
    ``prediction_type`` when given), and the LoRA fused into the denoiser. ``base_model`` replaces the base the folder
    names; every other keyword argument (``torch_dtype``, ``variant``, components, ...) applies to the base."""
    hub_kwargs = hub_kwargs_of(kwargs)
    if base_model is None and not lora_config.get("base_model"):
        raise ValueError(f"{LORA_STUDENT_CONFIG} of {source} names no base_model; pass `base_model=` with its base.")
    base = os.fspath(base_model) if base_model is not None else lora_config["base_model"]
    if os.path.isabs(base) and not os.path.isdir(base):  # a local teacher's folder is recorded as an absolute path
        raise ValueError(
            f"The LoRA student {source} was trained on the local folder {base}, which is not on this machine; pass "
            "`base_model=` with that teacher's folder or Hub id."
        )
    scheduler = kwargs.pop("scheduler", None)
    if scheduler is None:
        overrides = {"conditioning_timesteps": conditioning_timesteps, "prediction_type": prediction_type}
        scheduler = OneStepScheduler.from_pretrained(
            source, subfolder="scheduler", **hub_kwargs, **{k: v for k, v in overrides.items() if v is not None}
        )
    family = kwargs.pop("family", None) or lora_config.get("family")
    # `revision` names a revision of the LoRA repo; the base is pinned by the revision the student was trained on
    base_kwargs = {k: v for k, v in kwargs.items() if k != "revision"}
    if lora_config.get("base_revision") and base_model is None and not os.path.isdir(base):
        base_kwargs["revision"] = lora_config["base_revision"]
    pipe = cls.from_pretrained(base, scheduler=scheduler, family=family, **base_kwargs)
    pipe.load_student_lora(
        source,
        weight_name=lora_config.get("weight_name"),
        lora_scale=float(lora_config.get("lora_scale", 1.0)),
        **hub_kwargs,
    )
    return pipe


def load_preset(
    cls,
    preset: Preset,
    conditioning_timesteps: Optional[Sequence[float]] = None,
    prediction_type: Optional[str] = None,
    base_model: Optional[str] = None,
    **kwargs,
):
    """Assemble the student of ``preset`` (:data:`~.presets.PRESETS`) with :class:`OneStepPipeline` ``cls`` as its
    source runs it: the weight variant the source loads, the weight file under the spelling the repo has, and a
    :class:`OneStepScheduler` on the noise schedule the source reads (the pipeline's, the base's, or the student repo's
    own ``scheduler/``) with the source's timesteps and multi-step solver. The caller's
    ``conditioning_timesteps``/``prediction_type`` replace the source's, ``base_model`` the base of a denoiser or LoRA
    preset, ``variant`` the variant, ``scheduler`` the whole scheduler."""
    family = kwargs.pop("family", None)
    if family is not None and family != preset.family:
        display = get_adapter_class(preset.family).display_name
        raise ValueError(f"{preset.repo_id} is a student of the {display} family, not {family}; drop `family`.")
    check_family_kwargs(preset.family, kwargs)
    if preset.kind == "pipeline" and base_model is not None:
        raise ValueError(
            f"{preset.repo_id} is a full pipeline, with no base model for `base_model` to replace; drop it."
        )
    if preset.embedded_guidance_scale is not None:
        kwargs.setdefault("embedded_guidance_scale", preset.embedded_guidance_scale)
    if preset.max_sequence_length is not None:
        kwargs.setdefault("max_sequence_length", preset.max_sequence_length)
    hub_kwargs = hub_kwargs_of(kwargs)
    base = base_model if base_model is not None else preset.base_model
    if kwargs.get("scheduler") is None:
        if preset.scheduler_subfolder:
            config_source, config_file = preset.repo_id, f"{preset.scheduler_subfolder}/scheduler_config.json"
        else:
            config_source = preset.repo_id if preset.kind == "pipeline" else base
            config_file = "scheduler/scheduler_config.json"
        scheduler_config = read_json(config_source, config_file, hub_kwargs) or {}
        if preset.noise_path is not None:
            # the source's own path (a OneStepScheduler config names it); the config's length of the schedule stays
            scheduler_config = {**scheduler_config, "noise_path": preset.noise_path}
        kwargs["scheduler"] = scheduler_for(
            preset.family,
            scheduler_config,
            conditioning_timesteps if conditioning_timesteps is not None else list(preset.conditioning_timesteps),
            prediction_type or preset.prediction_type,
            preset.solver,
        )
    weight_name = preset.weight_name
    if preset.weight_name_spellings:
        weight_name = resolve_weight_name(preset.repo_id, preset.weight_names, preset.subfolder, **hub_kwargs)
    if preset.kind == "pipeline":
        if preset.variant is not None:
            kwargs.setdefault("variant", preset.variant)
        kwargs["family"] = preset.family
        return cls._from_pretrained_folder(preset.repo_id, **kwargs)
    if preset.kind == "denoiser":
        return load_from_base(
            cls,
            base,
            student_weights=preset.repo_id,
            weight_name=weight_name,
            subfolder=preset.subfolder,
            family=preset.family,
            **kwargs,
        )
    if preset.kind == "lora":
        return load_from_base(
            cls,
            base,
            lora=preset.repo_id,
            lora_weight_name=weight_name,
            lora_scale=preset.lora_scale,
            family=preset.family,
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
            raise ValueError(
                f"{path} could not be loaded safely (torch.load(weights_only=True) refused it: {reason_of(error)}); "
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
    conditioning_timesteps: Optional[Sequence[float]] = None,
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
        base_model: the base pipeline (Hub id or folder), e.g. ``"stabilityai/stable-diffusion-xl-base-1.0"``; a saved
            student works too (its components, its settings).
        conditioning_timesteps: the student's timesteps (DMD2 1-step ``[399]``, 4-step ``[999, 749, 499, 249]``);
            default: the base's own (a saved student's), else the pure-noise end of its path.
        prediction_type: the student's output parameterization (default: the base's, e.g. ``"sample"`` for
            SDXL-Lightning's ``x0`` UNet).
        student_weights: file, folder or Hub repo holding the denoiser weights (DMD2, Lightning, Hyper-SD,
            NitroFusion ship UNet-only files); ``weight_name``/``subfolder`` select inside it.
        lora, lora_weight_name, lora_scale: a LoRA student (Hyper-SD, DMD2 4-step LoRA), fused after loading.
        **kwargs: passed to ``from_pretrained`` of the base (``torch_dtype``, ``variant``, ``cache_dir``, components,
            ...); unknown ones are refused.
    """
    base_model = os.fspath(base_model)
    check_loading_kwargs(cls, kwargs, "from_base", FROM_BASE_KWARGS)
    conditioning_timesteps, prediction_type = check_scheduler_overrides(
        conditioning_timesteps, prediction_type, kwargs
    )
    for name, value, source_name, source in (
        ("weight_name", weight_name, "student_weights", student_weights),
        ("subfolder", subfolder, "student_weights", student_weights),
        ("lora_weight_name", lora_weight_name, "lora", lora),
    ):
        if value is not None and source is None:
            raise ValueError(
                f"`{name}` picks a file inside `{source_name}`, which is not given; pass both or neither."
            )
    hub_kwargs = hub_kwargs_of(kwargs)
    index = read_json(base_model, "model_index.json", hub_kwargs)
    if index is None:
        raise ValueError(f"{base_model} is not a diffusers pipeline (no model_index.json).")
    family = kwargs.pop("family", None) or detect_family(index, read_pipeline_configs(base_model, index, hub_kwargs))
    if kwargs.get("scheduler") is None:
        scheduler_config = read_json(base_model, "scheduler/scheduler_config.json", hub_kwargs) or {}
        kwargs["scheduler"] = scheduler_for(family, scheduler_config, conditioning_timesteps, prediction_type)
    if student_weights is not None:
        denoiser_name = get_adapter_class(family).denoiser_name
        if kwargs.get(denoiser_name) is not None:
            raise ValueError(
                f"`student_weights` and `{denoiser_name}` both give the student's {denoiser_name}; pass one of them."
            )
        torch_dtype = kwargs.get("torch_dtype", kwargs.get("dtype"))
        kwargs[denoiser_name] = build_denoiser(
            base_model,
            family,
            student_weights,
            weight_name,
            subfolder,
            torch_dtype=torch_dtype if isinstance(torch_dtype, torch.dtype) else None,
            **hub_kwargs,
        )
    pipe = cls.from_pretrained(base_model, family=family, **kwargs)
    if lora is not None:
        pipe.load_student_lora(lora, weight_name=lora_weight_name, lora_scale=lora_scale, **hub_kwargs)
    return pipe
