"""Stable Diffusion XL (Podell et al. 2023): UNet, two CLIP text encoders, VP path with epsilon prediction."""

from __future__ import annotations

from typing import List

import torch

from .base import UNET_LORA_TARGET_MODULES, Condition, FamilyAdapter, TrainingDefaults, _unwrap


class SDXLAdapter(FamilyAdapter):
    name = "sdxl"
    display_name = "SDXL"
    negative_prompt_attention = "cross"
    pipeline_class_names = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline")
    native_pipeline_class_name = "StableDiffusionXLPipeline"
    # The invisible watermark changes pixels; off, the native pipeline computes the same images as ours.
    native_pipeline_kwargs = {"add_watermarker": False}
    native_interop_pipeline_class_name = "StableDiffusionXLPipeline"
    native_interop_call_kwargs = {"guidance_scale": 0.0, "num_inference_steps": 1}
    denoiser_name = "unet"
    text_component_names = ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2")
    # DMD2's --generator_lora targets, also the target list of diffusers' LCM-LoRA SDXL training example
    # (train_lcm_distill_lora_sdxl.py).
    default_lora_target_modules = UNET_LORA_TARGET_MODULES
    # SDXL's own LoRA loader: it reads diffusers, peft and Kohya/SGM UNet layouts (the latter given the UNet config).
    lora_pipeline_class_name = "StableDiffusionXLPipeline"
    required_condition_fields = ("embeds", "pooled")
    # DMD2's SDXL recipe (Yin et al. 2024b, arXiv 2405.14867; the SDXL experiment scripts of its official repo):
    # student conditioned on t=399, real-score CFG 8, LoRA r=64 alpha=8, lr 5e-7 full / 5e-5 LoRA, generator GAN
    # weight 5e-3, TTUR 5. f-distill's SDXL config (arXiv 2502.15681; NVIDIA's FastGen) agrees.
    training_defaults = TrainingDefaults(
        student_timesteps=(399.0,),
        guidance_scale=8.0,
        learning_rate_full=5e-7,
        learning_rate_lora=5e-5,
        gan_weight=5e-3,
        lora_rank=64,
        lora_alpha=8,
    )

    @classmethod
    def matches(cls, model_index, component_configs):
        # Any pipeline around an SDXL UNet (ControlNet, inpainting, ...): SDXL's micro-conditioning embedding.
        return (component_configs.get("unet") or {}).get("addition_embed_type") == "text_time"

    def lora_state_dict_kwargs(self):
        # Kohya/SGM files name UNet blocks by position; diffusers maps them with the UNet's config.
        return {"unet_config": self.denoiser.config}

    def _encode(self, prompts: List[str], device) -> Condition:
        embeds, _, pooled, _ = self.text_pipeline().encode_prompt(
            prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return Condition(embeds=embeds, pooled=pooled)

    @property
    def pooled_dim(self) -> int:
        unet = _unwrap(self.denoiser)
        return unet.add_embedding.linear_1.in_features - 6 * unet.config.addition_time_embed_dim

    @property
    def pooled_embedding_dim(self) -> int:
        return self.pooled_dim

    def _unconditional(self, batch_size: int, device) -> Condition:
        # SDXL's pipeline (force_zeros_for_empty_prompt) and DMD2 use all-zero embeddings as the null condition,
        # so no text encoder is needed for it.
        unet = _unwrap(self.denoiser)
        tokenizer = self.components.get("tokenizer")
        length = tokenizer.model_max_length if tokenizer is not None else 77
        dtype = self.components["text_encoder_2"].dtype if self.components.get("text_encoder_2") else unet.dtype
        device = device or unet.device
        embeds = torch.zeros(batch_size, length, unet.config.cross_attention_dim, device=device, dtype=dtype)
        pooled = torch.zeros(batch_size, self.pooled_dim, device=device, dtype=dtype)
        return Condition(embeds=embeds, pooled=pooled)

    def add_time_ids(self, x_t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """SDXL micro-conditioning ``(original_size, crop_top_left, target_size)`` with the pipeline's defaults.

        The tensor depends only on the shape, dtype and device, so the last one is reused (building it from a Python
        list costs more than the rest of a step's glue); the UNet reads it without writing to it.
        """
        height, width = self.image_size_of(x_t)
        key = (height, width, x_t.shape[0], dtype, x_t.device)
        cached = getattr(self, "_time_ids", None)
        if cached is None or cached[0] != key:
            ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=dtype, device=x_t.device)
            cached = self._time_ids = (key, ids.repeat(x_t.shape[0], 1))
        return cached[1]

    def _forward(self, denoiser, x_t, t, condition, guidance):
        added = {"text_embeds": condition.pooled, "time_ids": self.add_time_ids(x_t, condition.embeds.dtype)}
        return denoiser(x_t, t, encoder_hidden_states=condition.embeds, added_cond_kwargs=added, return_dict=False)[0]

    def feature_module(self, denoiser):
        # DMD2 puts its GAN head on the UNet bottleneck (Yin et al. 2024b, arXiv 2405.14867: the GAN classifier on the
        # fake-score UNet's mid-block features).
        return denoiser.mid_block

    def feature_channels(self) -> int:
        return int(_unwrap(self.denoiser).config.block_out_channels[-1])
