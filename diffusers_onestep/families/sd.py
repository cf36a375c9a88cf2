"""Stable Diffusion 1.x and 2.x (Rombach et al. 2022, arXiv 2112.10752): UNet, one CLIP text encoder, VP path with
epsilon prediction (SD 1.x, SD 2.x base 512) or v-prediction (SD 2.x 768, Salimans & Ho 2022), read off the scheduler
config as for every family.

The safety checker and its feature extractor are not components of a student: our folders leave them out (``None``),
and ``StableDiffusionPipeline`` is built with ``requires_safety_checker=False`` wherever the library builds one.
"""

from __future__ import annotations

from typing import List

from .base import UNET_LORA_TARGET_MODULES, Condition, FamilyAdapter, TrainingDefaults, _unwrap


class StableDiffusionAdapter(FamilyAdapter):
    name = "sd"
    display_name = "Stable Diffusion 1.x/2.x"
    negative_prompt_attention = "cross"
    pipeline_class_names = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline")
    native_pipeline_class_name = "StableDiffusionPipeline"
    # No safety checker in our folders: StableDiffusionPipeline takes None for both and, with
    # requires_safety_checker=False, does not warn about it on every construction.
    native_pipeline_kwargs = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    native_interop_pipeline_class_name = "StableDiffusionPipeline"
    # guidance_scale <= 1 turns StableDiffusionPipeline's classifier-free guidance off (do_classifier_free_guidance)
    native_interop_call_kwargs = {"guidance_scale": 0.0, "num_inference_steps": 1}
    denoiser_name = "unet"
    text_component_names = ("tokenizer", "text_encoder")
    # The UNet LoRA targets of diffusers' LCM-LoRA SD 1.5 training example (train_lcm_distill_lora_sd_wds.py), the
    # same list as SDXL's (DMD2's --generator_lora targets): attention, feed-forward, resnet convolutions and time
    # embedding.
    default_lora_target_modules = UNET_LORA_TARGET_MODULES
    # StableDiffusionPipeline's own LoRA loader (StableDiffusionLoraLoaderMixin): `unet.`-prefixed keys; it reads
    # diffusers, peft and Kohya layouts.
    lora_pipeline_class_name = "StableDiffusionPipeline"
    # DMD2's SD 1.5 recipe (Yin et al. 2024b, arXiv 2405.14867; tianweiy/DMD2 experiments/sdv1.5/
    # laion6.25_sd_baseline_8node_guidance1.75_lr1e-5_seed10_dfake10_from_scratch.sh and its
    # ..._lr5e-7_..._diffusion1000_gan1e-3_... resume script at commit 8d8fa55):
    #   * the generator is conditioned on t=999 from pure noise (main/test_folder_sd.py: timesteps * (1000 - 1));
    #   * --real_guidance_scale 1.75 (its README: good FID but low image quality; a larger scale looks better);
    #   * --generator_lr 1e-5 and --guidance_lr 1e-5 from scratch (5e-7 in the GAN fine-tuning stage that resumes it);
    #   * --dfake_gen_update_ratio 10 (ten fake-score updates per generator update);
    #   * --gen_cls_loss_weight 1e-3 (the GAN stage's generator weight; --guidance_cls_loss_weight 1e-2).
    # DMD2 trained no SD 1.5 LoRA: the LoRA shape is main/train_sd.py's --lora_rank 64 / --lora_alpha 8 defaults and the
    # LoRA learning rate that of its SDXL LoRA run (sdxl_cond999_8node_lr5e-5_..._lora.sh), labelled so in
    # docs/training.md.
    #
    # SiD-LSG's SD 1.5 settings, the `sid` method's defaults on this family (algorithms.md §7.2; method_defaults) (Zhou
    # et al., "Guided Score identity Distillation for Data-Free One-Step Text-to-Image Generation", ICLR 2025, arXiv
    # 2406.01561; mingyuanzhou/SiD-LSG run_sid.sh 'sd1.5', sid_train.py defaults and README at commit 709fc22):
    # generator initialised from SD 1.5 and conditioned on --init_timestep 625 (of 1000); --alpha 1; --lr 1e-6 (fake
    # score) and --glr 1e-6 (generator), Adam betas (0, 0.999), eps 1e-8 (1e-6 in fp16); total batch 512, fp32
    # (--fp16 0); EMA half-life 0.05 Mimg; teacher times in [--tmin 20, --tmax 980]; LSG scales kappa1 = cfg_train_fake
    # = 2, kappa2 = kappa3 = cfg_eval_fake = 2, kappa4 = cfg_eval_real = 2 in run_sid.sh, while the README's table
    # reports 1.5 (the FID-oriented setting, FID 8.71) up to 4.5 (the CLIP-oriented one).
    training_defaults = TrainingDefaults(
        student_timesteps=(999.0,),
        guidance_scale=1.75,
        learning_rate_full=1e-5,
        learning_rate_lora=5e-5,
        gan_weight=1e-3,
        lora_rank=64,
        lora_alpha=8,
        critic_updates_per_student=10,
        method_defaults={
            "sid": {
                "student_timesteps": (625.0,),
                "sid_alpha": 1.0,
                "guidance_scale": 2.0,
                "fake_guidance_scale": 2.0,
                "fake_train_guidance_scale": 2.0,
                "critic_updates_per_student": 1,
                "learning_rate": 1e-6,
            }
        },
    )

    @classmethod
    def matches(cls, model_index, component_configs):
        # A plain text-to-image UNet around one CLIP encoder: no SDXL micro-conditioning (addition_embed_type
        # "text_time", which SDXLAdapter claims), no Kandinsky/IF image or text embeddings (addition_embed_type,
        # encoder_hid_dim), no upscaler class embedding, and as many output as input channels (inpainting's 9-channel
        # and depth-to-image's 5-channel UNets take extra inputs a text-to-image student does not have).
        unet = component_configs.get("unet") or {}
        return (
            unet.get("_class_name") == "UNet2DConditionModel"
            and unet.get("addition_embed_type") is None
            and unet.get("encoder_hid_dim") is None
            and unet.get("class_embed_type") is None
            and unet.get("in_channels", 4) == unet.get("out_channels", 4)
        )

    def lora_state_dict_kwargs(self):
        # Kohya/SGM files name UNet blocks by position; diffusers maps them with the UNet's config.
        return {"unet_config": self.denoiser.config}

    def _encode(self, prompts: List[str], device) -> Condition:
        embeds, _ = self.text_pipeline().encode_prompt(
            prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return Condition(embeds=embeds)

    # The null condition is the encoded empty prompt (the base class's): StableDiffusionPipeline's negative prompt
    # defaults to "" (encode_prompt's uncond_tokens), and DMD2's SD 1.5 trainer encodes "" for its unconditional
    # embedding (main/train_sd.py: text_encoder(tokenizer([""]))).

    def _forward(self, denoiser, x_t, t, condition, guidance):
        # The UNet takes the scheduler's timestep: the natural time itself on the VP path, 1000 sigma on a flow path
        # (InstaFlow's rectified flow on an SD 1.5 UNet: RectifiedFlowPipeline calls it at t = 1000 (1 - i / N)).
        timestep = self.noise_path.to_scheduler_timestep(t)
        return denoiser(x_t, timestep, encoder_hidden_states=condition.embeds, return_dict=False)[0]

    def feature_module(self, denoiser):
        # DMD2's GAN classifier reads the fake-score UNet's bottleneck (mid-block) features, on SD 1.5 as on SDXL.
        return denoiser.mid_block

    def feature_channels(self) -> int:
        return int(_unwrap(self.denoiser).config.block_out_channels[-1])
