"""``python -m diffusers_onestep.distill`` / ``accelerate launch -m diffusers_onestep.distill``: the training script.

The same command line as ``training/train_onestep.py`` and ``diffusers-onestep distill``, runnable from an
installed package (no checkout needed); ``--help`` lists every flag.
"""

import os
import sys

from .cli import STATUS_FILE_ENV, main, report_status


def run() -> int:
    """The training command's exit status, also reported to ``diffusers-onestep distill --num_processes`` when that
    command launched this process (accelerate launch itself only says 1); errors then name that command."""
    launched = STATUS_FILE_ENV in os.environ
    try:
        status = main(prog="diffusers-onestep distill" if launched else "python -m diffusers_onestep.distill")
    except SystemExit as exit_:  # argparse and refused input exit through SystemExit
        status = exit_.code if isinstance(exit_.code, int) else 1
    report_status(status)
    return status


if __name__ == "__main__":
    sys.exit(run())
