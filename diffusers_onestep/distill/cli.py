"""Command line of ``training/train_onestep.py``: flags (and ``--config FILE``) -> :class:`TrainConfig` -> trainer.

Everything that can be checked without loading a model is checked here, before anything is loaded or written:
bad input exits with status 2 and one sentence.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, Dict, List, Optional, Sequence

from .config import (
    LR_SCHEDULERS,
    MIXED_PRECISIONS,
    ON_NONFINITE,
    REPORT_TO,
    ROLE_KINDS,
    ConfigError,
    DataConfig,
    MethodConfig,
    OptimizationConfig,
    OutputConfig,
    RolesConfig,
    TrainConfig,
)

EPILOG = """\
examples:
  # SDXL, LoRA student and critic on one shared backbone, Jensen-Shannon (f-distill), real images for the
  # discriminator; 1 GPU
  accelerate launch training/train_onestep.py \\
      --teacher stabilityai/stable-diffusion-xl-base-1.0 --divergence js \\
      --prompts prompts.txt --real_images ./laion-subset --mixed_precision bf16 --gradient_checkpointing \\
      --output_dir sdxl-onestep-js

  # PixArt-alpha, DMD (reverse KL), full student, 8 GPUs
  accelerate launch --config_file training/accelerate_configs/multi_gpu.yaml training/train_onestep.py \\
      --teacher PixArt-alpha/PixArt-XL-2-512x512 --student full --critic lora --prompts my/prompt-dataset

  # resume the newest checkpoint of a run
  accelerate launch training/train_onestep.py --config sdxl.yaml --resume_from_checkpoint latest

