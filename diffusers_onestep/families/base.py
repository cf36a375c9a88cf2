"""The backbone-family adapter interface -- the only abstraction the rest of the project sees of a backbone.

An adapter turns one family's diffusers components into a canonical denoiser (k-diffusion ``external.py`` and EDM's
``*Precond`` are the models for this): encode prompts into a :class:`Condition`, call a denoiser at
``(x_t, t, condition)`` and return its *native* prediction, describe the noise path, shape latents, decode them.
Times passed to :meth:`FamilyAdapter.denoise` are the path's natural times (see :mod:`..parameterization`); the
adapter converts them to what the network expects.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from .. import parameterization as param


#: the UNet LoRA targets of DMD2's --generator_lora and of diffusers' LCM-LoRA training examples (SD 1.5 and SDXL):
#: attention, feed-forward, resnet convolutions and the time embedding
UNET_LORA_TARGET_MODULES = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "conv_shortcut",
    "downsamplers.0.conv",
    "upsamplers.0.conv",
    "time_emb_proj",
)


@dataclass(frozen=True)
class TrainingDefaults:
    """What a distillation run of this family uses where the user sets nothing (resolved once by
    :func:`diffusers_onestep.distill.config.resolve`). Each adapter cites where its values come from.

    Attributes:
        student_timesteps: the student's conditioning time(s) in the natural units of the teacher's noise path.
        guidance_scale: teacher classifier-free (or embedded) guidance ``w`` of the distribution-matching target.
        learning_rate_full, learning_rate_lora: student learning rate of a full copy / a LoRA student.
        gan_weight: generator GAN weight when the method trains a discriminator.
        lora_rank, lora_alpha: LoRA shape of the student and critic adapters.
        critic_updates_per_student: DMD2's two time-scale update rule (Yin et al. 2024b, arXiv 2405.14867).
        method_defaults: per method name, the settings a method's published runs on this family used: fields of
            :class:`~diffusers_onestep.distill.config.MethodConfig` plus ``learning_rate`` (both roles); they
            fill what the user left unset before the generic values above.
    """

    student_timesteps: Tuple[float, ...]
    guidance_scale: float
    learning_rate_full: float
    learning_rate_lora: float
    gan_weight: float = 5e-3
    lora_rank: int = 64
    lora_alpha: float = 64
    critic_updates_per_student: int = 5
    method_defaults: Dict[str, Dict[str, Any]] = field(default_factory=dict)

    def learning_rate(self, student_kind: str, method: Optional[str] = None) -> float:
        published = self.method_defaults.get(method or "", {}).get("learning_rate")
        if published is not None:
            return float(published)
        return self.learning_rate_lora if student_kind == "lora" else self.learning_rate_full


@dataclass(frozen=True)
class JointTokenLayout:
    """Where the text tokens sit in the token sequence of one joint-attention layer (for NASA negative prompts on
    MMDiTs, :func:`diffusers_onestep.pipelines.nasa.joint_negative_away_steer_attention`).

    Attributes:
        text_first: the sequence is ``[text; image]`` (else ``[image; text]``).
        text_from_encoder_states: the text tokens are the layer's ``encoder_hidden_states`` (a double-stream /
            MMDiT layer); else the layer gets no encoder states and its ``hidden_states`` already hold the text
            tokens, as many as the prompt embeddings have (a single-stream layer).
    """

    text_first: bool
    text_from_encoder_states: bool


@dataclass
class Condition:
    """Encoded text condition of a batch. Every tensor has the batch on dim 0.

    Attributes:
        embeds: token embeddings ``[B, L, D]`` fed to cross-attention.
        mask: attention mask ``[B, L]`` (PixArt, SANA); ``None`` where the family uses none (SDXL).
        pooled: pooled text embedding ``[B, D']`` (SDXL's ``text_embeds``).
    """

    embeds: torch.Tensor
    mask: Optional[torch.Tensor] = None
    pooled: Optional[torch.Tensor] = None

    def _tensors(self) -> Dict[str, Optional[torch.Tensor]]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def _map(self, fn) -> "Condition":
        return replace(self, **{k: (fn(v) if v is not None else None) for k, v in self._tensors().items()})

    @property
    def batch_size(self) -> int:
        return self.embeds.shape[0]

    def to(self, device=None, dtype=None) -> "Condition":
        def move(t: torch.Tensor) -> torch.Tensor:
            # Masks stay integer/bool; only floating tensors take the dtype.
            return t.to(device=device, dtype=dtype if (dtype is not None and t.is_floating_point()) else None)

        tensors = self._tensors()
        moved = {k: (move(v) if v is not None else None) for k, v in tensors.items()}
        if all(moved[k] is v for k, v in tensors.items()):
            return self  # nothing to move (the usual case in a pipeline call), as Tensor.to returns itself
        return replace(self, **moved)

    def detach(self) -> "Condition":
        return self._map(lambda t: t.detach())

    def repeat_interleave(self, repeats: int) -> "Condition":
        return self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def __getitem__(self, index) -> "Condition":
        if isinstance(index, int):
            index = slice(index, index + 1)
        return self._map(lambda t: t[index])

    @staticmethod
    def cat(conditions: Sequence["Condition"]) -> "Condition":
        first = conditions[0]
        merged = {}
        for name, value in first._tensors().items():
            merged[name] = None if value is None else torch.cat([getattr(c, name) for c in conditions], dim=0)
        return Condition(**merged)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {k: v for k, v in self._tensors().items() if v is not None}

    @classmethod
    def from_state_dict(cls, tensors: Dict[str, torch.Tensor]) -> "Condition":
        return cls(**{f.name: tensors.get(f.name) for f in fields(cls)})


class FamilyAdapter:
    """Canonical interface over one backbone family.

    Subclasses set the class attributes -- everything the rest of the project knows about a family is one of them --
    implement :meth:`_encode`, :meth:`_unconditional` and :meth:`_forward`, and are registered with
    :func:`diffusers_onestep.families.register_family`.
    """

    #: registry key, e.g. ``"sdxl"``
    name: str = ""
    #: human name used in messages
    display_name: str = ""
    #: diffusers pipeline classes whose folders are this family's (``model_index.json`` ``_class_name``); checked for
    #: every family before any :meth:`matches`
    pipeline_class_names: Tuple[str, ...] = ()
    #: the native diffusers pipeline class used for parity and text encoding
    native_pipeline_class_name: str = ""
    #: keyword arguments the native pipeline class is built with (from components or ``from_pretrained``)
    native_pipeline_kwargs: Dict[str, Any] = {}
    #: the native pipeline class that can drive :class:`OneStepScheduler`, named in saved students' ``model_index.json``
    #: so plain ``DiffusionPipeline.from_pretrained`` loads them; ``None``: the folder names ``OneStepPipeline``
    native_interop_pipeline_class_name: Optional[str] = None
    #: how that native pipeline is called to compute the student's image (guidance off, one step)
    native_interop_call_kwargs: Dict[str, Any] = {}
    #: the denoiser component: ``"unet"`` or ``"transformer"``
    denoiser_name: str = "transformer"
    #: text components (tokenizers and text encoders), in ``model_index.json`` order
    text_component_names: Tuple[str, ...] = ("tokenizer", "text_encoder")
    #: text components the family's pipeline runs without (SD3's T5: ``text_encoder_3=None``); prompts are encoded
    #: whether they are there or not
    optional_text_component_names: Tuple[str, ...] = ()
    #: the kind of noise path :meth:`_forward` takes times on; the scheduler config gives its parameters
    noise_path_kind: str = "vp"
    #: LoRA target modules used when the user gives none (the UNet attention list of diffusers'
    #: train_text_to_image_lora_sdxl.py example, also the list of diffusers' PixArt LoRA tests)
    default_lora_target_modules: Tuple[str, ...] = ("to_k", "to_q", "to_v", "to_out.0")
    #: diffusers pipeline class whose ``lora_state_dict`` reads and ``save_lora_weights`` writes this family's LoRA
    #: files (diffusers key prefixes); every family names its own
    lora_pipeline_class_name: str = ""
    #: how NASA negative prompts (SNOOPI, :mod:`diffusers_onestep.pipelines.nasa`) reach the denoiser's attention:
    #: ``"cross"`` where text enters through cross-attention with its own keys and values (UNet, PixArt, SANA; the
    #: paper's form), ``"joint"`` where text and image tokens attend jointly (MMDiTs: our extension, the layers and
    #: token layouts given by :meth:`joint_attention_layout`), ``None``: the family takes no negative prompt
    negative_prompt_attention: Optional[str] = None
    #: the denoiser takes an embedded guidance scale (SANA-Sprint)
    has_embedded_guidance: bool = False
    #: default embedded guidance scale of the family's pipeline
    default_embedded_guidance_scale: Optional[float] = None
    #: text tokens kept by the family's pipeline (None: the tokenizer's own length)
    default_max_sequence_length: Optional[int] = None
    #: condition fields a caller must provide when passing embeddings instead of prompts
    required_condition_fields: Tuple[str, ...] = ("embeds",)
    #: resolution binning of the family's native pipeline: ``{denoiser sample_size: (module, name)}`` of the diffusers
    #: aspect-ratio table (``ASPECT_RATIO_*_BIN``) it snaps requested sizes to for that sample size; empty where the
    #: native pipeline has no ``use_resolution_binning`` (SDXL)
    resolution_bin_tables: Dict[int, Tuple[str, str]] = {}
    #: defaults of a distillation run with this family as the teacher
    training_defaults: TrainingDefaults = TrainingDefaults(
        student_timesteps=(999.0,), guidance_scale=4.5, learning_rate_full=1e-6, learning_rate_lora=5e-5
    )

    @classmethod
    def matches(cls, model_index: Dict[str, Any], component_configs: Dict[str, Dict[str, Any]]) -> bool:
        """Whether a pipeline whose class no family names in :attr:`pipeline_class_names` is of this family, from its
        ``model_index.json`` and its components' configs (``{"unet": {...}}``, each with its ``_class_name``).

        Detection asks the families in registry order; the first that matches wins.
        """
        return False

    @classmethod
    def component_names(cls) -> Tuple[str, ...]:
        """The pipeline components an adapter of this family reads."""
        return ("vae", cls.denoiser_name, *cls.text_component_names)

    def __init__(
        self,
        components: Dict[str, Any],
        noise_path: Optional[param.NoisePath] = None,
        prediction_type: Optional[str] = None,
        max_sequence_length: Optional[int] = None,
    ):
        self.components = dict(components)
        self.max_sequence_length = max_sequence_length or self.default_max_sequence_length
        scheduler = self.components.get("scheduler")
        scheduler_config = dict(scheduler.config) if scheduler is not None else {}
        self.noise_path = noise_path or self.default_noise_path(scheduler_config)
        self.prediction_type = param.check_prediction_type(
            prediction_type or self.default_prediction_type(scheduler_config)
        )
        self._text_pipeline = None

    # ------------------------------------------------------------------------------------------------------------
    # construction
    # ------------------------------------------------------------------------------------------------------------

    @classmethod
    def from_pipeline(cls, pipeline, **kwargs) -> "FamilyAdapter":
        """Adapter over a loaded pipeline's components; ``kwargs`` go to the constructor."""
        return cls(pipeline.components, **kwargs)

    @classmethod
    def default_noise_path(cls, scheduler_config: Dict[str, Any]) -> param.NoisePath:
        """The teacher's noise path read from its scheduler config (``OneStepScheduler`` configs name theirs)."""
        return param.noise_path_from_scheduler_config(scheduler_config, kind=cls.noise_path_kind)

    @classmethod
    def default_prediction_type(cls, scheduler_config: Dict[str, Any]) -> str:
        """What the denoiser of a pipeline with this scheduler config predicts."""
        kind = param.noise_path_from_scheduler_config(scheduler_config, kind=cls.noise_path_kind).kind
        return param.prediction_type_from_scheduler_config(scheduler_config, kind)

    # ------------------------------------------------------------------------------------------------------------
    # components
    # ------------------------------------------------------------------------------------------------------------

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.components[self.denoiser_name]

    @property
    def vae(self):
        return self.components.get("vae")

    @property
    def required_text_component_names(self) -> Tuple[str, ...]:
        """The text components prompts cannot be encoded without."""
        return tuple(n for n in self.text_component_names if n not in self.optional_text_component_names)

    @property
    def has_text_encoders(self) -> bool:
        return all(self.components.get(n) is not None for n in self.required_text_component_names)

    def drop_text_encoders(self) -> None:
        """Free the text encoders once every condition the run needs is cached."""
        for name in self.text_component_names:
            if name.startswith("text_encoder"):
                self.components[name] = None
        self._text_pipeline = None

    @staticmethod
    def vae_scale_factor_of(vae_config: Dict[str, Any]) -> int:
        """Spatial downsampling of a VAE from its config (AutoencoderKL and AutoencoderDC)."""
        channels = vae_config.get("encoder_block_out_channels") or vae_config.get("block_out_channels")
        return 2 ** (len(channels) - 1)

    @classmethod
    def resolution_multiple_of(cls, vae_config: Dict[str, Any], denoiser_config: Dict[str, Any]) -> int:
        """What height and width must be multiples of, from configs alone (checked before loading weights)."""
        return cls.vae_scale_factor_of(vae_config) * int(denoiser_config.get("patch_size") or 1)

    @property
    def vae_scale_factor(self) -> int:
        return self.vae_scale_factor_of(self.vae.config)

    @property
    def patch_size(self) -> int:
        return int(getattr(self.denoiser.config, "patch_size", None) or 1)

    @property
    def resolution_multiple(self) -> int:
        """Height and width must be multiples of this: the VAE factor times the denoiser's patch size."""
        return self.vae_scale_factor * self.patch_size

    @property
    def text_embedding_dim(self) -> Optional[int]:
        """Width of the token embeddings the denoiser takes (the last dimension of ``prompt_embeds``): its config's
        ``caption_channels`` (DiTs that project captions: PixArt, SANA) or else ``cross_attention_dim`` (UNets);
        ``None`` where the config states neither as one number."""
        config = _unwrap(self.denoiser).config
        for key in ("caption_channels", "cross_attention_dim"):
            value = config.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        return None

    @property
    def pooled_embedding_dim(self) -> Optional[int]:
        """Width of the pooled text embedding (``pooled_prompt_embeds``) of families that take one (SDXL)."""
        return None

    @property
    def latent_channels(self) -> int:
        return int(self.denoiser.config.in_channels)

    @property
    def default_resolution(self) -> int:
        return int(self.denoiser.config.sample_size) * self.vae_scale_factor

    # ------------------------------------------------------------------------------------------------------------
    # resolution binning
    # ------------------------------------------------------------------------------------------------------------

    def resolution_bins(self) -> Optional[Dict[str, List[float]]]:
        """The aspect-ratio table (``{"ratio": [height, width]}``) that the family's native pipeline bins this
        denoiser's sizes to, chosen by its ``sample_size`` as that pipeline chooses it; ``None`` where it has none."""
        sample_size = self.denoiser.config.sample_size
        entry = self.resolution_bin_tables.get(sample_size) if isinstance(sample_size, int) else None
        if entry is None:
            return None
        import importlib

        module, name = entry
        return getattr(importlib.import_module(module), name)

    def binned_size(self, height: int, width: int, use_resolution_binning: Optional[bool] = None) -> Tuple[int, int]:
        """The size the denoiser generates at for a requested ``height x width``.

        With binning, the nearest aspect ratio of :meth:`resolution_bins` (``PixArtImageProcessor.
        classify_height_width_bin``), as the family's native pipeline does; :meth:`resize_to_requested` brings the
        decoded image back to the requested size. ``use_resolution_binning=None`` bins where the native pipeline's
        table is the one of the denoiser's own resolution (every published PixArt and SANA checkpoint: e.g. sample
        size 128 x VAE factor 8 = the 1024 px table). The native pipelines pick the table by ``sample_size`` alone,
        which assumes the published VAEs: a tiny test model of SANA (sample size 32, a 2x VAE, 64 px) would be snapped
        to the 1024 px table, and one of PixArt (sample size 8) is refused; ``None`` leaves such models unbinned, and
        ``True`` does exactly what the native pipeline does.
        """
        if use_resolution_binning is False:
            return height, width
        if not self.resolution_bin_tables:
            if use_resolution_binning:
                raise ValueError(
                    f"{self.display_name} students have no resolution binning ({self.native_pipeline_class_name} has "
                    "none); drop `use_resolution_binning`."
                )
            return height, width
        bins = self.resolution_bins()
        if bins is None:
            if use_resolution_binning:
                sizes = ", ".join(str(s) for s in sorted(self.resolution_bin_tables))
                raise ValueError(
                    f"`use_resolution_binning=True` needs a transformer of sample_size {sizes}, as "
                    f"{self.native_pipeline_class_name} does; this one has {self.denoiser.config.sample_size}."
                )
            return height, width
        if use_resolution_binning is None and [float(self.default_resolution)] * 2 != list(bins["1.0"]):
            return height, width
        from diffusers.image_processor import PixArtImageProcessor

        return PixArtImageProcessor.classify_height_width_bin(height, width, ratios=bins)

    @staticmethod
    def resize_to_requested(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Decoded images ``[B, 3, H, W]`` resized (bilinear) and center-cropped to ``height x width``, as the native
        pipelines undo resolution binning (``PixArtImageProcessor.resize_and_crop_tensor``); unchanged at that size."""
        if tuple(images.shape[-2:]) == (height, width):
            return images
        from diffusers.image_processor import PixArtImageProcessor

        return PixArtImageProcessor.resize_and_crop_tensor(images, width, height)

    def latent_shape(self, batch_size: int, height: int, width: int) -> Tuple[int, int, int, int]:
        f = self.vae_scale_factor
        return (batch_size, self.latent_channels, height // f, width // f)

    def image_seq_len(self, height: int, width: int) -> int:
        """Latent tokens of an image of ``height x width`` after patchifying: what a resolution-dependent noise path
        (dynamic shifting, FLUX.1) reads its shift from, as FluxPipeline's ``calculate_shift(latents.shape[1])``."""
        multiple = self.resolution_multiple
        return (height // multiple) * (width // multiple)

    def image_size_of(self, latents: torch.Tensor) -> Tuple[int, int]:
        return latents.shape[-2] * self.vae_scale_factor, latents.shape[-1] * self.vae_scale_factor

    # ------------------------------------------------------------------------------------------------------------
    # text
    # ------------------------------------------------------------------------------------------------------------

    def text_pipeline(self):
        """The family's own diffusers pipeline holding only the text components (for ``encode_prompt``)."""
        if self._text_pipeline is None:
            import diffusers

            cls = getattr(diffusers, self.native_pipeline_class_name)
            self._text_pipeline = self._build_text_pipeline(cls)
        return self._text_pipeline

    def _build_text_pipeline(self, cls):
        kwargs = {n: self.components.get(n) for n in self.text_component_names}
        return cls(**kwargs, vae=None, scheduler=None, **{self.denoiser_name: None}, **self.native_pipeline_kwargs)

    def _require_text_encoders(self) -> None:
        if not self.has_text_encoders:
            missing = [n for n in self.required_text_component_names if self.components.get(n) is None]
            raise ValueError(
                f"This {self.display_name} model has no {', '.join(missing)}; pass `prompt_embeds` (and the "
                "matching masks/pooled embeddings) instead of `prompt`."
            )

    @torch.no_grad()
    def encode_prompt(self, prompts: Sequence[str], device=None) -> Condition:
        """Encode a list of prompts with the family's own pipeline (its public ``encode_prompt``, through
        :meth:`text_pipeline`), so conditions are exactly the native pipeline's."""
        self._require_text_encoders()
        return self._encode(list(prompts), device)

    @torch.no_grad()
    def unconditional(self, batch_size: int, device=None) -> Condition:
        """The unconditional (null-prompt) condition used for classifier-free guidance."""
        return self._unconditional(batch_size, device)

    def _encode(self, prompts: List[str], device) -> Condition:
        raise NotImplementedError

    def _unconditional(self, batch_size: int, device) -> Condition:
        self._require_text_encoders()
        return self._encode([""] * batch_size, device)

    # ------------------------------------------------------------------------------------------------------------
    # denoiser
    # ------------------------------------------------------------------------------------------------------------

    def denoise(
        self,
        x_t: torch.Tensor,
        t,
        condition: Condition,
        *,
        denoiser: Optional[torch.nn.Module] = None,
        guidance: Optional[torch.Tensor] = None,
        return_features: bool = False,
    ):
        """Run ``denoiser`` (default: the adapter's own) at ``(x_t, t, condition)``.

        Args:
            x_t: noisy latents ``[B, C, H, W]`` in VAE-latent units.
            t: natural path time, a scalar or ``[B]``.
            guidance: embedded guidance scale per sample (families with ``has_embedded_guidance``).
            return_features: also return the feature map of :meth:`feature_module` (``[B, C', h, w]``), the trunk
                that discriminator heads read (DMD2's GAN classifier, arXiv 2405.14867; f-distill's
                density-ratio discriminator, arXiv 2502.15681).

        Returns:
            The native prediction (``self.prediction_type``), ``[B, C, H, W]``, or ``(prediction, features)``.
        """
        denoiser = denoiser if denoiser is not None else self.denoiser
        t = torch.as_tensor(t, device=x_t.device)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        if not return_features:
            return self._forward(denoiser, x_t, t, condition, guidance)
        captured: List[torch.Tensor] = []
        module = self.feature_module(_unwrap(denoiser))

        def hook(_module, _inputs, output):
            captured.append(self.feature_of_block_output(output))

        handle = module.register_forward_hook(hook)
        try:
            prediction = self._forward(denoiser, x_t, t, condition, guidance)
        finally:
            handle.remove()
        return prediction, self._features_to_map(captured[0], x_t)

    def _forward(self, denoiser, x_t, t, condition, guidance) -> torch.Tensor:
        raise NotImplementedError

    def feature_module(self, denoiser: torch.nn.Module) -> torch.nn.Module:
        """The module whose output feeds discriminator heads: the middle transformer block by default."""
        blocks = denoiser.transformer_blocks
        return blocks[len(blocks) // 2]

    def joint_attention_layout(self, processor_name: str) -> Optional[JointTokenLayout]:
        """For families with ``negative_prompt_attention = "joint"``: the token layout of the attention layer whose
        processor is ``denoiser.attn_processors[processor_name]``, or ``None`` where that layer is not joint (image
        self-attention, which NASA passes through)."""
        raise NotImplementedError(f"{self.display_name} students have no joint attention for NASA.")

    def fuse_qkv_projections(self, denoiser: torch.nn.Module) -> None:
        """Fuse the denoiser's query/key/value projections (``fuse_qkv_projections()``, where diffusers has it), for
        :meth:`OneStepPipeline.enable_fast_path`; a family whose fused processors do not cover every attention of its
        denoiser completes the job."""
        if hasattr(denoiser, "fuse_qkv_projections"):
            denoiser.fuse_qkv_projections()

    def feature_of_block_output(self, output) -> torch.Tensor:
        """The image features in the output of :meth:`feature_module`: the output itself, or the first element of a
        tuple (diffusers' transformer blocks); a family whose blocks return several streams picks the image one."""
        return output[0] if isinstance(output, (tuple, list)) else output

    def feature_channels(self) -> int:
        """Channels of the feature map returned with ``return_features=True``."""
        denoiser = _unwrap(self.denoiser)
        return int(denoiser.config.num_attention_heads * denoiser.config.attention_head_dim)

    def _features_to_map(self, features: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
        if features.ndim == 4:
            return features
        # Token sequence [B, N, D] of a patchified transformer -> [B, D, H/p, W/p].
        h, w = x_t.shape[-2] // self.patch_size, x_t.shape[-1] // self.patch_size
        return features.transpose(1, 2).reshape(features.shape[0], features.shape[2], h, w)

    def _split_learned_sigma(self, output: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
        # PixArt-style "learned sigma": the network outputs [prediction, variance]; keep the prediction.
        if output.shape[1] == 2 * x_t.shape[1]:
            return output[:, : x_t.shape[1]]
        return output

    # ------------------------------------------------------------------------------------------------------------
    # latents <-> images
    # ------------------------------------------------------------------------------------------------------------

    def _latent_normalization(self, latents: torch.Tensor):
        cfg = self.vae.config
        mean, std = cfg.get("latents_mean"), cfg.get("latents_std")
        if mean is not None and std is not None:
            shape = (1, len(mean), 1, 1)
            mean = torch.tensor(mean).view(shape).to(latents.device, latents.dtype)
            std = torch.tensor(std).view(shape).to(latents.device, latents.dtype)
            return mean, std / cfg.scaling_factor
        shift = cfg.get("shift_factor") or 0.0
        return shift, 1.0 / cfg.scaling_factor

    def decode(self, latents: torch.Tensor, vae_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """Latents -> images in [-1, 1], as the family's pipeline decodes them.

        ``vae_dtype`` is the VAE's dtype when the caller already knows it (saves a walk over the VAE's modules).
        """
        vae = self.vae
        vae_dtype = vae_dtype or vae.dtype
        upcast = vae_dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
        if upcast:
            vae.to(torch.float32)
        mean, scale = self._latent_normalization(latents)
        latents = latents * scale
        if not (isinstance(mean, float) and mean == 0.0):  # most VAEs have no shift: skip adding zero
            latents = latents + mean
        latents = latents.to(torch.float32 if upcast else vae_dtype)
        try:
            return vae.decode(latents, return_dict=False)[0]
        finally:
            if upcast:
                vae.to(torch.float16)

    def encode_images(self, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Images in [-1, 1] -> latents in the units the denoiser sees (inverse of :meth:`decode`)."""
        vae = self.vae
        out = vae.encode(images.to(vae.dtype))
        if hasattr(out, "latent_dist"):
            latents = out.latent_dist.sample(generator)
        else:
            latents = out.latent if hasattr(out, "latent") else out[0]
        mean, scale = self._latent_normalization(latents)
        return (latents - mean) / scale

    # ------------------------------------------------------------------------------------------------------------
    # the teacher's own multi-step sampler
    # ------------------------------------------------------------------------------------------------------------

    def to_pipeline_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Canonical latents ``[B, C, H, W]`` in the layout the family's pipeline takes as ``latents=`` (the same by
        default; FLUX.1 packs them)."""
        return latents

    def from_pipeline_latents(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Inverse of :meth:`to_pipeline_latents` for the pipeline's ``output_type="latent"`` output of latent size
        ``height x width``."""
        return latents

    def pipeline_sampling_kwargs(self, num_inference_steps: int) -> Dict[str, Any]:
        """Extra arguments of the family's pipeline call for a multi-step sample (none by default)."""
        return {}

    @torch.no_grad()
    def sample_with_pipeline(
        self,
        pipeline,
        noise: torch.Tensor,
        condition: Condition,
        num_inference_steps: int,
        guidance_scale: float,
        generator=None,
    ) -> torch.Tensor:
        """The teacher's own multi-step sample from ``noise``: the family's native pipeline (its scheduler, its
        guidance) called with ``latents=noise``, the conditions ``condition`` (and, for classifier-free guidance,
        :meth:`unconditional` as the negative ones, the null condition training guides with) and
        ``output_type="latent"``. Returns canonical latents ``[B, C, H, W]`` in the units the denoiser sees.

        ``noise`` is standard normal, as the pipelines draw it (they scale it by the scheduler's
        ``init_noise_sigma``); ``generator`` (one per sample) feeds stochastic schedulers. The image size is the
        noise's: resolution binning is switched off where the pipeline has it.
        """
        import inspect

        parameters = inspect.signature(pipeline.__call__).parameters
        height, width = self.image_size_of(noise)
        kwargs: Dict[str, Any] = {
            "num_inference_steps": num_inference_steps,
            "guidance_scale": guidance_scale,
            "height": height,
            "width": width,
            "latents": self.to_pipeline_latents(noise),
            "output_type": "latent",
            "return_dict": False,
            **self.pipeline_sampling_kwargs(num_inference_steps),
        }
        fields = {"embeds": "prompt_embeds", "mask": "prompt_attention_mask", "pooled": "pooled_prompt_embeds"}
        for field_name, argument in fields.items():
            value = getattr(condition, field_name)
            if value is not None and argument in parameters:
                kwargs[argument] = value
        if not self.has_embedded_guidance:
            null = self.unconditional(noise.shape[0], device=noise.device)
            for field_name, argument in fields.items():
                value = getattr(null, field_name)
                if value is not None and f"negative_{argument}" in parameters:
                    kwargs[f"negative_{argument}"] = value
            if "negative_prompt" in parameters:  # PixArt's and SANA's default "" would clash with the embeddings
                kwargs["negative_prompt"] = None
        if "use_resolution_binning" in parameters:
            kwargs["use_resolution_binning"] = False
        if generator is not None:
            kwargs["generator"] = generator
        latents = pipeline(**kwargs)[0]
        return self.from_pipeline_latents(latents, noise.shape[-2], noise.shape[-1])

    # ------------------------------------------------------------------------------------------------------------
    # LoRA
    # ------------------------------------------------------------------------------------------------------------

    def lora_state_dict_kwargs(self) -> Dict[str, Any]:
        """Extra keyword arguments of ``lora_state_dict`` of :attr:`lora_pipeline_class_name` for this denoiser."""
        return {}

    def lora_save_kwargs(
        self, lora_state_dict: Dict[str, torch.Tensor], metadata: Optional[dict] = None
    ) -> Dict[str, Any]:
        """Keyword arguments of ``save_lora_weights`` of :attr:`lora_pipeline_class_name` for this denoiser (diffusers
        names them after the component: ``unet_lora_layers``, ``transformer_lora_layers``)."""
        from ..lora import fold_lora_scale, lora_metadata_supported

        if metadata is not None and not lora_metadata_supported(self):
            # A diffusers without LoRA metadata reads every file at scale 1 (lora_alpha = r): store the update so.
            lora_state_dict, metadata = fold_lora_scale(lora_state_dict, metadata), None
        kwargs = {f"{self.denoiser_name}_lora_layers": lora_state_dict}
        if metadata is not None:
            kwargs[f"{self.denoiser_name}_lora_adapter_metadata"] = metadata
        return kwargs

    def describe(self) -> Dict[str, Any]:
        return {
            "family": self.name,
            "prediction_type": self.prediction_type,
            **self.noise_path.describe(),
        }


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP/FSDP/compile wrappers."""
    while True:
        inner = getattr(module, "module", None) or getattr(module, "_orig_mod", None)
        if inner is None or not isinstance(inner, torch.nn.Module):
            return module
        module = inner
