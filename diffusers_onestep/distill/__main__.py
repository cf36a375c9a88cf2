"""``python -m diffusers_onestep.distill`` / ``accelerate launch -m diffusers_onestep.distill``: the training script.

The same command line as ``training/train_onestep.py`` and ``diffusers-onestep distill``, runnable from an
installed package (no checkout needed); ``--help`` lists every flag.
"""

import sys

from .cli import main


if __name__ == "__main__":
    sys.exit(main(prog="python -m diffusers_onestep.distill"))
