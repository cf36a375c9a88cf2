"""LoRA I/O that works the same for every family, including PixArt whose transformer has no ``PeftAdapterMixin``.

Files are read with diffusers' own ``lora_state_dict`` of the family's LoRA-loader pipeline (so diffusers, peft
and Kohya key layouts are all understood) and injected with peft's functional API (``inject_adapter_in_model`` +
``set_peft_model_state_dict``, which needs no diffusers loader mixin). Only ``.safetensors`` files are read. Fusing
merges with peft's ``safe_merge`` (which checks for non-finite weights) and removes the LoRA layers.
"""

from __future__ import annotations

import os
import re
from typing import Dict, Iterable, List, Optional, Tuple, Union

import torch

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
#: first key segments by which diffusers LoRA files name the pipeline component a weight belongs to
_COMPONENT_PREFIXES = {"unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "prior"}


def read_lora_state_dict(
    adapter, path_or_state_dict: Union[str, Dict[str, torch.Tensor]], weight_name: Optional[str] = None, **hub_kwargs
) -> Tuple[Dict[str, torch.Tensor], Optional[Dict[str, float]], Optional[dict]]:
    """``(state_dict, network_alphas, metadata)`` of a LoRA file/folder/Hub repo, keys without the family prefix."""
    import diffusers

    loader = getattr(diffusers, adapter.lora_pipeline_class_name)
    kwargs = {**hub_kwargs, **adapter.lora_state_dict_kwargs()}
    if weight_name is None and isinstance(path_or_state_dict, str):
        # Name a local file as diffusers would find it: before 0.40 its loaders refuse to look for it when offline.
        if os.path.isfile(path_or_state_dict):
            path_or_state_dict, weight_name = os.path.split(os.path.abspath(path_or_state_dict))
        elif os.path.isfile(os.path.join(path_or_state_dict, LORA_WEIGHT_NAME)):
            weight_name = LORA_WEIGHT_NAME
    out = loader.lora_state_dict(
        path_or_state_dict, weight_name=weight_name, use_safetensors=True, return_lora_metadata=True, **kwargs
    )
    # UNet loaders return (state_dict, network_alphas, metadata); transformer loaders (state_dict, metadata).
    state_dict, network_alphas, metadata = out if len(out) == 3 else (out[0], None, out[1])
    prefix = adapter.denoiser_name + "."
    components = sorted({k.split(".", 1)[0] for k in state_dict} & _COMPONENT_PREFIXES)
    if components:  # keys name their pipeline component: keep the denoiser's (none left: a LoRA for another model)
        state_dict = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if network_alphas:
        network_alphas = {k.removeprefix(prefix): v for k, v in network_alphas.items() if k.startswith(prefix)}
    if metadata:
        metadata = {k.removeprefix(prefix): v for k, v in metadata.items() if k.startswith(prefix)} or metadata
    if not state_dict:
        found = f" (it holds weights for: {', '.join(components)})" if components else ""
        raise ValueError(
            f"The LoRA file holds no weights for the {adapter.display_name} {adapter.denoiser_name}{found}."
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
    # rule as diffusers' loaders, through its public get_peft_kwargs.
    if metadata is None:
        metadata = get_peft_kwargs(rank, network_alpha_dict=network_alphas, peft_state_dict=state_dict)
    config = LoraConfig(**metadata)
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


def _remove_adapter(model: torch.nn.Module, adapter_name: str, had_peft_layers: bool) -> None:
    """Undo a failed injection: leave the model as it was, with no half-loaded adapter behind."""
    if had_peft_layers:  # other adapters live in the model (training roles): remove only this one
        from peft.functional import delete_adapter

        delete_adapter(model, adapter_name, prefix="lora_")
        return
    from diffusers.utils.peft_utils import recurse_remove_peft_layers

    recurse_remove_peft_layers(model)
    for attribute in ("peft_config", "_hf_peft_config_loaded"):
        model.__dict__.pop(attribute, None)  # instance attributes set by the injection; class defaults stay


def fuse_lora(model: torch.nn.Module, adapter_names: Iterable[str], lora_scale: float = 1.0) -> None:
    """Merge the named adapters into the base weights (``safe_merge``) and remove every LoRA layer."""
    from diffusers.utils.peft_utils import recurse_remove_peft_layers
    from peft.tuners.tuners_utils import BaseTunerLayer

    names = list(adapter_names)
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            if lora_scale != 1.0:
                module.scale_layer(lora_scale)
            present = [n for n in names if n in getattr(module, "lora_A", {})]
            if present:
                module.merge(safe_merge=True, adapter_names=present)
    recurse_remove_peft_layers(model)
    if hasattr(model, "peft_config"):
        del model.peft_config
    if hasattr(model, "_hf_peft_config_loaded"):
        model._hf_peft_config_loaded = False


def load_and_fuse_lora(
    adapter,
    path_or_state_dict,
    weight_name: Optional[str] = None,
    lora_scale: float = 1.0,
    adapter_name: str = "onestep_student",
    **hub_kwargs,
) -> None:
    """Load a LoRA student into the adapter's denoiser and fuse it (a one-step student runs at full speed)."""
    state_dict, alphas, metadata = read_lora_state_dict(adapter, path_or_state_dict, weight_name, **hub_kwargs)
    inject_lora(adapter.denoiser, state_dict, adapter_name, alphas, metadata)
    fuse_lora(adapter.denoiser, [adapter_name], lora_scale)


def lora_metadata(config) -> Dict[str, str]:
    """A ``LoraConfig`` as the JSON metadata diffusers stores beside LoRA weights."""
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in data.items()}


def lora_keys(path: str) -> List[str]:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return list(f.keys())

