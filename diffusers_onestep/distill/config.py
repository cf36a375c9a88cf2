"""Typed configuration of a distillation run.

The dataclasses below are the single description of every setting: their field metadata (``help``, ``choices``,
``default_text``) generate the command line (:mod:`.cli`), ``TrainConfig.to_dict()`` is what gets written beside
every checkpoint, and such a file is accepted back as ``--config``. A field left ``None`` means "the default of the
teacher's family or of the method": :func:`.resolve.resolve` detects the family once, then takes every such value
from the family adapter's ``training_defaults`` and the method class, so the CLI, the Python API and a resumed run
train the same thing. Every value is validated before any model is loaded, with one actionable sentence per error
(``ConfigError``, a ``ValueError``). This module imports no method and no model code.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union


ROLE_KINDS = ("lora", "full")
MIXED_PRECISIONS = ("no", "fp16", "bf16")
REPORT_TO = ("tensorboard", "wandb", "none", "all")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")
ON_NONFINITE = ("stop", "skip")
DISCRIMINATOR_TRUNKS = ("teacher", "critic")
SIM_DISTANCES = ("pseudo_huber", "squared")
TDM_LOSSES = ("pseudo_huber", "mse")
#: the most conditioning timesteps a trained student takes (TDM's students take 2-8; OneStepScheduler stores up to 16)
MAX_STUDENT_TIMESTEPS = 8
#: the ``--real_images`` value that asks for a reference set sampled by the teacher from the training prompts
TEACHER_REFERENCE = "teacher"


class ConfigError(ValueError):
    """A configuration value is invalid; the message is one sentence that says how to fix it."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


#: float settings for which infinity means "no limit" (clipping at an infinite norm is no clipping)
_INFINITY_ALLOWED = ("max_grad_norm",)


