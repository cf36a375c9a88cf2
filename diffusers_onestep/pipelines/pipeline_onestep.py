"""OneStepPipeline: runs any supported distilled one- or few-step (1-16) student with ``pipe(prompt)``.

The pipeline is written once against the family adapter (:mod:`diffusers_onestep.families`) and the
:class:`~diffusers_onestep.OneStepScheduler`, which carries the student's timesteps and output parameterization;
nothing in it depends on the backbone.
"""

# No `from __future__ import annotations` here: diffusers before 0.37 reads the `__init__` annotations with
# `inspect` and fails on string annotations when loading a folder.
import contextlib
import json
import math
import numbers
import os
import shutil
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from diffusers import (
    AutoencoderDC,
    AutoencoderKL,
    DiffusionPipeline,
    FluxTransformer2DModel,
    ImagePipelineOutput,
    PixArtTransformer2DModel,
    SanaTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
)
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..families import ONESTEP_INDEX_KEY, Condition, FamilyAdapter, detect_family, get_adapter_class
from ..schedulers import OneStepScheduler
from ..storage import publish_entries, staging_path
from . import loading, nasa, serving
from .lora_loading import OneStepLoraLoaderMixin


OUTPUT_TYPES = ("pil", "np", "pt", "latent")
#: OneStepPipeline's settings kept under ``model_index.json``'s ``ONESTEP_INDEX_KEY`` in folders saved under a native
#: class name
ONESTEP_CONFIG_KEYS = ("family", "embedded_guidance_scale", "max_sequence_length")
#: every component slot a family adapter may fill (``FamilyAdapter.component_names``): one denoiser and up to three
#: text encoders with their tokenizers (SD3 has three); a test keeps this covering every registered family
_COMPONENT_NAMES = (
    "vae",
    "unet",
    "transformer",
    "text_encoder",
    "text_encoder_2",
    "text_encoder_3",
    "tokenizer",
    "tokenizer_2",
    "tokenizer_3",
)
#: the tensors a ``callback_on_step_end`` may read and replace, by ``__call__``'s argument names
CALLBACK_TENSOR_INPUTS = ("latents", "denoised", "prompt_embeds", "prompt_attention_mask", "pooled_prompt_embeds")


class _DisabledProgressBar:
    """What :meth:`OneStepPipeline.progress_bar` returns while the bar is switched off."""

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        return False

    def update(self, n: int = 1) -> None:
        pass


@contextlib.contextmanager
def _yielding(context, value):
    """``context`` entered, yielding ``value`` instead of what it yields."""
    with context:
        yield value


def _check_prompt(prompt, name: str = "prompt") -> None:
    if not (
        isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt))
    ):
        raise ValueError(f"`{name}` must be a string or a non-empty list of strings, got {type(prompt).__name__}.")


