"""Style LoRAs on a loaded student: ``load_lora_weights``, ``set_adapters``, ``fuse_lora``/``unfuse_lora``,
``unload_lora_weights``, with the names and call conventions of diffusers' own LoRA loader mixins.

One implementation serves every family. diffusers' loaders work through the denoiser's ``PeftAdapterMixin``, which
PixArt's transformer does not have, so adapters are injected with peft's functional API (:mod:`diffusers_onestep.lora`)
and managed with peft's public layer methods (``set_adapter``, ``set_scale``, ``merge``/``unmerge``,
``enable_adapters``) through diffusers' ``peft_utils`` helpers. Files are read by the family's own diffusers LoRA
reader, so a LoRA written by the native pipeline's ``save_lora_weights`` (``unet.``/``transformer.`` keys), a peft
state dict, or a Kohya file loads as it does in diffusers.

Not to be confused with a LoRA *student* (a student saved as a LoRA on its teacher), which
:meth:`~diffusers_onestep.OneStepPipeline.load_student_lora` fuses into the denoiser for good.
"""

from __future__ import annotations

import os
import warnings
from typing import Dict, List, Optional, Sequence, Union

import torch

from .. import lora as lora_io


#: keyword arguments of ``load_lora_weights`` that locate the file (those of diffusers' ``lora_state_dict``)
_HUB_KWARGS = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision", "subfolder")


