"""PixArt-α (Chen et al. 2023) and PixArt-Σ (Chen et al. 2024): DiT with T5 text, VP path, learned sigma."""

from __future__ import annotations

from typing import List

import torch

from .base import Condition, FamilyAdapter, _unwrap


class PixArtAlphaAdapter(FamilyAdapter):
    name = "pixart_alpha"
    display_name = "PixArt-α"
    pipeline_class_names = ("PixArtAlphaPipeline",)
    native_pipeline_class_name = "PixArtAlphaPipeline"
    denoiser_name = "transformer"
    #: T5 tokens kept, as in the family's pipeline
    default_max_sequence_length = 120
    required_condition_fields = ("embeds", "mask")

    def _encode(self, prompts: List[str], device) -> Condition:
        embeds, mask, _, _ = self.text_pipeline().encode_prompt(
            prompts,
            do_classifier_free_guidance=False,
            device=device,
            clean_caption=False,
            max_sequence_length=self.max_sequence_length,
        )
        return Condition(embeds=embeds, mask=mask)

    def _forward(self, denoiser, x_t, t, condition, guidance):
        added = {"resolution": None, "aspect_ratio": None}
        if getattr(_unwrap(denoiser), "use_additional_conditions", False):
            # PixArt-α 1024px resolution/aspect-ratio micro-conditioning, as PixArtAlphaPipeline builds it.
            height, width = self.image_size_of(x_t)
            batch = x_t.shape[0]
            dtype = condition.embeds.dtype
            added = {
                "resolution": torch.tensor([height, width], dtype=dtype, device=x_t.device).repeat(batch, 1),
                "aspect_ratio": torch.tensor([height / width], dtype=dtype, device=x_t.device).repeat(batch, 1),
            }
        output = denoiser(
            x_t,
            encoder_hidden_states=condition.embeds,
            encoder_attention_mask=condition.mask,
            timestep=t,
            added_cond_kwargs=added,
            return_dict=False,
        )[0]
        return self._split_learned_sigma(output, x_t)


class PixArtSigmaAdapter(PixArtAlphaAdapter):
    name = "pixart_sigma"
    display_name = "PixArt-Σ"
    pipeline_class_names = ("PixArtSigmaPipeline",)
    native_pipeline_class_name = "PixArtSigmaPipeline"
    default_max_sequence_length = 300
