"""The checkpoint format of a distillation run: write, read, list, prune, and the checks before resuming.

A checkpoint ``<output_dir>/checkpoint-<step>/`` holds the complete training state in safetensors and JSON:

==============================  ===================================================================================
file                            content
==============================  ===================================================================================
``trainable.safetensors``       every trainable tensor (student, critic, discriminator head) by stable name
``ema.safetensors``             the student's EMA (with ``--ema_decay``)
``method.safetensors``          the method's own state (f-distill's ratio-normalizer bins), when it has one
``optimizer_<role>.*``          AdamW moments (safetensors) and step counters and param groups (JSON)
``scheduler_<role>.json``       the LR scheduler's state (its lambdas are rebuilt from the config)
``grad_scaler.json``            the fp16 GradScaler's state (loss scale, growth tracker), under fp16 only
``rng_<rank>.*``                every process's torch/CUDA/RandomSource (safetensors) and Python/NumPy (JSON) state
``*.shard-<rank>.safetensors``  under FSDP, instead of ``trainable``/``ema``/``optimizer_<role>.safetensors``: each
                                process's shard of them (FSDP2 splits dim 0 in process order; resume with the same
                                number of processes; :func:`consolidated_tensors` joins them)
``training_config.json``        the configuration the state belongs to
``trainer_state.json``          step, skipped non-finite updates and fp16 overflows, process count, run id and the
                                size of every other
                                file; written last, it commits the folder
==============================  ===================================================================================

It is written into a hidden sibling folder that is renamed into place once complete, so a crash at any point
leaves either the whole checkpoint or none of it; the next successful save removes what a crash left behind (the
hidden staging folders of checkpoints and exports, temporary files).

**Runs.** Every run has a run id, kept across its resumptions: ``<output_dir>/run.json`` names the run that
writes the folder now (written when it starts), and each checkpoint's ``trainer_state.json`` names the run that
wrote it. A folder can hold checkpoints of several runs: ``--overwrite_output_dir`` starts a new run over an older
one's checkpoints, which are then foreign. ``--checkpoints_total_limit`` prunes only the current run's checkpoints,
and ``--resume_from_checkpoint latest`` resumes the newest complete checkpoint of the run ``run.json`` names
(while it has none, the run starts fresh; the older run's checkpoints are neither resumed nor touched).
Checkpoints written before run ids existed (format 1, no ``run_id``) still resume; the run that continues one
owns every checkpoint without a run id in its folder, and a folder without ``run.json`` resumes its newest.

**Checks before resuming** (:func:`find_resume_point`, called by the preflight before any weights load): every file
the format requires exists (format 2: every file ``trainer_state.json`` lists, at its recorded size; format 1: the
fixed set above), safetensors headers parse and cover their files, JSON files parse, and there is an RNG state for
every process of the resuming run -- resuming without one would not continue the run exactly. Under ``latest`` a
damaged newest checkpoint is passed over for the previous complete one, with one printed line naming the bad file;
a damaged checkpoint named explicitly is refused in one sentence that names the bad file and offers the previous
complete checkpoint. The checks catch truncated, missing and unparseable files, not bit flips inside tensor data.
"""

from __future__ import annotations

import copy
import json
import os
import random
import re
import shutil
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from .. import storage
from .config import ConfigError, TrainConfig, config_differences
from .models import RandomSource


CHECKPOINT_PREFIX = "checkpoint-"
CONFIG_NAME = "training_config.json"
TRAINER_STATE_NAME = "trainer_state.json"
#: names the run that writes ``output_dir`` now: ``{"run_id": ..., "owns_checkpoints_without_run_id": ...}``
RUN_NAME = "run.json"
#: the fp16 GradScaler's state (written under fp16 only)
GRAD_SCALER_NAME = "grad_scaler.json"
#: the file whose presence marks a complete checkpoint
CHECKPOINT_COMMIT_FILE = TRAINER_STATE_NAME
#: version of the layout above, stored in ``trainer_state.json`` (2: run id and file sizes; 1: neither)
CHECKPOINT_FORMAT = 2
#: the roles that have an optimizer and an LR scheduler in every checkpoint
OPTIMIZED_ROLES = ("student", "critic")
#: the files every format-1 checkpoint holds besides its commit file and RNG states (format 2 lists its own)
FORMAT_1_FILES = (
    "trainable.safetensors",
    CONFIG_NAME,
    *(f"optimizer_{role}.{ext}" for role in OPTIMIZED_ROLES for ext in ("safetensors", "json")),
    *(f"scheduler_{role}.json" for role in OPTIMIZED_ROLES),
)
#: the staging folder of a checkpoint (the same name on every process, which all write into it)
CHECKPOINT_STAGING_NAME = re.compile(rf"\.{CHECKPOINT_PREFIX}\d+\.tmp")
#: config keys that may change between a checkpoint and its resumption
RESUMABLE_CHANGES = (
    "optim.max_train_steps",
    "output.",
    "data.dataloader_num_workers",
    "data.data_cache_dir",
    "optim.on_nonfinite",
    "optim.max_nonfinite_skips",
    "cache_dir",
)