class OneStepLoraLoaderMixin:
    """Load, stack, weight, fuse, unfuse and unload LoRA adapters on the pipeline's denoiser (UNet or transformer).

    Behaviour follows diffusers' LoRA loader mixins: the adapter loaded last is the active one; :meth:`set_adapters`
    activates several with weights; :meth:`fuse_lora` merges the active adapters into the base weights (same output,
    no LoRA cost per call) and :meth:`unfuse_lora` subtracts them again (equal to the weights before fusing up to
    float rounding); :meth:`unload_lora_weights` removes every LoRA layer, keeping what is fused. One difference:
    ``fuse_lora(lora_scale=s)`` followed by ``unfuse_lora()`` restores the adapters' weights as they were before
    fusing, where diffusers leaves them multiplied by ``s``.
    """

    # ------------------------------------------------------------------------------------------------------------
    # loading
    # ------------------------------------------------------------------------------------------------------------

    def load_lora_weights(
        self,
        pretrained_model_name_or_path_or_dict: Union[str, os.PathLike, Dict[str, torch.Tensor]],
        adapter_name: Optional[str] = None,
        weight_name: Optional[str] = None,
        **kwargs,
    ) -> None:
        r"""Load a LoRA into the denoiser as adapter ``adapter_name``, which becomes the active adapter.

        Args:
            pretrained_model_name_or_path_or_dict (`str`, `os.PathLike` or `dict`): a `.safetensors` file, a folder
                holding one (`pytorch_lora_weights.safetensors` unless `weight_name` says otherwise), a Hub repo id,
                or a state dict (diffusers keys with the `unet.`/`transformer.` prefix, or peft keys).
            adapter_name (`str`, *optional*): the adapter's name; defaults to `"default_<n>"`, `n` the number of
                adapters already loaded.
            weight_name (`str`, *optional*): the file inside a folder or repo.
            cache_dir, force_download, proxies, local_files_only, token, revision, subfolder: as in diffusers'
                `load_lora_weights`, for Hub repos.
        """
        unexpected = sorted(set(kwargs) - set(_HUB_KWARGS))
        if unexpected:
            raise TypeError(
                f"load_lora_weights() got unexpected keyword arguments: {', '.join(unexpected)} (it takes "
                f"adapter_name, weight_name, {', '.join(_HUB_KWARGS)})."
            )
        self._refuse_if_fused("load_lora_weights")
        denoiser = self.denoiser
        loaded = lora_io.lora_adapter_names(denoiser)
        if adapter_name is None:
            index = len(loaded)
            while f"default_{index}" in loaded:
                index += 1
            adapter_name = f"default_{index}"
        elif adapter_name in loaded:
            raise ValueError(
                f"The {self.adapter.denoiser_name} already has an adapter named {adapter_name!r}; pass another "
                f"`adapter_name` or call delete_adapters({adapter_name!r}) first."
            )
        state_dict, network_alphas, metadata = lora_io.read_lora_state_dict(
            self.adapter, pretrained_model_name_or_path_or_dict, weight_name, **kwargs
        )
        with warnings.catch_warnings():
            # peft warns that a second adapter joins the model's peft_config: stacking adapters is the point here.
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            lora_io.inject_lora(denoiser, state_dict, adapter_name, network_alphas, metadata)

    # ------------------------------------------------------------------------------------------------------------
    # which adapters run, and how strongly
    # ------------------------------------------------------------------------------------------------------------

    def get_list_adapters(self) -> Dict[str, List[str]]:
        """The loaded adapters by component, e.g. ``{"unet": ["style", "detail"]}`` (empty when none)."""
        names = lora_io.lora_adapter_names(self.denoiser)
        return {self.adapter.denoiser_name: names} if names else {}

    def get_active_adapters(self) -> List[str]:
        """The adapters the denoiser runs now (``[]`` when none is loaded)."""
        layers = lora_io.lora_layers(self.denoiser)
        return list(layers[0][1].active_adapters) if layers else []

    def set_adapters(
        self,
        adapter_names: Union[str, Sequence[str]],
        adapter_weights: Union[float, Sequence[Optional[float]], None] = None,
    ) -> None:
        r"""Run exactly the adapters ``adapter_names``, each at its weight (the factor on its ``lora_alpha / r``).

        Args:
            adapter_names (`str` or `list[str]`): loaded adapters.
            adapter_weights (`float` or `list[float]`, *optional*): one weight for all, or one per adapter
                (`None` entries mean 1.0); default 1.0 each. Weight 0 leaves an adapter active with no effect.
        """
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self._require_adapters(names)
        if adapter_weights is None or isinstance(adapter_weights, (int, float)):
            weights = [1.0 if adapter_weights is None else float(adapter_weights)] * len(names)
        elif isinstance(adapter_weights, dict):
            raise ValueError(
                "Per-block LoRA weights (a dict) are not supported; give one number per adapter in `adapter_weights`."
            )
        else:
            weights = [1.0 if w is None else float(w) for w in adapter_weights]
            if len(weights) != len(names):
                raise ValueError(
                    f"Got {len(weights)} adapter weights for {len(names)} adapters ({', '.join(names)}); pass one "
                    "weight per adapter."
                )
        self._refuse_if_fused("set_adapters")
        from diffusers.utils.peft_utils import set_weights_and_activate_adapters

        set_weights_and_activate_adapters(self.denoiser, names, weights)

    def disable_lora(self) -> None:
        """Run the denoiser without its LoRA layers (they stay loaded; :meth:`enable_lora` turns them back on)."""
        from diffusers.utils.peft_utils import set_adapter_layers

        set_adapter_layers(self.denoiser, enabled=False)

    def enable_lora(self) -> None:
        """Undo :meth:`disable_lora`."""
        from diffusers.utils.peft_utils import set_adapter_layers

        set_adapter_layers(self.denoiser, enabled=True)

    # ------------------------------------------------------------------------------------------------------------
    # fusing
    # ------------------------------------------------------------------------------------------------------------

    def fuse_lora(
        self,
        lora_scale: float = 1.0,
        safe_fusing: bool = False,
        adapter_names: Optional[Sequence[str]] = None,
    ) -> None:
        r"""Merge adapters into the denoiser's base weights: the same output, without the LoRA layers' cost per call.

        Args:
            lora_scale (`float`): factor on the merged adapters' current weights.
            safe_fusing (`bool`): check the merged weights for NaN/inf before keeping them (peft's `safe_merge`).
            adapter_names (`list[str]`, *optional*): the adapters to merge; default: the active ones.
        """
        names = self.get_active_adapters() if adapter_names is None else list(adapter_names)
        self._require_adapters(names)
        scales = self._scales_before_fusing()
        for layer_name, layer in lora_io.lora_layers(self.denoiser):
            present = [n for n in names if n in layer.lora_A and n not in layer.merged_adapters]
            if not present:
                continue
            if lora_scale != 1.0:
                for name in present:
                    # The factor lives in the layer's scaling while merged (unmerge subtracts the same update);
                    # unfuse_lora puts the scaling back.
                    scales.setdefault((layer_name, name), layer.scaling[name])
                    layer.scaling[name] *= lora_scale
            layer.merge(safe_merge=safe_fusing, adapter_names=present)

    def unfuse_lora(self) -> None:
        """Subtract every merged adapter from the base weights again; the adapters stay loaded with their weights."""
        scales = self._scales_before_fusing()
        for layer_name, layer in lora_io.lora_layers(self.denoiser):
            if layer.merged:
                layer.unmerge()
            for name in list(layer.scaling):
                if (layer_name, name) in scales:
                    layer.scaling[name] = scales.pop((layer_name, name))
        scales.clear()

    # ------------------------------------------------------------------------------------------------------------
    # removing
    # ------------------------------------------------------------------------------------------------------------

    def delete_adapters(self, adapter_names: Union[str, Sequence[str]]) -> None:
        """Remove the named (unfused) adapters; the others stay as they are."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self._require_adapters(names)
        layers = lora_io.lora_layers(self.denoiser)
        merged = sorted({n for _, layer in layers for n in layer.merged_adapters} & set(names))
        if merged:
            raise ValueError(f"Adapters {', '.join(merged)} are fused; call unfuse_lora() before deleting them.")
        denoiser = self.denoiser
        for name in names:
            lora_io.delete_lora_adapter(denoiser, name)
        if not lora_io.lora_adapter_names(denoiser):
            lora_io.remove_lora_layers(denoiser)

    def unload_lora_weights(self) -> None:
        """Remove every LoRA layer from the denoiser. Fused adapters stay in the weights (``fuse_lora`` then
        ``unload_lora_weights`` bakes a LoRA in); unfused ones are gone."""
        denoiser = self.denoiser
        if lora_io.lora_layers(denoiser):
            lora_io.remove_lora_layers(denoiser)
        self._scales_before_fusing().clear()

    # ------------------------------------------------------------------------------------------------------------
    # helpers
    # ------------------------------------------------------------------------------------------------------------

    def _require_adapters(self, names: Sequence[str]) -> None:
        loaded = lora_io.lora_adapter_names(self.denoiser)
        missing = [n for n in names if n not in loaded]
        if missing:
            have = f"loaded: {', '.join(loaded)}" if loaded else "none is loaded"
            raise ValueError(f"No LoRA adapter named {', '.join(map(repr, missing))} ({have}).")

    def _refuse_if_fused(self, method: str) -> None:
        # While an adapter is merged, peft runs a layer as its base weights alone (a newly loaded adapter would act
        # only on the layers nothing is merged into), and unmerge subtracts the update at the weights of that moment
        # (changing them would corrupt the base weights).
        if any(layer.merged for _, layer in lora_io.lora_layers(self.denoiser)):
            raise ValueError(
                f"Call unfuse_lora() before {method}(): adapters are fused into the weights (or unload_lora_weights() "
                "to keep them fused for good)."
            )

    def _scales_before_fusing(self) -> Dict:
        """``{(layer name, adapter): scaling}`` that :meth:`fuse_lora` changed, for :meth:`unfuse_lora` to restore."""
        scales = getattr(self, "_lora_scales_before_fusing", None)
        if scales is None:
            scales = {}
            self._lora_scales_before_fusing = scales
        return scales
