"""Every check of a run that needs no model weights, made before anything is loaded or written.

Each failure is one actionable sentence (:class:`~.config.ConfigError` or :class:`~.data.DataError`). The CLI runs
these after :func:`~.config.resolve`; so does ``--dry_run``.
"""

from __future__ import annotations

import os
from typing import Optional

from .checkpoint import check_fresh_start, check_resume_config, find_resume_point
from .config import TEACHER_REFERENCE, ConfigError
from .resolve import ResolvedConfig


def preflight(resolved: ResolvedConfig) -> None:
    """Check a resolved run: resolution, precision, prompts, real images, output folder and resume point."""
    import torch

    from .data import check_prompt_source, check_real_images, load_prompts

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
        if resolved.mixed_precision_source == "accelerate":
            raise ConfigError(
                "The accelerate config sets mixed_precision fp16, which needs a CUDA GPU; pass --mixed_precision bf16 "
                "or no on this machine."
            )
        raise ConfigError("--mixed_precision fp16 needs a CUDA GPU; use bf16 or no on this machine.")
    if config.optim.mixed_precision == "bf16" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise ConfigError("This GPU does not support bf16; use --mixed_precision fp16 or no.")
    check_teacher_files(resolved)
    check_student_timesteps(resolved)
    check_lora_targets(resolved)
    check_trackers(config.output.report_to)
    check_prompt_source(config.data.prompts)
    load_prompts(config.data.prompts, config.data.prompt_column, cache_dir=config.cache_dir)
    method = config.method
    if method.uses_discriminator and not config.data.real_images:
        raise ConfigError(
            f"The {method.method} method ({method.divergence}) trains a discriminator on real images (GAN weight "
            f"{method.gan_weight}); pass --real_images IMAGE_DATASET, or use dmd2 (reverse_kl) with --gan_weight 0."
        )
    teacher_reference = config.data.real_images == TEACHER_REFERENCE  # sampled by the teacher: nothing to read
    if config.data.real_images and not teacher_reference and not os.path.exists(config.data.real_images):
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(config.data.real_images)
        except HFValidationError:
            raise ConfigError(f"--real_images {config.data.real_images} does not exist.") from None
    if (
        config.data.real_images
        and not teacher_reference
        and method.uses_discriminator
        and is_main_process()
        and not config.data.streaming
    ):
        check_real_images(
            config.data.real_images,
            config.data.image_column,
            config.data.caption_column,
            cache_dir=config.cache_dir,
            max_samples=config.data.max_train_samples,
        )
    if config.output.eval_steps is not None:
        from .evaluate import check_evaluation_inputs

        check_evaluation_inputs(config)
        if not os.path.exists(config.output.eval_reference):
            from huggingface_hub.utils import HFValidationError, validate_repo_id

            try:
                validate_repo_id(config.output.eval_reference)
            except HFValidationError:
                raise ConfigError(f"--eval_reference {config.output.eval_reference} does not exist.") from None
    if config.output.push_to_hub and is_main_process():
        from .. import hub

        repo_id = config.output.hub_model_id or os.path.basename(os.path.abspath(config.output.output_dir))
        try:
            hub.check_push_access(repo_id)
        except ValueError as error:
            raise ConfigError(str(error)) from None
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


def is_main_process() -> bool:
    """Whether this is the first process of the launch (``RANK`` as torchrun and accelerate set it): checks that ask
    the Hub run once, not once per process."""
    return int(os.environ.get("RANK", "0")) == 0


# ----------------------------------------------------------------------------------------------------------------
# the teacher's files
# ----------------------------------------------------------------------------------------------------------------


def check_teacher_files(resolved: ResolvedConfig) -> None:
    """Every component ``model_index.json`` lists is present in a local teacher folder, with configs that parse and
    weights of ``--variant`` whose safetensors headers are whole (a truncated download is named here, before the other
    components load). A Hub teacher is checked by its download."""
    from ..pipelines.loading import check_folder_files

    config = resolved.config
    if not os.path.isdir(config.teacher):
        return
    index = resolved.teacher_configs.get("model_index") or {}
    try:
        check_folder_files(config.teacher, index, variant=config.variant, remedy="download the teacher again")
    except ValueError as error:
        raise ConfigError(f"--teacher: {error}") from None


# ----------------------------------------------------------------------------------------------------------------
# what the run will build, checked from configs
# ----------------------------------------------------------------------------------------------------------------


def check_student_timesteps(resolved: ResolvedConfig) -> None:
    """The student's timesteps are ones its exported scheduler accepts on the teacher's noise path (integer steps
    inside a VP path, ``(0, 1]`` on a flow path, ...): a run with ``--student_timesteps 399.5`` would otherwise
    train to the end and fail at export."""
    from ..schedulers import OneStepScheduler

    scheduler_config = resolved.teacher_configs.get("scheduler")
    if not scheduler_config:
        return
    adapter_cls = resolved.adapter_class
    timesteps = resolved.student_timesteps
    try:
        OneStepScheduler.from_noise_path(
            adapter_cls.default_noise_path(scheduler_config),
            timesteps,
            adapter_cls.default_prediction_type(scheduler_config),
        )
    except ValueError as error:  # the student's scheduler says which rule the values break
        raise ConfigError(f"--student_timesteps {timesteps} cannot be exported: {error}") from None


def check_lora_targets(resolved: ResolvedConfig) -> None:
    """Every module named by ``--lora_target_modules`` exists in the teacher's denoiser (built from its config on the
    meta device: no memory, no weights). The family's default list may name modules a variant lacks; a list the user
    gave must match exactly."""
    config = resolved.config
    if "lora" not in (config.roles.student, config.roles.critic):
        return
    adapter_cls = resolved.adapter_class
    targets = list(config.roles.lora_target_modules or ())
    if not targets or sorted(targets) == sorted(adapter_cls.default_lora_target_modules):
        return
    names = denoiser_module_names(resolved)
    if names is None:
        return
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        examples = ", ".join(adapter_cls.default_lora_target_modules)
        raise ConfigError(
            f"--lora_target_modules {', '.join(missing)} match no module of the teacher's {adapter_cls.denoiser_name} "
            f"(its {adapter_cls.display_name} default is {examples})."
        )


def denoiser_module_names(resolved: ResolvedConfig) -> Optional[list]:
    """The module names of the teacher's denoiser, built from its config on the meta device, or ``None`` when its
    class is not a diffusers model we can build."""
    import importlib

    from accelerate import init_empty_weights

    adapter_cls = resolved.adapter_class
    entry = (resolved.teacher_configs.get("model_index") or {}).get(adapter_cls.denoiser_name)
    denoiser_config = resolved.teacher_configs.get(adapter_cls.denoiser_name)
    if not (isinstance(entry, list) and entry[0] and denoiser_config):
        return None
    try:
        model_cls = getattr(importlib.import_module(entry[0]), entry[1])
        with init_empty_weights():
            model = model_cls.from_config(denoiser_config)
    except Exception:  # an unknown class or a config this diffusers cannot build: the load will say why
        return None
    return [name for name, _ in model.named_modules()]


def check_trackers(report_to: str) -> None:
    """The tracker package ``--report_to`` names is installed (accelerate would fail only after the teacher loads)."""
    from accelerate.utils import is_tensorboard_available, is_wandb_available

    available = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}
    if report_to in available and not available[report_to]():
        raise ConfigError(
            f"--report_to {report_to} needs the {report_to} package; pip install {report_to}, or pass --report_to none."
        )
