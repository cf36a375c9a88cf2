#!/usr/bin/env python
"""Distill a diffusers text-to-image teacher (SDXL, PixArt-α/Σ, SANA, SANA-Sprint, SD 1.x/2.x) into a one-step
student.

    accelerate launch training/train_onestep.py --teacher stabilityai/stable-diffusion-xl-base-1.0 \\
        --prompts prompts.txt --output_dir dmd2-sdxl-lora

A thin shim for people who launch a file: the installed package runs the same command as
``accelerate launch -m diffusers_onestep.distill ...`` or ``diffusers-onestep distill ...``. This script only parses
arguments into the typed config and hands it to the trainer; see docs/training.md.
"""

from __future__ import annotations

import sys

from diffusers_onestep.distill.cli import main


if __name__ == "__main__":
    sys.exit(main())
