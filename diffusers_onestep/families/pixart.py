"""PixArt-α (Chen et al. 2023) and PixArt-Σ (Chen et al. 2024): DiT with T5 text, VP path, learned sigma."""

from __future__ import annotations

from typing import List

import torch

from .base import Condition, FamilyAdapter, TrainingDefaults, _unwrap


#: where diffusers defines the PixArt aspect-ratio tables (``ASPECT_RATIO_256_BIN`` ... ``ASPECT_RATIO_1024_BIN``)
_PIXART_ALPHA_MODULE = "diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha"

#: ``PixArtTransformer2DModel`` settings shared by every published PixArt-α/Σ transformer (PixArt-XL-2-*): only the
#: sizes (sample size, depth, heads, widths, caption channels) differ between checkpoints and the tiny test models
PIXART_BLOCK_CONFIG = {
    "patch_size": 2,
    "in_channels": 4,
    "out_channels": 8,  # learned sigma: prediction and variance
    "attention_bias": True,
    "activation_fn": "gelu-approximate",
    "num_embeds_ada_norm": 1000,
    "norm_type": "ada_norm_single",
    "norm_elementwise_affine": False,
    "norm_eps": 1e-6,
}


class PixArtAlphaAdapter(FamilyAdapter):
    name = "pixart_alpha"
    display_name = "PixArt-α"
    negative_prompt_attention = "cross"
    pipeline_class_names = ("PixArtAlphaPipeline",)
    native_pipeline_class_name = "PixArtAlphaPipeline"
    native_interop_pipeline_class_name = "PixArtAlphaPipeline"
    native_interop_call_kwargs = {"guidance_scale": 1.0, "num_inference_steps": 1}
    denoiser_name = "transformer"
    # diffusers 0.42 has no PixArt LoRA loader. SanaPipeline's SanaLoraLoaderMixin is a transformer-only one
    # (`_lora_loadable_modules = ["transformer"]`): its save_lora_weights writes `transformer.`-prefixed keys and its
    # lora_state_dict reads diffusers and peft layouts without UNet-specific remapping -- what a PixArt transformer
    # LoRA needs, and the file loads with `load_lora_weights` wherever a transformer LoRA loader is available.
    lora_pipeline_class_name = "SanaPipeline"
    #: T5 tokens kept, as in the family's pipeline
    default_max_sequence_length = 120
    required_condition_fields = ("embeds", "mask")
    # PixArtAlphaPipeline.__call__'s choice of aspect-ratio table by transformer sample size.
    resolution_bin_tables = {
        128: (_PIXART_ALPHA_MODULE, "ASPECT_RATIO_1024_BIN"),
        64: (_PIXART_ALPHA_MODULE, "ASPECT_RATIO_512_BIN"),
        32: (_PIXART_ALPHA_MODULE, "ASPECT_RATIO_256_BIN"),
    }
    # The public PixArt-α DMD student runs at t=400 (the PixArt-α DMD model card and the PixArt-sigma repo's DMD
    # demo: timesteps=[400]); TDM (Luo et al. 2025, arXiv 2503.06674) distils PixArt with CFG 4.5 in its PixArt
    # training demo. No published learning rate: ours, labelled so in docs/training.md.
    # The `tdm` method's defaults on PixArt-α are that demo's (train_tdm_demo.py, algorithms.md §11.1): a 4-step student
    # at T_k = k·225 − 1 of the 1000-step schedule (--total_steps 900) and --cfg 4.5; its optimizer settings (fake lr
    # 2e-5, generator lr 4e-6, Adam betas (0, 0.95)) are the method's own (TDM.optimizer_defaults).
    training_defaults = TrainingDefaults(
        student_timesteps=(400.0,),
        guidance_scale=4.5,
        learning_rate_full=1e-6,
        learning_rate_lora=5e-5,
        method_defaults={"tdm": {"student_timesteps": (899.0, 674.0, 449.0, 224.0), "guidance_scale": 4.5}},
    )

    @classmethod
    def matches(cls, model_index, component_configs):
        # PixArt-α and -Σ transformers share one class and look alike by config; only a Σ pipeline name tells Σ.
        transformer = component_configs.get("transformer") or {}
        return transformer.get("_class_name") == "PixArtTransformer2DModel" and "Sigma" not in (
            model_index.get("_class_name") or ""
        )

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
    native_interop_pipeline_class_name = "PixArtSigmaPipeline"
    # As PixArt-α: no PixArt LoRA loader exists, SanaPipeline's transformer-only one writes the same `transformer.` keys.
    lora_pipeline_class_name = "SanaPipeline"
    default_max_sequence_length = 300
    # PixArtSigmaPipeline.__call__'s choice: the PixArt-α tables plus the 2K one.
    resolution_bin_tables = {
        256: ("diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma", "ASPECT_RATIO_2048_BIN"),
        **PixArtAlphaAdapter.resolution_bin_tables,
    }

    @classmethod
    def matches(cls, model_index, component_configs):
        transformer = component_configs.get("transformer") or {}
        return transformer.get("_class_name") == "PixArtTransformer2DModel" and "Sigma" in (
            model_index.get("_class_name") or ""
        )
