"""Per-family training defaults, taken from the papers' released configurations where one exists.

Sources (algorithms.md): DMD2 SDXL (§4.6): student conditioned on t=399, real-score CFG 8, TTUR 5, LoRA r=64 α=8,
lr 5e-7 (full) / 5e-5 (LoRA), generator GAN weight 5e-3; f-distill SDXL (§6.5): JS, lr 5e-7, GAN 5e-3, CFG 8.
PixArt-α: the public DMD student runs at t=400 (diffusers-facts §3) and TDM distils PixArt with CFG 4.5 (§11.1).
SANA: no DMD2/f-distill recipe exists; the student starts from pure noise (flow sigma 1) with the SANA pipeline's
default guidance 4.5. SANA-Sprint students start at TrigFlow t = pi/2 (1.5708) with embedded guidance 4.5 (§11.5).
Learning rates for PixArt and SANA are our choice (no published recipe) and are labelled so in the docs.
"""

FAMILY_DEFAULTS = {
    "sdxl": {
        "student_timesteps": [399], "guidance_scale": 8.0, "lr_full": 5e-7, "lr_lora": 5e-5,
        "gan_weight": 5e-3, "lora_rank": 64, "lora_alpha": 8, "resolution": 1024,
    },
    "pixart_alpha": {
        "student_timesteps": [400], "guidance_scale": 4.5, "lr_full": 1e-6, "lr_lora": 5e-5,
        "gan_weight": 5e-3, "lora_rank": 64, "lora_alpha": 64, "resolution": 512,
    },
    "pixart_sigma": {
        "student_timesteps": [400], "guidance_scale": 4.5, "lr_full": 1e-6, "lr_lora": 5e-5,
        "gan_weight": 5e-3, "lora_rank": 64, "lora_alpha": 64, "resolution": 1024,
    },
    "sana": {
        "student_timesteps": [1.0], "guidance_scale": 4.5, "lr_full": 1e-6, "lr_lora": 5e-5,
        "gan_weight": 5e-3, "lora_rank": 64, "lora_alpha": 64, "resolution": 1024,
    },
    "sana_sprint": {
        "student_timesteps": [1.5708], "guidance_scale": 4.5, "lr_full": 2e-6, "lr_lora": 5e-5,
        "gan_weight": 5e-3, "lora_rank": 64, "lora_alpha": 64, "resolution": 1024,
    },
}
#: critic updates per student update (DMD2 SDXL and f-distill SDXL: 5)
CRITIC_UPDATES_PER_STUDENT = 5