Flags override the values of --config FILE (YAML or JSON, either flat flag names or the nested layout of
training_config.json). Defaults marked "family default" follow the papers (docs/training.md).
"""

# flag name -> (section, field); section None = top level of TrainConfig
FIELDS = {
    "teacher": (None, "teacher"), "family": (None, "family"), "revision": (None, "revision"),
    "max_sequence_length": (None, "max_sequence_length"),
    "divergence": ("method", "divergence"), "student_timesteps": ("method", "student_timesteps"),
    "guidance_scale": ("method", "guidance_scale"), "guidance_range": ("method", "guidance_range"),
    "gan_weight": ("method", "gan_weight"), "discriminator_weight": ("method", "discriminator_weight"),
    "discriminator_trunk": ("method", "discriminator_trunk"),
    "critic_updates_per_student": ("method", "critic_updates_per_student"),
    "time_range": ("method", "time_range"), "ratio_ema": ("method", "ratio_ema"),
    "student": ("roles", "student"), "critic": ("roles", "critic"), "lora_rank": ("roles", "lora_rank"),
    "lora_alpha": ("roles", "lora_alpha"), "lora_target_modules": ("roles", "lora_target_modules"),
    "critic_lora_rank": ("roles", "critic_lora_rank"),
    "gradient_checkpointing": ("roles", "gradient_checkpointing"),
    "learning_rate": ("optim", "learning_rate"), "critic_learning_rate": ("optim", "critic_learning_rate"),
    "adam_beta1": ("optim", "adam_beta1"), "adam_beta2": ("optim", "adam_beta2"),
    "adam_weight_decay": ("optim", "adam_weight_decay"), "adam_epsilon": ("optim", "adam_epsilon"),
    "lr_scheduler": ("optim", "lr_scheduler"), "lr_warmup_steps": ("optim", "lr_warmup_steps"),
    "max_grad_norm": ("optim", "max_grad_norm"), "train_batch_size": ("optim", "train_batch_size"),
    "gradient_accumulation_steps": ("optim", "gradient_accumulation_steps"),
    "max_train_steps": ("optim", "max_train_steps"), "mixed_precision": ("optim", "mixed_precision"),
    "seed": ("optim", "seed"), "ema_decay": ("optim", "ema_decay"), "on_nonfinite": ("optim", "on_nonfinite"),
    "max_nonfinite_skips": ("optim", "max_nonfinite_skips"),
    "prompts": ("data", "prompts"), "prompt_column": ("data", "prompt_column"),
    "real_images": ("data", "real_images"), "image_column": ("data", "image_column"),
    "caption_column": ("data", "caption_column"), "resolution": ("data", "resolution"),
    "cache_text_embeddings": ("data", "cache_text_embeddings"),
    "output_dir": ("output", "output_dir"), "overwrite_output_dir": ("output", "overwrite_output_dir"),
    "checkpointing_steps": ("output", "checkpointing_steps"),
    "checkpoints_total_limit": ("output", "checkpoints_total_limit"),
    "resume_from_checkpoint": ("output", "resume_from_checkpoint"),
    "save_on_interrupt": ("output", "save_on_interrupt"),
    "validation_prompts": ("output", "validation_prompts"), "validation_steps": ("output", "validation_steps"),
    "report_to": ("output", "report_to"), "logging_dir": ("output", "logging_dir"),
    "tracker_project_name": ("output", "tracker_project_name"),
    "push_to_hub": ("output", "push_to_hub"), "hub_model_id": ("output", "hub_model_id"),
    "private": ("output", "private"),
}


def _comma_list(value: str) -> List[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train_onestep.py",
        description="Distill a diffusers text-to-image teacher into a one-step student (DMD/VSD, f-distill, "
                    "LoRA or full), then save it for OneStepPipeline and optionally push it to the Hub.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", default=None, help="YAML or JSON file of settings; flags override it.")

    g = parser.add_argument_group("teacher")
    g.add_argument("--teacher", help="Hub model id or local diffusers pipeline folder of the teacher (required).")
    g.add_argument("--family", default=None,
                   help="auto (default: detected from model_index.json), sdxl, pixart_alpha, pixart_sigma, sana or "
                        "sana_sprint.")
    g.add_argument("--revision", default=None, help="Hub revision of the teacher.")
    g.add_argument("--max_sequence_length", type=int, default=None,
                   help="Text tokens kept (PixArt-α 120, PixArt-Σ/SANA 300 by default).")

    g = parser.add_argument_group("method")
    g.add_argument("--divergence", default=None,
                   help="reverse_kl (DMD/VSD, default), js, forward_kl, hellinger, jeffreys, softened_reverse_kl, "
                        "neyman, pearson or alpha:<a>. Anything but reverse_kl is f-distill and needs "
                        "--real_images for its discriminator.")
    g.add_argument("--student_timesteps", type=float, nargs="+", default=None,
                   help="The student's conditioning timestep(s) (family default: SDXL 399, PixArt 400, SANA 1.0, "
                        "Sprint 1.5708); several values train a multi-step student, e.g. 999 749 499 249.")
    g.add_argument("--guidance_scale", type=float, default=None,
                   help="Teacher CFG scale w in u + w(c - u) (family default: SDXL 8, PixArt/SANA 4.5).")
    g.add_argument("--guidance_range", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                   help="Draw the CFG scale uniformly from this range per sample (SNOOPI).")
    g.add_argument("--gan_weight", type=float, default=None,
                   help="Generator GAN weight (0 for reverse_kl without real images; f-distill family default).")
    g.add_argument("--discriminator_weight", type=float, default=None,
                   help="Discriminator loss weight in the critic step (DMD2 1e-2; f-distill 1).")
    g.add_argument("--discriminator_trunk", choices=("teacher", "critic"), default=None,
                   help="Features the discriminator head reads (default: critic for DMD2, teacher for f-distill).")
    g.add_argument("--critic_updates_per_student", type=int, default=None,
                   help="Critic updates per student update (two time-scale rule; default 5).")
    g.add_argument("--time_range", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                   help="Fraction of the noise path for the score terms (default 0.02 0.98).")
    g.add_argument("--ratio_ema", type=float, default=None, help="EMA of the per-time-bin ratio normalizer.")

    g = parser.add_argument_group("roles")
    g.add_argument("--student", choices=ROLE_KINDS, default=None, help="lora (default) or full student.")
    g.add_argument("--critic", choices=ROLE_KINDS, default=None, help="lora (default) or full critic.")
    g.add_argument("--lora_rank", type=int, default=None, help="LoRA rank (family default 64).")
    g.add_argument("--lora_alpha", type=float, default=None, help="LoRA alpha (SDXL default 8, as DMD2).")
    g.add_argument("--lora_target_modules", type=_comma_list, default=None,
                   help="Comma-separated module names (family default: DMD2's SDXL list; to_q,to_k,to_v,...).")
    g.add_argument("--critic_lora_rank", type=int, default=None, help="LoRA rank of the critic (default: --lora_rank).")
    g.add_argument("--gradient_checkpointing", action="store_true", default=None,
                   help="Recompute activations in backward to save memory.")

    g = parser.add_argument_group("optimisation")
    g.add_argument("--learning_rate", type=float, default=None,
                   help="Student learning rate (family default: SDXL 5e-5 LoRA / 5e-7 full).")
    g.add_argument("--critic_learning_rate", type=float, default=None, help="Critic learning rate (default: same).")
    g.add_argument("--adam_beta1", type=float, default=None)
    g.add_argument("--adam_beta2", type=float, default=None)
    g.add_argument("--adam_weight_decay", type=float, default=None)
    g.add_argument("--adam_epsilon", type=float, default=None)
    g.add_argument("--lr_scheduler", choices=LR_SCHEDULERS, default=None)
    g.add_argument("--lr_warmup_steps", type=int, default=None)
    g.add_argument("--max_grad_norm", type=float, default=None, help="Gradient-norm clipping (default 10, DMD2).")
    g.add_argument("--train_batch_size", type=int, default=None, help="Batch size per process (default 2).")
    g.add_argument("--gradient_accumulation_steps", type=int, default=None)
    g.add_argument("--max_train_steps", type=int, default=None, help="Training iterations (default 1000).")
    g.add_argument("--mixed_precision", choices=MIXED_PRECISIONS, default=None,
                   help="no, fp16 (CUDA only) or bf16: the frozen teacher runs in it; trainable weights stay fp32.")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--ema_decay", type=float, default=None, help="Keep an EMA of the student (e.g. 0.999).")
    g.add_argument("--on_nonfinite", choices=ON_NONFINITE, default=None,
                   help="stop (default) or skip updates whose loss or gradient is NaN/inf.")
    g.add_argument("--max_nonfinite_skips", type=int, default=None)

    g = parser.add_argument_group("data")
    g.add_argument("--prompts", default=None,
                   help="Prompts: a .txt file (one per line), .jsonl, a datasets file/folder or a Hub dataset name.")
    g.add_argument("--prompt_column", default=None, help="Column/field holding the prompts (default: text).")
    g.add_argument("--real_images", default=None,
                   help="Image dataset (imagefolder or Hub name) for the GAN / f-divergence discriminator.")
    g.add_argument("--image_column", default=None, help="Image column of --real_images (default: image).")
    g.add_argument("--caption_column", default=None, help="Caption column of --real_images (default: none).")
    g.add_argument("--resolution", type=int, default=None, help="Training resolution (default: the teacher's).")
    g.add_argument("--no_cache_text_embeddings", dest="cache_text_embeddings", action="store_false", default=None,
                   help="Encode prompts on the fly instead of caching them (for very large prompt sets).")

    g = parser.add_argument_group("output")
    g.add_argument("--output_dir", default=None, help="Where the student, checkpoints and logs go.")
    g.add_argument("--overwrite_output_dir", action="store_true", default=None,
                   help="Allow a non-empty --output_dir (otherwise refused).")
    g.add_argument("--checkpointing_steps", type=int, default=None, help="Checkpoint every N steps (default 500).")
    g.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep at most N checkpoints.")
    g.add_argument("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint-N folder.")
    g.add_argument("--no_save_on_interrupt", dest="save_on_interrupt", action="store_false", default=None,
                   help="Do not checkpoint when interrupted (Ctrl-C / SIGTERM).")
    g.add_argument("--validation_prompts", nargs="+", default=None, help="Prompts for validation grids.")
    g.add_argument("--validation_steps", type=int, default=None, help="Validate every N steps (default 500).")
    g.add_argument("--report_to", choices=REPORT_TO, default=None, help="tensorboard (default), wandb, all, none.")
    g.add_argument("--logging_dir", default=None)
    g.add_argument("--tracker_project_name", default=None)
    g.add_argument("--push_to_hub", action="store_true", default=None,
                   help="Upload the student (not the checkpoints) at the end; uses HF_TOKEN or your login.")
    g.add_argument("--hub_model_id", default=None, help="namespace/name of the Hub repo (default: output dir name).")
    g.add_argument("--private", action="store_true", default=None, help="Create the Hub repo as private.")
    return parser


def _read_config_file(path: str) -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise ConfigError(f"--config {path} does not exist.")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        if path.lower().endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except Exception as error:
        raise ConfigError(f"--config {path} could not be parsed: {str(error).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path} must hold a mapping of settings.")
    return data


def _flatten_file_config(data: Dict[str, Any]) -> Dict[str, Any]:
    """Accept flat flag names or the nested training_config.json layout; return flag names."""
    by_field = {(section, field): flag for flag, (section, field) in FIELDS.items()}
    flat: Dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and key in ("method", "roles", "optim", "data", "output"):
            for sub, sub_value in value.items():
                flag = by_field.get((key, sub))
                if flag is None:
                    raise ConfigError(f"Unknown setting {key}.{sub} in --config.")
                flat[flag] = sub_value
        elif key in FIELDS:
            flat[key] = value
        else:
            raise ConfigError(f"Unknown setting {key!r} in --config; use the flag names of --help.")
    return flat


def parse_args(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Flag values (``None`` where unset), merged over the --config file's."""
    parser = build_parser()
    args = parser.parse_args(argv)
    values: Dict[str, Any] = {}
    if args.config:
        values.update(_flatten_file_config(_read_config_file(args.config)))
    for flag in FIELDS:
        value = getattr(args, flag, None)
        if value is not None:
            values[flag] = value
    return values


