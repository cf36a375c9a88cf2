"""LoRA I/O that works the same for every family, including PixArt whose transformer has no ``PeftAdapterMixin``.

Files are read with diffusers' own ``lora_state_dict`` of the family's LoRA-loader pipeline (so diffusers, peft
and Kohya key layouts are all understood) and injected with peft's functional API (``inject_adapter_in_model`` +
``set_peft_model_state_dict``, which needs no diffusers loader mixin). Only ``.safetensors`` files are read. Fusing
merges with peft's ``safe_merge`` (which checks for non-finite weights) and removes the LoRA layers.

Two uses share these functions: LoRA *students* (fused into the denoiser on load, :func:`load_and_fuse_lora`), and
style LoRAs that users stack, weight, fuse and unfuse on a loaded student
(:class:`~diffusers_onestep.pipelines.lora_loading.OneStepLoraLoaderMixin`).
"""

from __future__ import annotations

import inspect
import logging
import os
import re
from typing import Dict, Iterable, List, Optional, Tuple, Union

import torch


logger = logging.getLogger(__name__)

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
#: first key segments by which diffusers LoRA files name the pipeline component a weight belongs to
_COMPONENT_PREFIXES = {"unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "prior"}


def lora_metadata_supported(adapter) -> bool:
    """Whether the installed diffusers stores and reads LoRA adapter metadata (rank, alpha, targets) in LoRA files: its
    family loader's ``save_lora_weights`` takes ``<denoiser>_lora_adapter_metadata`` (diffusers 0.33 has no such
    argument and its ``lora_state_dict`` no ``return_lora_metadata``)."""
    import diffusers

    loader = getattr(diffusers, adapter.lora_pipeline_class_name)
    return f"{adapter.denoiser_name}_lora_adapter_metadata" in inspect.signature(loader.save_lora_weights).parameters


def check_lora_source(source, weight_name: Optional[str] = None, subfolder: Optional[str] = None) -> None:
    """Refuse, in one sentence, a local LoRA path that does not exist or a folder without the file asked for.

    Hub repo ids pass through (diffusers downloads them); a path that cannot be a repo id and is not on disk is a
    typo, which diffusers would report as a Hub or offline-mode error.
    """
    if not isinstance(source, (str, os.PathLike)):
        return
    path = os.fspath(source)
    if os.path.isfile(path):
        return
    if os.path.isdir(path):
        folder = os.path.join(path, subfolder) if subfolder else path
        if weight_name is not None:
            if not os.path.isfile(os.path.join(folder, weight_name)):
                raise ValueError(f"The folder {folder} has no LoRA file {weight_name}.")
        elif not os.path.isdir(folder) or not any(n.endswith(".safetensors") for n in os.listdir(folder)):
            raise ValueError(
                f"The folder {folder} has no .safetensors LoRA file (diffusers names it {LORA_WEIGHT_NAME})."
            )
        return
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(path)
    except HFValidationError:
        raise ValueError(f"No LoRA file or folder at {path}.") from None
    if path.endswith(".safetensors"):
        raise ValueError(f"No LoRA file at {path}.")


def read_lora_state_dict(
    adapter, path_or_state_dict: Union[str, Dict[str, torch.Tensor]], weight_name: Optional[str] = None, **hub_kwargs
) -> Tuple[Dict[str, torch.Tensor], Optional[Dict[str, float]], Optional[dict]]:
    """``(state_dict, network_alphas, metadata)`` of a LoRA file/folder/Hub repo, keys without the family prefix.

    Weights for other pipeline components (e.g. an SDXL LoRA's ``text_encoder.`` keys) are left out with a warning:
    only the denoiser takes LoRAs here.
    """
    import diffusers

    check_lora_source(path_or_state_dict, weight_name, hub_kwargs.get("subfolder"))
    loader = getattr(diffusers, adapter.lora_pipeline_class_name)
    with_metadata = lora_metadata_supported(adapter)
    kwargs = {**hub_kwargs, **adapter.lora_state_dict_kwargs()}
    if weight_name is None and isinstance(path_or_state_dict, str):
        # Name a local file as diffusers would find it: before 0.40 its loaders refuse to look for it when offline.
        if os.path.isfile(path_or_state_dict):
            path_or_state_dict, weight_name = os.path.split(os.path.abspath(path_or_state_dict))
        elif os.path.isfile(os.path.join(path_or_state_dict, LORA_WEIGHT_NAME)):
            weight_name = LORA_WEIGHT_NAME
    if with_metadata:
        kwargs["return_lora_metadata"] = True
    out = loader.lora_state_dict(path_or_state_dict, weight_name=weight_name, use_safetensors=True, **kwargs)
    # UNet loaders return (state_dict, network_alphas), transformer loaders the state_dict alone; with
    # return_lora_metadata the metadata comes last.
    out = [out] if isinstance(out, dict) else list(out)
    metadata = out.pop() if with_metadata else None
    state_dict, network_alphas = out[0], (out[1] if len(out) > 1 else None)
    prefix = adapter.denoiser_name + "."
    components = sorted({k.split(".", 1)[0] for k in state_dict} & _COMPONENT_PREFIXES)
    if components:  # keys name their pipeline component: keep the denoiser's (none left: a LoRA for another model)
        state_dict = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if network_alphas:
        network_alphas = {k.removeprefix(prefix): v for k, v in network_alphas.items() if k.startswith(prefix)}
    if metadata:
        metadata = {k.removeprefix(prefix): v for k, v in metadata.items() if k.startswith(prefix)} or metadata
    if not state_dict:
        found = f" (it holds weights for: {', '.join(components)})" if components else ""
        raise ValueError(
            f"The LoRA file holds no weights for the {adapter.display_name} {adapter.denoiser_name}{found}."
        )
    others = [c for c in components if c != adapter.denoiser_name]
    if others:
        logger.warning(
            "The LoRA file also holds weights for %s, which are not loaded: only the %s takes LoRAs here.",
            ", ".join(others),
            adapter.denoiser_name,
        )
    return state_dict, network_alphas or None, metadata or None


def inject_lora(
    model: torch.nn.Module,
    state_dict: Dict[str, torch.Tensor],
    adapter_name: str,
    network_alphas: Optional[Dict[str, float]] = None,
    metadata: Optional[dict] = None,
) -> None:
    """Add adapter ``adapter_name`` to ``model`` with the weights of ``state_dict`` (diffusers or peft key names)."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from diffusers.utils.peft_utils import get_peft_kwargs
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    # Convert when ANY key is not in peft form. diffusers' own loaders look at the first key only, and
    # `convert_state_dict_to_diffusers` (what the LCM-LoRA SDXL example saves) writes a mixed file: attention layers as
    # `to_q.lora.down`, every other layer as `conv1.lora_A`. Sorted, a conv key comes first and all attention weights
    # would be dropped without an error.
    if any(".lora_A." not in k and ".lora_B." not in k for k in state_dict if "lora" in k):
        state_dict = convert_unet_state_dict_to_peft(state_dict)
    rank = {f"^{k}": v.shape[1] for k, v in state_dict.items() if "lora_B" in k and v.ndim > 1}
    # The file's own adapter metadata when it has some (diffusers' LoRA format), else the shapes and alphas; the same
    # rule as diffusers' loaders, through its public get_peft_kwargs (called with the arguments every supported
    # diffusers takes; later releases added keywords that its computation does not use).
    if metadata is None:
        metadata = get_peft_kwargs(rank, network_alphas, state_dict)
    config = LoraConfig(**_known_lora_options(LoraConfig, metadata))
    had_peft_layers = _has_peft_layers(model)
    try:
        inject_adapter_in_model(config, model, adapter_name=adapter_name)
    except ValueError as error:
        if "not found in the base model" not in str(error):
            raise
        raise ValueError(
            f"The LoRA targets layers the {type(model).__name__} does not have (e.g. "
            f"{sorted(config.target_modules)[0]!r}); it was made for a different model."
        ) from None
    try:
        try:
            incompatible = set_peft_model_state_dict(model, state_dict, adapter_name=adapter_name)
        except RuntimeError as error:
            mismatch = re.search(r"size mismatch for (\S+?):", str(error))
            if mismatch is None:
                raise
            raise ValueError(
                f"The LoRA's weights do not fit the {type(model).__name__} (size mismatch at {mismatch.group(1)}); "
                "it was made for a different model."
            ) from None
        unexpected = [k for k in getattr(incompatible, "unexpected_keys", []) if "lora" in k]
        if unexpected:
            raise ValueError(
                f"{len(unexpected)} LoRA weights match no layer of the {type(model).__name__} (first: "
                f"{unexpected[0]}); the LoRA was made for a different model."
            )
    except BaseException:
        _remove_adapter(model, adapter_name, had_peft_layers)
        raise


def _has_peft_layers(model: torch.nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


def lora_layers(model: torch.nn.Module) -> List[Tuple[str, torch.nn.Module]]:
    """``(name, layer)`` of every peft LoRA layer of ``model``."""
    from peft.tuners.lora import LoraLayer

    return [(name, module) for name, module in model.named_modules() if isinstance(module, LoraLayer)]


def lora_adapter_names(model: torch.nn.Module) -> List[str]:
    """The LoRA adapters present in ``model``'s layers, in the order they were added."""
    names: Dict[str, None] = {}
    for _, layer in lora_layers(model):
        names.update(dict.fromkeys(layer.lora_A))
    return list(names)


def remove_lora_layers(model: torch.nn.Module) -> None:
    """Replace every peft layer of ``model`` by its base layer (weights merged into it stay merged) and drop the peft
    config. A model with diffusers' ``PeftAdapterMixin`` does it through its own ``unload_lora``, so that diffusers'
    record of loaded adapters stays true; PixArt's transformer has no such mixin."""
    from diffusers.loaders import PeftAdapterMixin
    from diffusers.utils.peft_utils import recurse_remove_peft_layers

    if isinstance(model, PeftAdapterMixin):
        model.unload_lora()
        return
    recurse_remove_peft_layers(model)
    if hasattr(model, "peft_config"):
        del model.peft_config


def delete_lora_adapter(model: torch.nn.Module, adapter_name: str) -> None:
    """Remove one adapter's LoRA weights and config from ``model``, leaving the other adapters as they are."""
    from peft.functional import delete_adapter

    delete_adapter(model, adapter_name, prefix="lora_")
    peft_config = getattr(model, "peft_config", None)
    if isinstance(peft_config, dict):
        peft_config.pop(adapter_name, None)


def _remove_adapter(model: torch.nn.Module, adapter_name: str, had_peft_layers: bool) -> None:
    """Undo a failed injection: leave the model as it was, with no half-loaded adapter behind."""
    if had_peft_layers:  # other adapters live in the model (training roles, style LoRAs): remove only this one
        delete_lora_adapter(model, adapter_name)
    else:
        remove_lora_layers(model)


def fuse_lora(model: torch.nn.Module, adapter_names: Iterable[str], lora_scale: float = 1.0) -> None:
    """Merge the named adapters into the base weights (``safe_merge``) and remove every LoRA layer."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    names = list(adapter_names)
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            if lora_scale != 1.0:
                module.scale_layer(lora_scale)
            present = [n for n in names if n in getattr(module, "lora_A", {})]
            if present:
                module.merge(safe_merge=True, adapter_names=present)
    remove_lora_layers(model)


def load_and_fuse_lora(
    adapter,
    path_or_state_dict,
    weight_name: Optional[str] = None,
    lora_scale: float = 1.0,
    adapter_name: str = "onestep_student",
    **hub_kwargs,
) -> None:
    """Load a LoRA student into the adapter's denoiser and fuse it (a one-step student runs at full speed)."""
    loaded = lora_adapter_names(adapter.denoiser)
    if loaded:
        # Fusing a student removes every LoRA layer, and with them the style LoRAs' unfused weights.
        raise ValueError(
            f"Load the LoRA student before any other LoRA: the {adapter.denoiser_name} carries {', '.join(loaded)}; "
            "call unload_lora_weights() first."
        )
    state_dict, alphas, metadata = read_lora_state_dict(adapter, path_or_state_dict, weight_name, **hub_kwargs)
    inject_lora(adapter.denoiser, state_dict, adapter_name, alphas, metadata)
    fuse_lora(adapter.denoiser, [adapter_name], lora_scale)


def fold_lora_scale(state_dict: Dict[str, torch.Tensor], config: Dict) -> Dict[str, torch.Tensor]:
    """The LoRA ``state_dict`` with each layer's scale ``lora_alpha / r`` multiplied into its ``lora_B`` weights, so
    that a reader without the file's adapter metadata (which then takes ``lora_alpha = r``, scale 1) computes the same
    update ``scale * B A`` (Hu et al. 2021, arXiv 2106.09685, eq. 3 with the alpha/r scaling of its section 4.1).

    ``config`` is the adapter's ``LoraConfig`` as a dict; per-layer rank or alpha patterns, rsLoRA and DoRA are
    refused, the update then not being ``B A`` times one number.
    """
    if any(config.get(k) for k in ("rank_pattern", "alpha_pattern", "use_rslora", "use_dora")):
        raise ValueError(
            "This LoRA has per-layer ranks or alphas, rsLoRA or DoRA, which a LoRA file without adapter metadata "
            "cannot describe; install a diffusers release whose save_lora_weights stores LoRA metadata."
        )
    scale = float(config["lora_alpha"]) / float(config["r"])
    if scale == 1.0:
        return dict(state_dict)
    return {k: (v * scale if ".lora_B." in k else v) for k, v in state_dict.items()}


def _known_lora_options(config_class, metadata: dict) -> dict:
    """``metadata`` without the options the installed peft's ``config_class`` does not have, when they are unset.

    A newer peft writes every field of its LoraConfig into the adapter metadata (e.g. peft 0.19's ``kasa_config:
    None``), which an older peft's LoraConfig refuses as an unexpected keyword; left at their defaults they change
    nothing, so they are dropped. An option that is set cannot be honoured by this peft, so it is refused.
    """
    import dataclasses

    known = {field.name for field in dataclasses.fields(config_class)}
    unknown = {k: v for k, v in metadata.items() if k not in known}
    in_use = sorted(k for k, v in unknown.items() if v not in (None, False, {}, [], ""))
    if in_use:
        import peft

        raise ValueError(
            f"The LoRA uses {', '.join(in_use)}, which peft {peft.__version__} does not have; upgrade peft to load it."
        )
    return {k: v for k, v in metadata.items() if k in known}


def lora_metadata(config) -> Dict[str, str]:
    """A ``LoraConfig`` as the JSON metadata diffusers stores beside LoRA weights."""
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in data.items()}


def lora_keys(path: str) -> List[str]:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return list(f.keys())
