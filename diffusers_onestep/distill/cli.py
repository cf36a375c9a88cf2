"""Command line of the training script, generated from the config dataclasses: flags (and ``--config FILE``) ->
:class:`TrainConfig` -> :func:`resolve` -> :func:`preflight` -> trainer.

Every field of :mod:`.config` is a flag named after the field (booleans that default to true are switched off with
``--no_<name>``); help texts, choices and registered names come from the fields' metadata. Everything that can be checked without
loading a model is checked before anything is loaded or written: bad input exits with status 2 and one sentence.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import typing
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..errors import reason_of
from .config import SECTIONS, ConfigError, TrainConfig
from .preflight import preflight, resume_note
from .resolve import ResolvedConfig, resolve


EPILOG = """\
examples:
  # SDXL, LoRA student and critic on one shared backbone, Jensen-Shannon (f-distill), real images for the
  # discriminator; 1 GPU, mixed precision from `accelerate config` (e.g. bf16)
  accelerate launch -m diffusers_onestep.distill \\
      --teacher stabilityai/stable-diffusion-xl-base-1.0 --method fdistill --divergence js \\
      --prompts prompts.txt --real_images ./laion-subset --gradient_checkpointing --allow_tf32 \\
      --output_dir sdxl-onestep-js

  # PixArt-alpha, DMD (reverse KL), full student, 8 GPUs (an accelerate config of the checkout), pushed to the Hub
  # (the repo is created before anything loads)
  accelerate launch --config_file training/accelerate_configs/multi_gpu.yaml -m diffusers_onestep.distill \\
      --teacher PixArt-alpha/PixArt-XL-2-512x512 --student full --critic lora --prompts my/prompt-dataset \\
      --push_to_hub --hub_model_id my-org/pixart-onestep

  # one process, no accelerate launch: the console command
  diffusers-onestep distill --teacher PixArt-alpha/PixArt-XL-2-512x512 --prompts prompts.txt --mixed_precision bf16

  # resume the newest checkpoint of a run (a run without one yet starts fresh)
  accelerate launch -m diffusers_onestep.distill --config sdxl.yaml --resume_from_checkpoint latest

  # the settings a run resolved to, without loading any weights; a finished run's training_config.json runs again
  diffusers-onestep distill --config sdxl.yaml --dry_run
  accelerate launch -m diffusers_onestep.distill --config sdxl-onestep/training_config.json --output_dir sdxl-again

The same command runs as `accelerate launch training/train_onestep.py ...` from a checkout. Flags override the
values of --config FILE (YAML or JSON, either flat flag names or the nested layout of training_config.json);
--mixed_precision, when not given, is the accelerate config's. Defaults marked "family default" come from the
teacher's family adapter and follow the papers (docs/training.md); --dry_run prints every resolved value.
"""

#: argument groups of --help, by config section (None: the top level of TrainConfig)
GROUP_TITLES = {
    None: "teacher",
    "method": "method",
    "roles": "roles",
    "optim": "optimisation",
    "data": "data",
    "output": "output",
}


def _family_names() -> Tuple[str, ...]:
    from ..families import FAMILIES

    return ("auto",) + tuple(FAMILIES)


def _method_names() -> Tuple[str, ...]:
    from .methods import method_names

    return method_names()


#: the registries a field's ``known`` metadata names, read when the parser is built
KNOWN_NAMES = {"families": _family_names, "methods": _method_names}


def _comma_list(value: str) -> List[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def config_fields() -> List[Tuple[Optional[str], dataclasses.Field, Any]]:
    """``(section, field, type)`` of every setting, top-level fields first (section ``None``)."""
    out = []
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name not in SECTIONS:
            out.append((None, f, hints[f.name]))
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        out += [(section, f, hints[f.name]) for f in dataclasses.fields(cls)]
    return out


def _unwrap_optional(hint):
    if typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def family_defaults_text(attribute: str) -> str:
    """Every registered family's default for a setting, e.g. ``"SDXL 399; PixArt-α, PixArt-Σ 400; ..."``: read from the
    adapters' ``training_defaults`` (or an adapter attribute) when ``--help`` is built, so a new family is listed."""
    from ..families import FAMILIES

    def shown(value) -> str:
        if isinstance(value, (list, tuple)):
            return " ".join(shown(v) for v in value)
        return f"{value:g}" if isinstance(value, float) else str(value)

    by_value: Dict[str, List[str]] = {}
    for cls in FAMILIES.values():
        defaults = cls.training_defaults
        if attribute == "learning_rate":
            value = f"{shown(defaults.learning_rate_lora)} LoRA / {shown(defaults.learning_rate_full)} full"
        elif hasattr(defaults, attribute):
            value = shown(getattr(defaults, attribute))
        else:
            value = getattr(cls, attribute)
            if value is None:  # the family leaves it to the model (the field's default_text says how)
                continue
            value = shown(value)
        by_value.setdefault(value, []).append(cls.display_name)
    if len(by_value) == 1:
        return f"family default {next(iter(by_value))}"
    return "family default: " + "; ".join(f"{', '.join(names)} {value}" for value, names in by_value.items())


