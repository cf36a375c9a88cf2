"""The checkpoint format of a distillation run: write, read, list, prune, and the check before resuming.

A checkpoint ``<output_dir>/checkpoint-<step>/`` holds the complete training state in safetensors and JSON:

==============================  ===================================================================================
file                            content
==============================  ===================================================================================
``trainable.safetensors``       every trainable tensor (student, critic, discriminator head) by stable name
``ema.safetensors``             the student's EMA (with ``--ema_decay``)
``method.safetensors``          the method's own state (f-distill's ratio-normalizer bins), when it has one
``optimizer_<role>.*``          AdamW moments (safetensors) and step counters and param groups (JSON)
``scheduler_<role>.json``       the LR scheduler's state (its lambdas are rebuilt from the config)
``rng_<rank>.*``                every process's torch/CUDA/RandomSource (safetensors) and Python/NumPy (JSON) state
``training_config.json``        the configuration the state belongs to
``trainer_state.json``          step, skipped non-finite updates, process count; written last, it commits the folder
==============================  ===================================================================================

It is written into a hidden sibling folder that is renamed into place once complete, so a crash at any point
leaves either the whole checkpoint or none of it.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from .. import storage
from .config import ConfigError, TrainConfig, config_differences
from .models import RandomSource


CHECKPOINT_PREFIX = "checkpoint-"
CONFIG_NAME = "training_config.json"
TRAINER_STATE_NAME = "trainer_state.json"
#: the file whose presence marks a complete checkpoint
CHECKPOINT_COMMIT_FILE = TRAINER_STATE_NAME
#: version of the layout above, stored in ``trainer_state.json``
CHECKPOINT_FORMAT = 1
#: config keys that may change between a checkpoint and its resumption
RESUMABLE_CHANGES = (
    "optim.max_train_steps",
    "output.",
    "data.dataloader_num_workers",
    "optim.on_nonfinite",
    "optim.max_nonfinite_skips",
    "cache_dir",
)


@dataclass
class TrainingState:
    """Everything a checkpoint saves and restores besides the configuration.

    ``roles`` is the :class:`~.roles.BackboneRoles` of the run, ``method`` its method (``state_dict`` /
    ``load_state_dict``), ``optimizers`` and ``lr_schedulers`` are keyed by role, ``ema`` maps the student's parameter
    names to float32 averages (``None`` without ``--ema_decay``).
    """

    roles: Any
    method: Any
    optimizers: Dict[str, torch.optim.Optimizer]
    lr_schedulers: Dict[str, Any]
    random_source: RandomSource
    ema: Optional[Dict[str, torch.Tensor]] = None
    global_step: int = 0
    nonfinite_skips: int = 0


# ----------------------------------------------------------------------------------------------------------------
# finding checkpoints and checking a resumption
# ----------------------------------------------------------------------------------------------------------------


def list_checkpoints(output_dir: str) -> List[Tuple[int, str]]:
    """Complete checkpoints (``checkpoint-N`` with their commit file), sorted by step."""
    if not os.path.isdir(output_dir):
        return []
    out = []
    for name in os.listdir(output_dir):
        match = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", name)
        path = os.path.join(output_dir, name)
        if match and os.path.isfile(os.path.join(path, CHECKPOINT_COMMIT_FILE)):
            out.append((int(match.group(1)), path))
    return sorted(out)


def resolve_resume_path(resume: Optional[str], output_dir: str) -> Optional[str]:
    """The checkpoint folder to resume from, or ``None`` for a fresh run.

    ``latest`` is the newest complete checkpoint of ``output_dir``, and ``None`` while it has none (the run starts
    fresh, as in the diffusers training examples); any other value is a checkpoint folder, as a path or as its name
    inside ``output_dir`` (``checkpoint-500``), and a :class:`ConfigError` when it is no complete checkpoint.
    """
    if not resume:
        return None
    if resume == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1][1] if checkpoints else None
    if not os.path.exists(resume) and os.path.isdir(os.path.join(output_dir, resume)):
        resume = os.path.join(output_dir, resume)
    if not os.path.exists(resume):
        raise ConfigError(
            f"--resume_from_checkpoint {resume} does not exist; pass 'latest' or a {CHECKPOINT_PREFIX}N folder "
            "written by this script."
        )
    if not os.path.isfile(os.path.join(resume, CHECKPOINT_COMMIT_FILE)):
        raise ConfigError(
            f"--resume_from_checkpoint {resume} is not a complete checkpoint folder (it has no {CHECKPOINT_COMMIT_FILE}); "
            f"pass 'latest' or a {CHECKPOINT_PREFIX}N folder written by this script."
        )
    return resume


def check_resume_config(checkpoint: str, config: TrainConfig) -> None:
    """Refuse to resume with settings that change what is trained; the message lists the differences."""
    saved_path = os.path.join(checkpoint, CONFIG_NAME)
    if not os.path.isfile(saved_path):
        return
    saved = TrainConfig.load(saved_path).to_dict()
    differences = [
        d for d in config_differences(saved, config.to_dict()) if not d.split(":")[0].startswith(RESUMABLE_CHANGES)
    ]
    if differences:
        raise ConfigError(
            f"The run conflicts with the configuration of {checkpoint} ({'; '.join(differences)}); resume with "
            "the same settings, or start a new --output_dir."
        )


def prune_checkpoints(output_dir: str, limit: Optional[int]) -> None:
    """Keep the newest ``limit`` complete checkpoints; the newest one is never removed, whatever the limit."""
    if not limit:
        return
    checkpoints = list_checkpoints(output_dir)
    for _, path in checkpoints[:-1][: max(0, len(checkpoints) - limit)]:
        shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------------
# save and load
# ----------------------------------------------------------------------------------------------------------------


def save_checkpoint(
    accelerator, state: TrainingState, config: TrainConfig, on_event: Optional[Callable[..., Any]] = None
) -> str:
    """Write ``checkpoint-<state.global_step>`` crash-safely (every process takes part); returns its path.

    ``on_event(event, **info)`` is called with ``"before_checkpoint_commit"`` (``path`` = the staging folder,
    everything but the commit file written) and ``"checkpoint_written"`` (``path`` = the renamed folder), on the main
    process.
    """
    on_event = on_event or (lambda event, **info: None)
    output_dir = config.output.output_dir
    step = state.global_step
    target = os.path.join(output_dir, f"{CHECKPOINT_PREFIX}{step}")
    staging = os.path.join(output_dir, f".{CHECKPOINT_PREFIX}{step}.tmp")
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
    accelerator.wait_for_everyone()
    # Every process writes its own RNG state; the main process writes the shared state.
    _save_rng_state(staging, accelerator.process_index, state.random_source)
    if accelerator.is_main_process:
        storage.save_tensors(os.path.join(staging, "trainable.safetensors"), state.roles.trainable_state_dict())
        if state.ema is not None:
            storage.save_tensors(os.path.join(staging, "ema.safetensors"), state.ema)
        method_state = _flatten(state.method.state_dict())
        if method_state:
            storage.save_tensors(os.path.join(staging, "method.safetensors"), method_state)
        for role, optimizer in state.optimizers.items():
            tensors, plain = _optimizer_to_tensors(optimizer.state_dict())
            storage.save_tensors(os.path.join(staging, f"optimizer_{role}.safetensors"), tensors)
            storage.write_json(os.path.join(staging, f"optimizer_{role}.json"), plain)
            storage.write_json(
                os.path.join(staging, f"scheduler_{role}.json"), _scheduler_state(state.lr_schedulers[role])
            )
        config.save(os.path.join(staging, CONFIG_NAME))
        on_event("before_checkpoint_commit", path=staging, step=step)
        storage.write_json(
            os.path.join(staging, TRAINER_STATE_NAME),
            {
                "global_step": step,
                "nonfinite_skips": state.nonfinite_skips,
                "num_processes": accelerator.num_processes,
                "format": CHECKPOINT_FORMAT,
            },
        )
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        storage.replace_directory(staging, target)
        prune_checkpoints(output_dir, config.output.checkpoints_total_limit)
        on_event("checkpoint_written", path=target, step=step)
    accelerator.wait_for_everyone()
    return target


def load_checkpoint(path: str, state: TrainingState, process_index: int, device=None) -> None:
    """Restore ``state`` in place from a checkpoint folder (this process's RNG state included)."""
    with open(os.path.join(path, TRAINER_STATE_NAME), encoding="utf-8") as f:
        trainer_state = json.load(f)
    state.roles.load_trainable_state_dict(storage.load_tensors(os.path.join(path, "trainable.safetensors")))
    ema_path = os.path.join(path, "ema.safetensors")
    if state.ema is not None and os.path.isfile(ema_path):
        state.ema = {k: v.to(device) for k, v in storage.load_tensors(ema_path).items()}
    method_path = os.path.join(path, "method.safetensors")
    if os.path.isfile(method_path):
        state.method.load_state_dict(_unflatten(storage.load_tensors(method_path)))
    for role, optimizer in state.optimizers.items():
        plain = _read_json(os.path.join(path, f"optimizer_{role}.json"))
        tensors = storage.load_tensors(os.path.join(path, f"optimizer_{role}.safetensors"))
        optimizer.load_state_dict(_optimizer_from_tensors(tensors, plain))
        scheduler = state.lr_schedulers[role]
        saved = _read_json(os.path.join(path, f"scheduler_{role}.json"))
        scheduler.load_state_dict({**scheduler.state_dict(), **saved})
    _load_rng_state(path, process_index, state.random_source)
    state.global_step = int(trainer_state["global_step"])
    state.nonfinite_skips = int(trainer_state.get("nonfinite_skips", 0))


# ----------------------------------------------------------------------------------------------------------------
# (de)serialisation of optimizer, scheduler and RNG states
# ----------------------------------------------------------------------------------------------------------------


def _read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _optimizer_to_tensors(state: Dict[str, Any]) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Split an optimizer state_dict into tensors (safetensors) and plain values (JSON)."""
    tensors, plain_state = {}, {}
    for index, entry in state["state"].items():
        plain_state[str(index)] = {}
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value
            else:
                plain_state[str(index)][key] = value
    return tensors, {"state": plain_state, "param_groups": state["param_groups"]}


def _optimizer_from_tensors(tensors: Dict[str, torch.Tensor], plain: Dict[str, Any]) -> Dict[str, Any]:
    state: Dict[int, Dict[str, Any]] = {int(i): dict(v) for i, v in plain["state"].items()}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": plain["param_groups"]}


def _scheduler_state(scheduler) -> Dict[str, Any]:
    state = dict(scheduler.state_dict())
    state.pop("lr_lambdas", None)  # functions; rebuilt from the config
    return state


def _flatten(state: Dict[str, Any], prefix: str = "") -> Dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        elif torch.is_tensor(value):
            out[f"{prefix}{key}"] = value
    return out


def _unflatten(tensors: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for key, value in tensors.items():
        head, _, tail = key.partition(".")
        out.setdefault(head, {})[tail] = value
    return out


def _save_rng_state(folder: str, rank: int, random_source: RandomSource) -> None:
    storage.save_tensors(
        os.path.join(folder, f"rng_{rank}.safetensors"),
        {
            "torch": torch.get_rng_state(),
            **{f"cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())},
            **{f"source_{k}": v for k, v in random_source.state_dict().items()},
        },
    )
    version, python_state, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    storage.write_json(
        os.path.join(folder, f"rng_{rank}.json"),
        {
            "python": [version, list(python_state), gauss],
            "numpy": [kind, keys.tolist(), int(position), int(has_gauss), float(cached)],
        },
    )


def _load_rng_state(folder: str, rank: int, random_source: RandomSource) -> None:
    tensors_path = os.path.join(folder, f"rng_{rank}.safetensors")
    if not os.path.isfile(tensors_path):  # e.g. resumed with more processes than were saved
        return
    rng = storage.load_tensors(tensors_path)
    torch.set_rng_state(rng["torch"])
    cuda = [rng[f"cuda_{i}"] for i in sorted(int(k[len("cuda_") :]) for k in rng if k.startswith("cuda_"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    random_source.load_state_dict({k[len("source_") :]: v for k, v in rng.items() if k.startswith("source_")})
    plain = _read_json(os.path.join(folder, f"rng_{rank}.json"))
    version, python_state, gauss = plain["python"]
    random.setstate((version, tuple(python_state), gauss))
    kind, keys, position, has_gauss, cached = plain["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), position, has_gauss, cached))
