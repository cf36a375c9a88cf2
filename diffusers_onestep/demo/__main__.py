"""``make demo``: distill the bundled digits teacher into a one-step student, end to end, offline.

    diffusers-onestep demo            # about 10 minutes on 2 CPU cores (or: python -m diffusers_onestep.demo)
    diffusers-onestep demo --quick    # about a minute (a smoke run; the student is barely trained)

Runs from any working directory: the teacher and classifier ship inside the package, and the outputs go to
``--output_dir`` (default ``demo-output`` in the current directory).

1. Writes the training data into ``demo-output/data``: the prompt phrasings of every digit, and the real train
   split of scikit-learn's digits as an image folder (for the Jensen-Shannon discriminator).
2. Runs ``accelerate launch -m diffusers_onestep.distill`` on the bundled teacher (a PixArt-α-family model
   trained on the digits) with the project's defaults for this teacher: Jensen-Shannon f-distill, LoRA student and
   LoRA critic on the one frozen teacher backbone.
3. Evaluates, on the same prompts and seeds, the teacher at 50 steps, the teacher run as a one-step model at the
   student's timestep (the baseline a student must beat), and the student at one step, with the bundled digit
   classifier: Fréchet distance of its features to real held-out digits, prompt accuracy, coverage, images/s.
4. Writes ``demo-output/grid.png`` (rows: teacher 50 steps, teacher 1 step, student 1 step) and
   ``demo-output/metrics.json``, and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Sequence


#: the folder holding the ``diffusers_onestep`` package (the checkout, or site-packages of an installed wheel)
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
#: the training entry point as a module, so an installed wheel trains without the checkout's training/ script
TRAINING_MODULE = "diffusers_onestep.distill"


@dataclass
class DemoSettings:
    """What the demo trains and measures. ``full`` fits 10 minutes on 2 cores; ``quick`` about one."""

    max_train_steps: int = 600
    train_batch_size: int = 32
    divergence: str = "js"
    student: str = "lora"
    critic: str = "lora"
    lora_rank: int = 32
    #: attention and feed-forward layers and the output projection (PixArt's default is attention only)
    lora_target_modules: str = "to_q,to_k,to_v,to_out.0,ff.net.0.proj,ff.net.2,proj_out"
    learning_rate: float = 1e-3
    #: a full student's learning rate: at 1e-3 full students diverged (FD 33-43); 3e-4 gave 1.72 (docs/benchmarks.md)
    full_learning_rate: float = 3e-4
    critic_learning_rate: float = 1e-3
    guidance_scale: float = 1.5
    #: classifier-free guidance of the 50-step teacher row (the teacher's best FD; demo/assets/digits/README.md)
    teacher_guidance_scale: float = 1.5
    student_timesteps: List[int] = field(default_factory=lambda: [400])
    critic_updates_per_student: int = 2
    gan_weight: float = 1.0
    #: EMA of the student's weights, exported as the student (the single largest FD gain measured: see docs)
    ema_decay: float = 0.995
    eval_per_digit: int = 100
    teacher_steps: int = 50
    seed: int = 0


QUICK = {"max_train_steps": 12, "train_batch_size": 16, "eval_per_digit": 10, "teacher_steps": 20, "ema_decay": 0.5}


def log(message: str) -> None:
    print(message, flush=True)


def shown(path: str) -> str:
    """``path`` relative to the working directory when it lies inside it, else absolute (the bundled teacher of an
    installed wheel lies in site-packages)."""
    relative = os.path.relpath(os.path.abspath(path))
    return os.path.abspath(path) if relative.startswith(os.pardir) else relative


def write_data(folder: str, seed: int) -> Dict[str, str]:
    """Prompts file and real-image folder (with captions) for the training script."""
    import numpy as np
    from PIL import Image

    from . import digits

    os.makedirs(folder, exist_ok=True)
    prompts = os.path.join(folder, "prompts.txt")
    with open(prompts, "w", encoding="utf-8") as f:
        f.write("\n".join(p for p, _ in digits.all_prompts()) + "\n")
    real = os.path.join(folder, "real")
    os.makedirs(real, exist_ok=True)
    images, labels = digits.load_split("train", resolution=digits.TEACHER_RESOLUTION, channels=3)
    rng = np.random.default_rng(seed)
    records = []
    for i, (image, label) in enumerate(zip(images, labels.tolist())):
        array = ((image.permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
        name = f"{i:04d}.png"
        Image.fromarray(array).save(os.path.join(real, name))
        phrasings = digits.prompts_for_digit(label)
        records.append({"file_name": name, "text": phrasings[int(rng.integers(len(phrasings)))]})
    with open(os.path.join(real, "metadata.jsonl"), "w", encoding="utf-8") as f:
        f.write("\n".join(json.dumps(r) for r in records) + "\n")
    return {"prompts": prompts, "real": real}


def training_command(
    settings: DemoSettings, teacher: str, prompts: str, output_dir: str, objective_args: Sequence[str]
) -> List[str]:
    """``accelerate launch -m diffusers_onestep.distill`` with the demo's budget and settings (``DemoSettings``), as a
    user runs it; ``objective_args`` are what the objective adds: the demo's divergence, real images and GAN
    (:func:`train`), or a data-free ``--method`` (``benchmarks/digits.py``), each without the flags that do not apply
    to it (the training CLI refuses those)."""
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        "1",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        TRAINING_MODULE,
        "--teacher",
        teacher,
        "--prompts",
        prompts,
        "--student",
        settings.student,
        "--critic",
        settings.critic,
        "--lora_rank",
        str(settings.lora_rank),
        "--lora_target_modules",
        settings.lora_target_modules,
        "--learning_rate",
        str(settings.full_learning_rate if settings.student == "full" else settings.learning_rate),
        "--guidance_scale",
        str(settings.guidance_scale),
        "--student_timesteps",
        *[str(t) for t in settings.student_timesteps],
        "--ema_decay",
        str(settings.ema_decay),
        "--train_batch_size",
        str(settings.train_batch_size),
        "--max_train_steps",
        str(settings.max_train_steps),
        "--checkpointing_steps",
        str(settings.max_train_steps),
        "--validation_steps",
        str(10 * settings.max_train_steps),
        "--lr_scheduler",
        "constant",
        "--report_to",
        "none",
        "--seed",
        str(settings.seed),
        "--output_dir",
        output_dir,
        "--overwrite_output_dir",
        *objective_args,
    ]


def train(settings: DemoSettings, data: Dict[str, str], output_dir: str, teacher: str) -> None:
    """The product's own entry point, as a user runs it."""
    objective = [
        "--real_images",
        data["real"],
        "--caption_column",
        "text",
        "--divergence",
        settings.divergence,
        "--critic_learning_rate",
        str(settings.critic_learning_rate),
        "--critic_updates_per_student",
        str(settings.critic_updates_per_student),
        "--gan_weight",
        str(settings.gan_weight),
    ]
    command = training_command(settings, teacher, data["prompts"], output_dir, objective)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(command, env=env)
    if result.returncode != 0:
        raise SystemExit(f"The training script failed with status {result.returncode}.")


