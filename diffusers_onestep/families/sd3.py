"""Stable Diffusion 3 / 3.5 (Esser et al. 2024, arXiv 2403.03206): an MMDiT on a rectified-flow path with a fixed
shift (``x_t = (1 - t) x0 + t eps``, training times ``t = s u / (1 + (s - 1) u)``, the paper's eq. 23 with the
scheduler's ``shift`` s = 3 for SD3.5), three text encoders (CLIP-L, OpenCLIP-bigG and T5-XXL, the last optional).

``StableDiffusion3Pipeline`` conditions the transformer on the token sequence ``[CLIP-L ‖ CLIP-G (zero-padded to
the T5 width) ; T5]`` and on the pooled ``[CLIP-L ; CLIP-G]`` projections. Without ``text_encoder_3`` the pipeline
puts zeros where the T5 tokens go (SD3 is trained with each text encoder dropped independently, so T5 can be left
out at inference: the paper's "flexible text encoders"), and so does this adapter: it encodes through the pipeline's
own ``encode_prompt``.
"""

from __future__ import annotations

from typing import List, Optional

import torch

from .base import Condition, FamilyAdapter, JointTokenLayout, TrainingDefaults, _unwrap


class SD3Adapter(FamilyAdapter):
    name = "sd3"
    display_name = "SD3"
    pipeline_class_names = (
        "StableDiffusion3Pipeline",
        "StableDiffusion3Img2ImgPipeline",
        "StableDiffusion3PAGPipeline",
    )
    native_pipeline_class_name = "StableDiffusion3Pipeline"
    # One step of StableDiffusion3Pipeline's FlowMatchEulerDiscreteScheduler from sigma 1 at guidance off returns the
    # flow model's x0 = x_1 - v: what OneStepScheduler computes, so saved students name the native class.
    native_interop_pipeline_class_name = "StableDiffusion3Pipeline"
    native_interop_call_kwargs = {"guidance_scale": 0.0, "num_inference_steps": 1}
    denoiser_name = "transformer"
    text_component_names = (
        "tokenizer",
        "tokenizer_2",
        "tokenizer_3",
        "text_encoder",
        "text_encoder_2",
        "text_encoder_3",
    )
    #: T5 can be dropped (``text_encoder_3=None``): the pipeline then feeds zeros in its place
    optional_text_component_names = ("tokenizer_3", "text_encoder_3")
    noise_path_kind = "flow"
    # The attention projections of both streams of every joint block: the default target list of diffusers'
    # examples/dreambooth/train_dreambooth_lora_sd3.py (without --lora_layers). The last block discards its text stream
    # (`context_pre_only`), so its `attn.add_q_proj` adapter gets no gradient (tests/test_roles.py names it).
    default_lora_target_modules = (
        "attn.add_k_proj",
        "attn.add_q_proj",
        "attn.add_v_proj",
        "attn.to_add_out",
        "attn.to_k",
        "attn.to_out.0",
        "attn.to_q",
        "attn.to_v",
    )
    # SD3's own loader (SD3LoraLoaderMixin): its save_lora_weights writes `transformer.`-prefixed keys, which
    # StableDiffusion3Pipeline.load_lora_weights reads back (tests/test_sd3_training.py).
    lora_pipeline_class_name = "StableDiffusion3Pipeline"
    #: T5 tokens kept, StableDiffusion3Pipeline's default ``max_sequence_length``
    default_max_sequence_length = 256
    required_condition_fields = ("embeds", "pooled")
    #: NASA negative prompts through the MMDiT's joint attention (our extension, see :mod:`..pipelines.nasa`)
    negative_prompt_attention = "joint"
    # No published DMD2/f-distill recipe for SD3. The student starts from pure noise (sigma 1), where SD3.5-Large-Turbo
    # (adversarially distilled: its card names ADD; SD3-Turbo is LADD, Sauer et al. 2024, arXiv 2403.12015) starts its
    # 4 Euler steps: its model card calls
    # num_inference_steps=4, guidance_scale=0.0, and the SD3.5 reference code (Stability-AI/sd3.5 sd3_infer.py,
    # CONFIGS["sd3.5_large_turbo"]: shift 3.0, cfg 1.0, 4 steps, euler) agrees. The distribution-matching target uses
    # the CFG that reference code runs the teacher at: 4.5 for SD3.5-Large (CONFIGS["sd3.5_large"]; 5.0 for SD3- and
    # SD3.5-Medium -- pass --guidance_scale). Student and critic are LoRA adapters on one shared backbone (RolesConfig's
    # default layout), so an 8B transformer is held once. Learning rates are DMD2's SDXL values (ours for SD3).
    training_defaults = TrainingDefaults(
        student_timesteps=(1.0,),
        guidance_scale=4.5,
        learning_rate_full=5e-7,
        learning_rate_lora=5e-5,
        lora_rank=64,
        lora_alpha=64,
    )

    @classmethod
    def matches(cls, model_index, component_configs):
        return (component_configs.get("transformer") or {}).get("_class_name") == "SD3Transformer2DModel"

    # ------------------------------------------------------------------------------------------------------------
    # text
    # ------------------------------------------------------------------------------------------------------------

    def _build_text_pipeline(self, cls):
        kwargs = {n: self.components.get(n) for n in self.text_component_names}
        # Without T5 the pipeline sizes its zeros from `transformer.config.joint_attention_dim`, so the text pipeline
        # holds the (unwrapped) transformer then; it only reads its config.
        transformer = _unwrap(self.denoiser) if self.components.get("text_encoder_3") is None else None
        return cls(**kwargs, vae=None, scheduler=None, transformer=transformer)

    def _encode(self, prompts: List[str], device) -> Condition:
        embeds, _, pooled, _ = self.text_pipeline().encode_prompt(
            prompts,
            prompt_2=None,
            prompt_3=None,
            device=device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return Condition(embeds=embeds, pooled=pooled)

    @property
    def text_embedding_dim(self) -> Optional[int]:
        return int(_unwrap(self.denoiser).config.joint_attention_dim)

    @property
    def pooled_embedding_dim(self) -> Optional[int]:
        return int(_unwrap(self.denoiser).config.pooled_projection_dim)

    # ------------------------------------------------------------------------------------------------------------
    # denoiser
    # ------------------------------------------------------------------------------------------------------------

    def _forward(self, denoiser, x_t, t, condition, guidance):
        # The transformer takes timestep = sigma * num_train_timesteps, as StableDiffusion3Pipeline passes
        # FlowMatchEulerDiscreteScheduler's timesteps; it predicts the velocity eps - x0.
        timestep = self.noise_path.to_scheduler_timestep(t).to(torch.float32)
        return denoiser(
            hidden_states=x_t,
            timestep=timestep,
            encoder_hidden_states=condition.embeds,
            pooled_projections=condition.pooled,
            return_dict=False,
        )[0]

    def joint_attention_layout(self, processor_name: str) -> Optional[JointTokenLayout]:
        # `transformer_blocks.{i}.attn`: JointAttnProcessor2_0 (and FusedJointAttnProcessor2_0) attend over
        # `cat([image, text])`, the text tokens being the block's encoder states (diffusers 0.34 to 0.42).
        # `transformer_blocks.{i}.attn2` (SD3.5's MMDiT-X dual attention) is image-only self-attention.
        if processor_name.split(".")[-2] == "attn2":
            return None
        return JointTokenLayout(text_first=False, text_from_encoder_states=True)

    def fuse_qkv_projections(self, denoiser):
        # diffusers' SD3Transformer2DModel.fuse_qkv_projections gives every attention FusedJointAttnProcessor2_0, which
        # (diffusers 0.42) applies no QK norm and needs a text stream. SD3.5's transformers have QK RMS-norm
        # (`qk_norm="rms_norm"`), so fusing them would change their outputs: they stay unfused. SD3-Medium has no QK
        # norm and fuses; the image-only second attention of MMDiT-X blocks (`dual_attention_layers`), which has no
        # text stream, gets diffusers' fused self-attention processor.
        from diffusers.models.attention_processor import FusedAttnProcessor2_0

        if _unwrap(denoiser).config.get("qk_norm"):
            return
        denoiser.fuse_qkv_projections()
        for block in denoiser.transformer_blocks:
            if getattr(block, "attn2", None) is not None:
                block.attn2.set_processor(FusedAttnProcessor2_0())

    def feature_of_block_output(self, output):
        # A JointTransformerBlock returns (encoder_hidden_states, hidden_states): the image tokens are the second.
        return output[1]
