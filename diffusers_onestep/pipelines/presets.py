"""The public one-step checkpoints and how their model cards say to run them (recorded in each preset's ``card``).

Data and lookup only: ``OneStepPipeline.from_pretrained("<repo id>")`` resolves these ids through :data:`PRESETS`
(:func:`diffusers_onestep.pipelines.loading.load_preset` assembles one): the right base
pipeline, the student weights, and a :class:`OneStepScheduler` carrying the timesteps the card hard-codes
(``timesteps=[399]``, ``shifted_timestep=250``, ...). Repos with several students take ``weight_name=``.

Where the card's own scheduler feeds the UNet a slightly different input scale at the first step (trailing
Euler/EulerAncestral multiply unit noise by ``sqrt(1 - alphā_999)`` ≈ 0.998), OneStepPipeline feeds unit noise, as
LCMScheduler does; ``notes`` says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

from ..families import get_adapter_class


SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"
PIXART_1024 = "PixArt-alpha/PixArt-XL-2-1024-MS"
DMD2_4STEP = (999, 749, 499, 249)


@dataclass(frozen=True)
class Preset:
    """How to assemble and run one public student.

    Attributes:
        repo_id: the student's Hub repo.
        family: backbone family key.
        kind: ``"pipeline"`` (a full pipeline repo), ``"denoiser"`` (UNet/transformer weights on a base), or
            ``"lora"`` (a LoRA fused into a base).
        conditioning_timesteps: the timesteps the card passes (natural units of the noise path).
        prediction_type: what the student outputs.
        weight_name / subfolder: the file (or denoiser folder) inside ``repo_id``.
        base_model: the base pipeline for ``denoiser``/``lora`` kinds.
        lora_scale: fuse scale of LoRA students.
        embedded_guidance_scale: default embedded guidance (SANA-Sprint).
        resolution: the card's resolution.
        card: how the model card runs it, for the docs table.
        notes: differences from the card's recipe, if any.
        default: the variant used when no ``weight_name`` is given.
    """

    repo_id: str
    family: str
    kind: str
    conditioning_timesteps: Tuple[float, ...]
    prediction_type: str
    resolution: int
    card: str
    weight_name: Optional[str] = None
    subfolder: Optional[str] = None
    base_model: Optional[str] = None
    lora_scale: float = 1.0
    embedded_guidance_scale: Optional[float] = None
    notes: str = ""
    default: bool = False


PRESETS: List[Preset] = [
    Preset(
        "stabilityai/sdxl-turbo",
        "sdxl",
        "pipeline",
        (999,),
        "epsilon",
        512,
        "AutoPipelineForText2Image, num_inference_steps=1, guidance_scale=0.0 (EulerAncestral, trailing)",
        notes="unit-noise input instead of Euler's sqrt(1 - alphā_999) scaling (0.2% apart)",
        default=True,
    ),
    Preset(
        "tianweiy/DMD2",
        "sdxl",
        "denoiser",
        (399,),
        "epsilon",
        1024,
        "UNet .bin on SDXL base, LCMScheduler, timesteps=[399], guidance_scale=0",
        weight_name="dmd2_sdxl_1step_unet_fp16.bin",
        base_model=SDXL_BASE,
        notes="legacy .bin, loaded with torch.load(weights_only=True)",
        default=True,
    ),
    Preset(
        "tianweiy/DMD2",
        "sdxl",
        "denoiser",
        DMD2_4STEP,
        "epsilon",
        1024,
        "UNet .bin on SDXL base, LCMScheduler, timesteps=[999, 749, 499, 249], guidance_scale=0",
        weight_name="dmd2_sdxl_4step_unet_fp16.bin",
        base_model=SDXL_BASE,
        notes="legacy .bin, loaded with torch.load(weights_only=True)",
    ),
    Preset(
        "tianweiy/DMD2",
        "sdxl",
        "lora",
        DMD2_4STEP,
        "epsilon",
        1024,
        "load_lora_weights + fuse_lora(lora_scale=1.0), LCMScheduler, timesteps=[999, 749, 499, 249]",
        weight_name="dmd2_sdxl_4step_lora_fp16.safetensors",
        base_model=SDXL_BASE,
    ),
    Preset(
        "ByteDance/SDXL-Lightning",
        "sdxl",
        "denoiser",
        (999,),
        "sample",
        1024,
        "UNet safetensors on SDXL base, EulerDiscrete(timestep_spacing='trailing', prediction_type='sample'), 1 step",
        weight_name="sdxl_lightning_1step_unet_x0.safetensors",
        base_model=SDXL_BASE,
        notes="unit-noise input instead of Euler's sqrt(1 - alphā_999) scaling (0.2% apart)",
        default=True,
    ),
    Preset(
        "ByteDance/Hyper-SD",
        "sdxl",
        "denoiser",
        (800,),
        "epsilon",
        1024,
        "UNet safetensors on SDXL base, LCMScheduler, timesteps=[800]",
        weight_name="Hyper-SDXL-1step-Unet.safetensors",
        base_model=SDXL_BASE,
        default=True,
    ),
    Preset(
        "ByteDance/Hyper-SD",
        "sdxl",
        "lora",
        (999,),
        "epsilon",
        1024,
        "load_lora_weights + fuse_lora(), TCDScheduler, 1 step, eta=1.0",
        weight_name="Hyper-SDXL-1step-lora.safetensors",
        base_model=SDXL_BASE,
        notes="OneStepPipeline returns x0, where one TCD step returns x0 re-noised to t=0 with its own noise "
        "estimate, sqrt(alphā_0) x0 + sqrt(1 - alphā_0) eps (3% of eps)",
    ),
    Preset(
        "PixArt-alpha/PixArt-Alpha-DMD-XL-2-512x512",
        "pixart_alpha",
        "denoiser",
        (400,),
        "epsilon",
        512,
        "transformer/ on PixArt-XL-2-1024-MS text encoder and VAE, DDPMScheduler, timesteps=[400]",
        subfolder="transformer",
        base_model=PIXART_1024,
        default=True,
    ),
    Preset(
        "Efficient-Large-Model/Sana_Sprint_0.6B_1024px_diffusers",
        "sana_sprint",
        "pipeline",
        (1.5708,),
        "trigflow",
        1024,
        "SanaSprintPipeline, num_inference_steps=1, intermediate_timesteps=None, guidance 4.5",
        embedded_guidance_scale=4.5,
        default=True,
    ),
    Preset(
        "Efficient-Large-Model/Sana_Sprint_1.6B_1024px_diffusers",
        "sana_sprint",
        "pipeline",
        (1.5708,),
        "trigflow",
        1024,
        "SanaSprintPipeline, num_inference_steps=1, intermediate_timesteps=None, guidance 4.5",
        embedded_guidance_scale=4.5,
        default=True,
    ),
    Preset(
        "XDG-XHS/distar_long_1step",
        "sdxl",
        "pipeline",
        (399,),
        "epsilon",
        1024,
        "DiffusionPipeline, LCMScheduler, timesteps=[399], guidance_scale=0",
        default=True,
    ),
    Preset(
        "ChenDY/NitroFusion",
        "sdxl",
        "denoiser",
        (249,),
        "epsilon",
        1024,
        "UNet safetensors on SDXL base, pasted TimestepShiftLCMScheduler(shifted_timestep=250), 1 step",
        weight_name="nitrosd-realism_unet.safetensors",
        base_model=SDXL_BASE,
        notes="the card's scheduler shows the UNet 999*250/1000 = 249.75; the preset rounds to 249",
        default=True,
    ),
    Preset(
        "ChenDY/NitroFusion",
        "sdxl",
        "denoiser",
        (499,),
        "epsilon",
        1024,
        "UNet safetensors on SDXL base, pasted TimestepShiftLCMScheduler(shifted_timestep=500), 1 step",
        weight_name="nitrosd-vibrant_unet.safetensors",
        base_model=SDXL_BASE,
        notes="the card's scheduler shows the UNet 999*500/1000 = 499.5; the preset rounds to 499",
    ),
]


def preset_ids() -> List[str]:
    return sorted({p.repo_id for p in PRESETS})


def find_preset(repo_id: str, weight_name: Optional[str] = None) -> Optional[Preset]:
    """The preset for ``repo_id`` (and ``weight_name``), or ``None`` when the repo is not a known student."""
    candidates = [p for p in PRESETS if p.repo_id == repo_id]
    if not candidates:
        return None
    if weight_name is None:
        return next(p for p in candidates if p.default)
    for p in candidates:
        if weight_name in (p.weight_name, p.subfolder):
            return p
    names = ", ".join(p.weight_name or p.subfolder for p in candidates)
    raise ValueError(f"{repo_id} has no preset for weight_name={weight_name!r}; known variants: {names}.")


def _timesteps_text(timesteps) -> str:
    return "[" + ", ".join(f"{t:g}" for t in timesteps) + "]"


def _how_loaded(preset: Preset) -> str:
    if preset.kind == "pipeline":
        return "full pipeline"
    denoiser = get_adapter_class(preset.family).denoiser_name
    if preset.kind == "denoiser":
        what = f"`{preset.subfolder}/` folder" if preset.weight_name is None else f"{denoiser} weights"
        return f"{what} on `{preset.base_model}`"
    return f"LoRA fused (scale {preset.lora_scale:g}) into `{preset.base_model}`"


def markdown_table() -> str:
    """The supported-students table of ``docs/inference.md``, generated from :data:`PRESETS` (a test keeps the doc
    equal to it; regenerate with ``python -m diffusers_onestep.pipelines.presets``)."""
    rows = [
        "| Hub id | `weight_name=` | family | how it is loaded | timesteps | prediction | size | model card recipe "
        "| notes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in PRESETS:
        variant = p.weight_name or p.subfolder or "–"
        if p.default and (p.weight_name or p.subfolder):
            variant += " (default)"
        rows.append(
            f"| `{p.repo_id}` | {variant} | {p.family} | {_how_loaded(p)} | {_timesteps_text(p.conditioning_timesteps)} "
            f"| {p.prediction_type} | {p.resolution} | {p.card} | {p.notes or '–'} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":  # pragma: no cover
    print(markdown_table())
