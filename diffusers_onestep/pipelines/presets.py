"""The public one-step and few-step checkpoints, and how their sources say to run them.

Data and lookup only: ``OneStepPipeline.from_pretrained("<repo id>")`` resolves these ids through :data:`PRESETS`
(:func:`diffusers_onestep.pipelines.loading.load_preset` assembles one): the right base pipeline, the student weights,
and a :class:`OneStepScheduler` carrying the timesteps the source hard-codes (``timesteps=[399]``,
``shifted_timestep=250``, trailing spacing, ...), so that ``pipe(prompt)`` gives the source's image. Repos with several
students take ``weight_name=``.

Every preset records where its recipe comes from (``sources``: a model card, README, demo script or documentation page,
pinned to a revision), the recipe as quoted there (``recipe``), what differs from it (``notes``) and what could not be
checked against the source (``unconfirmed``). ``docs/inference.md``'s table is generated from them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import List, Optional, Tuple

from ..families import get_adapter_class


SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"
#: the SD 1.5 base: Hyper-SD's card names runwayml/stable-diffusion-v1-5, which is no longer on the Hub; this copy is
#: the id diffusers 0.42 itself names (StableDiffusionPipeline's sample-size deprecation message)
SD15_BASE = "stable-diffusion-v1-5/stable-diffusion-v1-5"
PIXART_1024 = "PixArt-alpha/PixArt-XL-2-1024-MS"
#: trailing spacing of 1000 training steps (EulerDiscreteScheduler and DDIMScheduler with timestep_spacing="trailing")
TRAILING = {
    2: (999, 499),
    4: (999, 749, 499, 249),
    8: (999, 874, 749, 624, 499, 374, 249, 124),
}
DMD2_4STEP = TRAILING[4]

#: the sources, pinned to the revision that was read
DMD2_CARD = "https://huggingface.co/tianweiy/DMD2/blob/d70dad9997ba79a111ac9e75e29ca9e4368377a1/README.md"
LIGHTNING_CARD = (
    "https://huggingface.co/ByteDance/SDXL-Lightning/blob/7374c773022b6d1872d66970b030721625521c67/README.md"
)
HYPER_CARD = "https://huggingface.co/ByteDance/Hyper-SD/blob/ed1416259dde8ab832ae4bf0af342f7d5012bced/README.md"
HYPER_FILES = "https://huggingface.co/ByteDance/Hyper-SD/tree/52d483a2ab8d38ce89e1d8b8f45771905f3af3f4"
TURBO_DOCS = (
    "https://github.com/huggingface/diffusers/blob/530fe0722df0bfda84a6abb7f55d3f4c862d6215/"
    "docs/source/en/using-diffusers/sdxl_turbo.md"
)
PIXART_DMD_DEMO = (
    "https://github.com/PixArt-alpha/PixArt-sigma/blob/1ce521afddcc2fab329b35b7374aa86d654e12f7/app/app_pixart_dmd.py"
)
SPRINT_DOC = "https://github.com/NVlabs/Sana/blob/0887f78a048ede31bf5c01449c4854eacb175c34/asset/docs/sana_sprint.md"
SPRINT_DIFFUSERS_DOCS = (
    "https://github.com/huggingface/diffusers/blob/4790104e0ba5a112bbae89104c5ed123e1155010/"
    "docs/source/en/api/pipelines/sana_sprint.md"
)
DISTAR_README = (
    "https://github.com/pkulwj1994/diff_instruct_star/blob/3b0cb9da46cde6c40f9b70d75b3b0ea102d11256/README.md"
)
FLUX_DEV = "black-forest-labs/FLUX.1-dev"
NITRO_README = "https://github.com/ChenDarYen/NitroFusion/blob/75ce562f1e07470fbb5866b4ff0b711c0056ac9a/README.md"
#: Stability AI's SD3.5 reference inference code; its CONFIGS table holds each SD3.x model's sampling settings
SD35_INFER = "https://github.com/Stability-AI/sd3.5/blob/fbf8f483f992d8d6ad4eaaeb23b1dc5f523c3b3a/sd3_infer.py"
#: the sigmas of FlowMatchEulerDiscreteScheduler(shift=3.0).set_timesteps(4) (diffusers 0.42, float32), the schedule
#: StableDiffusion3Pipeline runs SD3.5-Large-Turbo's 4 steps at; sd3_infer.py's 4-step Euler schedule at shift 3.0
#: (linspace over timesteps from sigma_max to sigma_min, then shifted) computes the same values
SD35_TURBO_SIGMAS = (1.0, 0.857692301273346, 0.602150559425354, 0.008928571827709675)

#: verbatim copies of Hub model cards (their text at the revision the copy was made; the Hub cards themselves are not
#: reachable here), where the SD 1.5, SD-Turbo, Hyper-FLUX and FLUX.1-schnell code blocks were read for this table
HF_README_COPIES = (
    "https://github.com/YinanWusoymilk/hf-readme/blob/1ab39f24f8f9548593ac6304367f31ae3ff45178/"
    "training_and_application/readme_files/"
)
HYPER_CARD_COPY = HF_README_COPIES + "ByteDance_Hyper-SD.md"
SCHNELL_CARD_COPY = HF_README_COPIES + "black-forest-labs_FLUX.1-schnell.md"
SD_TURBO_CARD_COPY = HF_README_COPIES + "stabilityai_sd-turbo.md"
#: SD-Turbo's own sampler (generative-models' Turbo demo: SD-Turbo runs configs/inference/sd_2_1.yaml, whose
#: denoiser is EpsScaling -- an epsilon UNet -- from the largest of 1000 DDPM sigmas)
SD_TURBO_DEMO = (
    "https://github.com/Stability-AI/generative-models/blob/07733737d5b64d9d3744abae3b76876904cd9715/"
    "scripts/demo/turbo.py"
)
SD_TURBO_CONFIG = (
    "https://github.com/Stability-AI/generative-models/blob/07bf8251e4a6bf6b34ed8b50633bd7f539916f44/"
    "configs/inference/sd_2_1.yaml"
)
DMD2_SD15_README = (
    "https://github.com/tianweiy/DMD2/blob/8d8fa55633d47cfb81bbc7a892e7248f9518763f/experiments/sdv1.5/README.md"
)
DMD2_SD15_EVAL = (
    "https://github.com/tianweiy/DMD2/blob/8d8fa55633d47cfb81bbc7a892e7248f9518763f/main/test_folder_sd.py"
)
#: DMD2's SD 1.5 model zoo (its experiments/sdv1.5/README.md): Hub folders holding the generator's pytorch_model.bin
DMD2_SD15_CHECKPOINTS = (
    "laion6.25_sd_baseline_8node_guidance1.75_lr5e-7_seed10_dfake10_diffusion1000_gan1e-3_resume_fid8.35_"
    "checkpoint_model_041000",
    "laion6.25_sd_baseline_8node_guidance1.75_lr1e-5_seed10_dfake10_from_scratch_fid9.28_checkpoint_model_039000",
)
INSTAFLOW_README = "https://github.com/gnobitab/InstaFlow/blob/736d904aec479ba6d6a8395457763922c9dfee19/code/README.md"
INSTAFLOW_PIPELINE = (
    "https://github.com/gnobitab/InstaFlow/blob/1079ed6cd64c15c70dadeb4e8b7379f8074b08f3/code/pipeline_rf.py"
)
HYPER_SD15_READ = (
    "the card's SD1.5 code blocks were read in a copy of its text (the second source); the 4- and 8-step file names "
    "follow its Hyper-SD15-Nstep(s)-lora pattern and its 2-step example, the Hub file listing was not re-read for them"
)
SD15_BASE_NOTE = (
    "the card's base runwayml/stable-diffusion-v1-5 is gone from the Hub: the preset loads its copy " + SD15_BASE
)

#: kinds of source, in the order the table prefers them; anything but a model card is named as such in the table
SOURCE_KINDS = ("model card", "README", "demo script", "docs")

UNIT_NOISE = "unit-noise input instead of Euler's sqrt(1 - alphā_999) scaling (0.2% apart)"
TRAILING_EULER = (
    "trailing Euler on an epsilon student is the deterministic DDIM step, the preset's `ode` solver; " + UNIT_NOISE
)
DMD2_README = "https://github.com/tianweiy/DMD2/blob/01f37a889dd347cb32bd124989bc12e0349ac7b2/README.md"
#: a verbatim copy of the DMD2 card's text, where its three code blocks were read in full for this table
DMD2_CARD_COPY = (
    "https://github.com/YinanWusoymilk/hf-readme/blob/1ab39f24f8f9548593ac6304367f31ae3ff45178/"
    "training_and_application/readme_files/tianweiy_DMD2.md"
)
DMD2_CARD_READ = (
    "the three code blocks (1-step UNet, 4-step UNet, 4-step LoRA) were read in full in a copy of the card's text "
    "(the second source), not on the Hub card at the revision linked first"
)
LIGHTNING_UNET_READ = (
    "the card's N-step UNet block was read here in part (its checkpoint name and the call num_inference_steps=4, "
    "guidance_scale=0); trailing spacing is that of its 1-step block and of its ComfyUI note (Euler, sgm_uniform)"
)
LIGHTNING_LORA_READ = (
    "the card's LoRA block was read here in part (its heading and imports, StableDiffusionXLPipeline and "
    "EulerDiscreteScheduler); load_lora_weights + fuse_lora() with trailing Euler as in its UNet blocks"
)
DDIM_LAST_STEP = (
    "DDIM with eta 0 is the preset's `ode` solver; DDIM's last step (the SDXL base's scheduler config sets "
    "set_alpha_to_one=False) returns sqrt(alphā_0) x0 + sqrt(1 - alphā_0) eps (3% of eps), OneStepPipeline returns x0"
)
NITRO_NOTE = (
    "the card's scheduler truncates (999 * {shift} / 1000).long(): the UNet gets exactly {t}, as here; its 2-4 step "
    "schedules condition the UNet at shifted timesteps while re-noising to the unshifted ones, which OneStepScheduler "
    "does not express, so the preset runs the 1-step recipe. The Hub card (ChenDY/NitroFusion, revision ce7256b) "
    "holds the same code"
)


def flow_euler_sigmas(steps: int) -> Tuple[float, ...]:
    """FluxPipeline's default schedule at ``steps`` steps, ``np.linspace(1.0, 1 / steps, steps)``: the unshifted sigmas
    its FlowMatchEulerDiscreteScheduler shifts at each image's resolution where it uses dynamic shifting (FLUX.1-dev),
    as OneStepScheduler does with them."""
    return tuple(round(1.0 - i * (1.0 - 1.0 / steps) / (steps - 1), 6) if steps > 1 else 1.0 for i in range(steps))


FLUX_EULER_NOTE = (
    "FlowMatchEulerDiscreteScheduler's Euler steps are the `ode` solver on the flow path; the stored sigmas are FluxPipeline's "
    "linspace(1, 1/N, N), shifted at each image's resolution as the repo's scheduler config says"
)


@dataclass(frozen=True)
class Preset:
    """How to assemble and run one public student, and where that recipe comes from.

    Attributes:
        repo_id: the student's Hub repo.
        family: backbone family key.
        kind: ``"pipeline"`` (a full pipeline repo), ``"denoiser"`` (UNet/transformer weights on a base), or
            ``"lora"`` (a LoRA fused into a base).
        conditioning_timesteps: the timesteps the source runs (natural units of the noise path).
        prediction_type: what the student outputs.
        resolution: the source's resolution.
        recipe: the recipe as the source gives it.
        sources: where the recipe is written: URLs pinned to the revision that was read, the first one the recipe's.
        source_kind: ``"model card"``, ``"README"`` (a GitHub README), ``"demo script"`` or ``"docs"``.
        weight_name / subfolder: the file (or denoiser folder) inside ``repo_id``.
        weight_name_spellings: other spellings of ``weight_name`` the sources use; Hub file names are case-sensitive,
            so the loader takes the one the repo has (:func:`diffusers_onestep.hub.resolve_weight_name`).
        base_model: the base pipeline for ``denoiser``/``lora`` kinds.
        lora_scale: fuse scale of LoRA students.
        embedded_guidance_scale: default embedded guidance (SANA-Sprint, FLUX.1-dev).
        max_sequence_length: the text tokens the source keeps (FLUX.1-schnell's card: 256).
        solver: how several steps move between timesteps: ``"sde"`` re-noises with fresh noise (LCMScheduler,
            SCMScheduler), ``"ode"`` with the predicted noise (trailing Euler, DDIM with eta 0).
        variant: the weight variant of ``repo_id`` the source loads (a repo that ships only ``*.fp16.*`` files);
            ``variant=`` of ``from_pretrained`` replaces it.
        scheduler_subfolder: the folder of ``repo_id`` whose ``scheduler_config.json`` the source reads the noise
            schedule from (otherwise the base's or the pipeline's own).
        noise_path: the noise path the source samples on where its scheduler config describes another (``"flow"``
            for InstaFlow: a rectified flow on an SD 1.5 UNet, whose repo keeps SD's DDPM-family scheduler config,
            which its pipeline does not use); ``None``: the one the scheduler config describes.
        notes: differences from the source's recipe, if any.
        unconfirmed: what the sources did not show and the preset assumes.
        default: the variant used when no ``weight_name`` is given.
    """

    repo_id: str
    family: str
    kind: str
    conditioning_timesteps: Tuple[float, ...]
    prediction_type: str
    resolution: int
    recipe: str
    sources: Tuple[str, ...]
    source_kind: str
    weight_name: Optional[str] = None
    weight_name_spellings: Tuple[str, ...] = ()
    subfolder: Optional[str] = None
    base_model: Optional[str] = None
    lora_scale: float = 1.0
    embedded_guidance_scale: Optional[float] = None
    max_sequence_length: Optional[int] = None
    solver: str = "sde"
    variant: Optional[str] = None
    scheduler_subfolder: Optional[str] = None
    noise_path: Optional[str] = None
    notes: str = ""
    unconfirmed: str = ""
    default: bool = False

    @property
    def weight_names(self) -> Tuple[str, ...]:
        """``weight_name`` and its other spellings, the expected one first."""
        return (self.weight_name, *self.weight_name_spellings) if self.weight_name else ()


def _sdxl_unet(file: str) -> str:
    return f"UNet2DConditionModel.from_config(SDXL base, subfolder='unet').load_state_dict(load_file('{file}'))"


def _lightning(steps: int, lora: bool) -> Preset:
    file = f"sdxl_lightning_{steps}step_{'lora' if lora else 'unet'}.safetensors"
    load = f"load_lora_weights(hf_hub_download(repo, '{file}')) + fuse_lora()" if lora else _sdxl_unet(file)
    return Preset(
        "ByteDance/SDXL-Lightning",
        "sdxl",
        "lora" if lora else "denoiser",
        TRAILING[steps],
        "epsilon",
        1024,
        recipe=f"{load}, EulerDiscreteScheduler.from_config(..., timestep_spacing='trailing'), "
        f"num_inference_steps={steps}, guidance_scale=0",
        sources=(LIGHTNING_CARD,),
        source_kind="model card",
        weight_name=file,
        base_model=SDXL_BASE,
        solver="ode",
        notes=TRAILING_EULER,
        unconfirmed=LIGHTNING_LORA_READ if lora else LIGHTNING_UNET_READ,
    )


def _hyper_lora(steps: int) -> Preset:
    file = f"Hyper-SDXL-{steps}steps-lora.safetensors"
    return Preset(
        "ByteDance/Hyper-SD",
        "sdxl",
        "lora",
        TRAILING[steps],
        "epsilon",
        1024,
        recipe=f"load_lora_weights(hf_hub_download(repo, '{file}')) + fuse_lora(), "
        f"DDIMScheduler.from_config(..., timestep_spacing='trailing'), num_inference_steps={steps}, guidance_scale=0",
        sources=(HYPER_CARD, HYPER_FILES),
        source_kind="model card",
        weight_name=file,
        base_model=SDXL_BASE,
        solver="ode",
        notes=DDIM_LAST_STEP,
    )


def _dmd2_sd15(folder: str) -> Preset:
    file = f"model/sdv1.5/{folder}/pytorch_model.bin"
    return Preset(
        "tianweiy/DMD2",
        "sd",
        "denoiser",
        (999,),
        "epsilon",
        512,
        recipe="UNet2DConditionModel.from_pretrained('runwayml/stable-diffusion-v1-5', subfolder='unet')"
        f".load_state_dict(torch.load('{file}'), strict=True); x0 = (noise - sqrt(1 - 0.0047) unet(noise, 999, "
        "text_encoder(prompt)[0])) / sqrt(0.0047) (--pred_eps), vae.decode(x0 / 0.18215)",
        sources=(DMD2_SD15_README, DMD2_SD15_EVAL),
        source_kind="README",
        weight_name=file,
        base_model=SD15_BASE,
        notes="legacy .bin, loaded with torch.load(weights_only=True); the evaluation script rounds alphā_999 to "
        "0.0047 where SD 1.5's schedule gives 0.00466, which OneStepPipeline uses: its x0 and the "
        "script's differ by about 0.4%; " + SD15_BASE_NOTE.replace("the card's", "the script's"),
        unconfirmed="DMD2 publishes no diffusers recipe for SD 1.5: the recipe is its evaluation script's generator "
        "call, which the README points to for inference",
    )


def _hyper_sd15_lora(steps: int) -> Preset:
    file = f"Hyper-SD15-{steps}steps-lora.safetensors"
    return Preset(
        "ByteDance/Hyper-SD",
        "sd",
        "lora",
        TRAILING[steps],
        "epsilon",
        512,
        recipe=f"DiffusionPipeline.from_pretrained('runwayml/stable-diffusion-v1-5') + load_lora_weights("
        f"hf_hub_download(repo, '{file}')) + fuse_lora(), DDIMScheduler.from_config(..., timestep_spacing='trailing'), "
        f"num_inference_steps={steps}, guidance_scale=0",
        sources=(HYPER_CARD, HYPER_CARD_COPY),
        source_kind="model card",
        weight_name=file,
        base_model=SD15_BASE,
        solver="ode",
        notes=SD15_BASE_NOTE + "; " + DDIM_LAST_STEP.replace("the SDXL base's", "the SD 1.5 base's"),
        unconfirmed=HYPER_SD15_READ,
    )


def _hyper_flux(steps: int) -> Preset:
    file = f"Hyper-FLUX.1-dev-{steps}steps-lora.safetensors"
    return Preset(
        "ByteDance/Hyper-SD",
        "flux",
        "lora",
        flow_euler_sigmas(steps),
        "flow_prediction",
        1024,
        recipe=f"FluxPipeline.from_pretrained('{FLUX_DEV}'), load_lora_weights(hf_hub_download(repo, '{file}')) + "
        f"fuse_lora(lora_scale=0.125), pipe(prompt, num_inference_steps={steps}, guidance_scale=3.5)",
        sources=(HYPER_CARD_COPY,),
        source_kind="model card",
        weight_name=file,
        base_model=FLUX_DEV,
        lora_scale=0.125,
        embedded_guidance_scale=3.5,
        solver="ode",
        notes=FLUX_EULER_NOTE + "; the card casts the pipeline to float16, which `torch_dtype=` chooses here",
        unconfirmed="the card's text was read in a verbatim copy (the source linked), not on the Hub card; its code "
        "block runs the 8-step file, the 16-step row follows its news line (8- and 16-step FLUX.1-dev LoRAs, LoRA "
        "scale around 0.125, guidance 3.5) and checkpoint naming (Hyper-FLUX.1-dev-Nsteps-lora.safetensors)"
        if steps != 8
        else "the card's text was read in a verbatim copy (the source linked), not on the Hub card",
    )


PRESETS: List[Preset] = [
    Preset(
        "stabilityai/sdxl-turbo",
        "sdxl",
        "pipeline",
        (999,),
        "epsilon",
        512,
        recipe="AutoPipelineForText2Image.from_pretrained('stabilityai/sdxl-turbo'), "
        "pipeline(prompt, guidance_scale=0.0, num_inference_steps=1); 512x512 by default",
        sources=(TURBO_DOCS,),
        source_kind="docs",
        notes="the repo's EulerAncestralDiscreteScheduler (trailing): " + UNIT_NOISE,
        unconfirmed="the model card itself was not read; the repo's scheduler (EulerAncestral, trailing spacing) is "
        "inferred from the same guide's from_single_file note, which sets timestep_spacing='trailing'",
        default=True,
    ),
    Preset(
        "tianweiy/DMD2",
        "sdxl",
        "denoiser",
        (399,),
        "epsilon",
        1024,
        recipe="UNet2DConditionModel.from_config(SDXL base, subfolder='unet').load_state_dict(torch.load("
        "hf_hub_download(repo, 'dmd2_sdxl_1step_unet_fp16.bin'))), LCMScheduler.from_config, num_inference_steps=1, "
        "guidance_scale=0, timesteps=[399]",
        sources=(DMD2_CARD, DMD2_CARD_COPY, DMD2_README),
        source_kind="model card",
        weight_name="dmd2_sdxl_1step_unet_fp16.bin",
        base_model=SDXL_BASE,
        notes="legacy .bin, loaded with torch.load(weights_only=True); the GitHub README gives the same call with "
        "dmd2_sdxl_1step_unet.bin",
        unconfirmed=DMD2_CARD_READ,
        default=True,
    ),
    Preset(
        "tianweiy/DMD2",
        "sdxl",
        "denoiser",
        DMD2_4STEP,
        "epsilon",
        1024,
        recipe="UNet2DConditionModel.from_config(SDXL base, subfolder='unet').load_state_dict(torch.load("
        "hf_hub_download(repo, 'dmd2_sdxl_4step_unet_fp16.bin'))), LCMScheduler.from_config, num_inference_steps=4, "
        "guidance_scale=0, timesteps=[999, 749, 499, 249]",
        sources=(DMD2_CARD, DMD2_CARD_COPY),
        source_kind="model card",
        weight_name="dmd2_sdxl_4step_unet_fp16.bin",
        base_model=SDXL_BASE,
        notes="legacy .bin, loaded with torch.load(weights_only=True); LCMScheduler re-noises x0 with fresh noise "
        "between steps, as the `sde` solver does",
        unconfirmed=DMD2_CARD_READ,
    ),
    Preset(
        "tianweiy/DMD2",
        "sdxl",
        "lora",
        DMD2_4STEP,
        "epsilon",
        1024,
        recipe="load_lora_weights(hf_hub_download(repo, 'dmd2_sdxl_4step_lora_fp16.safetensors')) + "
        "fuse_lora(lora_scale=1.0), LCMScheduler.from_config, num_inference_steps=4, guidance_scale=0, "
        "timesteps=[999, 749, 499, 249]",
        sources=(DMD2_CARD, DMD2_CARD_COPY),
        source_kind="model card",
        weight_name="dmd2_sdxl_4step_lora_fp16.safetensors",
        base_model=SDXL_BASE,
        notes="LCMScheduler re-noises x0 with fresh noise between steps, as the `sde` solver does",
        unconfirmed=DMD2_CARD_READ,
    ),
    *(_dmd2_sd15(folder) for folder in DMD2_SD15_CHECKPOINTS),
    Preset(
        "ByteDance/SDXL-Lightning",
        "sdxl",
        "denoiser",
        (999,),
        "sample",
        1024,
        recipe=_sdxl_unet("sdxl_lightning_1step_unet_x0.safetensors")
        + ", EulerDiscreteScheduler.from_config(..., timestep_spacing='trailing', prediction_type='sample'), "
        "num_inference_steps=1, guidance_scale=0",
        sources=(LIGHTNING_CARD,),
        source_kind="model card",
        weight_name="sdxl_lightning_1step_unet_x0.safetensors",
        base_model=SDXL_BASE,
        notes=UNIT_NOISE + "; the card calls this 1-step model experimental",
        default=True,
    ),
    *(_lightning(steps, lora) for lora in (False, True) for steps in (2, 4, 8)),
    Preset(
        "ByteDance/Hyper-SD",
        "sdxl",
        "denoiser",
        (800,),
        "epsilon",
        1024,
        recipe=_sdxl_unet("Hyper-SDXL-1step-Unet.safetensors")
        + ", LCMScheduler.from_config, num_inference_steps=1, guidance_scale=0, timesteps=[800]",
        sources=(HYPER_CARD, HYPER_FILES),
        source_kind="model card",
        weight_name="Hyper-SDXL-1step-Unet.safetensors",
        weight_name_spellings=("Hyper-SDXL-1step-unet.safetensors",),
        base_model=SDXL_BASE,
        notes="the card's checkpoint list spells Hyper-SDXL-1step-unet.safetensors, its code and the Hub file listing "
        "Hyper-SDXL-1step-Unet.safetensors: the loader takes the spelling the repo has",
        unconfirmed="the card's UNet code block was not re-read in full; timesteps=[800] is also what the repo's "
        "ComfyUI node (comfyui/ComfyUI-HyperSDXL1StepUnetScheduler/node.py) hard-codes",
        default=True,
    ),
    Preset(
        "ByteDance/Hyper-SD",
        "sdxl",
        "lora",
        (999,),
        "epsilon",
        1024,
        recipe="load_lora_weights(hf_hub_download(repo, 'Hyper-SDXL-1step-lora.safetensors')) + fuse_lora(), "
        "TCDScheduler.from_config, num_inference_steps=1, guidance_scale=0, eta=1.0",
        sources=(HYPER_CARD, HYPER_FILES),
        source_kind="model card",
        weight_name="Hyper-SDXL-1step-lora.safetensors",
        base_model=SDXL_BASE,
        notes="OneStepPipeline returns x0, where one TCD step returns x0 re-noised to t=0 with its own noise "
        "estimate, sqrt(alphā_0) x0 + sqrt(1 - alphā_0) eps (3% of eps)",
    ),
    *(_hyper_lora(steps) for steps in (2, 4, 8)),
    Preset(
        "ByteDance/Hyper-SD",
        "sd",
        "lora",
        (999,),
        "epsilon",
        512,
        recipe="DiffusionPipeline.from_pretrained('runwayml/stable-diffusion-v1-5') + load_lora_weights("
        "hf_hub_download(repo, 'Hyper-SD15-1step-lora.safetensors')) + fuse_lora(), TCDScheduler.from_config, "
        "num_inference_steps=1, guidance_scale=0, eta=1.0",
        sources=(HYPER_CARD, HYPER_CARD_COPY),
        source_kind="model card",
        weight_name="Hyper-SD15-1step-lora.safetensors",
        base_model=SD15_BASE,
        notes=SD15_BASE_NOTE + "; OneStepPipeline returns x0, where one TCD step returns x0 re-noised to t=0 with its "
        "own noise estimate, sqrt(alphā_0) x0 + sqrt(1 - alphā_0) eps (3% of eps)",
        unconfirmed=HYPER_SD15_READ,
    ),
    *(_hyper_sd15_lora(steps) for steps in (2, 4, 8)),
    Preset(
        "stabilityai/sd-turbo",
        "sd",
        "pipeline",
        (999,),
        "epsilon",
        512,
        recipe="AutoPipelineForText2Image.from_pretrained('stabilityai/sd-turbo', torch_dtype=torch.float16, "
        "variant='fp16'), pipe(prompt=prompt, num_inference_steps=1, guidance_scale=0.0); 512x512",
        sources=(SD_TURBO_CARD_COPY, SD_TURBO_DEMO, SD_TURBO_CONFIG),
        source_kind="model card",
        notes="the repo's EulerDiscreteScheduler (trailing): " + UNIT_NOISE + "; full-precision weights unless "
        "`variant='fp16'` is passed (the card loads the fp16 variant on a GPU)",
        unconfirmed="the card was read in a copy of its text (the first source), not on the Hub at a pinned revision; "
        "the repo's scheduler config was not read: trailing spacing is what the card's one-step call needs to start "
        "at t=999, as the Turbo demo's sampler does, and epsilon is the demo's SD-Turbo config (EpsScaling)",
        default=True,
    ),
    Preset(
        "XCLiu/instaflow_0_9B_from_sd_1_5",
        "sd",
        "pipeline",
        (1.0,),
        "data_velocity",
        512,
        recipe="RectifiedFlowPipeline.from_pretrained(repo) (the repo's code/pipeline_rf.py), pipe(prompt=prompt, "
        "num_inference_steps=1, guidance_scale=0.0): latents = randn * scheduler.init_noise_sigma, v = unet(latents, "
        "1000.0), latents + 1.0 * v",
        sources=(INSTAFLOW_README, INSTAFLOW_PIPELINE),
        source_kind="README",
        noise_path="flow",
        notes="a rectified flow on the SD 1.5 UNet: the preset runs it on the flow path (the UNet at 1000 sigma) with "
        "the velocity toward the data, x0 = x_1 + v; the README spells the repo XCLIU/...",
        unconfirmed="the repo's scheduler config was not read: RectifiedFlowPipeline scales the initial noise by its "
        "init_noise_sigma, 1 for SD 1.5's PNDMScheduler (which the preset assumes the repo keeps), and uses nothing "
        "else of it",
        default=True,
    ),
    Preset(
        "PixArt-alpha/PixArt-Alpha-DMD-XL-2-512x512",
        "pixart_alpha",
        "denoiser",
        (400,),
        "epsilon",
        512,
        recipe="PixArtAlphaPipeline.from_pretrained('PixArt-alpha/PixArt-XL-2-1024-MS', transformer=None) + "
        "Transformer2DModel.from_pretrained(repo, subfolder='transformer'), "
        "DDPMScheduler.from_pretrained(repo, subfolder='scheduler'), timesteps=[400], num_inference_steps=1, "
        "guidance_scale=1, 512x512",
        sources=(PIXART_DMD_DEMO,),
        source_kind="demo script",
        subfolder="transformer",
        base_model=PIXART_1024,
        scheduler_subfolder="scheduler",
        notes="the Hub card holds only license metadata; the noise schedule comes from the DMD repo's scheduler/, as "
        "in the demo; the transformer weights are a legacy .bin (diffusers loads it with torch.load(weights_only=True))",
        unconfirmed="the DMD repo's scheduler_config.json was not readable: its prediction_type (epsilon assumed, as "
        "PixArt-α's) and its clip_sample (DDPMScheduler's default, True, would clamp x0 to [-1, 1], which "
        "OneStepPipeline does not)",
        default=True,
    ),
    Preset(
        "Efficient-Large-Model/Sana_Sprint_0.6B_1024px_diffusers",
        "sana_sprint",
        "pipeline",
        (1.5708, 1.3),
        "trigflow",
        1024,
        recipe="SanaSprintPipeline.from_pretrained(repo, torch_dtype=torch.bfloat16); pipeline(prompt) with "
        "SanaSprintPipeline's defaults num_inference_steps=2, max_timesteps=1.57080, intermediate_timesteps=1.3, "
        "guidance_scale=4.5",
        sources=(SPRINT_DIFFUSERS_DOCS,),
        source_kind="docs",
        embedded_guidance_scale=4.5,
        notes="SCMScheduler re-noises x0 with fresh noise, as the `sde` solver does; num_inference_steps=1 gives the "
        "one-step image (SanaSprintPipeline's num_inference_steps=1, intermediate_timesteps=None)",
        unconfirmed="no example calls the 0.6B repo itself; the diffusers docs list it beside the 1.6B one, under "
        "the same pipeline and defaults",
        default=True,
    ),
    Preset(
        "Efficient-Large-Model/Sana_Sprint_1.6B_1024px_diffusers",
        "sana_sprint",
        "pipeline",
        (1.5708, 1.3),
        "trigflow",
        1024,
        recipe="SanaSprintPipeline.from_pretrained(repo, torch_dtype=torch.bfloat16); "
        "pipeline(prompt=prompt, num_inference_steps=2), with SanaSprintPipeline's defaults max_timesteps=1.57080, "
        "intermediate_timesteps=1.3, guidance_scale=4.5",
        sources=(SPRINT_DOC, SPRINT_DIFFUSERS_DOCS),
        source_kind="docs",
        embedded_guidance_scale=4.5,
        notes="SCMScheduler re-noises x0 with fresh noise, as the `sde` solver does; num_inference_steps=1 gives the "
        "one-step image (SanaSprintPipeline's num_inference_steps=1, intermediate_timesteps=None)",
        unconfirmed="the NVlabs doc spells the repo SANA_Sprint_1.6B_1024px_diffusers, the diffusers docs "
        "Sana_Sprint_1.6B_1024px_diffusers; the preset uses the latter",
        default=True,
    ),
    Preset(
        "black-forest-labs/FLUX.1-schnell",
        "flux",
        "pipeline",
        flow_euler_sigmas(4),
        "flow_prediction",
        1024,
        recipe="FluxPipeline.from_pretrained(repo, torch_dtype=torch.bfloat16), pipe(prompt, guidance_scale=0.0, "
        "num_inference_steps=4, max_sequence_length=256); FluxPipeline's default 1024x1024",
        sources=(SCHNELL_CARD_COPY,),
        source_kind="model card",
        max_sequence_length=256,
        solver="ode",
        notes=FLUX_EULER_NOTE + " (FLUX.1-schnell's: a fixed shift); its transformer has no guidance input, "
        "guidance_scale=0 is accepted and changes nothing",
        unconfirmed="the card's text was read in a verbatim copy (the source linked), not on the Hub card; the repo's "
        "scheduler_config.json was not readable here (a shift of 1 without dynamic shifting is assumed in the tests; "
        "the preset reads the repo's own at load)",
        default=True,
    ),
    *(_hyper_flux(steps) for steps in (8, 16)),
    Preset(
        "XDG-XHS/distar_long_1step",
        "sdxl",
        "pipeline",
        (399,),
        "epsilon",
        1024,
        recipe="DiffusionPipeline.from_pretrained(repo, torch_dtype=torch.float16, variant='fp16'), "
        "LCMScheduler.from_config, num_inference_steps=1, guidance_scale=0.0, 1024x1024, timesteps=[399]",
        sources=(DISTAR_README,),
        source_kind="README",
        variant="fp16",
        notes="loads the fp16 weight variant, as the README does (`variant=` replaces it)",
        unconfirmed="the repo's own file listing was not found: the README's variant='fp16' and the sibling repo "
        "XDG-XHS/diff_instruct_1step, which ships only unet/diffusion_pytorch_model.fp16.safetensors, suggest it has "
        "only fp16 files",
        default=True,
    ),
    Preset(
        "ChenDY/NitroFusion",
        "sdxl",
        "denoiser",
        (249,),
        "epsilon",
        1024,
        recipe=_sdxl_unet("nitrosd-realism_unet.safetensors")
        + ", TimestepShiftLCMScheduler.from_pretrained(SDXL base, subfolder='scheduler', shifted_timestep=250) with "
        "config.original_inference_steps = 4, num_inference_steps=1, guidance_scale=0",
        sources=(NITRO_README,),
        source_kind="README",
        weight_name="nitrosd-realism_unet.safetensors",
        base_model=SDXL_BASE,
        notes=NITRO_NOTE.format(shift=250, t=249),
        default=True,
    ),
    Preset(
        "ChenDY/NitroFusion",
        "sdxl",
        "denoiser",
        (499,),
        "epsilon",
        1024,
        recipe=_sdxl_unet("nitrosd-vibrant_unet.safetensors")
        + ", TimestepShiftLCMScheduler.from_pretrained(SDXL base, subfolder='scheduler', shifted_timestep=500) with "
        "config.original_inference_steps = 4, num_inference_steps=1, guidance_scale=0",
        sources=(NITRO_README,),
        source_kind="README",
        weight_name="nitrosd-vibrant_unet.safetensors",
        base_model=SDXL_BASE,
        notes=NITRO_NOTE.format(shift=500, t=499),
    ),
    # Left out (see docs/inference.md): ByteDance/Hyper-SD's SD3 LoRAs (Hyper-SD3-{4,8,16}steps-CFG-lora). Their card
    # (its "SD3-related models" block and Aug.19, 2024 note, read in a copy of the card's text: YinanWusoymilk/
    # hf-readme@1ab39f2 training_and_application/readme_files/ByteDance_Hyper-SD.md) fuses them at lora_scale=0.125
    # and samples with classifier-free guidance 3.0 / 5.0 / 7.0 at 4 / 8 / 16 steps; OneStepPipeline runs no
    # classifier-free guidance, and 16 steps exceed its 8.
    Preset(
        "stabilityai/stable-diffusion-3.5-large-turbo",
        "sd3",
        "pipeline",
        SD35_TURBO_SIGMAS,
        "flow_prediction",
        1024,
        recipe="StableDiffusion3Pipeline.from_pretrained(repo, torch_dtype=torch.bfloat16), pipe(prompt, "
        "num_inference_steps=4, guidance_scale=0.0) with the repo's FlowMatchEulerDiscreteScheduler; sd3_infer.py "
        "CONFIGS['sd3.5_large_turbo'] = {shift: 3.0, cfg: 1.0, steps: 4, sampler: euler}",
        sources=(SD35_INFER,),
        source_kind="demo script",
        solver="ode",
        notes="Euler steps of the flow velocity are the `ode` solver; num_inference_steps=1 gives the one-step image "
        "(StableDiffusion3Pipeline's num_inference_steps=1: one Euler step from sigma 1)",
        unconfirmed="the Hub model card's diffusers block (the call above) was read in a copy of the card's page "
        "text whose revision is not known, so it is not linked; the repo's scheduler_config.json was not read: "
        "shift 3.0 is sd3_infer.py's",
        default=True,
    ),
]


def preset_ids() -> List[str]:
    return sorted({p.repo_id for p in PRESETS})


def find_preset(repo_id: str, weight_name: Optional[str] = None) -> Optional[Preset]:
    """The preset for ``repo_id`` (and ``weight_name``, in any spelling its sources use), or ``None`` when the repo is
    not a known student."""
    candidates = [p for p in PRESETS if p.repo_id == repo_id]
    if not candidates:
        return None
    if weight_name is None:
        return next(p for p in candidates if p.default)
    for p in candidates:
        if weight_name in (*p.weight_names, p.subfolder):
            return p
    names = ", ".join(p.weight_name or p.subfolder for p in candidates)
    raise ValueError(f"{repo_id} has no preset for weight_name={weight_name!r}; known variants: {names}.")


def _timesteps_text(preset: Preset) -> str:
    text = "[" + ", ".join(f"{t:g}" for t in preset.conditioning_timesteps) + "]"
    return text if len(preset.conditioning_timesteps) == 1 else f"{text}, `{preset.solver}`"


def _how_loaded(preset: Preset) -> str:
    if preset.kind == "pipeline":
        return "full pipeline" + (f", `{preset.variant}` weights" if preset.variant else "")
    denoiser = get_adapter_class(preset.family).denoiser_name
    if preset.kind == "denoiser":
        what = f"`{preset.subfolder}/` folder" if preset.weight_name is None else f"{denoiser} weights"
        text = f"{what} on `{preset.base_model}`"
    else:
        text = f"LoRA fused (scale {preset.lora_scale:g}) into `{preset.base_model}`"
    if preset.scheduler_subfolder:
        text += f", schedule from `{preset.scheduler_subfolder}/`"
    return text


def source_label(url: str) -> str:
    """``owner/repo@rev7 path`` for a GitHub or Hub URL pinned to a revision (``blob/<rev>/<path>``, ``tree/<rev>``)."""
    match = re.match(r"https://(?:github\.com|huggingface\.co)/([^/]+/[^/]+)/(?:blob|tree)/([0-9a-f]+)/?(.*)$", url)
    if match is None:
        return url
    repo, revision, path = match.groups()
    what = path or "file listing"
    return f"{repo}@{revision[:7]} {what}"


def _source_text(preset: Preset) -> str:
    links = ", ".join(f"[{source_label(url)}]({url})" for url in preset.sources)
    return f"{preset.source_kind}: {links}"


def _notes_text(preset: Preset) -> str:
    parts = [preset.notes] if preset.notes else []
    if preset.unconfirmed:
        parts.append(f"**unconfirmed:** {preset.unconfirmed}")
    return "; ".join(parts) or "–"


def markdown_table() -> str:
    """The supported-students table of ``docs/inference.md``, generated from :data:`PRESETS` (a test keeps the doc
    equal to it; regenerate with ``python -m diffusers_onestep.pipelines.presets``)."""
    rows = [
        "| Hub id | `weight_name=` | family | how it is loaded | timesteps | prediction | size | recipe, as the source "
        "gives it | source | notes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in PRESETS:
        variant = p.weight_name or p.subfolder or "–"
        if p.default and (p.weight_name or p.subfolder):
            variant += " (default)"
        rows.append(
            f"| `{p.repo_id}` | {variant} | {p.family} | {_how_loaded(p)} | {_timesteps_text(p)} "
            f"| {p.prediction_type} | {p.resolution} | {p.recipe} | {_source_text(p)} | {_notes_text(p)} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":  # pragma: no cover
    print(markdown_table())
