"""One point of a digits hyperparameter sweep: train a student with the given training-script flags, evaluate it.

The demo's settings (``DemoSettings`` in ``diffusers_onestep/demo/__main__.py``) were chosen with this script; the
runs and their numbers are in docs/benchmarks.md ("Digits: what moved the student's FD"). Each call trains one student
with ``training/train_onestep.py`` on the bundled teacher and data (the demo's prompts and real digits), then
evaluates it exactly as ``benchmarks/digits.py`` does: 1,000 standard prompts (100 per digit), the same seeds, FD to the
real held-out digits, prompt accuracy, recall and coverage with the bundled classifier.

    .venv/bin/python benchmarks/digits_sweep.py NAME [training flags ...]
    .venv/bin/python benchmarks/digits_sweep.py js_ema995 --divergence js --max_train_steps 400 --ema_decay 0.995

Flags not given take the training script's defaults, except the fixed ones below (teacher, data, output, seed,
constant LR, no tracker). Appends one JSON line to ``--results`` (default
``benchmarks/results/digits_sweep.jsonl``) and prints it; writes an 8-per-digit grid next to the student.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    results = os.path.join(REPO, "benchmarks", "results", "digits_sweep.jsonl")
    if "--results" in argv:
        i = argv.index("--results")
        results = argv[i + 1]
        del argv[i : i + 2]
    if not argv or argv[0].startswith("-"):
        raise SystemExit("usage: digits_sweep.py NAME [training flags ...] (see the module docstring)")
    name, flags = argv[0], argv[1:]

    import torch

    from diffusers_onestep import OneStepPipeline
    from diffusers_onestep.demo import digits
    from diffusers_onestep.demo.__main__ import write_data

    root = os.path.join(REPO, "benchmarks", "results", "digits_sweep")
    data = write_data(os.path.join(root, "data"), seed=0)
    output_dir = os.path.join(root, name)
    command = [
        sys.executable,
        os.path.join(REPO, "training", "train_onestep.py"),
        "--teacher",
        digits.TEACHER_DIR,
        "--prompts",
        data["prompts"],
        "--real_images",
        data["real"],
        "--caption_column",
        "text",
        "--report_to",
        "none",
        "--output_dir",
        output_dir,
        "--overwrite_output_dir",
        "--lr_scheduler",
        "constant",
        "--validation_steps",
        "100000",
        "--seed",
        "0",
        "--resolution",
        str(digits.TEACHER_RESOLUTION),
        *flags,
    ]
    started = time.perf_counter()
    with open(os.path.join(root, f"{name}.log"), "w", encoding="utf-8") as log:
        if subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode:
            raise SystemExit(f"training failed; see {log.name}")
    train_seconds = time.perf_counter() - started

    pipe = OneStepPipeline.from_pretrained(output_dir)
    pipe.set_progress_bar_config(disable=True)
    prompts, requested = digits.evaluation_prompts()
    images = torch.cat(
        [
            pipe(prompts[i : i + 250], generator=torch.Generator().manual_seed(i), output_type="pt").images.float() * 2
            - 1
            for i in range(0, len(prompts), 250)
        ]
    )
    metrics = digits.evaluate(images, requested, value_range="-1,1")
    row = {
        "name": name,
        "flags": flags,
        "train_s": round(train_seconds),
        "fd": round(metrics["fd"], 3),
        "prompt_accuracy": round(metrics["prompt_accuracy"], 3),
        "recall": round(metrics["recall"], 3),
        "coverage": metrics["coverage"],
    }
    os.makedirs(os.path.dirname(results), exist_ok=True)
    with open(results, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
    grid = torch.cat(
        [
            pipe(
                [digits.prompts_for_digit(d)[0]] * 8, generator=torch.Generator().manual_seed(d), output_type="pt"
            ).images.float()
            * 2
            - 1
            for d in range(10)
        ]
    )
    digits.save_grid(grid, os.path.join(output_dir, "grid.png"), nrow=8, scale=4, value_range="-1,1")
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