def _default_text(f: dataclasses.Field) -> str:
    if "family_default" in f.metadata:
        text = family_defaults_text(f.metadata["family_default"])
        return f"{text}; {f.metadata['default_text']}" if "default_text" in f.metadata else text
    if "default_text" in f.metadata:
        return f.metadata["default_text"]
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    if isinstance(default, (list, tuple)):
        return " ".join(str(v) for v in default)
    return str(default)


def flag_of(f: dataclasses.Field) -> str:
    """The flag a field is set by: its name, or ``no_<name>`` for a boolean that defaults to true."""
    return f"no_{f.name}" if f.default is True else f.name


def _add_argument(group, section: Optional[str], f: dataclasses.Field, hint) -> None:
    dest = f.name if section is None else f"{section}.{f.name}"
    meta = f.metadata
    kwargs: Dict[str, Any] = {"dest": dest, "default": None}
    hint = _unwrap_optional(hint)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is bool:
        kwargs["action"] = "store_false" if f.default is True else "store_true"
        help_text = meta.get("help", "")
    else:
        if origin in (list, List):
            if meta.get("comma_list"):
                kwargs["type"] = _comma_list
            else:
                kwargs.update(type=args[0], nargs="+")
        elif origin in (tuple, Tuple):
            kwargs.update(type=args[0], nargs=len(args))
        else:
            kwargs["type"] = hint
        choices = meta.get("choices")
        if choices:
            kwargs["choices"] = tuple(choices)
        if "metavar" in meta:
            kwargs["metavar"] = meta["metavar"]
        elif not choices:
            kwargs["metavar"] = f.name.upper()
        known = f"; one of: {', '.join(KNOWN_NAMES[meta['known']]())}" if "known" in meta else ""
        help_text = f"{meta.get('help', '')} (default: {_default_text(f)}{known})"
    kwargs["help"] = help_text.replace("%", "%%")
    group.add_argument(f"--{flag_of(f)}", **kwargs)


#: the name --help and errors give the command when the caller names none (the script users launch)
DEFAULT_PROG = "train_onestep.py"


#: the variable through which processes started by :func:`launch` report their exit status to it
STATUS_FILE_ENV = "DIFFUSERS_ONESTEP_STATUS_FILE"


def build_parser(prog: Optional[str] = None, launcher: bool = False) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog or DEFAULT_PROG,
        # the launching command hands every flag but its own to the training processes, so a flag must be spelled
        # out for it to be recognised as one of them (``--num_proc`` would otherwise pass as ``--num_processes``)
        allow_abbrev=not launcher,
        description="Distill a diffusers text-to-image teacher into a one-step student (DMD2, f-distill, ... with LoRA "
        "or full roles), then save it for OneStepPipeline and optionally push it to the Hub.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config",
        default=None,
        help="YAML or JSON file of settings (flat flag names or the nested layout of a run's "
        "training_config.json); flags override it.",
    )
    parser.add_argument(
        "--dry_run",
        action="store_true",
        help="Print the resolved configuration as JSON and exit without loading any weights.",
    )
    groups = {section: parser.add_argument_group(title) for section, title in GROUP_TITLES.items()}
    for section, f, hint in config_fields():
        _add_argument(groups[section], section, f, hint)
    if launcher:
        launching = parser.add_argument_group(
            "launching (diffusers-onestep distill only)",
            "With either flag the command checks the run, then starts it through accelerate launch and returns the "
            "exit status of the training processes (2: input refused, 3: non-finite loss, 130: interrupted).",
        )
        launching.add_argument(
            "--num_processes", type=int, default=None, metavar="N", help="Training processes (GPUs) to start."
        )
        launching.add_argument(
            "--accelerate_config",
            default=None,
            metavar="FILE",
            help="An accelerate config file (what `accelerate launch --config_file` takes).",
        )
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
        raise ConfigError(f"--config {path} could not be parsed ({reason_of(error)}).") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path} must hold a mapping of settings.")
    return data


