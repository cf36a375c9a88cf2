"""NASA negative prompts measured on digits: does ``negative_prompt="digit k"`` remove k, and what does it cost?

SNOOPI's NASA (``diffusers_onestep/pipelines/nasa.py``) subtracts λ·Attn(Q, K−, V−) in every cross-attention layer
of a one-step student. Issue 14 asks for two things on the digits benchmark: with negative prompt "digit k" the share
of images the bundled classifier reads as k drops, and the FD to the positive class stays within 10 %. A student
prompted for digit j rarely draws a k (about 1 %), so a drop there is hard to see; this script measures three
settings, each at every λ of ``--scales`` with the same prompts and seeds (λ = 0 is the student without NASA):

* ``other``: prompts for every digit j ≠ k (``--per_digit`` each, the standard phrasings), negative "digit k". The
  share read as k is the leak into k; FD is to the real held-out digits of the nine positive classes, and prompt
  accuracy is the share read as the prompted j (the cost of the steering).
* ``generic``: the prompt "a handwritten digit" (no digit named), negative "digit k": the student draws a mix of
  digits, so the share of k is large enough to watch it drop; FD is to the real held-out digits other than k (the
  distribution a user asking for "a digit, not k" wants).
* ``self``: prompt and negative prompt both name k: the strongest steering, the share of k is the prompt's accuracy.

Every number is the mean over the ten k. ``fd_ratio`` is the FD at λ over the FD at λ = 0 (the issue's 10 % bound
is ``fd_ratio`` ≤ 1.10). FD here uses fewer images than the main digits table (9 × ``--per_digit`` per k), so
compare it only across λ within this table.

    python benchmarks/nasa_digits.py --student benchmarks/results/digits/js-lora
    python benchmarks/nasa_digits.py --student benchmarks/results/digits/js-lora --scales 0,0.25,0.5,1 --per_digit 30

The last printed line is one JSON object: ``{"student", "per_digit", "rows": [...]}``, one row per (setting, λ).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict, List, Sequence

import numpy as np


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

#: the positive prompt of the ``generic`` setting: names no digit (``digits.parse_digit`` gives None)
GENERIC_PROMPT = "a handwritten digit"
SETTINGS = ("other", "generic", "self")


def negative_prompt_for(digit: int) -> str:
    """The negative prompt that names ``digit`` ("digit 7", one of the teacher's own phrasings)."""
    return f"digit {digit}"


def requests(setting: str, negative_digit: int, per_digit: int):
    """``(prompts, requested digits or None, reference classes)`` of one setting for the negative digit k."""
    from diffusers_onestep.demo import digits

    if setting == "other":
        prompts, requested = digits.evaluation_prompts(per_digit)
        keep = [i for i, d in enumerate(requested) if d != negative_digit]
        classes = [d for d in range(10) if d != negative_digit]
        return [prompts[i] for i in keep], [requested[i] for i in keep], classes
    if setting == "generic":
        return [GENERIC_PROMPT] * (9 * per_digit), None, [d for d in range(10) if d != negative_digit]
    if setting == "self":
        phrasings = digits.prompts_for_digit(negative_digit)
        return (
            [phrasings[i % len(phrasings)] for i in range(per_digit)],
            [negative_digit] * per_digit,
            [negative_digit],
        )
    raise ValueError(f"setting must be one of {', '.join(SETTINGS)}, got {setting!r}.")


def generate(pipe, prompts: List[str], negative_prompt: str, scale: float, seed: int, batch_size: int = 500):
    """Images in [-1, 1]; λ = 0 runs the student without a negative prompt (what NASA at λ = 0 must equal)."""
    import torch

    images = []
    for i in range(0, len(prompts), batch_size):
        kwargs = {"negative_prompt": negative_prompt, "negative_scale": scale} if scale > 0 else {}
        out = pipe(
            prompts[i : i + batch_size], generator=torch.Generator().manual_seed(seed + i), output_type="pt", **kwargs
        )
        images.append(out.images.float() * 2 - 1)
    return torch.cat(images)


def measure(
    pipe,
    scales: Sequence[float],
    per_digit: int,
    seed: int = 0,
    negative_digits: Sequence[int] = tuple(range(10)),
    settings: Sequence[str] = SETTINGS,
    verbose: bool = False,
) -> List[Dict[str, float]]:
    """One row per (setting, λ): the share read as k, prompt accuracy, FD to the setting's reference classes and its
    ratio to λ = 0, each averaged over ``negative_digits``."""
    from diffusers_onestep.demo import digits

    real_features, real_labels = digits._reference(digits.TEACHER_RESOLUTION)
    rows = []
    for setting in settings:
        per_scale = {scale: {"share_k": [], "accuracy": [], "fd": []} for scale in scales}
        for k in negative_digits:
            prompts, requested, classes = requests(setting, k, per_digit)
            reference = real_features[np.isin(real_labels, classes)]
            for scale in scales:
                images = generate(pipe, prompts, negative_prompt_for(k), scale, seed)
                features, predicted = digits.classify(images, value_range="-1,1")
                cell = per_scale[scale]
                cell["share_k"].append(float((predicted == k).mean()))
                if verbose:
                    print(f"  {setting} k={k} λ={scale:g}: share read as k {cell['share_k'][-1]:.3f}", flush=True)
                if requested is not None and setting != "self":
                    cell["accuracy"].append(float((predicted == np.asarray(requested)).mean()))
                if setting != "self":
                    cell["fd"].append(digits.fd(features, reference))
        baseline = per_scale[scales[0]]["fd"] if scales[0] == 0 else None
        for scale in scales:
            cell = per_scale[scale]
            row = {"setting": setting, "scale": float(scale), "share_k": float(np.mean(cell["share_k"]))}
            row["accuracy"] = float(np.mean(cell["accuracy"])) if cell["accuracy"] else None
            row["fd"] = float(np.mean(cell["fd"])) if cell["fd"] else None
            # the ratio per k, then averaged: each k's FD is compared with its own λ = 0 images
            row["fd_ratio"] = (
                float(np.mean([f / b for f, b in zip(cell["fd"], baseline)])) if baseline and cell["fd"] else None
            )
            row["fd_ratio_max"] = (
                float(np.max([f / b for f, b in zip(cell["fd"], baseline)])) if baseline and cell["fd"] else None
            )
            rows.append(row)
    return rows


def format_table(rows: List[Dict[str, float]]) -> str:
    """The rows as a markdown table (``—`` where a setting has no such number)."""

    def number(value, digits_after=3):
        return "—" if value is None else f"{value:.{digits_after}f}"

    lines = [
        "| setting | λ | share read as k | prompt accuracy | FD | FD / FD(λ=0), mean | worst k |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['setting']} | {r['scale']:g} | {number(r['share_k'])} | {number(r['accuracy'])} | "
            f"{number(r['fd'], 2)} | {number(r['fd_ratio'])} | {number(r['fd_ratio_max'])} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", required=True, help="a one-step digits student folder (benchmarks/digits.py)")
    parser.add_argument("--scales", default="0,0.25,0.5,1", help="NASA λ values; the first should be 0 (the baseline)")
    parser.add_argument("--per_digit", type=int, default=30, help="images per positive digit and negative digit")
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from diffusers_onestep import OneStepPipeline

    scales = [float(s) for s in args.scales.split(",")]
    pipe = OneStepPipeline.from_pretrained(args.student)
    pipe.set_progress_bar_config(disable=True)
    started = time.perf_counter()
    rows = measure(pipe, scales, args.per_digit, args.seed, settings=args.settings.split(","), verbose=True)
    print(format_table(rows), flush=True)
    print(f"{(time.perf_counter() - started) / 60:.1f} min", flush=True)
    print(json.dumps({"student": args.student, "per_digit": args.per_digit, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