@dataclass(frozen=True)
class RunIdentity:
    """The run a checkpoint belongs to (see the module docstring)."""

    run_id: str
    #: whether checkpoints without a run id (format 1) are this run's: true once the run continued one of them
    owns_checkpoints_without_run_id: bool = False

    @classmethod
    def new(cls) -> "RunIdentity":
        return cls(uuid.uuid4().hex)

    def owns(self, trainer_state: Dict[str, Any]) -> bool:
        """Whether the checkpoint with this ``trainer_state.json`` content belongs to this run."""
        run_id = trainer_state.get("run_id")
        return run_id == self.run_id if run_id else self.owns_checkpoints_without_run_id


@dataclass
class TrainingState:
    """Everything a checkpoint saves and restores besides the configuration.

    ``roles`` is the :class:`~.roles.BackboneRoles` of the run, ``method`` its method (``state_dict`` /
    ``load_state_dict``), ``optimizers`` and ``lr_schedulers`` are keyed by role, ``ema`` maps the student's parameter
    names to float32 averages (``None`` without ``--ema_decay``), ``run`` is the run the checkpoints are written for,
    ``grad_scaler`` the fp16 ``torch.amp.GradScaler`` (``None`` without fp16) and ``overflow_skips`` the updates it
    skipped for a loss-scale overflow.
    """

    roles: Any
    method: Any
    optimizers: Dict[str, torch.optim.Optimizer]
    lr_schedulers: Dict[str, Any]
    random_source: RandomSource
    ema: Optional[Dict[str, torch.Tensor]] = None
    global_step: int = 0
    nonfinite_skips: int = 0
    grad_scaler: Any = None
    overflow_skips: int = 0
    run: RunIdentity = field(default_factory=RunIdentity.new)
    #: what training has cost up to the last checkpoint: ``wall_seconds``, ``sessions``, ``device``,
    #: ``num_processes``, ``peak_memory_bytes`` and ``peak_memory_kind`` (the model card's training cost)
    training_cost: Optional[Dict[str, Any]] = None
    #: with ``--keep_best``: the best evaluation so far, ``{"step", "metric", "value", "checkpoint"}``
    best: Optional[Dict[str, Any]] = None


# ----------------------------------------------------------------------------------------------------------------
# runs
# ----------------------------------------------------------------------------------------------------------------


def read_run(output_dir: str) -> Optional[RunIdentity]:
    """The run ``output_dir/run.json`` names, or ``None`` (a folder of a run from before run ids, or no run)."""
    data = _read_json_or_none(os.path.join(output_dir, RUN_NAME))
    if not isinstance(data, dict) or not data.get("run_id"):
        return None
    return RunIdentity(str(data["run_id"]), bool(data.get("owns_checkpoints_without_run_id", False)))


def write_run(output_dir: str, run: RunIdentity) -> None:
    storage.write_json(
        os.path.join(output_dir, RUN_NAME),
        {"run_id": run.run_id, "owns_checkpoints_without_run_id": run.owns_checkpoints_without_run_id},
    )


def continued_run(checkpoint: str, output_dir: str) -> RunIdentity:
    """The run that resumes ``checkpoint`` into ``output_dir``: the run that wrote it. A checkpoint without a run id
    (format 1) is continued by a run that owns every checkpoint without one: the run ``output_dir`` names already
    when that one does, else a new one."""
    run_id = (read_trainer_state(checkpoint) or {}).get("run_id")
    current = read_run(output_dir)
    if run_id:
        keeps_adopted = current is not None and current.run_id == run_id and current.owns_checkpoints_without_run_id
        return RunIdentity(run_id, keeps_adopted)
    if current is not None and current.owns_checkpoints_without_run_id:
        return current
    return RunIdentity(uuid.uuid4().hex, owns_checkpoints_without_run_id=True)