def config_from_values(values: Dict[str, Any], family: Optional[str] = None) -> TrainConfig:
    """Build the config; the family adapter's ``training_defaults`` fill what the user left unset."""
    from ..families import get_adapter_class

    values = dict(values)
    if family is not None:
        defaults = get_adapter_class(family).training_defaults
        values.setdefault("guidance_scale", defaults.guidance_scale)
        values.setdefault("learning_rate", defaults.learning_rate(values.get("student", "lora")))
        values.setdefault("lora_rank", defaults.lora_rank)
        values.setdefault("lora_alpha", defaults.lora_alpha)
        if values.get("divergence", "reverse_kl") != "reverse_kl" or values.get("real_images"):
            values.setdefault("gan_weight", defaults.gan_weight)
        values.setdefault("critic_updates_per_student", defaults.critic_updates_per_student)
    sections: Dict[str, Dict[str, Any]] = {"method": {}, "roles": {}, "optim": {}, "data": {}, "output": {}}
    top: Dict[str, Any] = {}
    for flag, value in values.items():
        section, field = FIELDS[flag]
        if section is None:
            top[field] = value
        else:
            sections[section][field] = value
    if top.get("family") is None:
        top["family"] = "auto"
    for key in ("guidance_range", "time_range"):
        if key in sections["method"] and sections["method"][key] is not None:
            sections["method"][key] = tuple(sections["method"][key])
    return TrainConfig(
        method=MethodConfig(**sections["method"]),
        roles=RolesConfig(**sections["roles"]),
        optim=OptimizationConfig(**sections["optim"]),
        data=DataConfig(**sections["data"]),
        output=OutputConfig(**sections["output"]),
        **top,
    )


