"""Typed configuration of a distillation run: the method, the roles, optimisation, data and output.

Every value is validated by ``validate()`` before any model is loaded, with one actionable sentence per error
(``ConfigError``, a ``ValueError``). The training script only fills these dataclasses from flags and a
YAML/JSON file; nothing else reads raw arguments. ``TrainConfig.to_dict()`` is what gets written beside every
checkpoint and into the output folder.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

ROLE_KINDS = ("lora", "full")
MIXED_PRECISIONS = ("no", "fp16", "bf16")
REPORT_TO = ("tensorboard", "wandb", "none", "all")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")
ON_NONFINITE = ("stop", "skip")
DISCRIMINATOR_TRUNKS = ("teacher", "critic")


class ConfigError(ValueError):
    """A configuration value is invalid; the message is one sentence that says how to fix it."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _pair(value, name: str) -> Optional[Tuple[float, float]]:
    if value is None:
        return None
    values = tuple(float(v) for v in value)
    _require(len(values) == 2 and values[0] <= values[1],
             f"`{name}` must be two numbers low and high with low <= high, got {list(value)}.")
    return values


@dataclass
class MethodConfig:
    """The distillation objective (algorithms.md §2-§6).

    Attributes:
        divergence: f-divergence name (``reverse_kl`` = DMD/VSD; ``js``, ``forward_kl``, ... = f-distill).
        student_timesteps: the student's conditioning timestep(s) in the teacher path's natural units; several
            values train a multi-step student by backward simulation (DMD2 §4.4). ``None``: family default.
        guidance_scale: teacher classifier-free guidance ``w`` in the form ``u + w (c - u)`` (Ho & Salimans).
        guidance_range: draw ``w`` uniformly per sample from this range instead (SNOOPI); overrides the scale.
        time_range: fraction of the path used for the score terms (DMD: 0.02-0.98).
        critic_time_range: fraction of the path used for the critic's denoising loss (DMD2: all of it).
        dm_weight: weight of the distribution-matching term.
        gan_weight: generator GAN weight (DMD2 SDXL 5e-3; f-distill needs it > 0; 0 disables the GAN).
        discriminator_weight: weight of the discriminator loss in the critic step (DMD2 1e-2; f-distill 1).
        discriminator_trunk: network whose features feed the discriminator head: ``critic`` (DMD2) or
            ``teacher`` (f-distill / FastGen). ``None`` picks per method.
        diffusion_gan_time_range: noise levels at which the discriminator sees samples (DMD2: all of them).
        ratio_clip, logit_clamp, ratio_bins, ratio_ema: density-ratio estimation of f-distill §6.3-6.4.
        critic_updates_per_student: critic updates per student update (two time-scale rule, DMD2 §4.3).
        backward_simulation: train multi-step students on their own rollouts (DMD2 §4.4).
    """

    divergence: str = "reverse_kl"
    student_timesteps: Optional[List[float]] = None
    guidance_scale: float = 4.5
    guidance_range: Optional[Tuple[float, float]] = None
    time_range: Tuple[float, float] = (0.02, 0.98)
    critic_time_range: Tuple[float, float] = (0.0, 1.0)
    dm_weight: float = 1.0
    gan_weight: Optional[float] = None
    discriminator_weight: Optional[float] = None
    discriminator_trunk: Optional[str] = None
    diffusion_gan_time_range: Tuple[float, float] = (0.0, 1.0)
    ratio_clip: Tuple[float, float] = (0.1, 20.0)
    logit_clamp: float = 10.0
    ratio_bins: int = 10
    ratio_ema: float = 0.0
    critic_updates_per_student: int = 5
    backward_simulation: bool = True

    @property
    def is_f_divergence(self) -> bool:
        return self.divergence != "reverse_kl"

    def resolved_gan_weight(self) -> float:
        """Generator GAN weight: as given, else 1e-3 for f-divergences (which need a discriminator), else 0."""
        if self.gan_weight is not None:
            return self.gan_weight
        return 1e-3 if self.is_f_divergence else 0.0

    def resolved_discriminator_weight(self) -> float:
        if self.discriminator_weight is not None:
            return self.discriminator_weight
        return 1.0 if self.is_f_divergence else 1e-2

    def resolved_discriminator_trunk(self) -> str:
        return self.discriminator_trunk or ("teacher" if self.is_f_divergence else "critic")

    @property
    def uses_discriminator(self) -> bool:
        return self.is_f_divergence or self.resolved_gan_weight() > 0

    def validate(self) -> "MethodConfig":
        from .divergences import get_divergence

        try:
            get_divergence(self.divergence)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        if self.student_timesteps is not None:
            _require(1 <= len(self.student_timesteps) <= 4,
                     f"`student_timesteps` takes 1 to 4 values, got {list(self.student_timesteps)}.")
            values = [float(t) for t in self.student_timesteps]
            _require(all(a > b for a, b in zip(values, values[1:])),
                     f"`student_timesteps` must be strictly decreasing, got {values}.")
        _require(self.guidance_scale >= 0, f"`guidance_scale` must be >= 0, got {self.guidance_scale}.")
        self.guidance_range = _pair(self.guidance_range, "guidance_range")
        for name in ("time_range", "critic_time_range", "diffusion_gan_time_range"):
            value = _pair(getattr(self, name), name)
            _require(0.0 <= value[0] < value[1] <= 1.0,
                     f"`{name}` must be fractions of the noise path with 0 <= low < high <= 1, got {list(value)}.")
            setattr(self, name, value)
        self.ratio_clip = _pair(self.ratio_clip, "ratio_clip")
        _require(self.ratio_clip[0] > 0, f"`ratio_clip` must be positive, got {list(self.ratio_clip)}.")
        if self.is_f_divergence:
            _require(self.resolved_gan_weight() > 0,
                     f"The {self.divergence} divergence estimates the density ratio with a discriminator, so "
                     "`gan_weight` must be > 0 (f-distill §6.3).")
        _require(self.critic_updates_per_student >= 1,
                 f"`critic_updates_per_student` must be >= 1, got {self.critic_updates_per_student}.")
        _require(self.discriminator_trunk in (None,) + DISCRIMINATOR_TRUNKS,
                 f"`discriminator_trunk` must be one of {', '.join(DISCRIMINATOR_TRUNKS)}, got "
                 f"{self.discriminator_trunk!r}.")
        _require(self.ratio_bins >= 1, f"`ratio_bins` must be >= 1, got {self.ratio_bins}.")
        _require(0.0 <= self.ratio_ema < 1.0, f"`ratio_ema` must be in [0, 1), got {self.ratio_ema}.")
        return self