class OneStepPipeline(DiffusionPipeline, OneStepLoraLoaderMixin):
    r"""Text-to-image generation with a distilled one- or few-step student of SDXL, PixArt-α/Σ, SANA, SANA-Sprint,
    Stable Diffusion 1.x/2.x or FLUX.1.

    Args:
        vae ([`AutoencoderKL`] or [`AutoencoderDC`]): the family's VAE.
        scheduler ([`OneStepScheduler`]): carries the student's conditioning timesteps and parameterization.
        unet ([`UNet2DConditionModel`], *optional*): the student denoiser of UNet families (SDXL, SD 1.x/2.x).
        transformer ([`PixArtTransformer2DModel`], [`SanaTransformer2DModel`] or [`FluxTransformer2DModel`], *optional*):
            the student denoiser of DiT families (PixArt, SANA, FLUX.1).
        text_encoder, text_encoder_2, text_encoder_3 ([`~transformers.PreTrainedModel`], *optional*),
        tokenizer, tokenizer_2, tokenizer_3 ([`~transformers.PreTrainedTokenizerBase`], *optional*): the family's
            text components (its adapter's `text_component_names`); they may be left out when prompts are always
            given as embeddings.
        family (`str`, *optional*): a registered family (`diffusers_onestep.families.FAMILIES`: `"sdxl"`,
            `"pixart_alpha"`, `"pixart_sigma"`, `"sana"`, `"sana_sprint"`, `"sd"`, ...); detected from the components
            when not given.
        embedded_guidance_scale (`float`, *optional*): default guidance of students with embedded guidance
            (SANA-Sprint: 4.5).
        max_sequence_length (`int`, *optional*): text tokens kept (PixArt-α 120, PixArt-Σ and SANA 300).
        dmd2_config (`dict`, *optional*): accepted and ignored: the serving engines' block of a saved folder's
            `model_index.json` (:mod:`diffusers_onestep.pipelines.serving`), which `from_pretrained` reads into the
            scheduler and `save_pretrained` rewrites from it.

    The type hints of the model components are what `DiffusionPipeline.from_pipe` matches components by (a family's
    native pipeline converts with [`~OneStepPipeline.from_pipe`]); a test keeps them covering every family.
    """

    # diffusers' enable_model_cpu_offload walks this chain and skips the names a pipeline leaves empty, so one chain
    # over every slot serves every family: text encoders, then the denoiser, then the VAE.
    model_cpu_offload_seq = "text_encoder->text_encoder_2->text_encoder_3->unet->transformer->vae"
    _optional_components = [n for n in _COMPONENT_NAMES if n != "vae"]
    _callback_tensor_inputs = list(CALLBACK_TENSOR_INPUTS)

    def __init__(
        self,
        vae: Union[AutoencoderKL, AutoencoderDC],
        scheduler: OneStepScheduler,
        unet: Optional[UNet2DConditionModel] = None,
        transformer: Optional[
            Union[PixArtTransformer2DModel, SanaTransformer2DModel, SD3Transformer2DModel, FluxTransformer2DModel]
        ] = None,
        text_encoder: Optional[PreTrainedModel] = None,
        text_encoder_2: Optional[PreTrainedModel] = None,
        text_encoder_3: Optional[PreTrainedModel] = None,
        tokenizer: Optional[PreTrainedTokenizerBase] = None,
        tokenizer_2: Optional[PreTrainedTokenizerBase] = None,
        tokenizer_3: Optional[PreTrainedTokenizerBase] = None,
        family: Optional[str] = None,
        embedded_guidance_scale: Optional[float] = None,
        max_sequence_length: Optional[int] = None,
        dmd2_config: Optional[Dict[str, Any]] = None,
    ):
        super().__init__()
        if not isinstance(scheduler, OneStepScheduler):
            raise ValueError(
                f"OneStepPipeline needs a OneStepScheduler, got {type(scheduler).__name__}; build one with "
                "OneStepScheduler.from_config(scheduler.config, conditioning_timesteps=[...], prediction_type=...)."
            )
        if (unet is None) == (transformer is None):
            raise ValueError("OneStepPipeline needs exactly one denoiser: a `unet` (SDXL) or a `transformer`.")
        self.register_modules(
            vae=vae,
            scheduler=scheduler,
            unet=unet,
            transformer=transformer,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            text_encoder_3=text_encoder_3,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            tokenizer_3=tokenizer_3,
        )
        if family is None:
            denoiser = unet if unet is not None else transformer
            name = "unet" if unet is not None else "transformer"
            family = detect_family({}, {name: {"_class_name": type(denoiser).__name__, **dict(denoiser.config)}})
        adapter_cls = get_adapter_class(family)
        self.register_to_config(
            family=adapter_cls.name,
            embedded_guidance_scale=embedded_guidance_scale,
            max_sequence_length=max_sequence_length,
        )
        self._adapter: Optional[FamilyAdapter] = None
        self._adapter_key = None
        self._image_processor: Optional[VaeImageProcessor] = None
        self._interrupt = False
        self._progress_bar_disabled = False
        #: CPU offloading was enabled through this pipeline's methods (see _compute_device)
        self._offloaded = False

    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        """``ConfigMixin.extract_init_dict`` -- the step in which ``DiffusionPipeline.from_pretrained`` turns a folder's
        ``model_index.json`` into this class's ``__init__`` arguments -- also reading the settings that a folder saved
        under a native class name keeps under ``"_onestep"`` (a key the native class ignores). Overridden here because
        ``DiffusionPipeline.from_pretrained(folder, custom_pipeline=...)`` builds this class without calling any of its
        other methods first; top-level keys and passed arguments win."""
        settings = config_dict.get(ONESTEP_INDEX_KEY) or {}
        lifted = {k: v for k, v in settings.items() if k in ONESTEP_CONFIG_KEYS and k not in config_dict}
        return super().extract_init_dict({**config_dict, **lifted}, **kwargs)

    # ------------------------------------------------------------------------------------------------------------
    # adapter
    # ------------------------------------------------------------------------------------------------------------

    @property
    def adapter(self) -> FamilyAdapter:
        """The family adapter over the current components (rebuilt when a component is swapped)."""
        key = tuple(id(getattr(self, n, None)) for n in _COMPONENT_NAMES + ("scheduler",))
        if self._adapter is None or key != self._adapter_key:
            components = {n: getattr(self, n, None) for n in _COMPONENT_NAMES}
            self._adapter = get_adapter_class(self.config.family)(
                components,
                noise_path=self.scheduler.path,
                prediction_type=self.scheduler.config.prediction_type,
                max_sequence_length=self.config.max_sequence_length,
            )
            self._adapter_key = key
        return self._adapter

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.unet if self.unet is not None else self.transformer

    @property
    def image_processor(self) -> VaeImageProcessor:
        """Post-processing of decoded images, built once per VAE scale factor."""
        factor = self.adapter.vae_scale_factor
        if self._image_processor is None or self._image_processor.config.vae_scale_factor != factor:
            self._image_processor = VaeImageProcessor(vae_scale_factor=factor)
        return self._image_processor

    def _compute_device(self) -> torch.device:
        """The device a call computes on: where the denoiser runs.

        Without offloading that is the denoiser's public ``device`` (its parameters' device, or the onload device of
        diffusers' group offloading). After ``enable_model_cpu_offload`` or ``enable_sequential_cpu_offload`` -- or
        with the denoiser's weights on the meta device, as accelerate's offloading leaves them -- the models rest off
        the accelerator between calls, and only diffusers' ``_execution_device``, the property every diffusers
        pipeline reads and which asks accelerate's hooks, knows where they run: diffusers has no public equivalent.
        This is the one place the library reads it, and only then, because it walks every submodule of every
        component several times (about a tenth of a call on small models). Model-offload hooks attached by hand with
        accelerate's ``cpu_offload_with_hook`` instead of the pipeline's methods are not seen.
        """
        device = self.denoiser.device
        if self._offloaded or device.type == "meta":
            return self._execution_device
        return device

    def enable_model_cpu_offload(self, *args, **kwargs):
        """``DiffusionPipeline.enable_model_cpu_offload``: each model moves to the accelerator when it runs and back
        to the CPU afterwards; calls then compute on diffusers' execution device (see :meth:`_compute_device`)."""
        super().enable_model_cpu_offload(*args, **kwargs)
        self._offloaded = True

    def enable_sequential_cpu_offload(self, *args, **kwargs):
        """``DiffusionPipeline.enable_sequential_cpu_offload`` (submodule by submodule; slower, less memory); calls
        then compute on diffusers' execution device (see :meth:`_compute_device`)."""
        super().enable_sequential_cpu_offload(*args, **kwargs)
        self._offloaded = True

    def remove_all_hooks(self):
        """``DiffusionPipeline.remove_all_hooks``: undoes CPU offloading."""
        super().remove_all_hooks()
        self._offloaded = False

    def enable_fast_path(
        self,
        compile: bool = True,
        channels_last: bool = True,
        fuse_qkv: bool = True,
        compile_vae: bool = True,
        backend: Union[str, Callable] = "inductor",
        mode: Optional[str] = None,
        fullgraph: bool = False,
    ) -> "OneStepPipeline":
        """Opt-in speed-ups for GPUs, through public diffusers and torch APIs only; returns the pipeline.

        * ``fuse_qkv``: ``fuse_qkv_projections()`` on the denoiser and the VAE where diffusers has it (UNet, PixArt and
          SANA transformers, ``AutoencoderKL``): one matmul for the query, key and value projections. Load and fuse a
          student LoRA (``fuse_lora``) before, as with any diffusers model.
        * ``channels_last``: the denoiser's and the VAE's 4-D weights in ``torch.channels_last`` (faster convolutions
          on tensor cores).
        * ``compile``: ``torch.compile`` of the denoiser and (``compile_vae``) the VAE decoder, in place
          (``nn.Module.compile``: the pipeline's components keep their classes, saving and LoRA loading are
          unchanged), with static shapes (``dynamic=False``) and the given ``backend``/``mode`` (e.g.
          ``mode="max-autotune"``).

        Warm-up: the first call at each batch size and resolution compiles (tens of seconds to minutes at real size);
        run one call per shape you will serve before timing or serving. Later calls of the same shape -- any prompt,
        seed or guidance -- reuse the compiled graphs without recompiling. Images stay within floating-point
        tolerance of the default path (fused projections change the order of the sums); ``tests/test_fast_path.py``
        checks both on every family. On the CPU it runs, but it is meant for CUDA GPUs. NASA negative prompts on
        joint-attention students (SD3, FLUX.1) run the denoiser eagerly in those calls (see :mod:`.nasa`).
        """
        modules = [m for m in (self.denoiser, self.vae) if m is not None]
        if fuse_qkv:
            self.adapter.fuse_qkv_projections(self.denoiser)
            if self.vae is not None and hasattr(self.vae, "fuse_qkv_projections"):
                self.vae.fuse_qkv_projections()
        if channels_last:
            for module in modules:
                module.to(memory_format=torch.channels_last)
        if compile:
            options = {"backend": backend, "fullgraph": fullgraph, "dynamic": False}
            if mode is not None:
                options["mode"] = mode
            self.denoiser.compile(**options)
            self._denoiser_compiled = True  # joint-attention NASA runs it eagerly (torch >= 2.6) or refuses
            if compile_vae and self.vae is not None:
                self.vae.decoder.compile(**options)
        return self

    def set_progress_bar_config(self, **kwargs):
        """``DiffusionPipeline.set_progress_bar_config``, also noting whether the bar is switched off
        (``disable=True``), in which case :meth:`progress_bar` builds no ``tqdm`` that would draw nothing."""
        super().set_progress_bar_config(**kwargs)
        self._progress_bar_disabled = kwargs.get("disable") is True

    def progress_bar(self, iterable=None, total=None):
        """``DiffusionPipeline.progress_bar``, with a no-op stand-in while the bar is switched off: a ``tqdm`` that draws
        nothing costs about 0.1 ms a call, several percent of a call on small models."""
        if iterable is None and total is not None and self._progress_bar_disabled:
            return _DisabledProgressBar()
        return super().progress_bar(iterable=iterable, total=total)

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    def _uses_embedded_guidance(self) -> bool:
        return self.adapter.has_embedded_guidance and bool(getattr(self.denoiser.config, "guidance_embeds", False))

    # ------------------------------------------------------------------------------------------------------------
    # text
    # ------------------------------------------------------------------------------------------------------------

    def encode_prompt(
        self,
        prompt: Union[str, List[str]],
        device: Optional[torch.device] = None,
        num_images_per_prompt: int = 1,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        r"""Encode prompts as the family's own pipeline does (its public `encode_prompt`), into the embeddings
        `__call__` takes instead of `prompt`, so they can be computed once and reused.

        Args:
            prompt (`str` or `list[str]`): the prompt(s).
            device (`torch.device`, *optional*): where the embeddings are computed and returned; defaults to the
                device the pipeline's calls compute on.
            num_images_per_prompt (`int`): repeat each prompt's embeddings this many times (in the batch order of
                `__call__`: all images of the first prompt, then the second's, ...).

        Returns:
            `(prompt_embeds, prompt_attention_mask, pooled_prompt_embeds)`, for `__call__`'s arguments of those names:
            the token embeddings `[B, L, D]`, the attention mask `[B, L]` of PixArt and SANA (`None` for SDXL) and
            SDXL's pooled embedding `[B, D']` (`None` for PixArt and SANA), in the text encoders' dtype.

        Example:

        ```py
        prompt_embeds, prompt_attention_mask, pooled_prompt_embeds = pipe.encode_prompt("a photo of a cat")
        image = pipe(prompt_embeds=prompt_embeds, prompt_attention_mask=prompt_attention_mask,
                     pooled_prompt_embeds=pooled_prompt_embeds).images[0]
        ```
        """
        _check_prompt(prompt)
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"`num_images_per_prompt` must be a positive integer, got {num_images_per_prompt!r}.")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        device = self._compute_device() if device is None else device
        condition = self.adapter.encode_prompt(prompts, device=device)
        if num_images_per_prompt > 1:
            condition = condition.repeat_interleave(num_images_per_prompt)
        return condition.embeds, condition.mask, condition.pooled

    # ------------------------------------------------------------------------------------------------------------
    # inputs
    # ------------------------------------------------------------------------------------------------------------

    def _check_condition_tensors(self, prompt_embeds, prompt_attention_mask, pooled_prompt_embeds, prefix="") -> None:
        """Check pre-computed text conditions (``prompt_embeds`` and its mask and pooled embedding, or the negative
        prompt's with ``prefix="negative_"``) against the family's layout and the denoiser's widths."""
        adapter = self.adapter
        family = adapter.display_name
        provided = {"embeds": prompt_embeds, "mask": prompt_attention_mask, "pooled": pooled_prompt_embeds}
        arg_names = {
            "embeds": f"{prefix}prompt_embeds",
            "mask": f"{prefix}prompt_attention_mask",
            "pooled": f"{prefix}pooled_prompt_embeds",
        }
        embeds_name = arg_names["embeds"]
        for field in adapter.required_condition_fields:
            if provided[field] is None:
                raise ValueError(f"{family} students need `{arg_names[field]}` together with `{embeds_name}`.")
        layouts = {"embeds": "(batch, tokens, width)", "mask": "(batch, tokens)", "pooled": "(batch, width)"}
        for field, value in provided.items():
            if value is None:
                continue
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"`{arg_names[field]}` must be a torch.Tensor, got {type(value).__name__}.")
            if value.ndim != layouts[field].count(",") + 1:
                raise ValueError(
                    f"`{arg_names[field]}` must have the shape {layouts[field]}, got {tuple(value.shape)}."
                )
        batch_size = prompt_embeds.shape[0]
        for field, value in provided.items():
            if value is not None and value.shape[0] != batch_size:
                raise ValueError(
                    f"`{arg_names[field]}` has batch size {value.shape[0]} but `{embeds_name}` has {batch_size}."
                )
        # The denoiser's input projections fix these widths; a mismatch would fail deep inside its forward.
        widths = {"embeds": adapter.text_embedding_dim, "pooled": adapter.pooled_embedding_dim}
        for field, embedding_width in widths.items():  # not `width`: that is the image's
            value = provided[field]
            if value is not None and embedding_width is not None and value.shape[-1] != embedding_width:
                raise ValueError(
                    f"`{arg_names[field]}` must be {embedding_width} wide for this {family} student's "
                    f"{adapter.denoiser_name}, got shape {tuple(value.shape)}; encode prompts with "
                    "`pipe.encode_prompt`."
                )
        mask = provided["mask"]
        if mask is not None and mask.shape[1] != prompt_embeds.shape[1]:
            raise ValueError(
                f"`{arg_names['mask']}` must have one entry per token of `{embeds_name}` "
                f"({prompt_embeds.shape[1]}), got shape {tuple(mask.shape)}."
            )

    def check_inputs(
        self,
        prompt,
        height: int,
        width: int,
        num_inference_steps: Optional[int] = None,
        timesteps: Optional[Sequence[float]] = None,
        num_images_per_prompt: int = 1,
        prompt_embeds: Optional[torch.Tensor] = None,
        prompt_attention_mask: Optional[torch.Tensor] = None,
        pooled_prompt_embeds: Optional[torch.Tensor] = None,
        guidance_scale: Optional[float] = None,
        negative_prompt=None,
        negative_prompt_embeds: Optional[torch.Tensor] = None,
        generator=None,
        latents: Optional[torch.Tensor] = None,
        output_type: str = "pil",
        callback_on_step_end_tensor_inputs: Optional[Sequence[str]] = None,
        callback_on_step_end=None,
        negative_scale: Optional[float] = None,
        negative_prompt_attention_mask: Optional[torch.Tensor] = None,
        negative_pooled_prompt_embeds: Optional[torch.Tensor] = None,
    ) -> None:
        """Raise one actionable ``ValueError`` for the first invalid argument."""
        adapter = self.adapter
        family = adapter.display_name
        multiple = adapter.resolution_multiple
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or value <= 0 or value % multiple:
                raise ValueError(
                    f"`{name}` must be a positive multiple of {multiple} (VAE factor {adapter.vae_scale_factor} × "
                    f"patch size {adapter.patch_size}) for this {family} student, got {value!r}."
                )
        if timesteps is not None:
            if num_inference_steps is not None and num_inference_steps != len(timesteps):
                raise ValueError("Pass either `num_inference_steps` or `timesteps`, not both.")
            self.scheduler.check_timesteps(timesteps)
        else:
            self.scheduler.select_timesteps(num_inference_steps)
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"`num_images_per_prompt` must be a positive integer, got {num_images_per_prompt!r}.")

        if (prompt is None) == (prompt_embeds is None):
            raise ValueError(
                "Pass exactly one of `prompt` and `prompt_embeds`, got "
                + ("both." if prompt is not None else "neither.")
            )
        if prompt is not None:
            _check_prompt(prompt)
            batch_size = 1 if isinstance(prompt, str) else len(prompt)
        else:
            self._check_condition_tensors(prompt_embeds, prompt_attention_mask, pooled_prompt_embeds)
            batch_size = prompt_embeds.shape[0]

        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("Pass at most one of `negative_prompt` and `negative_prompt_embeds`, got both.")
        if negative_prompt_embeds is None:
            for value, name in (
                (negative_prompt_attention_mask, "negative_prompt_attention_mask"),
                (negative_pooled_prompt_embeds, "negative_pooled_prompt_embeds"),
            ):
                if value is not None:
                    raise ValueError(f"`{name}` goes with `negative_prompt_embeds`; pass both or neither.")
        if negative_prompt is None and negative_prompt_embeds is None and negative_scale is not None:
            raise ValueError(
                "`negative_scale` weighs the negative prompt's attention (NASA) and needs `negative_prompt`; pass "
                "one or remove `negative_scale`."
            )
        if negative_prompt is not None or negative_prompt_embeds is not None:
            if not adapter.negative_prompt_attention:
                raise ValueError(
                    f"This {family} student takes no negative prompt: its family adapter names no attention for NASA "
                    "to steer (`negative_prompt_attention`); remove `negative_prompt`."
                )
            if (
                adapter.negative_prompt_attention == "joint"
                and getattr(self, "_denoiser_compiled", False)
                and not hasattr(torch.compiler, "set_stance")
            ):
                raise ValueError(
                    f"NASA negative prompts on {family} run the compiled denoiser eagerly, which needs torch >= 2.6 "
                    f"(`torch.compiler.set_stance`), found {torch.__version__}; call without `enable_fast_path`'s "
                    "compile or remove `negative_prompt`."
                )
            if negative_prompt_embeds is not None:
                self._check_condition_tensors(
                    negative_prompt_embeds, negative_prompt_attention_mask, negative_pooled_prompt_embeds, "negative_"
                )
                if negative_prompt_embeds.shape[0] != batch_size:
                    raise ValueError(
                        f"`negative_prompt_embeds` must have one row per prompt ({batch_size}), got batch size "
                        f"{negative_prompt_embeds.shape[0]}."
                    )
            else:
                _check_prompt(negative_prompt, "negative_prompt")
                if not isinstance(negative_prompt, str) and len(negative_prompt) != batch_size:
                    raise ValueError(
                        f"`negative_prompt` must be one string or one per prompt ({batch_size}), got "
                        f"{len(negative_prompt)}."
                    )
            if negative_scale is not None and (
                isinstance(negative_scale, bool)
                or not isinstance(negative_scale, numbers.Real)
                or not math.isfinite(negative_scale)
                or negative_scale < 0
            ):
                raise ValueError(f"`negative_scale` must be a finite number >= 0, got {negative_scale!r}.")
        if guidance_scale is not None:
            if (
                isinstance(guidance_scale, bool)
                or not isinstance(guidance_scale, numbers.Real)
                or not math.isfinite(guidance_scale)
            ):
                raise ValueError(f"`guidance_scale` must be a finite number, got {guidance_scale!r}.")
            if self._uses_embedded_guidance():
                if guidance_scale < 0:
                    raise ValueError(f"`guidance_scale` must be non-negative, got {guidance_scale}.")
            elif guidance_scale > 1:
                raise ValueError(
                    f"This {family} student was distilled with its guidance built in and takes no `guidance_scale` "
                    f"(got {guidance_scale}); remove the argument."
                )

        total = batch_size * num_images_per_prompt
        generators = generator if isinstance(generator, list) else [generator] if generator is not None else []
        for item in generators:
            if not isinstance(item, torch.Generator):
                raise ValueError(
                    f"`generator` must be a torch.Generator or a list of one per image, got {type(item).__name__} "
                    f"{item!r}; for a seed, pass torch.Generator().manual_seed(seed)."
                )
        if isinstance(generator, list) and len(generator) != total:
            raise ValueError(f"Got {len(generator)} generators for a batch of {total} images; pass one per image.")
        if latents is not None:
            if not isinstance(latents, torch.Tensor):
                raise ValueError(f"`latents` must be a torch.Tensor, got {type(latents).__name__}.")
            expected = adapter.latent_shape(total, height, width)
            if tuple(latents.shape) != tuple(expected):
                raise ValueError(f"`latents` must have shape {tuple(expected)}, got {tuple(latents.shape)}.")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}.")
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise ValueError(
                f"`callback_on_step_end` must be a function `callback(pipe, i, t, tensors)` or a diffusers callback "
                f"object, got {type(callback_on_step_end).__name__}."
            )
        if isinstance(callback_on_step_end_tensor_inputs, str):
            raise ValueError(
                "`callback_on_step_end_tensor_inputs` must be a list of names such as "
                f"[{callback_on_step_end_tensor_inputs!r}], got the string {callback_on_step_end_tensor_inputs!r}."
            )
        for name in callback_on_step_end_tensor_inputs or ():
            if name not in self._callback_tensor_inputs:
                raise ValueError(
                    f"`callback_on_step_end_tensor_inputs` may name {', '.join(self._callback_tensor_inputs)}, "
                    f"got {name!r}."
                )

    # ------------------------------------------------------------------------------------------------------------
    # call
    # ------------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompt: Union[str, List[str], None] = None,
        num_inference_steps: Optional[int] = None,
        timesteps: Optional[List[float]] = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        num_images_per_prompt: int = 1,
        generator: Union[torch.Generator, List[torch.Generator], None] = None,
        latents: Optional[torch.Tensor] = None,
        prompt_embeds: Optional[torch.Tensor] = None,
        prompt_attention_mask: Optional[torch.Tensor] = None,
        pooled_prompt_embeds: Optional[torch.Tensor] = None,
        guidance_scale: Optional[float] = None,
        negative_prompt: Union[str, List[str], None] = None,
        negative_prompt_embeds: Optional[torch.Tensor] = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Union[
            Callable[["OneStepPipeline", int, Any, Dict], Dict], PipelineCallback, MultiPipelineCallbacks, None
        ] = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        use_resolution_binning: Optional[bool] = None,
        negative_scale: Optional[float] = None,
        negative_prompt_attention_mask: Optional[torch.Tensor] = None,
        negative_pooled_prompt_embeds: Optional[torch.Tensor] = None,
    ):
        r"""Generate images.

        Args:
            prompt (`str` or `list[str]`): the prompt(s); or pass `prompt_embeds`.
            num_inference_steps (`int`, *optional*): number of steps, at most the number of timesteps the student
                was trained at; `None` runs them all (the student's own setting).
            timesteps (`list[float]`, *optional*): explicit conditioning timesteps overriding the stored ones.
            height, width (`int`, *optional*): image size; defaults to the denoiser's native size.
            num_images_per_prompt (`int`): images per prompt.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*): makes sampling deterministic.
            latents (`torch.Tensor`, *optional*): the initial noise, unit variance, of the latent shape.
            prompt_embeds, prompt_attention_mask, pooled_prompt_embeds (*optional*): pre-computed text conditions, as
                [`~OneStepPipeline.encode_prompt`] returns them (SDXL needs `pooled_prompt_embeds`; PixArt and SANA
                need `prompt_attention_mask`).
            guidance_scale (`float`, *optional*): only for students with embedded guidance (SANA-Sprint); other
                students had classifier-free guidance distilled into them and refuse values above 1.
            negative_prompt (`str` or `list[str]`, *optional*): what to steer away from, by NASA (SNOOPI, arXiv
                2412.02687): every cross-attention layer outputs `out_proj(Attn(Q, K+, V+) − λ·Attn(Q, K−, V−))`
                with λ = `negative_scale` (see `diffusers_onestep.pipelines.nasa`); costs the denoiser's stem up to
                its first cross-attention once per call. SD3/SD3.5 and FLUX.1 (joint attention; our extension, the
                paper defines cross-attention only): the negative prompt runs as a second stream on the same
                latents, and in every joint layer the image tokens' attention result subtracts λ times their
                attention to the negative prompt's text keys and values of that layer; costs a doubled denoiser
                batch at every step.
            negative_prompt_embeds, negative_prompt_attention_mask, negative_pooled_prompt_embeds (*optional*): the
                negative prompt pre-computed, as [`~OneStepPipeline.encode_prompt`] returns it (one row per prompt,
                the same fields `prompt_embeds` needs); instead of `negative_prompt`, with the same effect.
            output_type (`str`): `"pil"`, `"np"`, `"pt"` or `"latent"` (the denoised latents).
            return_dict (`bool`): return an [`ImagePipelineOutput`] instead of a tuple.
            callback_on_step_end (`Callable`, [`~diffusers.callbacks.PipelineCallback`] or
                [`~diffusers.callbacks.MultiPipelineCallbacks`], *optional*): called as `callback(pipe, i, t, tensors)`
                after each step with the tensors named in `callback_on_step_end_tensor_inputs` (for callback objects:
                their `tensor_inputs`); every tensor of `_callback_tensor_inputs` it returns replaces the pipeline's
                from the next step on (`latents`: the next step's input; `denoised`: the current `x0`, the output
                after the last step; `prompt_embeds`, `prompt_attention_mask`, `pooled_prompt_embeds`: the condition).
            callback_on_step_end_tensor_inputs (`list[str]`): which of `_callback_tensor_inputs` the callback reads.
            use_resolution_binning (`bool`, *optional*): generate at the nearest aspect-ratio bin of the family's
                native pipeline and resize the image back, as that pipeline does; default: on where it bins this
                denoiser's own resolution (see `FamilyAdapter.binned_size`).
            negative_scale (`float`, *optional*): NASA's λ >= 0, only with a negative prompt; default
                `nasa.DEFAULT_NEGATIVE_SCALE` (0.1, measured on the digits benchmark: the paper states none). 0 gives the image
                without the negative prompt.

        Returns:
            [`ImagePipelineOutput`] or `(images,)`.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        adapter = self.adapter
        # 0. Default size: the denoiser's native resolution; generated at the native pipeline's aspect-ratio bin where
        #    that pipeline bins, the decoded image resized back to the requested size in step 7
        height = adapter.default_resolution if height is None else height
        width = adapter.default_resolution if width is None else width
        requested_size = (height, width)
        height, width = adapter.binned_size(height, width, use_resolution_binning)

        # 1. Check inputs
        self.check_inputs(
            prompt,
            height,
            width,
            num_inference_steps,
            timesteps,
            num_images_per_prompt,
            prompt_embeds,
            prompt_attention_mask,
            pooled_prompt_embeds,
            guidance_scale,
            negative_prompt,
            negative_prompt_embeds,
            generator,
            latents,
            output_type,
            callback_on_step_end_tensor_inputs,
            callback_on_step_end,
            negative_scale=negative_scale,
            negative_prompt_attention_mask=negative_prompt_attention_mask,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
        )
        self._interrupt = False
        device = self._compute_device()
        dtype = self.denoiser.dtype

        # 2. Encode the prompt
        if prompt_embeds is None:
            prompt_embeds, prompt_attention_mask, pooled_prompt_embeds = self.encode_prompt(prompt, device=device)
        condition = Condition(prompt_embeds, prompt_attention_mask, pooled_prompt_embeds).to(device)
        if num_images_per_prompt > 1:
            condition = condition.repeat_interleave(num_images_per_prompt)
        batch = condition.batch_size

        # 3. Timesteps: the student's own unless overridden
        self.scheduler.set_timesteps(
            None if timesteps is not None else num_inference_steps,
            device=device,
            timesteps=timesteps,
            image_seq_len=adapter.image_seq_len(height, width),  # read by resolution-dependent paths (FLUX.1)
        )
        self.scheduler.set_begin_index(0)
        self._num_timesteps = len(self.scheduler.timesteps)

        # 4. Initial noise, unit variance, in float32
        shape = adapter.latent_shape(batch, height, width)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        latents = latents.to(device=device, dtype=torch.float32)

        # 5. Embedded guidance (SANA-Sprint); None for guidance-distilled students
        guidance = None
        if self._uses_embedded_guidance():
            scale = guidance_scale
            if scale is None:
                scale = self.config.embedded_guidance_scale or adapter.default_embedded_guidance_scale
            guidance = torch.full((batch,), float(scale), device=device)

        # 6. Sampling: predict x0 at each conditioning timestep, re-noise to the next (OneStepScheduler.step)
        condition = condition.to(dtype=dtype)
        denoised = latents
        steering = contextlib.nullcontext(self._denoise)
        if negative_prompt is not None or negative_prompt_embeds is not None:
            if negative_prompt_embeds is not None:
                negative_prompt = Condition(
                    negative_prompt_embeds, negative_prompt_attention_mask, negative_pooled_prompt_embeds
                )
            steering = self._negative_away_steer_attention(
                negative_prompt, batch, num_images_per_prompt, latents.to(dtype), condition, guidance, negative_scale
            )
        with steering as denoise, self.progress_bar(total=self._num_timesteps) as progress_bar:
            for i, t in enumerate(self.scheduler.timesteps):
                if self.interrupt:
                    break
                model_output = denoise(latents.to(dtype), self.scheduler.path_timesteps[i], condition, guidance)
                latents, denoised = self.scheduler.step(
                    model_output.float(), t, latents, generator=generator, return_dict=False
                )
                if callback_on_step_end is not None:
                    latents, denoised, condition = self._run_callback(
                        callback_on_step_end,
                        callback_on_step_end_tensor_inputs,
                        i,
                        t,
                        latents,
                        denoised,
                        condition,
                        device,
                        dtype,
                    )
                progress_bar.update()

        # 7. Decode the final x0
        if output_type == "latent":
            image = denoised
        else:
            image = adapter.decode(denoised)
            image = adapter.resize_to_requested(image, *requested_size)
            image = self.image_processor.postprocess(image, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)

    def _denoise(self, latents, t, condition, guidance):
        """One denoiser prediction of the sampling loop (without a negative prompt)."""
        return self.adapter.denoise(latents, t, condition, guidance=guidance)

    def _negative_away_steer_attention(
        self, negative_prompt, batch, num_images_per_prompt, latents, condition, guidance, negative_scale
    ):
        """The NASA context for one call, yielding the sampling loop's ``denoise(latents, t, condition, guidance)``
        (see :mod:`.nasa`). Cross-attention families: the cross-attention states of the negative prompt, recorded at
        the first cross-attention layer of a denoiser pass that stops there (they depend on neither the latents nor the
        time in these families), then every processor wrapped until the context exits. Joint-attention families: every
        forward runs on ``[positive; negative]`` and keeps the positive half, each joint layer steering the positive
        image queries away from the negative text keys and values. ``negative_prompt`` is text or an encoded
        :class:`Condition` (from ``negative_prompt_embeds``), one row per prompt."""
        device = latents.device
        if isinstance(negative_prompt, Condition):
            negative = negative_prompt
        else:
            negative_prompts = (
                [negative_prompt] * (batch // num_images_per_prompt)
                if isinstance(negative_prompt, str)
                else negative_prompt
            )
            negative = self.adapter.encode_prompt(list(negative_prompts), device=device)
        if num_images_per_prompt > 1:
            negative = negative.repeat_interleave(num_images_per_prompt)
        negative = negative.to(device).to(dtype=condition.embeds.dtype)
        scale = nasa.DEFAULT_NEGATIVE_SCALE if negative_scale is None else float(negative_scale)
        if self.adapter.negative_prompt_attention == "joint":
            if scale == 0:  # exactly the plain image, without the doubled batch (whose sums may round differently)
                return contextlib.nullcontext(self._denoise)
            return nasa.joint_negative_away_steer_attention(
                self.denoiser, self.adapter.joint_attention_layout, self._denoise, negative, scale
            )
        t = self.scheduler.path_timesteps[0]
        states = nasa.record_cross_attention_states(
            self.denoiser, lambda: self.adapter.denoise(latents, t, negative, guidance=guidance)
        )
        return _yielding(nasa.negative_away_steer_attention(self.denoiser, states, scale), self._denoise)

    def _run_callback(self, callback, tensor_inputs, i, t, latents, denoised, condition, device, dtype):
        """Call ``callback_on_step_end`` with the named tensors; take back every tensor of ``_callback_tensor_inputs``
        it returns, as diffusers' pipelines do (``callback_outputs.pop(name, current)``)."""
        current = {
            "latents": latents,
            "denoised": denoised,
            "prompt_embeds": condition.embeds,
            "prompt_attention_mask": condition.mask,
            "pooled_prompt_embeds": condition.pooled,
        }
        outputs = callback(self, i, t, {name: current[name] for name in tensor_inputs})
        self._check_callback_outputs(outputs, current)
        updated = {name: (outputs or {}).get(name, value) for name, value in current.items()}
        if any(
            updated[name] is not current[name]
            for name in ("prompt_embeds", "prompt_attention_mask", "pooled_prompt_embeds")
        ):
            condition = Condition(
                updated["prompt_embeds"], updated["prompt_attention_mask"], updated["pooled_prompt_embeds"]
            ).to(device=device, dtype=dtype)
        return updated["latents"], updated["denoised"], condition

    def _check_callback_outputs(self, outputs, current: Dict[str, Any]) -> None:
        """What ``callback_on_step_end`` returned must be ``None`` or a dict of replacement tensors: anything else would
        be ignored silently or fail a step later (a tensor's truth value, a key of a tensor no step reads)."""
        if outputs is None:
            return
        if not isinstance(outputs, dict):
            raise ValueError(
                "`callback_on_step_end` must return a dict of tensors to replace (or None), got "
                f"{type(outputs).__name__}; return e.g. {{'latents': latents}}."
            )
        for name, value in outputs.items():
            if name not in current:
                raise ValueError(
                    f"`callback_on_step_end` returned {name!r}, which the pipeline does not read; it may return "
                    f"{', '.join(self._callback_tensor_inputs)}."
                )
            if not isinstance(value, torch.Tensor):
                if value is None and current[name] is None:
                    continue
                raise ValueError(
                    f"`callback_on_step_end` returned {type(value).__name__} for `{name}`; return a torch.Tensor."
                )
            if name in ("latents", "denoised") and value.shape != current[name].shape:
                raise ValueError(
                    f"`callback_on_step_end` returned `{name}` of shape {tuple(value.shape)}, but the pipeline's has "
                    f"shape {tuple(current[name].shape)}."
                )

    # ------------------------------------------------------------------------------------------------------------
    # loading and saving
    # ------------------------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        r"""Load a student from a folder or Hub id.

        Accepted sources:

        * a folder saved by :meth:`save_pretrained` (or by the training script), native-class or not;
        * a LoRA student folder (``pytorch_lora_weights.safetensors`` + ``onestep_lora.json``);
        * one of the known public one- and few-step checkpoints (``presets.PRESETS``, e.g. ``"tianweiy/DMD2"``),
          assembled and scheduled as its source (model card, README or demo) runs it (pass ``weight_name=`` to pick a
          variant);
        * any SDXL / PixArt / SANA / SANA-Sprint / SD 1.x-2.x pipeline folder or id, run at `conditioning_timesteps`
          (default: the pure-noise end of its path) -- e.g. a teacher at one step, the baseline a student must beat.

        Keyword arguments, the same for every kind of source: ``conditioning_timesteps`` and ``prediction_type`` (the
        student's scheduler, replacing a stored one) or ``scheduler``; ``weight_name`` (a preset's variant);
        ``base_model`` (another base for a LoRA student or a preset built on one); components by name and this class's
        settings (``family``, ``max_sequence_length``, ``embedded_guidance_scale``); and
        ``DiffusionPipeline.from_pretrained``'s own (``torch_dtype``, ``variant``, ``revision``, ...). Anything else,
        and a setting that does not apply to the source, is refused with one sentence before anything loads.
        """
        return loading.load_pipeline(cls, pretrained_model_name_or_path, **kwargs)

    @classmethod
    def _from_pretrained_folder(cls, pretrained_model_name_or_path, **kwargs):
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def from_base(cls, base_model, **kwargs) -> "OneStepPipeline":
        r"""Build a student from a base pipeline plus denoiser-only weights or a LoRA (DMD2, Lightning, Hyper-SD, ...).

        See :func:`diffusers_onestep.pipelines.loading.load_from_base` for the arguments.
        """
        return loading.load_from_base(cls, base_model, **kwargs)

    @classmethod
    def from_pipe(cls, pipeline: DiffusionPipeline, **kwargs) -> "OneStepPipeline":
        r"""A student over another pipeline's components, shared without copying (`DiffusionPipeline.from_pipe`):
        e.g. `OneStepPipeline.from_pipe(StableDiffusionXLPipeline.from_pretrained(...), conditioning_timesteps=[399])`.

        A pipeline without a [`OneStepScheduler`] gets one on its scheduler's noise path, as
        [`~OneStepPipeline.from_pretrained`] does for a native folder: at `conditioning_timesteps` (default: the
        pure-noise end of the path) predicting `prediction_type` (default: what the scheduler's config says). The
        family is read from the pipeline's class (PixArt-Σ and -α transformers look alike) unless `family=` is given.
        Other keyword arguments are `DiffusionPipeline.from_pipe`'s (components to replace, `torch_dtype`, ...). As
        diffusers recommends for any pipeline made with `from_pipe`, call `enable_model_cpu_offload()` (or another
        memory-saving method) on the new pipeline itself: offloading set up on the source pipeline does not carry over.
        """
        conditioning_timesteps = kwargs.pop("conditioning_timesteps", None)
        prediction_type = kwargs.pop("prediction_type", None)
        if not isinstance(pipeline, OneStepPipeline):
            if kwargs.get("family") is None:
                denoisers = {
                    name: {"_class_name": type(module).__name__, **dict(module.config)}
                    for name, module in pipeline.components.items()
                    if name in ("unet", "transformer") and module is not None
                }
                kwargs["family"] = detect_family({"_class_name": type(pipeline).__name__}, denoisers)
        family = kwargs.get("family") or pipeline.config.family
        needs_scheduler = (
            not isinstance(pipeline.scheduler, OneStepScheduler)
            or conditioning_timesteps is not None
            or prediction_type is not None
        )
        if "scheduler" not in kwargs and needs_scheduler:
            kwargs["scheduler"] = loading.scheduler_for(
                family, dict(pipeline.scheduler.config), conditioning_timesteps, prediction_type
            )
        return super().from_pipe(pipeline, **kwargs)

    def load_student_lora(
        self, path_or_state_dict, weight_name: Optional[str] = None, lora_scale: float = 1.0, **hub_kwargs
    ) -> None:
        """Load a LoRA student (file, folder, Hub id or state dict) into the denoiser and fuse it."""
        from ..lora import load_and_fuse_lora

        load_and_fuse_lora(
            self.adapter, path_or_state_dict, weight_name=weight_name, lora_scale=lora_scale, **hub_kwargs
        )

    def save_pretrained(
        self, save_directory: Union[str, os.PathLike], safe_serialization: bool = True, **kwargs
    ) -> None:
        """Save the student; the folder is written to a temporary sibling and moved into place when complete.

        Into an existing folder only the saved entries move, each component folder as a whole and
        ``model_index.json`` last (removed first, so the folder is never loadable half-written): everything else in
        it (a training run's checkpoints and logs, a user's notes) stays. A path that is a file is refused.

        For families whose own diffusers pipeline can drive :class:`OneStepScheduler` (the adapter's
        ``native_interop_pipeline_class_name``: SDXL, PixArt-α/Σ, SANA, SD 1.x/2.x), ``model_index.json`` names that pipeline class, so plain ``DiffusionPipeline.from_pretrained(folder)`` loads
        the student too (with ``diffusers_onestep`` installed); SANA-Sprint folders name ``OneStepPipeline``.

        Flow-matching students also get the serving engines' ``dmd2_config`` block in ``model_index.json``
        (:mod:`diffusers_onestep.pipelines.serving`); a native class loading the folder logs that it ignores it.
        """
        if not safe_serialization:
            raise ValueError("diffusers-onestep saves safetensors only; drop `safe_serialization=False`.")
        if kwargs.get("push_to_hub"):
            raise ValueError("Save first, then upload with `diffusers_onestep.hub.push_to_hub(folder, repo_id)`.")
        loaded = self.get_list_adapters()
        if loaded:
            # the denoiser's weights would be saved under peft's wrapped names, which no loader reads back
            raise ValueError(
                f"Style LoRAs {sorted(sum(loaded.values(), []))} are loaded: call `pipe.fuse_lora()` then "
                "`pipe.unload_lora_weights()` to save them baked in, or `pipe.unload_lora_weights()` to save without."
            )
        save_directory = os.fspath(save_directory)
        if os.path.lexists(save_directory) and not os.path.isdir(save_directory):
            raise ValueError(
                f"{save_directory} is a file; `save_pretrained` writes a folder, so name a new or "
                "existing folder instead."
            )
        os.makedirs(os.path.dirname(os.path.abspath(save_directory)), exist_ok=True)
        staging = staging_path(save_directory)
        try:
            super().save_pretrained(staging, safe_serialization=True, **kwargs)
            self._finish_model_index(staging)
            # Into an existing folder only our own entries move (each component folder as a whole, model_index.json
            # last): a training run's checkpoints, logs or a user's notes next to them stay, as plain diffusers keeps
            # them.
            publish_entries(staging, save_directory, commit_file="model_index.json")
        finally:
            if os.path.isdir(staging):
                shutil.rmtree(staging, ignore_errors=True)

    def _finish_model_index(self, folder: str) -> None:
        """One rewrite of the ``model_index.json`` diffusers wrote: the native class name and our settings for
        families with a native interop class, the serving engines' ``dmd2_config`` block for flow-matching students
        (:mod:`.serving`)."""
        adapter = self.adapter
        native = adapter.native_interop_pipeline_class_name
        guidance = 1.0
        if adapter.has_embedded_guidance:
            guidance = self.config.embedded_guidance_scale or adapter.default_embedded_guidance_scale or 1.0
        block = serving.dmd2_config_for(self.scheduler, guidance)
        if native is None and block is None:
            return
        path = os.path.join(folder, "model_index.json")
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
        if native is not None:
            import inspect

            import diffusers

            accepted = set(inspect.signature(getattr(diffusers, native).__init__).parameters)
            index = {k: v for k, v in index.items() if k.startswith("_") or (k in accepted and v != [None, None])}
            index["_class_name"] = native
            # Our own settings under a "_" key: the native class ignores it silently (a plain key would be warned
            # about on every load), and OneStepPipeline.from_pretrained reads it back (PixArt-Σ vs -α,
            # max_sequence_length).
            index[ONESTEP_INDEX_KEY] = {
                k: self.config[k] for k in ONESTEP_CONFIG_KEYS if self.config.get(k) is not None
            }
        if block is not None:
            index[serving.DMD2_CONFIG_KEY] = block
        with open(path, "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2, sort_keys=True)
            f.write("\n")