def preflight(config: TrainConfig) -> str:
    """Every check that needs no model weights; returns the teacher's family. Raises ConfigError/DataError."""
    import torch

    from ..families import get_adapter_class
    from ..pipelines.loading import read_json
    from .data import check_prompt_source, load_prompts
    from .trainer import check_resume_config, resolve_family, resolve_resume_path

    config.validate()
    family = resolve_family(config)
    adapter_cls = get_adapter_class(family)
    denoiser = adapter_cls.denoiser_name
    vae_config = read_json(config.teacher, "vae/config.json") or {}
    denoiser_config = read_json(config.teacher, f"{denoiser}/config.json") or {}
    if config.data.resolution is not None and vae_config:
        multiple = adapter_cls.resolution_multiple_of(vae_config, denoiser_config)
        if config.data.resolution % multiple:
            raise ConfigError(
                f"--resolution {config.data.resolution} is not a multiple of {multiple} (the VAE factor times the "
                f"patch size of this {adapter_cls.display_name} teacher)."
            )
    if config.optim.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("--mixed_precision fp16 needs a CUDA GPU; use bf16 or no on this machine.")
    if config.optim.mixed_precision == "bf16" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise ConfigError("This GPU does not support bf16; use --mixed_precision fp16 or no.")
    check_prompt_source(config.data.prompts)
    load_prompts(config.data.prompts, config.data.prompt_column)
    if config.method.uses_discriminator and not config.data.real_images:
        raise ConfigError(
            f"The {config.method.divergence} method trains a discriminator on real images (GAN weight "
            f"{config.method.resolved_gan_weight()}); pass --real_images IMAGE_DATASET, or use reverse_kl with "
            "--gan_weight 0."
        )
    if config.data.real_images and not os.path.exists(config.data.real_images):
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(config.data.real_images)
        except HFValidationError:
            raise ConfigError(f"--real_images {config.data.real_images} does not exist.") from None
    output_dir = config.output.output_dir
    resume = resolve_resume_path(config.output.resume_from_checkpoint, output_dir)
    if resume is not None:
        check_resume_config(resume, config)
    elif (os.path.isdir(output_dir) and os.listdir(output_dir) and not config.output.overwrite_output_dir):
        raise ConfigError(
            f"--output_dir {output_dir} is not empty; pass --overwrite_output_dir to write into it, or "
            "--resume_from_checkpoint latest to continue its run."
        )
    elif os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ConfigError(f"--output_dir {output_dir} exists and is not a folder.")
    return family


def main(argv: Optional[Sequence[str]] = None, hooks: Optional[Sequence[Any]] = None) -> int:
    """Parse, resolve, check and train; returns the exit status. ``hooks`` go to :class:`~.trainer.Trainer` (the
    crash-safety tests inject faults through them from a launcher script of their own)."""
    from .data import DataError

    parser = build_parser()
    try:
        values = parse_args(argv)
        # Validate what the user gave, detect the teacher's family from its configs, then fill family defaults.
        probe = config_from_values(values).validate()
        from .trainer import resolve_family

        config = config_from_values(values, resolve_family(probe))
        preflight(config)
    except (ConfigError, DataError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")

    from .trainer import NonFiniteError, Trainer, TrainingInterrupted

    try:
        Trainer(config, hooks=hooks).run()
    except TrainingInterrupted:
        return 130
    except NonFiniteError as error:
        print(f"{parser.prog}: error: {error}", flush=True)
        return 3
    return 0
