"""Evaluate a digits PixArt-α pipeline (the bundled teacher by default) with the digits metrics.

    python benchmarks/digits/evaluate_teacher.py --runs ddim:50:1,ddim:50:2,ddim:4:1,ddim:1:1 --grid

Each run is ``scheduler:steps:guidance`` (scheduler ``ddim`` = the folder's own DDIMScheduler, ``dpm`` =
DPMSolverMultistepScheduler built from the same config; the PixArt-α pipeline cannot run ``dpm`` at 1 step). Every run
generates the standard 1,000 images (100 per digit, the 5 phrasings in turn, one seeded generator per batch of 500)
and scores them with ``diffusers_onestep.demo.digits.evaluate``. Results go to ``--json`` and a table to stdout.
``--grid`` also writes a picture (rows = digits 0-9, columns = seeds) for the first run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from diffusers_onestep.demo import digits  # noqa: E402


def load(folder):
    from diffusers import PixArtAlphaPipeline

    pipe = PixArtAlphaPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def set_scheduler(pipe, name, original):
    from diffusers import DPMSolverMultistepScheduler

    if name == "ddim":
        pipe.scheduler = original
    elif name == "dpm":
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(original.config, timestep_spacing="trailing")
    else:
        raise ValueError(f"unknown scheduler {name!r}; use ddim or dpm")


@torch.no_grad()
def one_call_x0(pipe, prompts, timestep, guidance, seed=0, batch_size=500):
    """The teacher's x0 estimate from pure noise in ONE denoiser call at ``timestep`` (a student's starting point).

    The scaled latents have unit std, so pure noise N(0, I) matches the marginal scale of x_t at every t; below
    t=999 it lacks the alpha_t * x0 signal part, which is the usual one-step-generator convention (DMD at t*<T).
    """
    alphas_cumprod = pipe.scheduler.alphas_cumprod.double()
    alpha, sigma = alphas_cumprod[timestep].sqrt().float(), (1 - alphas_cumprod[timestep]).sqrt().float()
    size = int(pipe.transformer.config.sample_size)
    channels = int(pipe.transformer.config.in_channels)
    out = []
    for i in range(0, len(prompts), batch_size):
        chunk = list(prompts[i : i + batch_size])
        generator = torch.Generator().manual_seed(seed + i)
        z = torch.randn((len(chunk), channels, size, size), generator=generator)
        embeds, mask, neg, neg_mask = pipe.encode_prompt(
            chunk, do_classifier_free_guidance=guidance > 1, device="cpu", clean_caption=False
        )
        if guidance > 1:
            embeds, mask, x = torch.cat([neg, embeds]), torch.cat([neg_mask, mask]), torch.cat([z, z])
        else:
            x = z
        t = torch.full((len(x),), timestep)
        eps = pipe.transformer(
            x,
            encoder_hidden_states=embeds,
            encoder_attention_mask=mask,
            timestep=t,
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        ).sample[:, :channels]
        if guidance > 1:
            uncond, cond = eps.chunk(2)
            eps = uncond + guidance * (cond - uncond)
        x0 = (z - sigma * eps) / alpha
        images = pipe.vae.decode(x0 / pipe.vae.config.scaling_factor).sample.clamp(-1, 1)
        out.append(images)
    return torch.cat(out)


def calibration_sets(per_digit=digits.EVAL_PER_DIGIT, seed=0):
    """Reference image sets of the standard size, to read FD values against (no model involved)."""
    x, y = digits.load_split("train", resolution=digits.TEACHER_RESOLUTION)
    generator = torch.Generator().manual_seed(seed)
    idx = torch.cat([torch.nonzero(y == d).flatten()[:per_digit] for d in range(10)])
    real, labels = x[idx], y[idx]
    means = torch.stack([x[y == d].mean(0) for d in range(10)])
    first = torch.stack([x[torch.nonzero(y == d).flatten()[0]] for d in range(10)])
    return labels, {
        "real train images (first 100 per digit)": real,
        "real + Gaussian noise sigma 0.3": (real + 0.3 * torch.randn(real.shape, generator=generator)).clamp(-1, 1),
        "each digit's mean image, repeated": means[labels],
        "one real image per digit, repeated": first[labels],
        "uniform noise": torch.rand(real.shape, generator=generator) * 2 - 1,
    }


def grid(pipe, path, steps, guidance, columns=8, seed=1234):
    prompts = []
    for d in range(10):
        phrasings = digits.prompts_for_digit(d)
        prompts += [phrasings[c % len(phrasings)] for c in range(columns)]
    images = digits.generate_with_pipeline(pipe, prompts, steps, guidance, seed=seed, batch_size=len(prompts))
    return digits.save_grid(images, path, nrow=columns)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default=digits.TEACHER_DIR)
    parser.add_argument("--runs", default="ddim:50:1,ddim:50:1.5,ddim:50:2,ddim:50:3")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per_digit", type=int, default=digits.EVAL_PER_DIGIT)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None, help="append results to this JSON list")
    parser.add_argument("--grid", default=None, help="write a grid PNG of each run here (use {name} for the run)")
    parser.add_argument("--reference", action="store_true", help="also print the real-vs-real reference")
    parser.add_argument("--calibration", action="store_true", help="only print the FD of reference image sets")
    parser.add_argument("--one_call", default="", help="timesteps t* for the one-call x0 sweep, e.g. 999,900,800")
    parser.add_argument("--one_call_guidance", type=float, default=1.0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.calibration:
        labels, sets = calibration_sets(args.per_digit)
        for name, images in sets.items():
            m = digits.evaluate(images, labels, value_range="-1,1")
            print(f"calibration {name}: fd {m['fd']:.3f} acc {m['prompt_accuracy']:.3f} recall {m['recall']:.3f}")
        return
    pipe = load(args.teacher)
    original = pipe.scheduler
    prompts, requested = digits.evaluation_prompts(args.per_digit)
    results = []
    if args.reference:
        ref = digits.reference_fd(seeds=(0, 1, 2, 3, 4), per_digit=args.per_digit)
        print(f"real train vs held-out ({args.per_digit}/digit, 5 draws): {json.dumps(ref)}", flush=True)
        results.append({"run": "real-train-vs-heldout", **ref})
    for run in args.runs.split(","):
        name, steps, guidance = run.split(":")
        steps, guidance = int(steps), float(guidance)
        set_scheduler(pipe, name, original)
        start = time.time()
        images = digits.generate_with_pipeline(pipe, prompts, steps, guidance, seed=args.seed)
        seconds = time.time() - start
        metrics = digits.evaluate(images, requested, value_range="-1,1")
        row = {
            "run": run,
            "scheduler": name,
            "steps": steps,
            "guidance": guidance,
            "sample_seconds": round(seconds, 1),
            "teacher": os.path.abspath(args.teacher),
            **metrics,
        }
        results.append(row)
        print(
            f"{run:>14}: fd {metrics['fd']:.3f}  acc {metrics['prompt_accuracy']:.3f}  "
            f"coverage {metrics['coverage']:.2f}  recall {metrics['recall']:.3f}  ({seconds:.0f} s)  "
            f"per-class acc {[round(a, 2) for a in metrics['per_class']['accuracy']]}",
            flush=True,
        )
        if args.grid:
            grid(pipe, args.grid.format(name=run.replace(":", "_")), steps, guidance)
    set_scheduler(pipe, "ddim", original)
    for timestep in [int(t) for t in args.one_call.split(",") if t]:
        start = time.time()
        images = one_call_x0(pipe, prompts, timestep, args.one_call_guidance, seed=args.seed)
        seconds = time.time() - start
        metrics = digits.evaluate(images, requested, value_range="-1,1")
        run = f"one-call-x0:t{timestep}:{args.one_call_guidance:g}"
        results.append(
            {
                "run": run,
                "timestep": timestep,
                "guidance": args.one_call_guidance,
                "sample_seconds": round(seconds, 1),
                "teacher": os.path.abspath(args.teacher),
                **metrics,
            }
        )
        print(
            f"{run:>14}: fd {metrics['fd']:.3f}  acc {metrics['prompt_accuracy']:.3f}  "
            f"coverage {metrics['coverage']:.2f}  recall {metrics['recall']:.3f}  ({seconds:.0f} s)",
            flush=True,
        )
        if args.grid:
            grid_images = one_call_x0(
                pipe,
                [digits.prompts_for_digit(d)[c % 5] for d in range(10) for c in range(8)],
                timestep,
                args.one_call_guidance,
                seed=1234,
            )
            digits.save_grid(grid_images, args.grid.format(name=run.replace(":", "_")), nrow=8)
    if args.json:
        previous = []
        if os.path.isfile(args.json):
            with open(args.json, encoding="utf-8") as f:
                previous = json.load(f)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(previous + results, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
