"""Every check of a run that needs no model weights, made before anything is loaded or written.

Each failure is one actionable sentence (:class:`~.config.ConfigError` or :class:`~.data.DataError`). The CLI runs
these after :func:`~.config.resolve`; so does ``--dry_run``.
"""

from __future__ import annotations

import os
from typing import Optional

from .checkpoint import check_resume_config, resolve_resume_path
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
    resume = resolve_resume_path(config.output.resume_from_checkpoint, output_dir)
    continuing = config.output.resume_from_checkpoint == "latest"  # this folder's run, checkpointed or not yet
    if resume is not None:
        check_resume_config(resume, config)
    elif (
        os.path.isdir(output_dir)
        and os.listdir(output_dir)
        and not config.output.overwrite_output_dir
        and not continuing
    ):
        raise ConfigError(
            f"--output_dir {output_dir} is not empty; pass --overwrite_output_dir to write into it, or "
            "--resume_from_checkpoint latest to continue its run."
        )
    elif os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ConfigError(f"--output_dir {output_dir} exists and is not a folder.")


def fresh_start_note(resolved: ResolvedConfig) -> Optional[str]:
    """The line that says ``--resume_from_checkpoint latest`` found no checkpoint yet (the run starts fresh), or
    ``None``."""
    output = resolved.config.output
    if output.resume_from_checkpoint == "latest" and resolve_resume_path("latest", output.output_dir) is None:
        return f"--resume_from_checkpoint latest: {output.output_dir} has no checkpoint yet, so the run starts fresh."
    return None