@dataclass
class RolesConfig:
    """How the teacher, critic ("fake score") and student share weights.

    ``lora`` roles are adapters on the one frozen teacher backbone (teacher = adapters disabled); ``full`` roles are
    trainable copies initialised from the teacher.
    """

    student: str = "lora"
    critic: str = "lora"
    lora_rank: int = 64
    lora_alpha: Optional[float] = None
    lora_target_modules: Optional[List[str]] = None
    critic_lora_rank: Optional[int] = None
    gradient_checkpointing: bool = False

    def validate(self) -> "RolesConfig":
        _require(self.student in ROLE_KINDS, f"`--student` must be one of {', '.join(ROLE_KINDS)}, got {self.student!r}.")
        _require(self.critic in ROLE_KINDS, f"`--critic` must be one of {', '.join(ROLE_KINDS)}, got {self.critic!r}.")
        if "lora" in (self.student, self.critic):
            _require(isinstance(self.lora_rank, int) and self.lora_rank >= 1,
                     f"`--lora_rank` must be a positive integer for LoRA roles, got {self.lora_rank!r}.")
            _require(self.lora_alpha is None or self.lora_alpha > 0,
                     f"`--lora_alpha` must be positive, got {self.lora_alpha}.")
            _require(self.critic_lora_rank is None or self.critic_lora_rank >= 1,
                     f"`critic_lora_rank` must be a positive integer, got {self.critic_lora_rank}.")
            if self.lora_target_modules is not None:
                _require(len(self.lora_target_modules) > 0 and all(m for m in self.lora_target_modules),
                         "`--lora_target_modules` must name at least one module, e.g. to_q,to_k,to_v,to_out.0.")
        return self


