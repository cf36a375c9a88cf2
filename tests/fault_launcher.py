#!/usr/bin/env python
"""The training command with faults injected through the trainer's hooks, for the crash-safety tests.

    python tests/fault_launcher.py --fault loss@3 [--fault after_step@2:pause ...] TRAINING FLAGS...
    accelerate launch --num_processes 2 ... tests/fault_launcher.py --fault after_step@3:pause:1 TRAINING FLAGS...

A fault is ``event@step[:action[:rank]]``. ``pause`` (the default) writes ``<output_dir>/.fault-<event>-<step>``
(holding the process id) and waits until the process is killed or interrupted (SIGINT/SIGTERM; the trainer then
stops after the step); ``nan`` makes the loss of a ``loss`` event NaN. With a ``rank``, only that process (its
``accelerator.process_index``) acts on the fault. Steps are those the hooks report: the 0-based iteration for ``loss``
and ``optimizer_step``, completed steps for ``after_step`` and the checkpoint events. Everything else goes to the
training command's ``main`` unchanged. Each process writes its id to ``<output_dir>/.pid-<rank>`` at its first hook
(so that a test can end exactly these processes) and ``<output_dir>/.exit-<rank>.json`` as it ends:
``{"status": <main's return value>, "global_step": <the trainer's step>}``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from typing import List, Optional, Sequence, Tuple

from diffusers_onestep.distill.cli import main


ACTIONS = ("pause", "nan")


def marker_path(output_dir: str, event: str, step: int) -> str:
    """The file a paused fault writes once it is reached."""
    return os.path.join(output_dir, f".fault-{event}-{step}")


def pid_path(output_dir: str, rank: int) -> str:
    """The file holding the id of the training process of ``rank``."""
    return os.path.join(output_dir, f".pid-{rank}")


def exit_path(output_dir: str, rank: int) -> str:
    """The file a process writes as it ends (its status and step)."""
    return os.path.join(output_dir, f".exit-{rank}.json")


def parse_faults(argv: Sequence[str]) -> Tuple[List[Tuple[str, int, str, Optional[int]]], List[str]]:
    """``(event, step, action, rank)`` of every ``--fault`` and the remaining training arguments."""
    faults, rest = [], []
    arguments = iter(argv)
    for argument in arguments:
        if argument != "--fault":
            rest.append(argument)
            continue
        where, _, action_and_rank = next(arguments).partition(":")
        action, _, rank = action_and_rank.partition(":")
        event, _, step = where.partition("@")
        action = action or "pause"
        if action not in ACTIONS:
            raise SystemExit(f"unknown fault action {action!r}; expected one of {', '.join(ACTIONS)}")
        faults.append((event, int(step), action, int(rank) if rank else None))
    return faults, rest


def fault_hook(faults: Sequence[Tuple[str, int, str, Optional[int]]], seen: Optional[dict] = None):
    """The hook that acts on ``faults``; it keeps the trainer in ``seen["trainer"]``."""

    def hook(event, trainer, **info):
        if seen is not None and "trainer" not in seen:
            seen["trainer"] = trainer
            with open(pid_path(trainer.config.output.output_dir, trainer.accelerator.process_index), "w") as f:
                f.write(str(os.getpid()))
        for name, step, action, rank in faults:
            if name != event or info.get("step") != step:
                continue
            if rank is not None and trainer.accelerator.process_index != rank:
                continue
            if action == "nan" and "loss" in info:
                return info["loss"] * float("nan")
            with open(marker_path(trainer.config.output.output_dir, event, step), "w") as f:
                f.write(str(os.getpid()))
            while trainer.interrupt_signal is None:
                time.sleep(0.05)
        return None

    return hook


if __name__ == "__main__":
    faults, training_argv = parse_faults(sys.argv[1:])
    # Once one process has exited, torchrun sends SIGTERM to the others; outside the training loop (which handles
    # it itself) it is ignored here, so that a process that stopped with the others still writes its exit file.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    seen: dict = {}
    status = main(training_argv, hooks=[fault_hook(faults, seen)])
    trainer = seen.get("trainer")
    if trainer is not None:
        rank = trainer.accelerator.process_index
        with open(exit_path(trainer.config.output.output_dir, rank), "w") as f:
            json.dump({"status": status, "global_step": trainer.global_step}, f)
    sys.exit(status)
