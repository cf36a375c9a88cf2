"""Every check of a run that needs no model weights, made before anything is loaded or written.

Each failure is one actionable sentence (:class:`~.config.ConfigError` or :class:`~.data.DataError`). The CLI runs
these after :func:`~.config.resolve`; so does ``--dry_run``.
"""

from __future__ import annotations

import os
from typing import Optional

from .checkpoint import check_fresh_start, check_resume_config, find_resume_point
from .config import ConfigError
from .resolve import ResolvedConfig


def preflight(resolved: ResolvedConfig) -> None:
    """Check a resolved run: resolution, precision, prompts, real images, output folder and resume point."""
    import torch

    from .data import check_prompt_source, load_prompts

    config = resolved.config
    adapter_cls = resolved.adapter_class
    vae_config = resolved.teacher_configs.get("vae") or {}
    denoiser_config = resolved.teacher_configs.get(adapter_cls.denoiser_name) or {}
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
    load_prompts(config.data.prompts, config.data.prompt_column, cache_dir=config.cache_dir)
    method = config.method
    if method.uses_discriminator and not config.data.real_images:
        raise ConfigError(
            f"The {method.method} method ({method.divergence}) trains a discriminator on real images (GAN weight "
            f"{method.gan_weight}); pass --real_images IMAGE_DATASET, or use dmd2 (reverse_kl) with --gan_weight 0."
        )
    if config.data.real_images and not os.path.exists(config.data.real_images):
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(config.data.real_images)
        except HFValidationError:
            raise ConfigError(f"--real_images {config.data.real_images} does not exist.") from None
    output_dir = config.output.output_dir
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ConfigError(f"--output_dir {output_dir} exists and is not a folder.")
    resume = find_resume_point(config.output.resume_from_checkpoint, output_dir, launched_processes()).path
    if resume is not None:
        check_resume_config(resume, config)
    else:
        check_fresh_start(output_dir, config)


def launched_processes() -> int:
    """How many processes the run has: ``accelerate launch`` (and torchrun) say so in ``WORLD_SIZE``."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def resume_note(resolved: ResolvedConfig) -> Optional[str]:
    """The line about where ``--resume_from_checkpoint latest`` starts (no checkpoint yet, so the run starts fresh;
    or a damaged newest checkpoint passed over for the previous one), or ``None``."""
    output = resolved.config.output
    return find_resume_point(output.resume_from_checkpoint, output.output_dir, launched_processes()).note