def shipped_teacher_metrics(steps: int, guidance: float, per_digit: int, seed: int):
    """The teacher's metrics measured when it was built (``demo/assets/digits/teacher_metrics.json``), if they match.

    The teacher is fixed and sampling is deterministic, so these are exactly what
    :func:`digits.generate_with_pipeline` + :func:`digits.evaluate` give on the same prompts and seed; the demo
    quotes them instead of spending 4-5 minutes of its 10 on 50-step sampling (``--recompute_teacher`` reruns it).
    """
    from . import digits

    path = os.path.join(digits.ASSETS_DIR, "teacher_metrics.json")
    if per_digit != digits.EVAL_PER_DIGIT or not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        rows = json.load(f)
    for row in rows:
        if (
            row.get("run") == f"ddim:{steps}:{guidance:g}"
            and row.get("seed") == seed
            and row.get("n") == 10 * per_digit
        ):
            return {k: row[k] for k in ("fd", "prompt_accuracy", "coverage", "recall", "per_class", "n")} | {
                "images_per_s": row["n"] / row["sample_seconds"],
                "source": os.path.relpath(path, PACKAGE_PARENT),
            }
    return None


def evaluate_runs(
    settings: DemoSettings,
    teacher: str,
    students: Dict[str, str],
    teacher_steps: List[int],
    recompute_teacher: bool = False,
) -> Dict[str, Dict]:
    """Metrics of the teacher at each of ``teacher_steps`` steps, the teacher at one step, and each student.

    Every run sees the same 1,000 standard prompts (:func:`digits.evaluation_prompts`) and seed, generated in batches
    of 500 exactly as the teacher's shipped metrics were. Returns ``{run name: metrics}`` in display order; each entry
    also holds ``images_per_s`` and a ``grid`` tensor (one image per digit, the same seed for every run).
    """
    import torch
    from diffusers import DDIMScheduler, PixArtAlphaPipeline

    from diffusers_onestep import OneStepPipeline

    from . import digits

    prompts, requested = digits.evaluation_prompts(settings.eval_per_digit)
    multi = PixArtAlphaPipeline.from_pretrained(teacher)
    multi.scheduler = DDIMScheduler.from_config(multi.scheduler.config)
    multi.set_progress_bar_config(disable=True)

    def one_step(pipe):
        pipe.set_progress_bar_config(disable=True)

        def run(batch, seed):
            generator = torch.Generator().manual_seed(seed)
            return pipe(list(batch), generator=generator, output_type="pt").images.float() * 2 - 1

        return run

    def multi_step(steps):
        def run(batch, seed):
            return digits.generate_with_pipeline(
                multi,
                batch,
                num_inference_steps=steps,
                guidance_scale=settings.teacher_guidance_scale,
                seed=seed,
                batch_size=len(batch),
            )

        return run

    runs = {f"teacher, {n} steps": multi_step(n) for n in teacher_steps}
    runs["teacher, 1 step"] = one_step(
        OneStepPipeline.from_pretrained(teacher, conditioning_timesteps=settings.student_timesteps[:1])
    )
    for name, folder in students.items():
        runs[name] = one_step(OneStepPipeline.from_pretrained(folder))
    grid_prompts = [digits.prompts_for_digit(d)[0] for d in range(10)]
    results = {}
    for name, fn in runs.items():
        steps = int(name.split(", ")[1].split()[0]) if name.startswith("teacher, ") else 1
        shipped = None
        if name.startswith("teacher, ") and steps > 1 and not recompute_teacher:
            shipped = shipped_teacher_metrics(
                steps, settings.teacher_guidance_scale, settings.eval_per_digit, settings.seed
            )
        if shipped is not None:
            metrics = shipped
        else:
            started = time.perf_counter()
            images = torch.cat([fn(prompts[i : i + 500], settings.seed + i) for i in range(0, len(prompts), 500)])
            seconds = time.perf_counter() - started
            metrics = digits.evaluate(images, requested, value_range="-1,1")
            metrics["images_per_s"] = len(prompts) / seconds
        metrics["grid"] = fn(grid_prompts, 12345)
        results[name] = metrics
    return results