# ----------------------------------------------------------------------------------------------------------------
# finding checkpoints and checking a resumption
# ----------------------------------------------------------------------------------------------------------------


def read_trainer_state(checkpoint: str) -> Optional[Dict[str, Any]]:
    """The ``trainer_state.json`` of a checkpoint folder, or ``None`` when it is missing or does not parse."""
    data = _read_json_or_none(os.path.join(checkpoint, TRAINER_STATE_NAME))
    return data if isinstance(data, dict) and "global_step" in data else None


def checkpoint_folders(output_dir: str) -> List[Tuple[int, str]]:
    """Every ``checkpoint-N`` folder of ``output_dir``, complete or not, sorted by step."""
    if not os.path.isdir(output_dir):
        return []
    out = []
    for name in os.listdir(output_dir):
        match = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", name)
        path = os.path.join(output_dir, name)
        if match and os.path.isdir(path):
            out.append((int(match.group(1)), path))
    return sorted(out)


def list_checkpoints(output_dir: str, run: Optional[RunIdentity] = None) -> List[Tuple[int, str]]:
    """Complete checkpoints (``checkpoint-N`` with their commit file), sorted by step; with ``run``, only its own."""
    out = []
    for step, path in checkpoint_folders(output_dir):
        if not os.path.isfile(os.path.join(path, CHECKPOINT_COMMIT_FILE)):
            continue
        if run is not None:
            state = read_trainer_state(path)
            if state is None or not run.owns(state):
                continue
        out.append((step, path))
    return out


def checkpoint_problem(checkpoint: str, num_processes: int = 1) -> Optional[str]:
    """What keeps ``checkpoint`` from resuming a run of ``num_processes`` processes exactly, as a clause that names
    the bad file (``"<checkpoint>/trainable.safetensors is truncated"``), or ``None`` when it is complete.

    Reads only ``trainer_state.json``, the JSON files and the safetensors headers: no tensor data is loaded.
    """
    state_path = os.path.join(checkpoint, TRAINER_STATE_NAME)
    if not os.path.isfile(state_path):
        return f"{state_path} is missing"
    state = read_trainer_state(checkpoint)
    if state is None:
        return f"{state_path} is not valid JSON (truncated or corrupt)"
    expected_sizes: Dict[str, Optional[int]]
    try:
        saved_processes = int(state.get("num_processes", 1))
        listed = int(state.get("format", 1)) >= 2
        expected_sizes = {str(name): int(size) for name, size in state["files"].items()} if listed else {}
        num_shards = int(state.get("num_shards") or 0)
    except (KeyError, TypeError, ValueError, AttributeError):
        return f"{state_path} does not describe a checkpoint (corrupt)"
    if num_shards and num_shards != num_processes:
        return (
            f"{state_path} records weights sharded over {_processes(num_shards)} (FSDP), this run has {num_processes}"
        )
    if not listed:
        expected_sizes = dict.fromkeys(FORMAT_1_FILES)
        for rank in range(saved_processes):
            expected_sizes.update(dict.fromkeys((f"rng_{rank}.safetensors", f"rng_{rank}.json")))
        saved_config = _read_json_or_none(os.path.join(checkpoint, CONFIG_NAME))
        if isinstance(saved_config, dict) and (saved_config.get("optim") or {}).get("ema_decay"):
            expected_sizes["ema.safetensors"] = None
    for rank in range(num_processes):
        for name in (f"rng_{rank}.safetensors", f"rng_{rank}.json"):
            expected_sizes.setdefault(name, None)
    for name in sorted(expected_sizes):
        path = os.path.join(checkpoint, name)
        if not os.path.isfile(path):
            rng_rank = re.fullmatch(r"rng_(\d+)\.\w+", name)
            if rng_rank and int(rng_rank.group(1)) >= saved_processes:
                saved_by = _processes(saved_processes)
                return f"{path} is missing (the checkpoint was saved by {saved_by}, this run has {num_processes})"
            return f"{path} is missing"
    for name, expected_size in sorted(expected_sizes.items()):
        path = os.path.join(checkpoint, name)
        size = os.path.getsize(path)
        if expected_size is not None and size < expected_size:
            return f"{path} is truncated"
        if expected_size is not None and size != expected_size:
            return f"{path} is not the size it was saved with"
        if name.endswith(".safetensors") and storage.safetensors_problem(path) is not None:
            return f"{path} is not a whole safetensors file (truncated or corrupt)"
        if name.endswith(".json") and _read_json_or_none(path) is None:
            return f"{path} is not valid JSON (truncated or corrupt)"
    return None


