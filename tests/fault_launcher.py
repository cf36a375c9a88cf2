#!/usr/bin/env python
"""The training command with faults injected through the trainer's hooks, for the crash-safety tests.

    python tests/fault_launcher.py --fault loss@3 [--fault after_step@2:pause ...] TRAINING FLAGS...

A fault is ``event@step[:action]``. ``pause`` (the default) writes ``<output_dir>/.fault-<event>-<step>`` and waits
until the process is killed or interrupted (SIGINT/SIGTERM; the trainer then stops after the step); ``nan`` makes
the loss of a ``loss`` event NaN. Steps are those the hooks report: the 0-based iteration for ``loss`` and
``optimizer_step``, completed steps for ``after_step`` and the checkpoint events. Everything else goes to the
training command's ``main`` unchanged.
"""

from __future__ import annotations

import os
import sys
import time
from typing import List, Sequence, Tuple

from diffusers_onestep.distill.cli import main


ACTIONS = ("pause", "nan")


def marker_path(output_dir: str, event: str, step: int) -> str:
    """The file a paused fault writes once it is reached."""
    return os.path.join(output_dir, f".fault-{event}-{step}")


def parse_faults(argv: Sequence[str]) -> Tuple[List[Tuple[str, int, str]], List[str]]:
    """``(event, step, action)`` of every ``--fault`` and the remaining training arguments."""
    faults, rest = [], []
    arguments = iter(argv)
    for argument in arguments:
        if argument != "--fault":
            rest.append(argument)
            continue
        where, _, action = next(arguments).partition(":")
        event, _, step = where.partition("@")
        action = action or "pause"
        if action not in ACTIONS:
            raise SystemExit(f"unknown fault action {action!r}; expected one of {', '.join(ACTIONS)}")
        faults.append((event, int(step), action))
    return faults, rest


def fault_hook(faults: Sequence[Tuple[str, int, str]]):
    def hook(event, trainer, **info):
        for name, step, action in faults:
            if name != event or info.get("step") != step:
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
    sys.exit(main(training_argv, hooks=[fault_hook(faults)]))