def print_table(results: Dict[str, Dict], reference_fd: float) -> None:
    log(f"{'':<26}{'FD ↓':>9}{'prompt acc ↑':>14}{'coverage':>10}{'images/s':>10}")
    for name, r in results.items():
        log(f"{name:<26}{r['fd']:>9.2f}{r['prompt_accuracy']:>14.3f}{r['coverage']:>10.2f}{r['images_per_s']:>10.1f}")
    log(f"{'real train digits':<26}{reference_fd:>9.2f}{1.0:>14.3f}  (the floor: real images, same sample size)")


def main(argv=None, prog: str = "python -m diffusers_onestep.demo") -> int:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a one-minute smoke run (used by the tests)")
    parser.add_argument("--output_dir", default="demo-output")
    parser.add_argument("--teacher", default=None, help="the digits teacher folder (default: the bundled one)")
    parser.add_argument(
        "--recompute_teacher",
        action="store_true",
        help="sample the teacher's 50-step row instead of quoting its shipped, deterministic metrics",
    )
    args = parser.parse_args(argv)

    from . import digits

    started = time.perf_counter()
    settings = DemoSettings(**(QUICK if args.quick else {}))
    teacher = args.teacher or digits.TEACHER_DIR
    output_dir = os.path.abspath(args.output_dir)
    log(
        f"diffusers-onestep demo{' (--quick)' if args.quick else ''}: distilling {shown(teacher)} "
        f"(PixArt-α family, {digits.TEACHER_RESOLUTION}×{digits.TEACHER_RESOLUTION} digits) into a one-step "
        f"{settings.student} student with {settings.divergence} f-distill, {settings.max_train_steps} steps."
    )
    os.makedirs(output_dir, exist_ok=True)
    data = write_data(os.path.join(output_dir, "data"), settings.seed)
    student = os.path.join(output_dir, "student")
    train(settings, data, student, teacher)

    log(
        f"Evaluating on {10 * settings.eval_per_digit} prompts, 100 per digit (teacher {settings.teacher_steps} "
        "steps, teacher 1 step, student 1 step)..."
    )
    student_name = "student, 1 step"
    results = evaluate_runs(
        settings,
        teacher,
        {student_name: student},
        [settings.teacher_steps],
        recompute_teacher=args.recompute_teacher or args.teacher is not None,
    )

    import torch

    grid = torch.cat([r.pop("grid") for r in results.values()])
    digits.save_grid(grid, os.path.join(output_dir, "grid.png"), nrow=10, scale=6, value_range="-1,1")
    teacher_multi, teacher_one, student_one = results.values()
    reference = digits.reference_fd(per_digit=settings.eval_per_digit)["fd"]
    metrics = {
        "teacher50_fd": teacher_multi["fd"],
        "teacher1_fd": teacher_one["fd"],
        "best_student": f"{settings.divergence}-{settings.student}",
        "best_student_fd": student_one["fd"],
        "fd_ratio": student_one["fd"] / teacher_multi["fd"],
        "acc_ratio": student_one["prompt_accuracy"] / max(teacher_multi["prompt_accuracy"], 1e-9),
        "real_fd": reference,
        "eval_images": 10 * settings.eval_per_digit,
        "teacher_steps": settings.teacher_steps,
        "runs": results,
        "settings": asdict(settings),
    }
    log("")
    print_table(results, reference)
    for name, r in results.items():
        if "source" in r:
            log(
                f"({name}: the teacher's deterministic metrics measured when it was built, {r['source']}; "
                "--recompute_teacher samples them again, 4-5 minutes)"
            )
    metrics["wall_s"] = time.perf_counter() - started
    from ..storage import write_json

    write_json(os.path.join(output_dir, "metrics.json"), metrics)
    log(
        f"student FD / teacher-50 FD = {metrics['fd_ratio']:.2f}; accuracy ratio = {metrics['acc_ratio']:.3f}; "
        f"wall time {metrics['wall_s']:.0f} s"
    )
    log(
        f"wrote {shown(output_dir)}/grid.png, metrics.json and the student folder "
        f"{shown(student)} (OneStepPipeline.from_pretrained loads it)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