def _type_error(name: str, value: Any, hint: Any) -> Optional[str]:
    """Why ``value`` does not fit the field type ``hint`` (``None`` if it does): a config file can hold any JSON/YAML
    value, and ``max_train_steps: 2.5`` or ``guidance_scale: .inf`` would otherwise train before anything fails."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is Union:  # Optional[X]
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
        args = typing.get_args(hint)
    origin = typing.get_origin(hint) or hint
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return f"`--{name}` must be a list, got {value!r}."
        for item in value:
            problem = _type_error(name, item, args[0])
            if problem is not None:
                return problem
        return None
    if hint is bool:
        return None if isinstance(value, bool) else f"`--{name}` must be true or false, got {value!r}."
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            return f"`--{name}` must be an integer, got {value!r}."
        return None
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"`--{name}` must be a number, got {value!r}."
        if not math.isfinite(value) and not (name in _INFINITY_ALLOWED and value == math.inf):
            return f"`--{name}` must be a finite number, got {value!r}."
        return None
    if hint is str:
        return None if isinstance(value, str) else f"`--{name}` must be a string, got {value!r}."
    return None


def check_field_types(section: Any) -> None:
    """One sentence for the first field of the dataclass ``section`` whose value does not fit its type."""
    hints = typing.get_type_hints(type(section))
    for field_ in dataclasses.fields(section):
        if dataclasses.is_dataclass(getattr(section, field_.name)):
            continue
        problem = _type_error(field_.name, getattr(section, field_.name), hints[field_.name])
        _require(problem is None, problem or "")


def _pair(value, name: str) -> Optional[Tuple[float, float]]:
    if value is None:
        return None
    values = tuple(float(v) for v in value)
    _require(
        len(values) == 2 and values[0] <= values[1],
        f"`{name}` must be two numbers low and high with low <= high, got {list(value)}.",
    )
    return values


def setting(default: Any = None, help: str = "", *, default_factory=None, **cli: Any):
    """A config field with its command-line description.

    ``help`` is the flag's help text; ``cli`` holds argparse details the type does not give: ``choices`` (a tuple
    argparse enforces), ``known`` (``"methods"`` or ``"families"``: a registry whose names ``--help`` lists at parse
    time and the resolver checks with a sentence of ours, so names registered after import count), ``metavar``,
    ``comma_list=True`` (one comma-separated argument), ``family_default`` (the ``TrainingDefaults`` field, or adapter
    attribute, that fills a ``None``: ``--help`` lists every registered family's value), and ``default_text`` (how
    ``--help`` states any other ``None`` default).
    """
    metadata = {"help": help, **cli}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class MethodConfig:
    """The distillation objective (DMD, DMD2, f-distill). ``None`` fields take the method's or the family's default.

    Attributes:
        method: registered method name (``dmd2``, ``fdistill``, ...); ``None``: ``fdistill`` when ``divergence`` is
            an f-divergence other than reverse KL, else ``dmd2``.
        divergence: f-divergence name (``reverse_kl`` = DMD/VSD; ``js``, ``forward_kl``, ... = f-distill).
        student_timesteps: the student's conditioning timestep(s) in the teacher path's natural units; several
            values train a multi-step student by backward simulation (DMD2).
        guidance_scale: teacher classifier-free guidance ``w`` in the form ``u + w (c - u)`` (Ho & Salimans).
        guidance_range: draw ``w`` uniformly per sample from this range instead (SNOOPI); overrides the scale.
        critic_guidance: with ``guidance_range``, guide the critic (fake score) with the same per-sample ``w`` as
            the teacher (SNOOPI's PG-SB varies the scale of both teachers of the VSD loss).
        time_range: fraction of the path used for the score terms (DMD: 0.02-0.98).
        critic_time_range: fraction of the path used for the critic's denoising loss (DMD2: all of it).
        dm_weight: weight of the distribution-matching term.
        gan_weight: generator GAN weight (DMD2 SDXL 5e-3; f-distill needs it > 0; 0 disables the GAN).
        discriminator_weight: weight of the discriminator loss in the critic step (DMD2 1e-2; f-distill 1).
        discriminator_trunk: network whose features feed the discriminator head: ``critic`` (DMD2) or
            ``teacher`` (f-distill / FastGen).
        diffusion_gan_time_range: noise levels at which the discriminator sees samples (DMD2: all of them).
        ratio_clip, logit_clamp, ratio_bins, ratio_ema: density-ratio estimation and normalisation of f-distill.
        critic_updates_per_student: critic updates per student update (DMD2's two time-scale update rule).
        backward_simulation: train multi-step students on their own rollouts (DMD2's backward simulation).
        sid_alpha: SiD's α (Zhou et al. 2024, eq. 23; ``sid`` only): 1.2 in SiD's released runs, 1 in SiD-LSG's SD
            runs; ½ is the exact Fisher-divergence gradient.
        fake_guidance_scale: SiD-LSG's κ2 = κ3 (``cfg_eval_fake``): classifier-free guidance of the fake score in the
            generator loss (``sid``, ``sim``).
        fake_train_guidance_scale: SiD-LSG's κ1 (``cfg_train_fake``): guidance of the fake score inside its own
            denoising loss (``sid``, ``sim``).
        sim_distance, sim_huber_c: SIM's distance ``d`` (``pseudo_huber`` or ``squared``) and the pseudo-Huber ``c``
            in score units (``sim`` only).
        tdm_loss, tdm_huber_c: TDM's generator distance (``pseudo_huber``, the demo's ``--use_huber``, or ``mse``)
            and its ``c`` in latent units (1e-3 in ``train_tdm_demo.py``) (``tdm`` only).
        tdm_random_mid: re-noise the student's ``x̂0`` to a random time inside its segment instead of the segment's
            lower edge (the demo's ``--use_randmid``; ``tdm`` only).
        regression_weight: λ of DMD's regression loss (Yin et al. 2024, arXiv 2311.18828, §3.3 and
            Algorithm 1): ``λ · mean((G(z) - x_teacher(z))^2)`` over the pairs of ``--real_images teacher``, a
            latent-space mean squared error where DMD uses LPIPS on decoded images (``dmd2``, ``fdistill``).
    """

    method: Optional[str] = setting(
        None,
        "Distillation method; fdistill when --divergence is an f-divergence other than reverse_kl, else dmd2.",
        known="methods",
        default_text="from --divergence",
    )
    divergence: Optional[str] = setting(
        None,
        "reverse_kl (DMD/VSD), js, forward_kl, hellinger, jeffreys, softened_reverse_kl, neyman, pearson or "
        "alpha:<a>. Anything but reverse_kl is f-distill and needs --real_images for its discriminator.",
        default_text="the method's: reverse_kl for dmd2, js for fdistill",
    )
    student_timesteps: Optional[List[float]] = setting(
        None,
        "The student's conditioning timestep(s); several values train a multi-step student, e.g. 999 749 499 249.",
        family_default="student_timesteps",
    )
    guidance_scale: Optional[float] = setting(
        None, "Teacher CFG scale w in u + w(c - u).", family_default="guidance_scale"
    )
    guidance_range: Optional[Tuple[float, float]] = setting(
        None, "Draw the CFG scale uniformly from this range per sample (SNOOPI).", metavar=("LOW", "HIGH")
    )
    critic_guidance: bool = setting(
        True,
        "With --guidance_range, guide the critic (fake score) with the teacher's per-sample CFG scale (SNOOPI PG-SB).",
    )
    time_range: Tuple[float, float] = setting(
        (0.02, 0.98), "Fraction of the noise path for the score terms.", metavar=("LOW", "HIGH")
    )
    critic_time_range: Tuple[float, float] = setting(
        (0.0, 1.0), "Fraction of the noise path for the critic's denoising loss.", metavar=("LOW", "HIGH")
    )
    dm_weight: float = setting(1.0, "Weight of the distribution-matching term of the student loss.")
    gan_weight: Optional[float] = setting(
        None,
        "Generator GAN weight; 0 disables the GAN (f-distill needs it > 0).",
        family_default="gan_weight",
        default_text="0 unless a discriminator trains",
    )
    discriminator_weight: Optional[float] = setting(
        None, "Discriminator loss weight in the critic step.", default_text="the method's: dmd2 1e-2, fdistill 1"
    )
    discriminator_trunk: Optional[str] = setting(
        None,
        "Network whose features the discriminator head reads.",
        choices=DISCRIMINATOR_TRUNKS,
        default_text="the method's: critic for dmd2, teacher for fdistill",
    )
    diffusion_gan_time_range: Tuple[float, float] = setting(
        (0.0, 1.0), "Noise levels (path fractions) at which the discriminator sees samples.", metavar=("LOW", "HIGH")
    )
    ratio_clip: Tuple[float, float] = setting(
        (0.1, 20.0), "Clip of the estimated density ratio r (f-distill).", metavar=("LOW", "HIGH")
    )
    logit_clamp: float = setting(10.0, "Clamp of the discriminator logit before r = exp(logit).")
    ratio_bins: int = setting(10, "Time bins of the ratio normaliser (f-distill's first normalisation stage).")
    ratio_ema: float = setting(0.0, "EMA of the per-time-bin ratio normaliser.")
    critic_updates_per_student: Optional[int] = setting(
        None, "Critic updates per student update (two time-scale rule).", family_default="critic_updates_per_student"
    )
    backward_simulation: bool = setting(
        True, "Train multi-step students on their own rollouts (DMD2's backward simulation)."
    )
    sid_alpha: Optional[float] = setting(
        None, "SiD's alpha in its generator loss (sid only).", default_text="1.2 (SiD's released runs)"
    )
    fake_guidance_scale: Optional[float] = setting(
        None,
        "CFG scale of the fake score in the generator loss, SiD-LSG's kappa2 = kappa3 (sid, sim).",
        default_text="1 (no guidance)",
    )
    fake_train_guidance_scale: Optional[float] = setting(
        None,
        "CFG scale of the fake score inside its own denoising loss, SiD-LSG's kappa1 (sid, sim).",
        default_text="1 (no guidance)",
    )
    sim_distance: Optional[str] = setting(
        None, "SIM's score distance (sim only).", choices=SIM_DISTANCES, default_text="pseudo_huber"
    )
    sim_huber_c: Optional[float] = setting(
        None, "The pseudo-Huber c of SIM's distance, in score units (sim only).", default_text="1"
    )
    tdm_loss: Optional[str] = setting(
        None,
        "TDM's generator distance: pseudo_huber (the demo's --use_huber) or mse, each divided by W (tdm only).",
        choices=TDM_LOSSES,
        default_text="pseudo_huber",
    )
    tdm_huber_c: Optional[float] = setting(
        None, "The pseudo-Huber c of TDM's generator loss, in latent units (tdm only).", default_text="1e-3"
    )
    tdm_random_mid: Optional[bool] = setting(
        None,
        "Re-noise the student's x0 to a random time inside its segment instead of the segment's lower edge "
        "(TDM's --use_randmid; tdm only).",
    )
    regression_weight: Optional[float] = setting(
        None,
        "Weight lambda of DMD's regression loss (arXiv 2311.18828, sec. 3.3): lambda * mean((G(z) - x_teacher(z))^2) "
        "on the (noise, teacher sample) pairs of --real_images teacher -- a latent-space mean squared error where "
        "DMD uses LPIPS on decoded images (dmd2, fdistill).",
        default_text="0 (no regression loss)",
    )

    @property
    def uses_discriminator(self) -> bool:
        """Whether a discriminator head trains (meaningful once the config is resolved)."""
        return bool(self.gan_weight)

    def validate(self) -> "MethodConfig":
        """Check the values that are set; ``None`` is left for :func:`resolve`."""
        from .divergences import get_divergence

        if self.divergence is not None:
            try:
                get_divergence(self.divergence)
            except ValueError as error:
                raise ConfigError(str(error)) from None
        if self.student_timesteps is not None:
            _require(
                1 <= len(self.student_timesteps) <= MAX_STUDENT_TIMESTEPS,
                f"`student_timesteps` takes 1 to {MAX_STUDENT_TIMESTEPS} values, got {list(self.student_timesteps)}.",
            )
            values = [float(t) for t in self.student_timesteps]
            _require(
                all(a > b for a, b in zip(values, values[1:])),
                f"`student_timesteps` must be strictly decreasing, got {values}.",
            )
            self.student_timesteps = values
        _require(
            self.guidance_scale is None or self.guidance_scale >= 0,
            f"`guidance_scale` must be >= 0, got {self.guidance_scale}.",
        )
        self.guidance_range = _pair(self.guidance_range, "guidance_range")
        _require(
            self.critic_guidance or self.guidance_range is not None,
            "`--no_critic_guidance` applies only with `--guidance_range` (a fixed scale never guides the critic); "
            "remove it.",
        )
        for name in ("time_range", "critic_time_range", "diffusion_gan_time_range"):
            value = _pair(getattr(self, name), name)
            _require(
                0.0 <= value[0] < value[1] <= 1.0,
                f"`{name}` must be fractions of the noise path with 0 <= low < high <= 1, got {list(value)}.",
            )
            setattr(self, name, value)
        self.ratio_clip = _pair(self.ratio_clip, "ratio_clip")
        _require(self.ratio_clip[0] > 0, f"`ratio_clip` must be positive, got {list(self.ratio_clip)}.")
        _require(self.gan_weight is None or self.gan_weight >= 0, f"`gan_weight` must be >= 0, got {self.gan_weight}.")
        _require(
            self.critic_updates_per_student is None or self.critic_updates_per_student >= 1,
            f"`critic_updates_per_student` must be >= 1, got {self.critic_updates_per_student}.",
        )
        _require(
            self.discriminator_trunk in (None,) + DISCRIMINATOR_TRUNKS,
            f"`discriminator_trunk` must be one of {', '.join(DISCRIMINATOR_TRUNKS)}, got "
            f"{self.discriminator_trunk!r}.",
        )
        _require(self.ratio_bins >= 1, f"`ratio_bins` must be >= 1, got {self.ratio_bins}.")
        _require(0.0 <= self.ratio_ema < 1.0, f"`ratio_ema` must be in [0, 1), got {self.ratio_ema}.")
        _require(self.dm_weight >= 0, f"`--dm_weight` must be >= 0, got {self.dm_weight}.")
        _require(
            self.discriminator_weight is None or self.discriminator_weight >= 0,
            f"`--discriminator_weight` must be >= 0, got {self.discriminator_weight}.",
        )
        _require(self.logit_clamp > 0, f"`--logit_clamp` must be positive, got {self.logit_clamp}.")
        for name in ("fake_guidance_scale", "fake_train_guidance_scale"):
            value = getattr(self, name)
            _require(value is None or value >= 0, f"`--{name}` must be >= 0, got {value}.")
        _require(
            self.sim_distance in (None,) + SIM_DISTANCES,
            f"`--sim_distance` must be one of {', '.join(SIM_DISTANCES)}, got {self.sim_distance!r}.",
        )
        _require(
            self.sim_huber_c is None or self.sim_huber_c > 0,
            f"`--sim_huber_c` must be positive, got {self.sim_huber_c}.",
        )
        _require(
            self.tdm_loss in (None,) + TDM_LOSSES,
            f"`--tdm_loss` must be one of {', '.join(TDM_LOSSES)}, got {self.tdm_loss!r}.",
        )
        _require(
            self.tdm_huber_c is None or self.tdm_huber_c > 0,
            f"`--tdm_huber_c` must be positive, got {self.tdm_huber_c}.",
        )
        _require(
            self.regression_weight is None or self.regression_weight >= 0,
            f"`--regression_weight` must be >= 0, got {self.regression_weight}.",
        )
        return self


@dataclass
class RolesConfig:
    """How the teacher, critic ("fake score") and student share weights.

    ``lora`` roles are adapters on the one frozen teacher backbone (teacher = adapters disabled); ``full`` roles are
    trainable copies initialised from the teacher.
    """

    student: str = setting("lora", "lora or full student.", choices=ROLE_KINDS)
    critic: str = setting("lora", "lora or full critic (fake score).", choices=ROLE_KINDS)
    lora_rank: Optional[int] = setting(None, "LoRA rank of the student (and critic).", family_default="lora_rank")
    lora_alpha: Optional[float] = setting(None, "LoRA alpha.", family_default="lora_alpha")
    lora_target_modules: Optional[List[str]] = setting(
        None,
        "Comma-separated module names that get LoRA layers.",
        comma_list=True,
        default_text="the family's list, e.g. DMD2's SDXL list; to_q,to_k,to_v,to_out.0",
    )
    critic_lora_rank: Optional[int] = setting(None, "LoRA rank of the critic.", default_text="--lora_rank")
    gradient_checkpointing: bool = setting(False, "Recompute activations in backward to save memory.")

    def validate(self) -> "RolesConfig":
        _require(
            self.student in ROLE_KINDS, f"`--student` must be one of {', '.join(ROLE_KINDS)}, got {self.student!r}."
        )
        _require(self.critic in ROLE_KINDS, f"`--critic` must be one of {', '.join(ROLE_KINDS)}, got {self.critic!r}.")
        _require(
            self.lora_rank is None or (isinstance(self.lora_rank, int) and self.lora_rank >= 1),
            f"`--lora_rank` must be a positive integer for LoRA roles, got {self.lora_rank!r}.",
        )
        _require(
            self.lora_alpha is None or self.lora_alpha > 0, f"`--lora_alpha` must be positive, got {self.lora_alpha}."
        )
        _require(
            self.critic_lora_rank is None or self.critic_lora_rank >= 1,
            f"`critic_lora_rank` must be a positive integer, got {self.critic_lora_rank}.",
        )
        if self.lora_target_modules is not None:
            _require(
                len(self.lora_target_modules) > 0 and all(m for m in self.lora_target_modules),
                "`--lora_target_modules` must name at least one module, e.g. to_q,to_k,to_v,to_out.0.",
            )
        return self


@dataclass
class OptimizationConfig:
    """Optimisers and schedule (AdamW for each trainable role, as DMD2)."""

    learning_rate: Optional[float] = setting(None, "Student learning rate.", family_default="learning_rate")
    critic_learning_rate: Optional[float] = setting(
        None, "Critic learning rate.", default_text="--learning_rate; 5x --learning_rate for tdm"
    )
    adam_beta1: Optional[float] = setting(None, "AdamW beta1.", default_text="0.9; the method's for tdm (0)")
    adam_beta2: Optional[float] = setting(None, "AdamW beta2.", default_text="0.999; the method's for tdm (0.95)")
    adam_weight_decay: float = setting(0.01, "AdamW weight decay.")
    adam_epsilon: float = setting(1e-8, "AdamW epsilon.")
    lr_scheduler: str = setting("constant_with_warmup", "Learning-rate schedule.", choices=LR_SCHEDULERS)
    lr_warmup_steps: int = setting(0, "Warm-up steps of the schedule.")
    max_grad_norm: float = setting(10.0, "Gradient-norm clipping (DMD2: 10).")
    train_batch_size: int = setting(2, "Batch size per process.")
    gradient_accumulation_steps: int = setting(1, "Micro-batches accumulated per update.")
    max_train_steps: int = setting(1000, "Training iterations.")
    mixed_precision: Optional[str] = setting(
        None,
        "no, fp16 (CUDA only) or bf16: the frozen teacher runs in it; trainable weights stay fp32.",
        choices=MIXED_PRECISIONS,
        default_text="the accelerate config's (accelerate launch --config_file / accelerate config), else no",
    )
    allow_tf32: bool = setting(
        False,
        "Allow TF32 matmuls and cuDNN convolutions on Ampere and newer GPUs (faster fp32 math, as the "
        "diffusers training examples).",
    )
    seed: int = setting(0, "Seed of every random draw of the run.")
    ema_decay: Optional[float] = setting(
        None, "Keep an EMA of the student (e.g. 0.999) and export it.", default_text="no EMA"
    )
    offload_ema: bool = setting(
        False,
        "Keep the student's EMA in CPU memory, updated from the accelerator after each student step (saves "
        "4 bytes per student parameter on the accelerator; a full SDXL student's EMA is 10 GB).",
    )
    use_8bit_adam: bool = setting(
        False,
        "bitsandbytes' 8-bit AdamW for both roles (optimizer states in 2 bytes instead of 8 per parameter; for full "
        "students; needs bitsandbytes and a CUDA GPU).",
    )
    on_nonfinite: str = setting(
        "stop",
        "stop, or skip updates whose loss or gradient is NaN/inf (under fp16, non-finite gradients are loss-scale "
        "overflows while the scale is above 1: skipped, counted apart, the scale halved).",
        choices=ON_NONFINITE,
    )
    max_nonfinite_skips: int = setting(10, "With --on_nonfinite skip: stop after this many skipped updates.")

    @property
    def betas(self) -> Tuple[float, float]:
        """AdamW's ``(beta1, beta2)``: the set (or resolved) values, AdamW's (0.9, 0.999) where still unset."""
        beta1 = 0.9 if self.adam_beta1 is None else self.adam_beta1
        return beta1, 0.999 if self.adam_beta2 is None else self.adam_beta2

    def validate(self) -> "OptimizationConfig":
        for name in ("learning_rate", "critic_learning_rate"):
            value = getattr(self, name)
            _require(
                value is None or (value > 0 and math.isfinite(value)),
                f"`--{name}` must be a positive number, got {value}.",
            )
        _require(
            self.lr_scheduler in LR_SCHEDULERS,
            f"`--lr_scheduler` must be one of {', '.join(LR_SCHEDULERS)}, got {self.lr_scheduler!r}.",
        )
        _require(self.train_batch_size >= 1, f"`--train_batch_size` must be >= 1, got {self.train_batch_size}.")
        _require(
            self.gradient_accumulation_steps >= 1,
            f"`--gradient_accumulation_steps` must be >= 1, got {self.gradient_accumulation_steps}.",
        )
        _require(self.max_train_steps >= 1, f"`--max_train_steps` must be >= 1, got {self.max_train_steps}.")
        _require(
            self.mixed_precision in (None,) + MIXED_PRECISIONS,
            f"`--mixed_precision` must be one of {', '.join(MIXED_PRECISIONS)}, got {self.mixed_precision!r}.",
        )
        _require(self.max_grad_norm > 0, f"`--max_grad_norm` must be positive, got {self.max_grad_norm}.")
        # torch.optim.AdamW's own limits, checked here so that a bad value fails before the teacher loads
        for name in ("adam_beta1", "adam_beta2"):
            value = getattr(self, name)
            _require(value is None or 0.0 <= value < 1.0, f"`--{name}` must be in [0, 1), got {value}.")
        _require(self.adam_epsilon > 0, f"`--adam_epsilon` must be positive, got {self.adam_epsilon}.")
        _require(self.adam_weight_decay >= 0, f"`--adam_weight_decay` must be >= 0, got {self.adam_weight_decay}.")
        _require(self.lr_warmup_steps >= 0, f"`--lr_warmup_steps` must be >= 0, got {self.lr_warmup_steps}.")
        # NumPy's seeds (which accelerate's set_seed also sets) are 32-bit
        _require(0 <= self.seed < 2**32, f"`--seed` must be in [0, 2**32 - 1], got {self.seed}.")
        _require(
            self.max_nonfinite_skips >= 0, f"`--max_nonfinite_skips` must be >= 0, got {self.max_nonfinite_skips}."
        )
        _require(
            self.ema_decay is None or 0 < self.ema_decay < 1, f"`--ema_decay` must be in (0, 1), got {self.ema_decay}."
        )
        if self.use_8bit_adam:
            import importlib.util

            _require(
                importlib.util.find_spec("bitsandbytes") is not None,
                "`--use_8bit_adam` needs bitsandbytes, which is not installed; pip install "
                "'diffusers-onestep[8bit]' or drop --use_8bit_adam.",
            )
        _require(
            self.on_nonfinite in ON_NONFINITE,
            f"`--on_nonfinite` must be one of {', '.join(ON_NONFINITE)}, got {self.on_nonfinite!r}.",
        )
        return self


#: the DataConfig fields that only --real_images teacher reads
TEACHER_REFERENCE_FLAGS = (
    "teacher_reference_count",
    "teacher_reference_steps",
    "teacher_reference_guidance_scale",
    "teacher_reference_dir",
)


@dataclass
class DataConfig:
    """Prompts (and optional real images for the GAN / discriminator)."""

    prompts: Optional[str] = setting(
        None, "Prompts: a .txt file (one per line), .jsonl, a datasets file/folder or a Hub dataset name (required)."
    )
    prompt_column: str = setting("text", "Column/field holding the prompts.")
    real_images: Optional[str] = setting(
        None,
        "Image dataset (imagefolder or Hub name) for the GAN / f-divergence discriminator, or 'teacher': a reference "
        "set the teacher samples from the training prompts with its own multi-step sampler, cached on disk (prompts "
        "only; name a folder called teacher ./teacher).",
        default_text="none",
    )
    teacher_reference_count: Optional[int] = setting(
        None,
        "With --real_images teacher: how many reference latents the teacher samples (prompt i of each is a seeded "
        "pass over the training prompts, every prompt once before any repeats).",
        default_text="1000",
    )
    teacher_reference_steps: Optional[int] = setting(
        None,
        "With --real_images teacher: sampling steps of the teacher's own pipeline and scheduler.",
        default_text="the teacher pipeline's default num_inference_steps",
    )
    teacher_reference_guidance_scale: Optional[float] = setting(
        None,
        "With --real_images teacher: the teacher's guidance scale while sampling the reference set (CFG w in "
        "u + w(c - u), or the embedded scale of a guidance-distilled teacher).",
        default_text="--guidance_scale",
    )
    teacher_reference_dir: Optional[str] = setting(
        None,
        "With --real_images teacher: folder of the cached reference sets (one subfolder per fingerprint of the "
        "teacher, prompts, count, steps, guidance, seed, resolution and precision; a killed build resumes there).",
        default_text="teacher_reference in --output_dir",
    )
    image_column: str = setting("image", "Image column of --real_images.")
    caption_column: Optional[str] = setting(
        None,
        "Caption column of --real_images: real images are judged under their captions (DMD2); without it, "
        "real and generated images are both judged under the null prompt.",
        default_text="none",
    )
    resolution: Optional[int] = setting(None, "Training resolution.", default_text="the teacher's native size")
    cache_text_embeddings: bool = setting(
        True,
        "Encode every prompt once and free the text encoders (--no_cache_text_embeddings encodes on the fly, "
        "for very large prompt sets).",
    )
    dataloader_num_workers: int = setting(
        0,
        "DataLoader worker processes that decode and resize the next batches of --real_images while the accelerator "
        "trains (0: in the main process; a --streaming source is read in the main process).",
    )
    max_train_samples: Optional[int] = setting(
        None,
        "Train on the first N prompts and the first N real images only (quick runs, debugging).",
        default_text="all",
    )
    center_crop: bool = setting(
        True,
        "Center-crop real images to the training size after resizing (--no_center_crop: a random crop, drawn per "
        "image and epoch from --seed).",
    )
    random_flip: bool = setting(False, "Mirror each real image horizontally with probability 1/2 (drawn from --seed).")
    cache_latents: bool = setting(
        False,
        "Encode every real image once with the VAE (datasets.map) into an Arrow file in the frozen dtype under "
        "--data_cache_dir, shared by all processes and reused by later runs with the same images, VAE and settings; "
        "its random crops and flips are drawn once, when cached. Without it images are decoded and encoded per batch.",
    )
    data_cache_dir: Optional[str] = setting(
        None,
        "Folder of the on-disk text-embedding and latent caches (file names are fingerprints of their inputs).",
        default_text="diffusers_onestep in the datasets cache (HF_DATASETS_CACHE, or --cache_dir)",
    )
    streaming: bool = setting(
        False,
        "Read --real_images as a stream (datasets streaming; webdataset .tar shards too): nothing is downloaded or "
        "converted first; the order is a seeded shuffle buffer, new each epoch.",
    )
    aspect_ratio_buckets: bool = setting(
        False,
        "Multi-aspect-ratio training: each real image goes to the bucket of the family's aspect-ratio table nearest "
        "its shape (PixArt/SANA's, SDXL: the same 1024 px table), scaled to --resolution; each batch is one bucket, "
        "and the student generates at that size.",
    )

    def validate(self) -> "DataConfig":
        _require(
            bool(self.prompts),
            "`--prompts` is required: a .txt file (one prompt a line), a .jsonl file, "
            "a datasets folder/file, or a Hub dataset name.",
        )
        _require(
            self.resolution is None or (isinstance(self.resolution, int) and self.resolution > 0),
            f"`--resolution` must be a positive integer, got {self.resolution!r}.",
        )
        _require(
            isinstance(self.dataloader_num_workers, int) and self.dataloader_num_workers >= 0,
            f"`--dataloader_num_workers` must be an integer >= 0, got {self.dataloader_num_workers!r}.",
        )
        _require(
            self.max_train_samples is None or self.max_train_samples >= 1,
            f"`--max_train_samples` must be >= 1, got {self.max_train_samples}.",
        )
        for flag in ("streaming", "cache_latents", "aspect_ratio_buckets"):
            _require(
                not getattr(self, flag) or bool(self.real_images),
                f"`--{flag}` applies to --real_images, which this run does not read; drop --{flag}.",
            )
        if self.real_images == TEACHER_REFERENCE:
            for flag in ("streaming", "cache_latents", "aspect_ratio_buckets", "random_flip"):
                _require(
                    not getattr(self, flag),
                    f"`--{flag}` applies to an image dataset, but --real_images teacher samples latents (cached "
                    f"already); drop --{flag}.",
                )
            _require(
                self.caption_column is None,
                "`--caption_column` applies to an image dataset; --real_images teacher pairs each reference with the "
                "prompt it was sampled from, so drop --caption_column.",
            )
        else:
            for flag in TEACHER_REFERENCE_FLAGS:
                _require(
                    getattr(self, flag) is None,
                    f"`--{flag}` applies to --real_images teacher; pass --real_images teacher or drop --{flag}.",
                )
        _require(
            self.teacher_reference_count is None or self.teacher_reference_count >= 1,
            f"`--teacher_reference_count` must be >= 1, got {self.teacher_reference_count}.",
        )
        _require(
            self.teacher_reference_steps is None or self.teacher_reference_steps >= 1,
            f"`--teacher_reference_steps` must be >= 1, got {self.teacher_reference_steps}.",
        )
        _require(
            self.teacher_reference_guidance_scale is None or self.teacher_reference_guidance_scale >= 0,
            f"`--teacher_reference_guidance_scale` must be >= 0, got {self.teacher_reference_guidance_scale}.",
        )
        _require(
            self.teacher_reference_dir is None or bool(self.teacher_reference_dir.strip()),
            "`--teacher_reference_dir` must not be empty.",
        )
        _require(
            not (self.streaming and self.cache_latents),
            "`--cache_latents` needs a map-style dataset to index; drop --streaming (a local folder or Hub dataset is "
            "then converted to Arrow once) or --cache_latents.",
        )
        _require(
            not (self.streaming and self.aspect_ratio_buckets),
            "`--aspect_ratio_buckets` sorts every image into a bucket before training, which a stream cannot; drop "
            "--streaming or --aspect_ratio_buckets.",
        )
        return self


@dataclass
class OutputConfig:
    """Where and how often things are written, logged and pushed."""

    output_dir: str = setting("onestep-student", "Where the student, checkpoints and logs go.")
    overwrite_output_dir: bool = setting(False, "Allow a non-empty --output_dir (otherwise refused).")
    checkpointing_steps: int = setting(500, "Checkpoint every N steps.")
    checkpoints_total_limit: Optional[int] = setting(
        None,
        "Keep at most N checkpoints of this run (an older run's in --output_dir are never removed).",
        default_text="all",
    )
    resume_from_checkpoint: Optional[str] = setting(
        None,
        "'latest' (the newest complete checkpoint of the run in --output_dir, passing over damaged ones; while there "
        "is none the run starts fresh) or a checkpoint-N folder (a path, or its name inside --output_dir).",
        default_text="none",
    )
    save_on_interrupt: bool = setting(True, "Checkpoint when interrupted (Ctrl-C / SIGTERM).")
    validation_prompts: Optional[List[str]] = setting(
        None, "Prompts for validation grids.", default_text="the first four prompts"
    )
    validation_steps: int = setting(500, "Validate every N steps.")
    report_to: str = setting("tensorboard", "Where to log.", choices=REPORT_TO)
    logging_dir: str = setting("logs", "Log folder inside --output_dir.")
    tracker_project_name: str = setting("diffusers-onestep", "Tracker project name.")
    push_to_hub: bool = setting(
        False,
        "Create the Hub repo at the start (a bad token fails before anything loads) "
        "and upload the student (not the checkpoints) at the end; uses HF_TOKEN or "
        "your `hf auth login`.",
    )
    hub_model_id: Optional[str] = setting(None, "namespace/name of the Hub repo.", default_text="the output dir name")
    base_model_id: Optional[str] = setting(
        None,
        "Hub id of the teacher, recorded as a LoRA student's base model (onestep_lora.json) and the model card's "
        "base_model; needed with --push_to_hub when --teacher is a local folder.",
        default_text="--teacher when it is a Hub id; a local teacher folder is recorded as its absolute path",
    )
    private: bool = setting(False, "Create the Hub repo as private.")
    eval_steps: Optional[int] = setting(
        None,
        "Evaluate the student every N steps and at the end (FID/FD of --eval_num_images images of --eval_prompts "
        "against --eval_reference, CLIP score with --eval_clip_model); logged to the tracker as eval/*, written to "
        "evaluation/metrics.json and into the model card.",
        default_text="no evaluation",
    )
    eval_prompts: Optional[str] = setting(
        None, "Held-out prompts of the evaluation: a datasets source, as --prompts.", default_text="none"
    )
    eval_prompt_column: str = setting("text", "Column of --eval_prompts holding the prompts.")
    eval_reference: Optional[str] = setting(
        None, "Reference images of the evaluation's FID/FD: an image folder or Hub dataset.", default_text="none"
    )
    eval_num_images: Optional[int] = setting(
        None, "Images per evaluation (the first N --eval_prompts).", default_text="every --eval_prompts prompt"
    )
    eval_features: str = setting(
        "inception",
        "Feature space of the evaluation: inception (clean-fid's FID) or digits (the bundled digits classifier).",
        choices=("inception", "digits"),
    )
    eval_inception_path: Optional[str] = setting(
        None, "clean-fid's inception-2015-12-05.pt (file or folder).", default_text="the cache, downloaded once"
    )
    eval_clip_model: Optional[str] = setting(
        None, "CLIP model (Hub id or folder) of the evaluation's CLIP score.", default_text="no CLIP score"
    )
    keep_best: bool = setting(
        False,
        "With --eval_steps: keep the checkpoint of the best evaluation (lowest FID/FD) beside the latest; "
        "--checkpoints_total_limit never removes it (best_checkpoint.json names it).",
    )

    def validate(self) -> "OutputConfig":
        _require(bool(self.output_dir), "`--output_dir` must not be empty.")
        _require(
            self.checkpointing_steps >= 1, f"`--checkpointing_steps` must be >= 1, got {self.checkpointing_steps}."
        )
        _require(
            self.checkpoints_total_limit is None or self.checkpoints_total_limit >= 1,
            f"`--checkpoints_total_limit` must be >= 1, got {self.checkpoints_total_limit}.",
        )
        _require(self.validation_steps >= 1, f"`--validation_steps` must be >= 1, got {self.validation_steps}.")
        _require(
            self.validation_prompts is None or all(p.strip() for p in self.validation_prompts),
            f"`--validation_prompts` must not hold an empty prompt, got {self.validation_prompts}.",
        )
        _require(bool(self.tracker_project_name.strip()), "`--tracker_project_name` must not be empty.")
        _require(bool(self.logging_dir.strip()), "`--logging_dir` must not be empty.")
        _require(
            self.report_to in REPORT_TO,
            f"`--report_to` must be one of {', '.join(REPORT_TO)}, got {self.report_to!r}.",
        )
        _require(
            self.eval_steps is None or self.eval_steps >= 1, f"`--eval_steps` must be >= 1, got {self.eval_steps}."
        )
        if self.eval_steps is not None:
            _require(
                bool(self.eval_prompts) and bool(self.eval_reference),
                "`--eval_steps` needs --eval_prompts (held-out prompts) and --eval_reference (reference images).",
            )
        _require(
            self.eval_num_images is None or self.eval_num_images >= 2,
            f"`--eval_num_images` must be >= 2 (FID needs two images), got {self.eval_num_images}.",
        )
        _require(
            self.eval_features in ("inception", "digits"),
            f"`--eval_features` must be inception or digits, got {self.eval_features!r}.",
        )
        _require(not self.keep_best or self.eval_steps is not None, "`--keep_best` needs --eval_steps.")
        if self.hub_model_id is not None:
            from huggingface_hub.utils import HFValidationError, validate_repo_id

            try:
                validate_repo_id(self.hub_model_id)
            except HFValidationError:
                raise ConfigError(
                    f"`--hub_model_id` {self.hub_model_id!r} is not a valid Hub repo id; use 'namespace/name' with "
                    "letters, digits, '-', '_' and '.'."
                ) from None
        if self.base_model_id is not None:
            from huggingface_hub.utils import HFValidationError, validate_repo_id

            try:
                validate_repo_id(self.base_model_id)
            except HFValidationError:
                raise ConfigError(
                    f"`--base_model_id` {self.base_model_id!r} is not a Hub repo id; give the teacher's id as on the "
                    "Hub, such as stabilityai/stable-diffusion-xl-base-1.0."
                ) from None
        return self


#: the sections of a TrainConfig, by field name
SECTIONS = {
    "method": MethodConfig,
    "roles": RolesConfig,
    "optim": OptimizationConfig,
    "data": DataConfig,
    "output": OutputConfig,
}


@dataclass
class TrainConfig:
    """A whole distillation run. :func:`.resolve.resolve` fills the family's and the method's defaults."""

    teacher: Optional[str] = setting(
        None, "Hub model id or local diffusers pipeline folder of the teacher (required)."
    )
    family: str = setting(
        "auto", "Backbone family of the teacher (auto: detected from its model_index.json).", known="families"
    )
    revision: Optional[str] = setting(None, "Hub revision of the teacher.", default_text="main")
    variant: Optional[str] = setting(
        None,
        "Weights variant of the teacher (and of the students initialised from it), e.g. fp16 for "
        "diffusion_pytorch_model.fp16.safetensors.",
        default_text="the plain weights",
    )
    cache_dir: Optional[str] = setting(
        None, "Folder for downloaded models and datasets.", default_text="the Hugging Face cache"
    )
    max_sequence_length: Optional[int] = setting(
        None,
        "Text tokens kept.",
        family_default="default_max_sequence_length",
        default_text="the tokenizer's own length for the others",
    )
    method: MethodConfig = field(default_factory=MethodConfig)
    roles: RolesConfig = field(default_factory=RolesConfig)
    optim: OptimizationConfig = field(default_factory=OptimizationConfig)
    data: DataConfig = field(default_factory=DataConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def validate(self) -> "TrainConfig":
        from ..families import FAMILIES, supported_families_text

        for part in (self, self.method, self.roles, self.optim, self.data, self.output):
            check_field_types(part)
        _require(bool(self.teacher), "`--teacher` is required: a Hub model id or a local diffusers pipeline folder.")
        _require(
            self.max_sequence_length is None or self.max_sequence_length >= 1,
            f"`--max_sequence_length` must be >= 1, got {self.max_sequence_length}.",
        )
        _require(
            self.family == "auto" or self.family in FAMILIES,
            f"`--family` must be auto or one of {supported_families_text()}, got {self.family!r}.",
        )
        for part in (self.method, self.roles, self.optim, self.data, self.output):
            part.validate()
        _require(
            not self.method.regression_weight or self.data.real_images == TEACHER_REFERENCE,
            "`--regression_weight` regresses the student onto the teacher's samples from the same noise, which only "
            "--real_images teacher stores; pass --real_images teacher or drop --regression_weight.",
        )
        return self

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "TrainConfig":
        """Build from a nested dict (as written by :meth:`to_dict`); unknown keys are refused."""
        kwargs: Dict[str, Any] = {}
        known = {f.name for f in dataclasses.fields(cls)}
        for key, value in data.items():
            _require(key in known, f"Unknown config key {key!r}; known keys are {', '.join(sorted(known))}.")
            if key in SECTIONS:
                section_cls = SECTIONS[key]
                names = {f.name for f in dataclasses.fields(section_cls)}
                for sub in value:
                    _require(
                        sub in names, f"Unknown config key {key}.{sub}; known keys are {', '.join(sorted(names))}."
                    )
                kwargs[key] = section_cls(**value)
            else:
                kwargs[key] = value
        return cls(**kwargs)

    def save(self, path: str) -> None:
        # The project's one crash-safe JSON writer: a crash leaves the old file and a temporary name that the next
        # checkpoint clears.
        from ..storage import write_json

        write_json(path, self.to_dict())

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