def _file_values(data: Dict[str, Any]) -> Dict[str, Any]:
    """Settings of a --config file by destination (``section.field``); flat flag names and the nested layout of
    training_config.json are both accepted, and anything else is refused by name."""
    by_flag, by_path = {}, {}
    for section, f, _ in config_fields():
        dest = f.name if section is None else f"{section}.{f.name}"
        by_flag[f.name] = dest
        by_path[(section, f.name)] = dest
    values: Dict[str, Any] = {}
    for key, value in data.items():
        if key in SECTIONS and isinstance(value, dict):
            for sub, sub_value in value.items():
                if (key, sub) not in by_path:
                    raise ConfigError(f"Unknown setting {key}.{sub} in --config.")
                values[by_path[(key, sub)]] = sub_value
        elif key in by_flag:
            values[by_flag[key]] = value
        elif key.startswith("no_") and key[3:] in by_flag:
            values[by_flag[key[3:]]] = not value
        else:
            raise ConfigError(f"Unknown setting {key!r} in --config; use the flag names of --help.")
    return values


def config_from_values(values: Dict[str, Any]) -> TrainConfig:
    """A :class:`TrainConfig` from settings by destination (``"teacher"``, ``"method.divergence"``, ...)."""
    nested: Dict[str, Any] = {section: {} for section in SECTIONS}
    for dest, value in values.items():
        section, _, name = dest.rpartition(".")
        if section:
            nested[section][name] = value
        else:
            nested[name] = value
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for name, value in nested[section].items():
            if value is not None and typing.get_origin(_unwrap_optional(hints[name])) in (tuple, Tuple):
                nested[section][name] = tuple(value)
    return TrainConfig.from_dict(nested)