@dataclass(frozen=True)
class ResumePoint:
    """Where a run starts: ``path`` is the checkpoint folder to resume (``None``: the run starts fresh), ``note`` the
    line to print about that choice (a fresh start under ``latest``, or a damaged newest checkpoint passed over)."""

    path: Optional[str]
    note: Optional[str] = None


def find_resume_point(resume: Optional[str], output_dir: str, num_processes: int = 1) -> ResumePoint:
    """The checkpoint a run of ``num_processes`` processes resumes, checked with :func:`checkpoint_problem`.

    ``latest`` is the newest complete checkpoint of the run ``output_dir/run.json`` names (of any run when there is
    no ``run.json``), passing over damaged newer ones with a note; ``None`` while it has none (the run starts fresh,
    as in the diffusers training examples). Any other value is a checkpoint folder, as a path or as its name inside
    ``output_dir`` (``checkpoint-500``). Raises a :class:`ConfigError` for a named checkpoint that does not exist or is
    damaged (offering the previous complete one), and under ``latest`` when every checkpoint of the run is damaged.
    """
    if not resume:
        return ResumePoint(None)
    if resume == "latest":
        return _latest_resume_point(output_dir, num_processes)
    if not os.path.exists(resume) and os.path.isdir(os.path.join(output_dir, resume)):
        resume = os.path.join(output_dir, resume)
    if not os.path.exists(resume):
        raise ConfigError(
            f"--resume_from_checkpoint {resume} does not exist; pass 'latest' or a {CHECKPOINT_PREFIX}N folder "
            "written by this script."
        )
    looks_like_a_checkpoint = re.fullmatch(rf"{CHECKPOINT_PREFIX}\d+", os.path.basename(os.path.normpath(resume)))
    if not looks_like_a_checkpoint and not os.path.isfile(os.path.join(resume, CHECKPOINT_COMMIT_FILE)):
        raise ConfigError(
            f"--resume_from_checkpoint {resume} is not a complete checkpoint folder (it has no "
            f"{CHECKPOINT_COMMIT_FILE}); pass 'latest' or a {CHECKPOINT_PREFIX}N folder written by this script."
        )
    problem = checkpoint_problem(resume, num_processes)
    if problem is None:
        return ResumePoint(resume)
    previous = _previous_complete_checkpoint(resume, num_processes)
    if previous is not None:
        raise ConfigError(
            f"--resume_from_checkpoint {resume} cannot be resumed: {problem}; resume from {previous}, the previous "
            "complete checkpoint, instead."
        )
    raise ConfigError(
        f"--resume_from_checkpoint {resume} cannot be resumed: {problem}, and no earlier complete checkpoint lies "
        "beside it; start the run over without --resume_from_checkpoint."
    )


def resolve_resume_path(resume: Optional[str], output_dir: str, num_processes: int = 1) -> Optional[str]:
    """The checkpoint folder to resume from, or ``None`` for a fresh run (:func:`find_resume_point`'s path)."""
    return find_resume_point(resume, output_dir, num_processes).path


def _latest_resume_point(output_dir: str, num_processes: int) -> ResumePoint:
    run = read_run(output_dir)
    candidates = [path for _, path in checkpoint_folders(output_dir) if _may_belong_to(path, run)]
    first_problem = None
    for path in reversed(candidates):
        problem = checkpoint_problem(path, num_processes)
        if problem is None:
            note = f"--resume_from_checkpoint latest: {first_problem}, so the run resumes from {path}."
            return ResumePoint(path, note if first_problem else None)
        first_problem = first_problem or problem
    if first_problem is not None:
        raise ConfigError(
            f"--resume_from_checkpoint latest: {first_problem}, and {output_dir} holds no earlier complete checkpoint "
            "of its run; start the run over without --resume_from_checkpoint, with --overwrite_output_dir."
        )
    if checkpoint_folders(output_dir):
        return ResumePoint(
            None,
            f"--resume_from_checkpoint latest: {output_dir} has no checkpoint of its current run yet (its checkpoints "
            "belong to a run it replaced), so the run starts fresh.",
        )
    return ResumePoint(
        None, f"--resume_from_checkpoint latest: {output_dir} has no checkpoint yet, so the run starts fresh."
    )


