"""FLUX.1 (Black Forest Labs 2024): an MM-DiT flow transformer over 2x2-packed latents, CLIP-L pooled + T5 text, a
resolution-dependent flow shift, and -- in FLUX.1-dev -- guidance embedded in the network.

The adapter keeps the project's canonical latents ``[B, C, H, W]`` (VAE latents, 16 channels for FLUX.1) everywhere
outside the network: :meth:`FluxAdapter._forward` packs them into FluxPipeline's token sequence (each 2x2 patch of
``C`` channels one token of ``4C``), with its position ids (``img_ids``: ``(0, row, column)`` of each patch;
``txt_ids``: zeros), and unpacks the velocity it returns. Sampling noise drawn as ``[B, C, H, W]`` is therefore the
noise FluxPipeline draws before packing, and every loss, scheduler step and decode sees ordinary latents.

* Time: flow sigma ``t`` in [0, 1]; the transformer takes ``timestep = (1000 t) / 1000`` as FluxPipeline passes it.
* Shift: FLUX.1-dev's ``FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)`` shifts the schedule with
  ``mu = calculate_shift(image_seq_len)``; the noise path expresses it (:class:`~..parameterization.FlowPath` with a
  :class:`~..parameterization.DynamicShift`), FLUX.1-schnell's scheduler has a fixed shift of 1.
* Guidance: FLUX.1-dev is guidance-distilled: the scale is an input of the transformer (``guidance_embeds=True``),
  one pass, no classifier-free doubling, like SANA-Sprint; FLUX.1-schnell has no guidance input.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch

from .base import Condition, FamilyAdapter, JointTokenLayout, TrainingDefaults, _unwrap


#: side of the latent patches FluxPipeline packs into one token
PACK = 2


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, (H/2)(W/2), 4C]``: each 2x2 patch one token, channels then patch rows then patch
    columns -- the layout of FluxPipeline's latents (its ``prepare_latents``)."""
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // PACK, PACK, w // PACK, PACK).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // PACK) * (w // PACK), c * PACK * PACK)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents` for latents of ``height x width``."""
    b, _, channels = tokens.shape
    c = channels // (PACK * PACK)
    patches = tokens.view(b, height // PACK, width // PACK, c, PACK, PACK).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, c, height, width)


def latent_image_ids(height: int, width: int, device=None, dtype=None) -> torch.Tensor:
    """Rotary position ids ``[(H/2)(W/2), 3]`` of the packed tokens: ``(0, row, column)`` of each patch, in the order
    of :func:`pack_latents` (as FluxPipeline builds them)."""
    rows, cols = height // PACK, width // PACK
    ids = torch.zeros(rows, cols, 3)
    ids[..., 1] = torch.arange(rows)[:, None]
    ids[..., 2] = torch.arange(cols)[None, :]
    return ids.reshape(rows * cols, 3).to(device=device, dtype=dtype)


class FluxAdapter(FamilyAdapter):
    name = "flux"
    display_name = "FLUX.1"
    pipeline_class_names = ("FluxPipeline",)
    native_pipeline_class_name = "FluxPipeline"
    # FluxPipeline always passes `sigmas` (and `mu`) to its scheduler's set_timesteps, which OneStepScheduler does not
    # take, so it cannot drive one: FLUX.1 student folders name OneStepPipeline (as SANA-Sprint's do).
    native_interop_pipeline_class_name = None
    native_interop_call_kwargs = {}
    denoiser_name = "transformer"
    # model_index.json order of FluxPipeline: CLIP-L (pooled) first, T5 second
    text_component_names = ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2")
    noise_path_kind = "flow"
    # FluxPipeline's own loader (FluxLoraLoaderMixin): `transformer.`-prefixed keys; it also reads Kohya, XLabs and
    # BFL-control layouts.
    lora_pipeline_class_name = "FluxPipeline"
    # The default targets of diffusers' FLUX LoRA training example (examples/dreambooth/train_dreambooth_lora_flux.py):
    # attention projections of the image and text streams and both feed-forwards; `attn.to_*` also matches the single
    # blocks' attention.
    default_lora_target_modules = (
        "attn.to_k",
        "attn.to_q",
        "attn.to_v",
        "attn.to_out.0",
        "attn.add_k_proj",
        "attn.add_q_proj",
        "attn.add_v_proj",
        "attn.to_add_out",
        "ff.net.0.proj",
        "ff.net.2",
        "ff_context.net.0.proj",
        "ff_context.net.2",
    )
    has_embedded_guidance = True
    #: FluxPipeline's default `guidance_scale`, the scale FLUX.1-dev's card runs it at
    default_embedded_guidance_scale = 3.5
    #: FluxPipeline's default `max_sequence_length` (T5 tokens)
    default_max_sequence_length = 512
    required_condition_fields = ("embeds", "pooled")
    #: NASA negative prompts through the double- and single-stream joint attention (our extension, see
    #: :mod:`..pipelines.nasa`)
    negative_prompt_attention = "joint"
    # As a teacher, FLUX.1-dev is queried with its embedded guidance at FluxPipeline's default 3.5 (one pass, no CFG);
    # the student starts from pure noise (sigma 1). No DMD2/f-distill recipe for FLUX.1 is published: the learning
    # rates are SANA's (ours). Roles default to LoRA adapters on one shared backbone (RolesConfig), which a 12B
    # transformer needs: one copy of the weights instead of three.
    training_defaults = TrainingDefaults(
        student_timesteps=(1.0,),
        guidance_scale=3.5,
        learning_rate_full=1e-6,
        learning_rate_lora=5e-5,
    )

    @classmethod
    def matches(cls, model_index, component_configs):
        return (component_configs.get("transformer") or {}).get("_class_name") == "FluxTransformer2DModel"

    def to_pipeline_latents(self, latents: torch.Tensor) -> torch.Tensor:
        # FluxPipeline takes (and returns, with output_type="latent") its packed token sequence
        return pack_latents(latents)

    def from_pipeline_latents(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return unpack_latents(latents, height, width)

    # ------------------------------------------------------------------------------------------------------------
    # shapes: canonical latents outside, packed tokens inside the network
    # ------------------------------------------------------------------------------------------------------------

    @classmethod
    def resolution_multiple_of(cls, vae_config: Dict[str, Any], denoiser_config: Dict[str, Any]) -> int:
        # FluxPipeline's check: height and width divisible by vae_scale_factor * 2 (the 2x2 packing)
        return cls.vae_scale_factor_of(vae_config) * PACK

    @property
    def patch_size(self) -> int:
        return PACK

    @property
    def latent_channels(self) -> int:
        # the transformer's in_channels count packed channels (4 per latent channel)
        return int(self.denoiser.config.in_channels) // (PACK * PACK)

    @property
    def default_resolution(self) -> int:
        # FluxPipeline's default: default_sample_size (128) x VAE factor = 1024 px for FLUX.1 -- the FLUX.1 VAE's own
        # `sample_size` (1024); a VAE config stating one (the tiny test models) gives it, else 128 x its factor.
        sample_size = self.vae.config.get("sample_size") if self.vae is not None else None
        if isinstance(sample_size, int) and sample_size % self.resolution_multiple == 0:
            return sample_size
        return 128 * self.vae_scale_factor

    @property
    def text_embedding_dim(self) -> Optional[int]:
        return int(_unwrap(self.denoiser).config.joint_attention_dim)

    @property
    def pooled_embedding_dim(self) -> Optional[int]:
        return int(_unwrap(self.denoiser).config.pooled_projection_dim)

    # ------------------------------------------------------------------------------------------------------------
    # text
    # ------------------------------------------------------------------------------------------------------------

    def _encode(self, prompts: List[str], device) -> Condition:
        embeds, pooled, _text_ids = self.text_pipeline().encode_prompt(
            prompts,
            prompt_2=None,
            device=device,
            num_images_per_prompt=1,
            max_sequence_length=self.max_sequence_length,
        )
        return Condition(embeds=embeds, pooled=pooled)

    # ------------------------------------------------------------------------------------------------------------
    # denoiser
    # ------------------------------------------------------------------------------------------------------------

    def _guidance(self, denoiser, guidance, batch_size: int, device) -> Optional[torch.Tensor]:
        """The guidance input of a guidance-embedded transformer (FLUX.1-dev), float32 as FluxPipeline builds it;
        ``None`` for FLUX.1-schnell, whose transformer has no guidance embedding."""
        if not getattr(_unwrap(denoiser).config, "guidance_embeds", False):
            return None
        if guidance is None:
            guidance = self.default_embedded_guidance_scale
        guidance = torch.as_tensor(guidance, device=device, dtype=torch.float32)
        return guidance.expand(batch_size) if guidance.ndim == 0 else guidance

    def _forward(self, denoiser, x_t, t, condition, guidance):
        height, width = x_t.shape[-2:]
        tokens = pack_latents(x_t)
        # FluxPipeline: `timestep = t.expand(B).to(latents.dtype)` of its scheduler's timesteps (sigma x 1000), then
        # `timestep / 1000` into the transformer (which multiplies by 1000 again).
        timestep = self.noise_path.to_scheduler_timestep(t.to(torch.float64)).to(torch.float32).to(x_t.dtype)
        velocity = denoiser(
            hidden_states=tokens,
            timestep=timestep / 1000,
            guidance=self._guidance(denoiser, guidance, x_t.shape[0], x_t.device),
            pooled_projections=condition.pooled,
            encoder_hidden_states=condition.embeds,
            txt_ids=torch.zeros(condition.embeds.shape[1], 3, device=x_t.device, dtype=condition.embeds.dtype),
            img_ids=latent_image_ids(height, width, device=x_t.device, dtype=condition.embeds.dtype),
            return_dict=False,
        )[0]
        return unpack_latents(velocity, height, width)

    def joint_attention_layout(self, processor_name: str) -> Optional[JointTokenLayout]:
        # Every attention of FLUX.1 is joint over `[text; image]` (FluxAttnProcessor2_0 in diffusers 0.34,
        # FluxAttnProcessor in 0.42 concatenate the text stream first). Double-stream blocks
        # (`transformer_blocks.{i}.attn`) get the text stream as encoder states; single-stream blocks
        # (`single_transformer_blocks.{i}.attn`) get one sequence whose first tokens are the text, as many as the prompt
        # embeddings (0.34 concatenates before the single blocks, 0.42 inside each).
        if processor_name.startswith("single_transformer_blocks."):
            return JointTokenLayout(text_first=True, text_from_encoder_states=False)
        return JointTokenLayout(text_first=True, text_from_encoder_states=True)

    def feature_module(self, denoiser: torch.nn.Module) -> torch.nn.Module:
        """The last double-stream block: its image stream is the deepest that is image tokens alone (the single blocks
        after it carry text and image tokens as one sequence)."""
        return denoiser.transformer_blocks[-1]

    def feature_of_block_output(self, output) -> torch.Tensor:
        # FluxTransformerBlock returns (encoder_hidden_states, hidden_states): the image stream is the second
        return output[1]

    # ------------------------------------------------------------------------------------------------------------
    # LoRA
    # ------------------------------------------------------------------------------------------------------------

    def lora_state_dict_kwargs(self) -> Dict[str, Any]:
        # FluxLoraLoaderMixin.lora_state_dict returns a file's `.alpha` entries only when asked (its load_lora_weights
        # asks): without them a LoRA stored with alpha != rank would load at the wrong scale.
        return {"return_alphas": True}