@dataclass
class OptimizationConfig:
    """Optimisers and schedule (AdamW for each trainable role, DMD2 §4.3)."""

    learning_rate: float = 1e-5
    critic_learning_rate: Optional[float] = None
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 0.01
    adam_epsilon: float = 1e-8
    lr_scheduler: str = "constant_with_warmup"
    lr_warmup_steps: int = 0
    max_grad_norm: float = 10.0
    train_batch_size: int = 2
    gradient_accumulation_steps: int = 1
    max_train_steps: int = 1000
    mixed_precision: str = "no"
    seed: int = 0
    ema_decay: Optional[float] = None
    on_nonfinite: str = "stop"
    max_nonfinite_skips: int = 10

    def validate(self) -> "OptimizationConfig":
        for name in ("learning_rate",):
            value = getattr(self, name)
            _require(value > 0 and math.isfinite(value), f"`--{name}` must be a positive number, got {value}.")
        if self.critic_learning_rate is not None:
            _require(self.critic_learning_rate > 0,
                     f"`--critic_learning_rate` must be positive, got {self.critic_learning_rate}.")
        _require(self.lr_scheduler in LR_SCHEDULERS,
                 f"`--lr_scheduler` must be one of {', '.join(LR_SCHEDULERS)}, got {self.lr_scheduler!r}.")
        _require(self.train_batch_size >= 1, f"`--train_batch_size` must be >= 1, got {self.train_batch_size}.")
        _require(self.gradient_accumulation_steps >= 1,
                 f"`--gradient_accumulation_steps` must be >= 1, got {self.gradient_accumulation_steps}.")
        _require(self.max_train_steps >= 1, f"`--max_train_steps` must be >= 1, got {self.max_train_steps}.")
        _require(self.mixed_precision in MIXED_PRECISIONS,
                 f"`--mixed_precision` must be one of {', '.join(MIXED_PRECISIONS)}, got {self.mixed_precision!r}.")
        _require(self.max_grad_norm > 0, f"`--max_grad_norm` must be positive, got {self.max_grad_norm}.")
        _require(self.ema_decay is None or 0 < self.ema_decay < 1,
                 f"`--ema_decay` must be in (0, 1), got {self.ema_decay}.")
        _require(self.on_nonfinite in ON_NONFINITE,
                 f"`--on_nonfinite` must be one of {', '.join(ON_NONFINITE)}, got {self.on_nonfinite!r}.")
        return self


@dataclass
class DataConfig:
    """Prompts (and optional real images for the GAN / discriminator)."""

    prompts: Optional[str] = None
    prompt_column: str = "text"
    real_images: Optional[str] = None
    image_column: str = "image"
    caption_column: Optional[str] = None
    resolution: Optional[int] = None
    cache_text_embeddings: bool = True
    dataloader_num_workers: int = 0

    def validate(self) -> "DataConfig":
        _require(bool(self.prompts), "`--prompts` is required: a .txt file (one prompt a line), a .jsonl file, "
                                     "a datasets folder/file, or a Hub dataset name.")
        _require(self.resolution is None or (isinstance(self.resolution, int) and self.resolution > 0),
                 f"`--resolution` must be a positive integer, got {self.resolution!r}.")
        return self