def _previous_complete_checkpoint(checkpoint: str, num_processes: int) -> Optional[str]:
    """The newest complete checkpoint beside a damaged ``checkpoint-N``, with a lower step, of the same run."""
    match = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", os.path.basename(os.path.normpath(checkpoint)))
    if not match:
        return None
    folder = os.path.dirname(os.path.normpath(checkpoint))
    damaged_state = read_trainer_state(checkpoint)
    folder_run = read_run(folder)
    for step, path in reversed(list_checkpoints(folder)):
        state = read_trainer_state(path)
        if step >= int(match.group(1)) or state is None:
            continue
        if damaged_state is not None:  # the same run id, or both written before run ids
            same_run = state.get("run_id") == damaged_state.get("run_id")
        else:  # whose the damaged one was is unreadable: the folder's current run (any, before run ids)
            same_run = folder_run is None or folder_run.owns(state)
        if same_run and checkpoint_problem(path, num_processes) is None:
            return path
    return None


def config_conflicts(saved: Dict[str, Any], config: TrainConfig) -> List[str]:
    """The differences ``key: saved -> new`` between a saved configuration and ``config`` that change what is
    trained (everything but :data:`RESUMABLE_CHANGES`)."""
    return [
        d for d in config_differences(saved, config.to_dict()) if not d.split(":")[0].startswith(RESUMABLE_CHANGES)
    ]


def check_resume_config(checkpoint: str, config: TrainConfig) -> None:
    """Refuse to resume with settings that change what is trained; the message lists the differences."""
    saved_path = os.path.join(checkpoint, CONFIG_NAME)
    if not os.path.isfile(saved_path):
        return
    differences = config_conflicts(TrainConfig.load(saved_path).to_dict(), config)
    if differences:
        raise ConfigError(
            f"The run conflicts with the configuration of {checkpoint} ({'; '.join(differences)}); resume with "
            "the same settings, or start a new --output_dir."
        )


def check_fresh_start(output_dir: str, config: TrainConfig) -> None:
    """Refuse to start a run afresh in a non-empty ``output_dir`` without ``--overwrite_output_dir``, unless the
    folder holds only the run files of the same run stopped before its first checkpoint (a restart loses nothing).

    Run files are ``training_config.json``, ``run.json``, the logging folder, ``validation/``, ``evaluation/`` and
    ``best_checkpoint.json``, what interrupted writes leave behind, and checkpoints of a run that the current one replaced.
    """
    if not os.path.isdir(output_dir) or not os.listdir(output_dir) or config.output.overwrite_output_dir:
        return
    run = read_run(output_dir)
    if any(_may_belong_to(path, run) for _, path in checkpoint_folders(output_dir)):
        raise ConfigError(
            f"--output_dir {output_dir} is not empty; pass --overwrite_output_dir to write into it, or "
            "--resume_from_checkpoint latest to continue its run."
        )
    run_files = {
        CONFIG_NAME,
        RUN_NAME,
        "validation",
        "evaluation",  # --eval_steps
        "best_checkpoint.json",  # --keep_best
        config.output.logging_dir.replace(os.sep, "/").split("/")[0],
    }
    reference_dir = config.data.teacher_reference_dir
    if reference_dir:  # --real_images teacher: a reference set built (or half built) inside the output folder
        inside = os.path.relpath(os.path.abspath(reference_dir), os.path.abspath(output_dir))
        if inside != "." and not inside.startswith(".."):
            run_files.add(inside.split(os.sep)[0])
    foreign = sorted(
        name
        for name in os.listdir(output_dir)
        if name not in run_files
        and not re.fullmatch(rf"{CHECKPOINT_PREFIX}\d+", name)
        and not storage.LEFTOVER_NAME.fullmatch(name)
        and not CHECKPOINT_STAGING_NAME.fullmatch(name)
    )
    saved_config = None
    if os.path.exists(os.path.join(output_dir, CONFIG_NAME)):
        try:
            saved_config = TrainConfig.load(os.path.join(output_dir, CONFIG_NAME)).to_dict()
        except (OSError, ValueError, TypeError):  # not a configuration this script wrote
            foreign.insert(0, CONFIG_NAME)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise ConfigError(
            f"--output_dir {output_dir} holds files that are not this run's ({shown}); pass "
            "--overwrite_output_dir to write into it."
        )
    differences = config_conflicts(saved_config, config) if saved_config is not None else []
    if differences:
        raise ConfigError(
            f"--output_dir {output_dir} holds a run with other settings and no checkpoint yet "
            f"({'; '.join(differences)}); pass --overwrite_output_dir to start over in it, or run with its settings."
        )


