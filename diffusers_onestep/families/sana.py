"""SANA (Xie et al. 2024; flow matching, Gemma text) and SANA-Sprint (Chen et al. 2025; TrigFlow, embedded CFG)."""

from __future__ import annotations

from typing import List

import torch

from .. import parameterization as param
from .base import Condition, FamilyAdapter, TrainingDefaults, _unwrap


class SanaAdapter(FamilyAdapter):
    name = "sana"
    display_name = "SANA"
    negative_prompt_attention = "cross"
    pipeline_class_names = ("SanaPipeline", "SanaPAGPipeline")
    native_pipeline_class_name = "SanaPipeline"
    native_interop_pipeline_class_name = "SanaPipeline"
    native_interop_call_kwargs = {"guidance_scale": 1.0, "num_inference_steps": 1}
    denoiser_name = "transformer"
    noise_path_kind = "flow"
    # SANA's own LoRA loader (SanaLoraLoaderMixin): `transformer.`-prefixed keys.
    lora_pipeline_class_name = "SanaPipeline"
    default_lora_target_modules = ("to_k", "to_q", "to_v")
    default_max_sequence_length = 300
    required_condition_fields = ("embeds", "mask")
    # SanaPipeline.__call__'s choice of aspect-ratio table by transformer sample size (DC-AE, 32x downsampling).
    resolution_bin_tables = {
        128: ("diffusers.pipelines.sana.pipeline_sana", "ASPECT_RATIO_4096_BIN"),
        64: ("diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma", "ASPECT_RATIO_2048_BIN"),
        32: ("diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha", "ASPECT_RATIO_1024_BIN"),
        16: ("diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha", "ASPECT_RATIO_512_BIN"),
    }
    # No DMD2/f-distill recipe exists for SANA: the student starts from pure noise (flow sigma 1) and the target uses
    # the SANA pipeline's default guidance 4.5; learning rates are ours.
    training_defaults = TrainingDefaults(
        student_timesteps=(1.0,),
        guidance_scale=4.5,
        learning_rate_full=1e-6,
        learning_rate_lora=5e-5,
    )

    @classmethod
    def matches(cls, model_index, component_configs):
        transformer = component_configs.get("transformer") or {}
        return transformer.get("_class_name") == "SanaTransformer2DModel" and not transformer.get("guidance_embeds")

    def _encode(self, prompts: List[str], device) -> Condition:
        # No complex_human_instruction: it prepends ~1000 tokens of instructions meant for the 4.5 guidance
        # teacher's prompt enhancement, not for distillation targets.
        embeds, mask, _, _ = self.text_pipeline().encode_prompt(
            prompts,
            do_classifier_free_guidance=False,
            device=device,
            clean_caption=False,
            max_sequence_length=self.max_sequence_length,
            complex_human_instruction=None,
        )
        return Condition(embeds=embeds, mask=mask)

    def _model_timestep(self, denoiser, t):
        scale = getattr(_unwrap(denoiser).config, "timestep_scale", 1.0) or 1.0
        return self.noise_path.to_scheduler_timestep(t) * scale

    def _guidance(self, denoiser, guidance, batch_size, device):
        return None

    def _forward(self, denoiser, x_t, t, condition, guidance):
        return denoiser(
            x_t,
            encoder_hidden_states=condition.embeds,
            encoder_attention_mask=condition.mask,
            timestep=self._model_timestep(denoiser, t),
            guidance=self._guidance(denoiser, guidance, x_t.shape[0], x_t.device),
            return_dict=False,
        )[0]


class SanaSprintAdapter(SanaAdapter):
    """SANA-Sprint: a flow transformer run as a TrigFlow model, with guidance embedded in the network."""

    name = "sana_sprint"
    display_name = "SANA-Sprint"
    pipeline_class_names = ("SanaSprintPipeline",)
    native_pipeline_class_name = "SanaSprintPipeline"
    # SanaSprintPipeline calls SCMScheduler.set_timesteps(max_timesteps=..., intermediate_timesteps=...) and scales the
    # sample by sigma_data inside its loop, so it cannot drive OneStepScheduler: Sprint folders name OneStepPipeline.
    native_interop_pipeline_class_name = None
    native_interop_call_kwargs = {}
    noise_path_kind = "trigflow"
    # SanaSprintPipeline's own LoRA loader (SanaLoraLoaderMixin, as SANA's): `transformer.`-prefixed keys.
    lora_pipeline_class_name = "SanaSprintPipeline"
    has_embedded_guidance = True
    default_embedded_guidance_scale = 4.5
    # SanaSprintPipeline.__call__ bins only the 1024 px sample size.
    resolution_bin_tables = {32: ("diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha", "ASPECT_RATIO_1024_BIN")}
    # SANA-Sprint students start at TrigFlow t = pi/2 with embedded guidance 4.5 (SANA-Sprint, Chen et al. 2025,
    # arXiv 2503.09641; diffusers' SanaSprintPipeline defaults: max_timesteps=1.57080, guidance_scale=4.5).
    training_defaults = TrainingDefaults(
        student_timesteps=(1.5708,),
        guidance_scale=4.5,
        learning_rate_full=2e-6,
        learning_rate_lora=5e-5,
    )

    @classmethod
    def matches(cls, model_index, component_configs):
        transformer = component_configs.get("transformer") or {}
        return transformer.get("_class_name") == "SanaTransformer2DModel" and bool(transformer.get("guidance_embeds"))

    def pipeline_sampling_kwargs(self, num_inference_steps: int):
        # SanaSprintPipeline's intermediate timestep belongs to its 2-step schedule only
        return {} if num_inference_steps == 2 else {"intermediate_timesteps": None}

    def _encode(self, prompts: List[str], device) -> Condition:
        embeds, mask = self.text_pipeline().encode_prompt(
            prompts,
            device=device,
            clean_caption=False,
            max_sequence_length=self.max_sequence_length,
            complex_human_instruction=None,
        )
        return Condition(embeds=embeds, mask=mask)

    def _guidance(self, denoiser, guidance, batch_size, device):
        config = _unwrap(denoiser).config
        if not getattr(config, "guidance_embeds", False):
            return None
        if guidance is None:
            guidance = torch.full((batch_size,), self.default_embedded_guidance_scale, device=device)
        guidance = torch.as_tensor(guidance, device=device, dtype=torch.float32)
        if guidance.ndim == 0:
            guidance = guidance.expand(batch_size)
        return guidance * config.guidance_embeds_scale

    def _forward(self, denoiser, x_t, t, condition, guidance):
        # TrigFlow time t -> flow time s and flow sample; the network's velocity -> TrigFlow output F.
        s = param.trigflow_to_flow_time(t.to(torch.float64))
        flow_sample = param.trigflow_to_flow_sample(x_t, t)
        velocity = denoiser(
            flow_sample.to(x_t.dtype),
            encoder_hidden_states=condition.embeds,
            encoder_attention_mask=condition.mask,
            timestep=s.to(torch.float32),
            guidance=self._guidance(denoiser, guidance, x_t.shape[0], x_t.device),
            return_dict=False,
        )[0]
        return param.flow_velocity_to_trigflow(velocity, flow_sample, s)
