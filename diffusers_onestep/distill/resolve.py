"""The one resolver: ``resolve(TrainConfig) -> ResolvedConfig``.

It reads the teacher's configs (never its weights), detects the family once (honouring ``revision``), and fills every
setting left ``None`` from the family adapter's ``training_defaults`` and the method class
(:func:`.methods.resolve_method_config`). The CLI, the Python API (``Trainer(TrainConfig(...))``) and a resumed run
all go through it, and a resolved config resolves to itself.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from ..errors import reason_of
from .config import MIXED_PRECISIONS, TEACHER_REFERENCE, ConfigError, TrainConfig
from .methods import get_method_class, resolve_method_config


@dataclass(frozen=True)
class ResolvedConfig:
    """A run's configuration with every default filled in, and what was learned resolving it.

    Attributes:
        config: the complete :class:`TrainConfig` (no ``None`` left where a default exists); this is what
            ``training_config.json`` holds, and what a resumed run must match.
        family: the teacher's family, detected once.
        teacher_configs: the teacher's ``model_index.json`` and its denoiser and VAE configs (read without weights).
        mixed_precision_source: where ``optim.mixed_precision`` came from: ``"flag"`` (the command line or a config
            file), ``"accelerate"`` (the accelerate config, through ``accelerate launch``) or ``"default"``.
    """

    config: TrainConfig
    family: str
    teacher_configs: Dict[str, Dict[str, Any]] = field(default_factory=dict, repr=False, compare=False)
    mixed_precision_source: str = field(default="flag", compare=False)

    def __getattr__(self, name: str):
        # A resolved config reads like the TrainConfig it holds (``resolved.optim.learning_rate``).
        if name == "config":
            raise AttributeError(name)
        return getattr(self.config, name)

    @property
    def adapter_class(self):
        from ..families import get_adapter_class

        return get_adapter_class(self.family)

    @property
    def method_class(self):
        return get_method_class(self.config.method.method)

    @property
    def student_timesteps(self) -> List[float]:
        return [float(t) for t in self.config.method.student_timesteps]

    @property
    def mixed_precision_explained(self) -> str:
        """``optim.mixed_precision`` and where it came from, in words (``--dry_run`` and the trainer print it)."""
        source = MIXED_PRECISION_SOURCES[self.mixed_precision_source]
        return f"mixed_precision {self.config.optim.mixed_precision} ({source})"


#: the variable ``accelerate launch`` sets from its ``--mixed_precision`` flag or its config file (``--config_file``,
#: else the one ``accelerate config`` wrote); the Accelerator reads it when it is given no value
ACCELERATE_MIXED_PRECISION = "ACCELERATE_MIXED_PRECISION"
MIXED_PRECISION_SOURCES = {
    "flag": "from --mixed_precision",
    "accelerate": "from the accelerate config, through accelerate launch",
    "default": "the default: no --mixed_precision and not started by accelerate launch",
}


def resolve_mixed_precision(value: Optional[str]) -> Tuple[str, str]:
    """``(mixed_precision, source)``: an explicit value wins; unset, the accelerate config's value (what the
    ``Accelerator`` itself takes when given none), else ``"no"``. ``source`` is a key of
    :data:`MIXED_PRECISION_SOURCES`."""
    if value is not None:
        return value, "flag"
    launched = os.environ.get(ACCELERATE_MIXED_PRECISION)
    if launched is None:
        return "no", "default"
    launched = launched.strip().lower()
    if launched not in MIXED_PRECISIONS:
        raise ConfigError(
            f"The accelerate config sets mixed_precision {launched}, which this script does not support; pass "
            f"--mixed_precision {', '.join(MIXED_PRECISIONS[:-1])} or {MIXED_PRECISIONS[-1]}."
        )
    return launched, "accelerate"


def read_teacher_configs(
    teacher: str, revision: Optional[str] = None, cache_dir: Optional[str] = None
) -> Dict[str, Dict[str, Any]]:
    """``model_index.json`` of a teacher (Hub id or folder) and the configs of its denoiser, VAE and scheduler, or a
    one-sentence :class:`ConfigError`. Reads JSON only, never weights."""
    from ..families import read_pipeline_configs
    from ..hub import offline_cache_miss, read_json, uncached_while_offline

    kwargs = {key: value for key, value in {"revision": revision, "cache_dir": cache_dir}.items() if value}
    try:
        index = read_json(teacher, "model_index.json", kwargs)
        if index is None:
            if not os.path.isdir(teacher) and uncached_while_offline(teacher, "model_index.json", **kwargs):
                raise ConfigError(f"--teacher {offline_cache_miss(teacher)}")
            if read_json(teacher, "onestep_lora.json", kwargs) is not None:
                raise ConfigError(
                    f"--teacher {teacher} is a diffusers-onestep LoRA student, not a teacher; distill from the base "
                    "model its onestep_lora.json names."
                )
            raise ConfigError(f"--teacher {teacher} is not a diffusers pipeline (it has no model_index.json).")
        scheduler_entry = index.get("scheduler") if isinstance(index.get("scheduler"), list) else [None, None]
        # a saved student names its native pipeline class (and "_onestep" may name the family of a teacher too), so
        # what marks it is our scheduler
        if index.get("_class_name") == "OneStepPipeline" or "OneStepScheduler" in scheduler_entry:
            raise ConfigError(
                f"--teacher {teacher} is a one-step student saved by OneStepPipeline, not a teacher; distill from the "
                "multi-step pipeline it was trained from."
            )
        configs: Dict[str, Dict[str, Any]] = {"model_index": index, **read_pipeline_configs(teacher, index, kwargs)}
        for name, filename in (("vae", "vae/config.json"), ("scheduler", "scheduler/scheduler_config.json")):
            if isinstance(index.get(name), list) and index[name][0] is not None:
                configs[name] = read_json(teacher, filename, kwargs) or {}
    except ValueError as error:  # read_json's sentence for a damaged config, check_repo_id's for a bad id
        if isinstance(error, ConfigError):
            raise
        raise ConfigError(f"--teacher: {error}") from None
    except OSError as error:  # huggingface_hub: repository / revision not found, gated, no connection
        raise ConfigError(f"--teacher {teacher} could not be read from the Hub ({reason_of(error)}).") from None
    return configs


def detect_teacher_family(teacher_configs: Dict[str, Dict[str, Any]], requested: str = "auto") -> str:
    from ..families import detect_family

    index = teacher_configs["model_index"]
    components = {k: v for k, v in teacher_configs.items() if k != "model_index"}
    try:
        detected = detect_family(index, components)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if requested not in ("auto", detected):
        raise ConfigError(f"--family {requested} does not match the teacher, which is a {detected} model.")
    return detected


def resolve(config: TrainConfig, teacher_configs: Optional[Dict[str, Dict[str, Any]]] = None) -> ResolvedConfig:
    """Validate ``config``, detect the teacher's family once (honouring ``revision``) and fill every default from the
    family adapter's ``training_defaults`` and the method class. Loads no weights.

    A config that is already complete (a run's ``training_config.json``) resolves to itself.
    """
    from ..families import get_adapter_class

    config = copy.deepcopy(config).validate()
    check_published_base(config)
    if teacher_configs is None:
        teacher_configs = read_teacher_configs(config.teacher, config.revision, config.cache_dir)
    family = detect_teacher_family(teacher_configs, config.family)
    adapter_cls = get_adapter_class(family)
    defaults = adapter_cls.training_defaults
    config.family = family
    config.method = resolve_method_config(config.method, defaults, has_real_images=bool(config.data.real_images))

    roles = config.roles
    if roles.lora_rank is None:
        roles.lora_rank = defaults.lora_rank
    if roles.lora_alpha is None:
        roles.lora_alpha = float(defaults.lora_alpha)
    if roles.critic_lora_rank is None:
        roles.critic_lora_rank = roles.lora_rank
    if roles.lora_target_modules is None:
        roles.lora_target_modules = list(adapter_cls.default_lora_target_modules)
    optim = config.optim
    optim.mixed_precision, mixed_precision_source = resolve_mixed_precision(optim.mixed_precision)
    # The method's own published optimizer settings (TDM: Adam betas (0, 0.95), generator lr = fake lr / 5) fill
    # what the user left unset, after the family's record of the method's runs and before the generic defaults.
    method_cls = get_method_class(config.method.method)
    published = getattr(defaults, "method_defaults", {}).get(method_cls.name, {})
    method_rates = optim.learning_rate is None and "learning_rate" not in published
    method_rates = method_rates and "learning_rate" in method_cls.optimizer_defaults
    if optim.learning_rate is None:
        if method_rates:
            optim.learning_rate = float(method_cls.optimizer_defaults["learning_rate"])
        else:
            optim.learning_rate = defaults.learning_rate(roles.student, config.method.method)
    if optim.critic_learning_rate is None:
        if method_rates and "critic_learning_rate" in method_cls.optimizer_defaults:
            optim.critic_learning_rate = float(method_cls.optimizer_defaults["critic_learning_rate"])
        else:
            optim.critic_learning_rate = optim.learning_rate * method_cls.critic_learning_rate_ratio
    for name, generic in (("adam_beta1", 0.9), ("adam_beta2", 0.999)):
        if getattr(optim, name) is None:
            setattr(optim, name, float(method_cls.optimizer_defaults.get(name, generic)))
    if config.max_sequence_length is None:
        config.max_sequence_length = adapter_cls.default_max_sequence_length
    if config.data.resolution is None:
        config.data.resolution = _native_resolution(adapter_cls, teacher_configs)
    if config.data.real_images == TEACHER_REFERENCE:
        _resolve_teacher_reference(config, adapter_cls)
    return ResolvedConfig(
        config=config.validate(),
        family=family,
        teacher_configs=teacher_configs,
        mixed_precision_source=mixed_precision_source,
    )


def check_published_base(config: TrainConfig) -> None:
    """A LoRA student names its base model (``onestep_lora.json``); pushed, that name must load on other machines. A
    local teacher folder does not, so ``--push_to_hub`` of a LoRA student of one needs ``--base_model_id``: refused
    here, before anything loads, rather than after training with a student that loads nowhere else."""
    output = config.output
    if not output.push_to_hub or config.roles.student != "lora" or output.base_model_id is not None:
        return
    if os.path.isdir(config.teacher):
        raise ConfigError(
            f"--teacher {config.teacher} is a local folder, which the pushed LoRA student would name as its base model "
            "and which loads only on this machine; pass --base_model_id with the teacher's Hub id."
        )


def _native_resolution(adapter_cls, teacher_configs: Dict[str, Dict[str, Any]]) -> Optional[int]:
    denoiser = teacher_configs.get(adapter_cls.denoiser_name) or {}
    vae = teacher_configs.get("vae") or {}
    sample_size = denoiser.get("sample_size")
    if isinstance(sample_size, (list, tuple)):
        sample_size = sample_size[0]
    if not sample_size or not vae:
        return None
    return int(sample_size) * adapter_cls.vae_scale_factor_of(vae)


#: how many latents ``--real_images teacher`` samples where ``--teacher_reference_count`` is not given
DEFAULT_TEACHER_REFERENCE_COUNT = 1000
#: the reference set's folder inside ``--output_dir`` where ``--teacher_reference_dir`` is not given
TEACHER_REFERENCE_DIR_NAME = "teacher_reference"


def _resolve_teacher_reference(config: TrainConfig, adapter_cls) -> None:
    """The defaults of ``--real_images teacher``: 1000 latents, the native pipeline's own default number of steps,
    the run's guidance scale, a folder inside the output folder (where a resumed run finds a half-built set)."""
    import inspect

    import diffusers

    data = config.data
    if not config.method.gan_weight and not config.method.regression_weight:
        raise ConfigError(
            f"--real_images teacher feeds a discriminator or the regression loss, and this {config.method.method} run "
            "has neither (GAN weight 0, no --regression_weight); drop --real_images or set one of them."
        )
    if data.teacher_reference_count is None:
        data.teacher_reference_count = DEFAULT_TEACHER_REFERENCE_COUNT
    if data.teacher_reference_steps is None:
        call = getattr(diffusers, adapter_cls.native_pipeline_class_name).__call__
        default = inspect.signature(call).parameters.get("num_inference_steps")
        data.teacher_reference_steps = int(default.default) if default is not None and default.default else 50
    if data.teacher_reference_guidance_scale is None:
        data.teacher_reference_guidance_scale = float(config.method.guidance_scale)
    guidance = data.teacher_reference_guidance_scale
    if not adapter_cls.has_embedded_guidance and guidance < 1:
        # the native pipelines guide only above 1 (below, they run the conditional branch alone)
        raise ConfigError(
            f"`--teacher_reference_guidance_scale` {guidance} is below 1, where the teacher's pipeline "
            "switches classifier-free guidance off; pass 1 (no guidance) or more."
        )
    if data.teacher_reference_dir is None:
        data.teacher_reference_dir = os.path.join(config.output.output_dir, TEACHER_REFERENCE_DIR_NAME)