@dataclass
class OutputConfig:
    """Where and how often things are written, logged and pushed."""

    output_dir: str = "onestep-student"
    overwrite_output_dir: bool = False
    checkpointing_steps: int = 500
    checkpoints_total_limit: Optional[int] = None
    resume_from_checkpoint: Optional[str] = None
    save_on_interrupt: bool = True
    validation_prompts: Optional[List[str]] = None
    validation_steps: int = 500
    report_to: str = "tensorboard"
    logging_dir: str = "logs"
    tracker_project_name: str = "diffusers-onestep"
    push_to_hub: bool = False
    hub_model_id: Optional[str] = None
    private: bool = False

    def validate(self) -> "OutputConfig":
        _require(bool(self.output_dir), "`--output_dir` must not be empty.")
        _require(self.checkpointing_steps >= 1, f"`--checkpointing_steps` must be >= 1, got {self.checkpointing_steps}.")
        _require(self.checkpoints_total_limit is None or self.checkpoints_total_limit >= 1,
                 f"`--checkpoints_total_limit` must be >= 1, got {self.checkpoints_total_limit}.")
        _require(self.validation_steps >= 1, f"`--validation_steps` must be >= 1, got {self.validation_steps}.")
        _require(self.report_to in REPORT_TO,
                 f"`--report_to` must be one of {', '.join(REPORT_TO)}, got {self.report_to!r}.")
        if self.hub_model_id is not None:
            from huggingface_hub.utils import HFValidationError, validate_repo_id

            try:
                validate_repo_id(self.hub_model_id)
            except HFValidationError:
                raise ConfigError(
                    f"`--hub_model_id` {self.hub_model_id!r} is not a valid Hub repo id; use 'namespace/name' with "
                    "letters, digits, '-', '_' and '.'."
                ) from None
        return self


@dataclass
class TrainConfig:
    """A whole distillation run."""

    teacher: Optional[str] = None
    family: str = "auto"
    revision: Optional[str] = None
    max_sequence_length: Optional[int] = None
    method: MethodConfig = field(default_factory=MethodConfig)
    roles: RolesConfig = field(default_factory=RolesConfig)
    optim: OptimizationConfig = field(default_factory=OptimizationConfig)
    data: DataConfig = field(default_factory=DataConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def validate(self) -> "TrainConfig":
        from ..families import FAMILIES, SUPPORTED_FAMILIES_TEXT

        _require(bool(self.teacher), "`--teacher` is required: a Hub model id or a local diffusers pipeline folder.")
        _require(self.family == "auto" or self.family in FAMILIES,
                 f"`--family` must be auto or one of {SUPPORTED_FAMILIES_TEXT}, got {self.family!r}.")
        for part in (self.method, self.roles, self.optim, self.data, self.output):
            part.validate()
        return self

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "TrainConfig":
        """Build from a nested dict (as written by :meth:`to_dict`); unknown keys are refused."""
        sections = {"method": MethodConfig, "roles": RolesConfig, "optim": OptimizationConfig,
                    "data": DataConfig, "output": OutputConfig}
        kwargs: Dict[str, Any] = {}
        known = {f.name for f in dataclasses.fields(cls)}
        for key, value in data.items():
            _require(key in known, f"Unknown config key {key!r}; known keys are {', '.join(sorted(known))}.")
            if key in sections:
                section_cls = sections[key]
                names = {f.name for f in dataclasses.fields(section_cls)}
                for sub in value:
                    _require(sub in names, f"Unknown config key {key}.{sub}; known keys are {', '.join(sorted(names))}.")
                kwargs[key] = section_cls(**value)
            else:
                kwargs[key] = value
        return cls(**kwargs)

    def save(self, path: str) -> None:
        tmp = f"{path}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True, default=list)
            f.write("\n")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> "TrainConfig":
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))


def config_differences(a: Dict[str, Any], b: Dict[str, Any], prefix: str = "") -> List[str]:
    """Human-readable differences ``key: a -> b`` between two nested config dicts."""
    out = []
    for key in sorted(set(a) | set(b)):
        name = f"{prefix}{key}"
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += config_differences(va, vb, prefix=name + ".")
        elif _normalise(va) != _normalise(vb):
            out.append(f"{name}: {va!r} -> {vb!r}")
    return out


def _normalise(value):
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    return value
