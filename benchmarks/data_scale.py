"""Host memory and time to the first step as the data grows: 200 vs 2,000 real images and prompts.

A tiny PixArt-alpha teacher trains f-distill (its discriminator reads real images with their captions) on images
generated into a temporary ``imagefolder`` (PNG files, 128 x 128, with a caption each) and as many prompts. Every
case runs in a fresh subprocess that stops right after its first optimization step and reports:

* ``rss_mib``: the peak resident memory of the process (``ru_maxrss``) up to the end of the first step;
* ``first_step_s``: wall time from the start of the training command (parsing, checks, loading, data setup and
  caches) to the end of the first step;
* ``cache_mib``: the bytes of the on-disk caches the run built (text embeddings; latents with ``--cache_latents``).

Each size runs cold (empty cache folder) and warm (the same command again, reusing the caches), in two data modes:
``lazy`` (images decoded and VAE-encoded per batch) and ``cached`` (``--cache_latents``). The ratios are
2,000-case / 200-case: memory must not grow with the data (ratio ~1; the caches live on disk and are memory-mapped),
nor the warm time to the first step; the cold time grows by the encoding of the caches.
``--baseline_repo PATH`` also runs a checkout of the project from before this change (PYTHONPATH=PATH) for the
same data, where every image is decoded into RAM as float32 before encoding.

    python benchmarks/data_scale.py                        # the table, then one JSON line
    python benchmarks/data_scale.py --sizes 20 200 --resolution 32    # the reduced mode the tests run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time


RESULT_PREFIX = "RESULT "
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = "cat dog car tree house river mountain city robot flower bird boat castle forest lamp chair".split()


def write_data(folder: str, count: int, image_size: int) -> tuple:
    """``count`` random PNG images with captions (an imagefolder) and ``count`` prompts, under ``folder``."""
    import numpy as np
    from PIL import Image

    images = os.path.join(folder, "images")
    os.makedirs(images, exist_ok=True)
    rng = np.random.RandomState(0)
    captions = []
    for i in range(count):
        # smooth random images (a noise pattern upsampled) compress like photos, unlike white noise
        small = (rng.rand(image_size // 16, image_size // 16, 3) * 255).astype("uint8")
        Image.fromarray(small).resize((image_size, image_size), Image.BICUBIC).save(os.path.join(images, f"{i}.png"))
        captions.append(f"a {WORDS[i % len(WORDS)]} next to a {WORDS[(i * 7 + 3) % len(WORDS)]}, number {i}")
    with open(os.path.join(images, "metadata.jsonl"), "w") as f:
        for i, caption in enumerate(captions):
            f.write(json.dumps({"file_name": f"{i}.png", "text": caption}) + "\n")
    prompts = os.path.join(folder, "prompts.txt")
    with open(prompts, "w") as f:
        f.write("\n".join(f"a photo of {c}" for c in captions) + "\n")
    return images, prompts


def folder_bytes(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, name)) for name in files)
    return total


class _FirstStepDone(Exception):
    pass


def train_to_first_step(argv, started: float) -> dict:
    """The training command (as the console script parses and checks it), stopped after its first step; returns
    the peak RSS of this process and the time since ``started``."""
    import resource

    from diffusers_onestep.distill import cli
    from diffusers_onestep.distill.trainer import Trainer

    measured = {}

    def stop_after_first_step(event, trainer, **info):
        if event == "after_step":
            measured["rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            measured["first_step_s"] = time.time() - started
            raise _FirstStepDone

    config, _ = cli.resolve_args(argv)
    try:
        Trainer(config, hooks=[stop_after_first_step]).run()
    except _FirstStepDone:
        return measured
    raise RuntimeError("the run ended without a step")


def child(argv) -> None:
    result = train_to_first_step(argv, float(os.environ["DATA_SCALE_STARTED"]))
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    os._exit(0)  # nothing after the first step is measured


def run_case(
    repo: str, teacher: str, images: str, prompts: str, work: str, resolution: int, extra, in_process: bool = False
) -> dict:
    output_dir = tempfile.mkdtemp(dir=work, prefix="run-")
    argv = [
        "--teacher",
        teacher,
        "--prompts",
        prompts,
        "--real_images",
        images,
        "--caption_column",
        "text",
        "--divergence",
        "js",
        "--resolution",
        str(resolution),
        "--output_dir",
        output_dir,
        "--max_train_steps",
        "2",
        "--train_batch_size",
        "4",
        "--lora_rank",
        "2",
        "--max_sequence_length",
        "16",
        "--report_to",
        "none",
        "--cache_dir",
        os.path.join(work, "hf-cache"),
        *extra,
    ]
    if in_process:  # the tests' reduced mode: no interpreter start per case, and RSS is this process's peak
        result = train_to_first_step(argv, time.time())
        shutil.rmtree(output_dir, ignore_errors=True)
        return result
    environment = dict(os.environ, PYTHONPATH=repo, DATA_SCALE_STARTED=str(time.time()), OMP_NUM_THREADS="1")
    environment.setdefault("HF_HUB_OFFLINE", "1")
    environment.setdefault("HF_DATASETS_OFFLINE", "1")
    result = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--child", "--", *argv],
        env=environment,
        capture_output=True,
        text=True,
        cwd=work,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if not lines:
        raise RuntimeError(f"the case failed ({result.returncode}):\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    shutil.rmtree(output_dir, ignore_errors=True)
    return json.loads(lines[-1][len(RESULT_PREFIX) :])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs=2, default=(200, 2000), metavar=("SMALL", "LARGE"))
    parser.add_argument("--resolution", type=int, default=32, help="training resolution of the tiny teacher")
    parser.add_argument("--image_size", type=int, default=128, help="side of the generated PNG images")
    parser.add_argument("--modes", nargs="+", default=("lazy", "cached"), choices=("lazy", "cached"))
    parser.add_argument(
        "--temperatures", nargs="+", default=("cold", "warm"), choices=("cold", "warm"), help="cold and/or warm runs"
    )
    parser.add_argument("--baseline_repo", default=None, help="also run this checkout (the data path before)")
    parser.add_argument(
        "--in_process",
        action="store_true",
        help="run the cases in this process (a quick check of the benchmark; its RSS is not per case)",
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args(argv)
    if args.child:
        child([a for a in rest if a != "--"])
        return 0

    from diffusers_onestep.testing import save_tiny_native_pipeline

    work = tempfile.mkdtemp(prefix="data-scale-")
    try:
        teacher = save_tiny_native_pipeline("pixart_alpha", os.path.join(work, "teacher"))
        data = {n: write_data(os.path.join(work, f"data-{n}"), n, args.image_size) for n in args.sizes}
        results = {}
        runs = [(mode, REPO) for mode in args.modes]
        if args.baseline_repo:
            runs.append(("before", os.path.abspath(args.baseline_repo)))
        for mode, repo in runs:
            results[mode] = {}
            for n in args.sizes:
                cache = os.path.join(work, f"cache-{mode}-{n}")
                extra = [] if mode == "before" else ["--data_cache_dir", cache]
                extra += ["--cache_latents"] if mode == "cached" else []
                results[mode][n] = {}
                for temperature in args.temperatures:  # warm: the same command again, with the caches of cold
                    case = run_case(repo, teacher, *data[n], work, args.resolution, extra, args.in_process)
                    case["cache_mib"] = folder_bytes(cache) / 2**20 if os.path.isdir(cache) else 0.0
                    results[mode][n][temperature] = case
                print(mode, n, json.dumps(results[mode][n]), flush=True)
        small, large = args.sizes
        ratios = {
            mode: {
                f"{temperature}_{key}": by_size[large][temperature][key] / by_size[small][temperature][key]
                for temperature in args.temperatures
                for key in ("rss_mib", "first_step_s")
            }
            for mode, by_size in results.items()
        }
        print(f"\n{'mode':<8}{'images':>8}{'':>7}{'RSS MiB':>10}{'first step s':>14}{'cache MiB':>11}")
        for mode, by_size in results.items():
            for n, runs_of_size in by_size.items():
                for temperature, case in runs_of_size.items():
                    cache_mib = f"{case['cache_mib']:.1f}"
                    print(
                        f"{mode:<8}{n:>8}{temperature:>7}{case['rss_mib']:>10.0f}{case['first_step_s']:>14.2f}"
                        f"{cache_mib:>11}"
                    )
        print(f"\nratios {large}/{small}:")
        for mode, values in ratios.items():
            print(f"  {mode:<8}" + "  ".join(f"{key} {value:.2f}" for key, value in values.items()))
        print(
            json.dumps(
                {"sizes": list(args.sizes), "resolution": args.resolution, "results": results, "ratios": ratios}
            )
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
