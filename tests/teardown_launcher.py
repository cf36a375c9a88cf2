#!/usr/bin/env python
"""The training command, recording how many DDP wrappers are still alive when the process group is destroyed.

    accelerate launch --num_processes 2 ... tests/teardown_launcher.py TRAINING FLAGS...

Each process writes ``<output_dir>/.teardown-<rank>.json`` (``{"live_ddp_wrappers": n}``) as accelerate's
``end_training`` calls ``torch.distributed.destroy_process_group``. A wrapper still alive then is freed later, holding
the GIL, with the last reference to the gloo process group, and that can hang the process at exit
(pytorch/pytorch#56297; see ``Trainer._end_training``); the trainer's contract is that there is none.
"""

from __future__ import annotations

import gc
import json
import os
import sys

import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from diffusers_onestep.distill.cli import main


def record_live_wrappers(output_dir: str) -> None:
    """Wrap ``torch.distributed.destroy_process_group`` so that it first writes this process's live-wrapper count."""
    destroy = dist.destroy_process_group

    def destroy_process_group(*args, **kwargs):
        live = sum(isinstance(obj, DistributedDataParallel) for obj in gc.get_objects())
        with open(os.path.join(output_dir, f".teardown-{dist.get_rank()}.json"), "w") as f:
            json.dump({"live_ddp_wrappers": live}, f)
        return destroy(*args, **kwargs)

    dist.destroy_process_group = destroy_process_group


if __name__ == "__main__":
    argv = sys.argv[1:]
    record_live_wrappers(argv[argv.index("--output_dir") + 1])
    sys.exit(main(argv))