def parse_args(
    argv: Optional[Sequence[str]] = None, prog: Optional[str] = None
) -> Tuple[TrainConfig, argparse.Namespace]:
    """The unresolved config given by ``argv`` (flags over the --config file's values), and the parsed namespace
    (for ``--dry_run``)."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    values: Dict[str, Any] = {}
    if args.config:
        values.update(_file_values(_read_config_file(args.config)))
    for section, f, _ in config_fields():
        dest = f.name if section is None else f"{section}.{f.name}"
        value = getattr(args, dest)
        if value is not None:
            values[dest] = value
    return config_from_values(values), args


def resolve_args(
    argv: Optional[Sequence[str]] = None, prog: Optional[str] = None
) -> Tuple[ResolvedConfig, argparse.Namespace]:
    """Parse, resolve and preflight ``argv``: the run the script would start, checked without loading weights."""
    config, args = parse_args(argv, prog)
    resolved = resolve(config)
    preflight(resolved)
    return resolved, args


def main(
    argv: Optional[Sequence[str]] = None,
    hooks: Optional[Sequence[Any]] = None,
    prog: Optional[str] = None,
    launcher: bool = False,
) -> int:
    """Parse, resolve, check and train; returns the exit status. ``hooks`` go to :class:`~.trainer.Trainer` (the
    crash-safety tests inject faults through them from a launcher script of their own); ``prog`` is the command's
    name in ``--help`` and errors (default: ``train_onestep.py``); ``launcher`` adds ``--num_processes`` and
    ``--accelerate_config``, with which the checked run is started through :func:`launch`."""
    from .data import DataError

    parser = build_parser(prog, launcher)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    launching = launcher and (args.num_processes is not None or args.accelerate_config is not None)
    try:
        if launching:
            # check the run the processes will see: their number and the accelerate config's precision
            with launched_environment(args.num_processes, args.accelerate_config):
                config, _ = resolve_args(_without_launch_flags(argv), prog)
        else:
            config, _ = resolve_args(argv, prog)
    except (ConfigError, DataError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    if args.dry_run:
        # stdout is the resolved configuration (JSON, as training_config.json); where values came from goes to stderr
        print(json.dumps(config.config.to_dict(), indent=2, sort_keys=True, default=list))
        for note in (config.mixed_precision_explained, resume_note(config)):
            if note:
                print(f"{parser.prog}: {note}", file=sys.stderr)
        return 0
    if launching:
        return launch(_without_launch_flags(argv), args.num_processes, args.accelerate_config)

    from .trainer import HubError, NonFiniteError, Trainer, TrainingInterrupted

    try:
        Trainer(config, hooks=hooks).run()
    except (ConfigError, DataError) as error:  # what only loading could show (a weight file that does not decode)
        print(f"{parser.prog}: error: {error}", file=sys.stderr, flush=True)
        return 2
    except TrainingInterrupted:
        return 130
    except NonFiniteError as error:
        print(f"{parser.prog}: error: {error}", flush=True)
        return 3
    except HubError as error:  # the repo could not be created: refused before any weight loaded
        print(f"{parser.prog}: error: {error}", file=sys.stderr, flush=True)
        return 2
    return 0


# ----------------------------------------------------------------------------------------------------------------
# launching
# ----------------------------------------------------------------------------------------------------------------

#: the flags only the launching command takes, with whether each takes a value
LAUNCH_FLAGS = {"--num_processes": True, "--accelerate_config": True}


def _without_launch_flags(argv: Sequence[str]) -> List[str]:
    """``argv`` less :data:`LAUNCH_FLAGS` (also in their ``--flag=value`` form): what each training process gets."""
    out: List[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in LAUNCH_FLAGS:
            skip = LAUNCH_FLAGS[arg]
        elif arg.split("=", 1)[0] not in LAUNCH_FLAGS:
            out.append(arg)
    return out


def accelerate_config_values(path: Optional[str]) -> Dict[str, Any]:
    """The settings of an accelerate config file (YAML or JSON), or a one-sentence :class:`ConfigError`."""
    if path is None:
        return {}
    if not os.path.isfile(path):
        raise ConfigError(f"--accelerate_config {path} does not exist.")
    try:
        import yaml

        with open(path, encoding="utf-8") as f:
            values = yaml.safe_load(f) or {}
    except (OSError, ValueError) as error:  # yaml.YAMLError is a ValueError
        raise ConfigError(f"--accelerate_config {path} could not be read ({reason_of(error)}).") from None
    if not isinstance(values, dict):
        raise ConfigError(f"--accelerate_config {path} must hold a mapping of accelerate settings.")
    return values


@contextlib.contextmanager
def launched_environment(num_processes: Optional[int], accelerate_config: Optional[str]):
    """The variables ``accelerate launch`` will give the training processes that the checks read (``WORLD_SIZE``
    for the resume check, ``ACCELERATE_MIXED_PRECISION``), set while the launching process checks the run."""
    from .resolve import ACCELERATE_MIXED_PRECISION

    if num_processes is not None and num_processes < 1:
        raise ConfigError(f"--num_processes must be >= 1, got {num_processes}.")
    values = accelerate_config_values(accelerate_config)
    world_size = num_processes or values.get("num_processes") or 1
    launched = {"WORLD_SIZE": str(world_size)}
    precision = values.get("mixed_precision")
    if precision is not None:
        # an unquoted `mixed_precision: no` is YAML's false
        launched[ACCELERATE_MIXED_PRECISION] = "no" if precision is False else str(precision)
    saved = {key: os.environ.get(key) for key in launched}
    os.environ.update(launched)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def launch(argv: Sequence[str], num_processes: Optional[int], accelerate_config: Optional[str]) -> int:
    """Run the (already checked) training command ``argv`` through ``accelerate launch`` and return the training
    processes' own exit status.

    ``accelerate launch`` turns any nonzero exit of a process into exit status 1 with a traceback of its own
    (``subprocess.CalledProcessError``; ``torch.distributed``'s ``ChildFailedError`` for several processes), which
    buries the one sentence the script printed. So it runs here with ``--quiet`` (no launcher traceback), and every
    training process that exits nonzero writes its status to the file named by :data:`STATUS_FILE_ENV`, which is
    what this returns.
    """
    import subprocess
    import tempfile

    command = [sys.executable, "-m", "accelerate.commands.launch", "--quiet"]
    if accelerate_config is not None:
        command += ["--config_file", accelerate_config]
    else:  # the values accelerate would otherwise warn it defaulted
        command += ["--num_machines", "1", "--dynamo_backend", "no"]
        if num_processes and num_processes > 1:
            command.append("--multi_gpu")  # torchrun's process group (gloo on a machine without CUDA)
    if num_processes is not None:
        command += ["--num_processes", str(num_processes)]
    command += ["-m", "diffusers_onestep.distill", *argv]
    with tempfile.TemporaryDirectory(prefix="onestep-launch-") as folder:
        status_file = os.path.join(folder, "status")
        environment = dict(os.environ, **{STATUS_FILE_ENV: status_file})
        process = subprocess.Popen(command, env=environment)
        while True:
            try:
                returncode = process.wait()
                break
            except KeyboardInterrupt:  # the training processes got the same Ctrl-C: wait for their checkpoint
                continue
        if os.path.isfile(status_file):
            with open(status_file, encoding="utf-8") as f:
                text = f.read().strip()
            if text.lstrip("-").isdigit():
                return int(text)
    return returncode


def report_status(status: int) -> None:
    """Record a training process's nonzero exit status for :func:`launch` (the first process to fail wins)."""
    path = os.environ.get(STATUS_FILE_ENV)
    if not path or not status:
        return
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError:  # another process reported first, or the launcher is gone
        return
    with os.fdopen(descriptor, "w", encoding="utf-8") as f:
        f.write(f"{status}\n")
