"""Digits benchmark: the bundled teacher at 50, 4 and 1 steps against one-step students of every divergence.

Each student -- reverse_kl (DMD2: VSD + GAN), js and forward_kl (f-distill) × {lora, full}, and with ``--methods``
the data-free score-divergence methods sid and sim (SiD, SIM) -- is trained by ``accelerate launch
training/train_onestep.py`` with the same budget and settings as ``make demo`` (only the divergence or method and
the student's kind change; sid and sim take no real images and no GAN, and the method's own 1:1 update ratio; tdm
likewise, as a 2-step student on 899 449 by default, evaluated with its 2 steps through its saved folder), then
all runs are evaluated on the same 1,000 prompts (100 per digit) and seeds with the bundled classifier (``diffusers_onestep/demo/digits.py``): FD to real held-out digits, prompt
accuracy, coverage, and wall time.

    python benchmarks/digits.py                       # ~40-60 minutes on 2 CPU cores; writes docs/benchmarks.md
    python benchmarks/digits.py --divergences js --kinds lora --no_docs   # one student
    python benchmarks/digits.py --divergences "" --methods sid,sim --kinds lora --no_docs   # SiD and SIM students
    python benchmarks/digits.py --divergences "" --methods sid --kinds lora --learning_rate 1e-4 --no_docs
    python benchmarks/digits.py --divergences "" --methods tdm --kinds lora --learning_rate 1e-4 --no_docs  # 2 steps
    # (SiD and SIM diverge on digits at the demo's LoRA learning rate 1e-3; 1e-4 trains: docs/benchmarks.md)

The last printed line is one JSON object: ``{"teacher50_fd", "teacher1_fd", "best_student", "best_student_fd",
"fd_ratio", "acc_ratio"}``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, replace


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from diffusers_onestep.demo import digits  # noqa: E402
from diffusers_onestep.demo.__main__ import (  # noqa: E402
    DemoSettings,
    evaluate_runs,
    log,
    print_table,
    train,
    training_command,
    write_data,
)


DOC = os.path.join(REPO, "docs", "benchmarks.md")
SECTION = "## Digits: one-step students against the teacher"


#: the data-free score-divergence methods (``distill/methods/sid.py``) this benchmark trains besides the divergences
SCORE_METHODS = ("sid", "sim")
#: TDM (``distill/methods/tdm.py``): a data-free few-step student, trained like sid/sim but on a K-step grid
FEW_STEP_METHODS = ("tdm",)
#: the TDM student's default grid: TDM's ``total_steps = 900`` grid (the library's PixArt default 899 674 449 224)
#: at 2 steps, ``T_k = 899 - 900 k / K``
TDM_STUDENT_TIMESTEPS = (899, 449)


def train_score_method(
    settings: DemoSettings, method: str, data, output_dir: str, teacher: str, extra_args=()
) -> None:
    """Train a ``--method sid|sim|tdm`` student with the demo's budget and settings (``DemoSettings``).

    The demo's :func:`training_command` without what a score-divergence method refuses: no ``--divergence``, no real
    images and no ``--gan_weight`` (SiD and SIM are data-free), and no ``--critic_updates_per_student`` (the method's
    own 1:1 fake-score:generator ratio, SiD's Algorithm 1). SiD's alpha, SiD-LSG's fake-score guidance and
    SIM's pseudo-Huber distance take the library's defaults (``MethodConfig``); the teacher's CFG is the demo's.
    ``tdm`` trains on ``settings.student_timesteps`` (its K-step grid) and keeps the method's own fake-score learning
    rate (5x the student's) and Adam betas (0, 0.95) (``TDM.optimizer_defaults``); ``extra_args`` (e.g.
    ``--tdm_loss mse``) are appended.
    """
    objective = [
        "--method",
        method,
        *([] if method in FEW_STEP_METHODS else ["--critic_learning_rate", str(settings.critic_learning_rate)]),
        *extra_args,
    ]
    command = training_command(settings, teacher, data["prompts"], output_dir, objective)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if subprocess.run(command, env=env).returncode != 0:
        raise SystemExit(f"The training script failed for --method {method}.")


def update_docs(table: str, command: str, extra: str) -> None:
    with open(DOC, encoding="utf-8") as f:
        text = f.read()
    body = f"{SECTION}\n\n{extra}\n\n```bash\n{command}\n```\n\n{table}\n"
    if SECTION in text:
        start = text.index(SECTION)
        rest = text[start + len(SECTION) :]
        following = rest.find("\n## ")
        text = text[:start] + body + (rest[following + 1 :] if following >= 0 else "")
    else:
        text = text.rstrip() + "\n\n" + body
    with open(DOC, "w", encoding="utf-8") as f:
        f.write(text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--divergences", default="reverse_kl,js,forward_kl")
    parser.add_argument(
        "--methods",
        default="",
        help=f"comma-separated data-free methods ({', '.join(SCORE_METHODS + FEW_STEP_METHODS)}) trained besides "
        "the divergences",
    )
    parser.add_argument(
        "--tdm_student_timesteps",
        default=" ".join(str(t) for t in TDM_STUDENT_TIMESTEPS),
        help="the tdm student's K conditioning timesteps, decreasing, space-separated (2 to 8)",
    )
    parser.add_argument("--tdm_loss", default=None, help="tdm's generator distance (default: the library's)")
    parser.add_argument("--kinds", default="lora,full")
    parser.add_argument("--max_train_steps", type=int, default=None, help="budget per student (default: the demo's)")
    parser.add_argument("--ema_decay", type=float, default=None, help="student EMA decay (default: the demo's)")
    parser.add_argument(
        "--learning_rate", type=float, default=None, help="a LoRA student's learning rate (default: the demo's)"
    )
    parser.add_argument("--eval_per_digit", type=int, default=digits.EVAL_PER_DIGIT)
    parser.add_argument("--jobs", type=int, default=1, help="students trained at once (one thread each when > 1)")
    parser.add_argument(
        "--reuse_students",
        default="",
        help="comma-separated students whose finished folders (and train times in results.json) "
        "from an earlier run of this benchmark are kept instead of retrained",
    )
    parser.add_argument("--output_dir", default=os.path.join(REPO, "benchmarks", "results", "digits"))
    parser.add_argument(
        "--no_docs",
        action="store_true",
        help="do not rewrite the section of docs/benchmarks.md nor its grid (the grid goes to --output_dir)",
    )
    args = parser.parse_args(argv)

    started = time.perf_counter()
    base = DemoSettings(eval_per_digit=args.eval_per_digit)
    if args.max_train_steps:
        base = replace(base, max_train_steps=args.max_train_steps)
    if args.ema_decay:
        base = replace(base, ema_decay=args.ema_decay)
    if args.learning_rate:
        base = replace(base, learning_rate=args.learning_rate)
    os.makedirs(args.output_dir, exist_ok=True)
    data = write_data(os.path.join(args.output_dir, "data"), base.seed)
    students, train_seconds, to_train = {}, {}, []
    reuse = [n for n in args.reuse_students.split(",") if n]
    previous_path = os.path.join(args.output_dir, "results.json")
    previous = {}
    if reuse and os.path.isfile(previous_path):
        with open(previous_path, encoding="utf-8") as f:
            previous = json.load(f).get("train_seconds", {})
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(SCORE_METHODS + FEW_STEP_METHODS))
    if unknown:
        raise SystemExit(
            f"--methods: {', '.join(unknown)} is not one of {', '.join(SCORE_METHODS + FEW_STEP_METHODS)}."
        )
    tdm_timesteps = [int(t) for t in args.tdm_student_timesteps.split()]
    for objective in [d for d in args.divergences.split(",") if d] + methods:
        for kind in args.kinds.split(","):
            name = f"{objective}-{kind}"
            students[name] = os.path.join(args.output_dir, name)
            if name in reuse:
                if not os.path.isfile(os.path.join(students[name], "training_config.json")) or name not in previous:
                    raise SystemExit(
                        f"--reuse_students {name}: no finished student and train time in {args.output_dir}."
                    )
                train_seconds[name] = previous[name]
                log(f"== {name}: reused from the earlier run")
            else:
                method = objective if objective in SCORE_METHODS + FEW_STEP_METHODS else None
                divergence = base.divergence if method else objective
                settings = replace(base, divergence=divergence, student=kind)
                if method in FEW_STEP_METHODS:
                    settings = replace(settings, student_timesteps=tdm_timesteps)
                to_train.append((name, method, settings))

    def train_one(item):
        name, method, settings = item
        log(f"== {name}: {settings.max_train_steps} steps")
        t0 = time.perf_counter()
        if method:
            extra = ["--tdm_loss", args.tdm_loss] if method == "tdm" and args.tdm_loss else []
            train_score_method(settings, method, data, students[name], digits.TEACHER_DIR, extra)
        else:
            train(settings, data, students[name], digits.TEACHER_DIR)
        return name, time.perf_counter() - t0

    if args.jobs > 1:
        from concurrent.futures import ThreadPoolExecutor

        os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the training subprocesses
        with ThreadPoolExecutor(args.jobs) as pool:
            train_seconds.update(pool.map(train_one, to_train))
    else:
        train_seconds.update(map(train_one, to_train))
    train_seconds = {name: train_seconds[name] for name in students}

    results = evaluate_runs(base, digits.TEACHER_DIR, students, [50, 4])
    import torch

    grid = torch.cat([r.pop("grid") for r in results.values()])
    # the docs' grid only when the docs are rewritten; a --no_docs run keeps its grid beside its students
    grid_path = (
        os.path.join(args.output_dir, "digits_grid.png")
        if args.no_docs
        else os.path.join(REPO, "docs", "images", "digits_grid.png")
    )
    os.makedirs(os.path.dirname(grid_path), exist_ok=True)
    digits.save_grid(grid, grid_path, nrow=10, scale=4, value_range="-1,1")
    reference = digits.reference_fd(per_digit=args.eval_per_digit)["fd"]
    print_table(results, reference)

    teacher50, teacher1 = results["teacher, 50 steps"], results["teacher, 1 step"]
    best = min(students, key=lambda n: results[n]["fd"])
    summary = {
        "teacher50_fd": round(teacher50["fd"], 4),
        "teacher1_fd": round(teacher1["fd"], 4),
        "best_student": best,
        "best_student_fd": round(results[best]["fd"], 4),
        "fd_ratio": round(results[best]["fd"] / teacher50["fd"], 4),
        "acc_ratio": round(results[best]["prompt_accuracy"] / teacher50["prompt_accuracy"], 4),
    }
    with open(os.path.join(args.output_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(
            {
                "summary": summary,
                "runs": results,
                "train_seconds": train_seconds,
                "settings": asdict(base),
                "real_fd": reference,
            },
            f,
            indent=2,
        )

    if not args.no_docs:
        rows = ["| run | FD ↓ | prompt accuracy ↑ | coverage | images/s | train wall s |", "|---|---|---|---|---|---|"]
        for name, r in results.items():
            rows.append(
                f"| {name} | {r['fd']:.2f} | {r['prompt_accuracy']:.3f} | {r['coverage']:.2f} | "
                f"{r['images_per_s']:.1f} | {train_seconds.get(name, 0):.0f} |"
            )
        rows.append(f"| real train digits (floor) | {reference:.2f} | 1.000 | 1.00 | | |")
        extra = (
            f"Students' budget and settings: the demo's (`DemoSettings` in `diffusers_onestep/demo/__main__.py`) "
            f"unless the command overrides them. The bundled PixArt-α-family digits teacher (`diffusers_onestep/demo/assets/digits/`) against one-step students distilled by "
            f"`training/train_onestep.py`, each with the demo's budget ({base.max_train_steps} iterations, batch "
            f"{base.train_batch_size}, student timestep {base.student_timesteps}, teacher CFG "
            f"{base.guidance_scale}, critic:student {base.critic_updates_per_student}, GAN weight {base.gan_weight}, "
            f"learning rate {base.learning_rate} (LoRA) / {base.full_learning_rate} (full student), "
            f"student EMA {base.ema_decay}). "
            f"{10 * args.eval_per_digit} images per run, the same prompts and seeds for every row; the teacher's "
            f"multi-step rows use DDIM with guidance {base.teacher_guidance_scale}. Total wall time "
            f"{(time.perf_counter() - started) / 60:.0f} min on the 2-core CPU machine.\n\n"
            "![digits grid](images/digits_grid.png)\n\nGrid rows, top to bottom: "
            + ", ".join(results)
            + ".\n\n```json\n"
            + json.dumps(summary)
            + "\n```"
        )
        command = " ".join([".venv/bin/python benchmarks/digits.py", *(sys.argv[1:] if argv is None else argv)])
        update_docs("\n".join(rows), command, extra)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
