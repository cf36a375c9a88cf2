"""LoRA I/O that works the same for every family, including PixArt whose transformer has no ``PeftAdapterMixin``.

Files are read with diffusers' own ``lora_state_dict`` of the family's LoRA-loader pipeline (so diffusers, peft
and Kohya key layouts are all understood, diffusers-facts §5.1) and injected with peft's functional API
(``inject_adapter_in_model`` + ``set_peft_model_state_dict``, diffusers-facts §5.3). Only ``.safetensors`` files are
read. Fusing merges with peft's ``safe_merge`` (which checks for non-finite weights) and removes the LoRA layers.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Tuple, Union

import torch

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def read_lora_state_dict(
    adapter, path_or_state_dict: Union[str, Dict[str, torch.Tensor]], weight_name: Optional[str] = None, **hub_kwargs
) -> Tuple[Dict[str, torch.Tensor], Optional[Dict[str, float]], Optional[dict]]:
    """``(state_dict, network_alphas, metadata)`` of a LoRA file/folder/Hub repo, keys without the family prefix."""
    import diffusers

    loader = getattr(diffusers, adapter.lora_pipeline_class_name)
    kwargs = dict(hub_kwargs)
    if adapter.name == "sdxl":
        kwargs["unet_config"] = adapter.denoiser.config
    out = loader.lora_state_dict(
        path_or_state_dict, weight_name=weight_name, use_safetensors=True, return_lora_metadata=True, **kwargs
    )
    # UNet loaders return (state_dict, network_alphas, metadata); transformer loaders (state_dict, metadata).
    state_dict, network_alphas, metadata = out if len(out) == 3 else (out[0], None, out[1])
    prefix = adapter.denoiser_name + "."
    if any(k.startswith(prefix) for k in state_dict):
        state_dict = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if network_alphas:
        network_alphas = {k.removeprefix(prefix): v for k, v in network_alphas.items() if k.startswith(prefix)}
    if metadata:
        metadata = {k.removeprefix(prefix): v for k, v in metadata.items() if k.startswith(prefix)} or metadata
    if not state_dict:
        raise ValueError(f"The LoRA file holds no weights for the {adapter.display_name} {adapter.denoiser_name}.")
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
    from diffusers.utils.peft_utils import _create_lora_config
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    if "lora_A" not in next(iter(state_dict)):
        state_dict = convert_unet_state_dict_to_peft(state_dict)
    rank = {f"^{k}": v.shape[1] for k, v in state_dict.items() if "lora_B" in k and v.ndim > 1}
    config = _create_lora_config(
        state_dict, network_alphas, metadata, rank, model_state_dict=model.state_dict(), adapter_name=adapter_name
    )
    inject_adapter_in_model(config, model, adapter_name=adapter_name)
    incompatible = set_peft_model_state_dict(model, state_dict, adapter_name=adapter_name)
    unexpected = [k for k in getattr(incompatible, "unexpected_keys", []) if "lora_" in k]
    if unexpected:
        raise ValueError(
            f"{len(unexpected)} LoRA weights match no layer of the {type(model).__name__} (first: {unexpected[0]}); "
            "the LoRA was made for a different model."
        )


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