def _may_belong_to(checkpoint: str, run: Optional[RunIdentity]) -> bool:
    """Whether ``checkpoint`` may be ``run``'s: it is, it was written before run ids in a folder without
    ``run.json``, or whose it is cannot be read (a damaged folder, which the checks then name)."""
    state = read_trainer_state(checkpoint)
    return run is None or state is None or run.owns(state)


def prune_checkpoints(
    output_dir: str, limit: Optional[int], run: Optional[RunIdentity], keep: Optional[str] = None
) -> None:
    """Keep the newest ``limit`` complete checkpoints of ``run`` (of every run when ``None``); the newest one is never
    removed, whatever the limit, checkpoints of other runs are never touched, and ``keep`` (the best checkpoint of
    ``--keep_best``) is kept beside them."""
    if not limit:
        return
    kept = os.path.normpath(keep) if keep else None
    checkpoints = list_checkpoints(output_dir, run)
    for _, path in checkpoints[:-1][: max(0, len(checkpoints) - limit)]:
        if os.path.normpath(path) == kept:
            continue
        storage.remove_directory(path)


# ----------------------------------------------------------------------------------------------------------------
# save and load
# ----------------------------------------------------------------------------------------------------------------


def save_checkpoint(
    accelerator, state: TrainingState, config: TrainConfig, on_event: Optional[Callable[..., Any]] = None
) -> str:
    """Write ``checkpoint-<state.global_step>`` crash-safely (every process takes part); returns its path. Once it
    is in place, what earlier crashes left in ``output_dir`` is removed and the run's checkpoints are pruned.

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
    if hasattr(state.roles, "reshard"):
        state.roles.reshard()  # FSDP: the parameters must be the shards, not a gathered root
    # Every process writes its own RNG state; the main process writes the shared state.
    _save_rng_state(staging, accelerator.process_index, state.random_source)
    sharded = bool(getattr(state.roles, "sharded", False))
    if sharded:
        # FSDP: every process writes its own shard of the weights, the EMA and the optimizer moments.
        _save_shards(staging, accelerator.process_index, state)
    if accelerator.is_main_process:
        if not sharded:
            storage.save_tensors(os.path.join(staging, "trainable.safetensors"), state.roles.trainable_state_dict())
            if state.ema is not None:
                storage.save_tensors(os.path.join(staging, "ema.safetensors"), state.ema)
        method_state = _flatten(state.method.state_dict())
        if method_state:
            storage.save_tensors(os.path.join(staging, "method.safetensors"), method_state)
        for role, optimizer in state.optimizers.items():
            tensors, plain = _optimizer_to_tensors(optimizer.state_dict())
            if not sharded:
                storage.save_tensors(os.path.join(staging, f"optimizer_{role}.safetensors"), tensors)
            storage.write_json(os.path.join(staging, f"optimizer_{role}.json"), plain)
            storage.write_json(
                os.path.join(staging, f"scheduler_{role}.json"), _scheduler_state(state.lr_schedulers[role])
            )
        if state.grad_scaler is not None:
            # GradScaler.state_dict holds plain numbers (scale, factors, interval, growth tracker): JSON, no pickle
            storage.write_json(os.path.join(staging, GRAD_SCALER_NAME), state.grad_scaler.state_dict())
        config.save(os.path.join(staging, CONFIG_NAME))
    # The commit file lists every file with its size, so every process's RNG state must be in the folder first.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        on_event("before_checkpoint_commit", path=staging, step=step)
        storage.write_json(
            os.path.join(staging, TRAINER_STATE_NAME),
            {
                "global_step": step,
                "nonfinite_skips": state.nonfinite_skips,
                "overflow_skips": state.overflow_skips,
                "num_processes": accelerator.num_processes,
                **({"num_shards": accelerator.num_processes} if sharded else {}),
                "format": CHECKPOINT_FORMAT,
                "run_id": state.run.run_id,
                **({"training_cost": state.training_cost} if state.training_cost else {}),
                **({"best": state.best} if state.best else {}),
                "files": {name: os.path.getsize(os.path.join(staging, name)) for name in sorted(os.listdir(staging))},
            },
        )
        storage.replace_directory(staging, target)
        storage.remove_leftovers(output_dir, also=CHECKPOINT_STAGING_NAME)
        best = os.path.join(output_dir, state.best["checkpoint"]) if state.best else None
        prune_checkpoints(output_dir, config.output.checkpoints_total_limit, state.run, keep=best)
        on_event("checkpoint_written", path=target, step=step)
    accelerator.wait_for_everyone()
    return target


def load_checkpoint(path: str, state: TrainingState, process_index: int, device=None) -> None:
    """Restore ``state`` in place from a checkpoint folder (this process's RNG state included; the run identity is
    the caller's, see :func:`continued_run`)."""
    trainer_state = _read_json(os.path.join(path, TRAINER_STATE_NAME))
    num_shards = trainer_state.get("num_shards")
    sharded = bool(getattr(state.roles, "sharded", False))
    if bool(num_shards) != sharded:
        written = f"under FSDP by {_processes(int(num_shards))}" if num_shards else "without FSDP"
        raise ConfigError(
            f"{path} was written {written}; resume it the same way (a sharded checkpoint holds each process's shard)."
        )
    if sharded:
        state.roles.reshard()
        _load_shards(path, process_index, state)
    else:
        state.roles.load_trainable_state_dict(storage.load_tensors(os.path.join(path, "trainable.safetensors")))
    ema_path = os.path.join(path, "ema.safetensors")
    if state.ema is not None and os.path.isfile(ema_path):
        # each average goes back where the run keeps it (the CPU with --offload_ema)
        devices = {k: v.device for k, v in state.ema.items()}
        state.ema = {k: v.to(devices.get(k, device)) for k, v in storage.load_tensors(ema_path).items()}
    method_path = os.path.join(path, "method.safetensors")
    if os.path.isfile(method_path):
        state.method.load_state_dict(_unflatten(storage.load_tensors(method_path)))
    for role, optimizer in state.optimizers.items():
        plain = _read_json(os.path.join(path, f"optimizer_{role}.json"))
        name = f"optimizer_{role}.shard-{process_index}" if sharded else f"optimizer_{role}"
        tensors = storage.load_tensors(os.path.join(path, f"{name}.safetensors"))
        loaded = _optimizer_from_tensors(tensors, plain)
        if sharded:
            loaded = _shard_optimizer_state(optimizer, loaded)
        optimizer.load_state_dict(loaded)
        scheduler = state.lr_schedulers[role]
        saved = _read_json(os.path.join(path, f"scheduler_{role}.json"))
        scheduler.load_state_dict({**scheduler.state_dict(), **saved})
    scaler_path = os.path.join(path, GRAD_SCALER_NAME)
    if state.grad_scaler is not None and os.path.isfile(scaler_path):
        # (a checkpoint without it predates this file: the scaler starts again from its initial scale)
        state.grad_scaler.load_state_dict(_read_json(scaler_path))
    _load_rng_state(path, process_index, state.random_source)
    state.global_step = int(trainer_state["global_step"])
    state.nonfinite_skips = int(trainer_state.get("nonfinite_skips", 0))
    state.overflow_skips = int(trainer_state.get("overflow_skips", 0))
    state.training_cost = trainer_state.get("training_cost")
    state.best = trainer_state.get("best")


# ----------------------------------------------------------------------------------------------------------------
# (de)serialisation of optimizer, scheduler and RNG states
# ----------------------------------------------------------------------------------------------------------------


def _read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _processes(count: int) -> str:
    return f"{count} process" if count == 1 else f"{count} processes"


def _read_json_or_none(path: str) -> Any:
    """The parsed file, or ``None`` when it is missing or is no valid JSON."""
    try:
        return _read_json(path)
    except (OSError, ValueError):
        return None


def _optimizer_to_tensors(state: Dict[str, Any]) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Split an optimizer state_dict into tensors (safetensors, named ``<param index>.<key>``) and plain values
    (JSON). A nested dict of a parameter's state (bitsandbytes' 8-bit AdamW keeps its quantization state in one) is
    split the same way, its keys joined with ``/``."""
    tensors: Dict[str, torch.Tensor] = {}

    def split(entry: Dict[str, Any], prefix: str) -> Dict[str, Any]:
        plain = {}
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{prefix}{key}"] = value
            elif isinstance(value, dict):
                plain[key] = split(value, f"{prefix}{key}/")
            else:
                plain[key] = value
        return plain

    plain_state = {str(index): split(entry, f"{index}.") for index, entry in state["state"].items()}
    return tensors, {"state": plain_state, "param_groups": state["param_groups"]}


def _optimizer_from_tensors(tensors: Dict[str, torch.Tensor], plain: Dict[str, Any]) -> Dict[str, Any]:
    state: Dict[int, Dict[str, Any]] = {int(i): copy.deepcopy(v) for i, v in plain["state"].items()}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        *parents, leaf = key.split("/")
        entry = state.setdefault(int(index), {})
        for parent in parents:
            entry = entry.setdefault(parent, {})
        entry[leaf] = value
    return {"state": state, "param_groups": plain["param_groups"]}


def _save_shards(folder: str, rank: int, state: TrainingState) -> None:
    """This process's shards (FSDP): ``trainable.shard-<rank>``, ``ema.shard-<rank>`` and the optimizer moments
    ``optimizer_<role>.shard-<rank>`` (safetensors); the optimizers' plain values are the main process's JSON."""
    from . import sharding

    trainable = {name: sharding.local(t) for name, t in state.roles.trainable_state_dict().items()}
    storage.save_tensors(os.path.join(folder, f"trainable.shard-{rank}.safetensors"), trainable)
    if state.ema is not None:  # a sharded run's EMA holds this process's shards already
        storage.save_tensors(os.path.join(folder, f"ema.shard-{rank}.safetensors"), state.ema)
    for role, optimizer in state.optimizers.items():
        tensors, _ = _optimizer_to_tensors(optimizer.state_dict())
        tensors = {name: sharding.local(t) for name, t in tensors.items()}
        storage.save_tensors(os.path.join(folder, f"optimizer_{role}.shard-{rank}.safetensors"), tensors)


def _load_shards(folder: str, rank: int, state: TrainingState) -> None:
    state.roles.load_trainable_state_dict(
        storage.load_tensors(os.path.join(folder, f"trainable.shard-{rank}.safetensors"))
    )
    ema_path = os.path.join(folder, f"ema.shard-{rank}.safetensors")
    if state.ema is not None and os.path.isfile(ema_path):
        devices = {k: v.device for k, v in state.ema.items()}
        state.ema = {k: v.to(devices[k]) for k, v in storage.load_tensors(ema_path).items()}


def _shard_optimizer_state(optimizer, loaded: Dict[str, Any]) -> Dict[str, Any]:
    """Lay a sharded checkpoint's optimizer moments out as the optimizer's (``DTensor``) parameters: a moment of a
    sharded parameter becomes a shard of the same layout; scalars (``step``) stay plain."""
    from . import sharding

    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    for index, entry in loaded["state"].items():
        parameter = parameters[int(index)]
        for key, value in list(entry.items()):
            if torch.is_tensor(value) and value.dim() > 0 and sharding.is_sharded(parameter):
                entry[key] = sharding.like(parameter, value)
    return loaded


def consolidated_tensors(checkpoint: str, prefix: str) -> Dict[str, torch.Tensor]:
    """The whole tensors of ``<prefix>.safetensors`` (``trainable``, ``ema``, ``optimizer_student``, ...) of a
    checkpoint, joined from its per-process shards when it was written under FSDP (FSDP2 shards dim 0 in process
    order, as ``torch.chunk``); no process group needed."""
    trainer_state = read_trainer_state(checkpoint) or {}
    num_shards = trainer_state.get("num_shards")
    if not num_shards:
        return storage.load_tensors(os.path.join(checkpoint, f"{prefix}.safetensors"))
    shards = [
        storage.load_tensors(os.path.join(checkpoint, f"{prefix}.shard-{r}.safetensors")) for r in range(num_shards)
    ]
    out = {}
    for name, first in shards[0].items():
        pieces = [shard[name] for shard in shards]
        out[name] = torch.cat(pieces, dim=0) if first.dim() else first
    return out


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
    if not os.path.isfile(tensors_path):  # the preflight refuses this; a run without it would not resume exactly
        raise ConfigError(f"{folder} cannot be resumed exactly: {tensors_path} is missing.")
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
