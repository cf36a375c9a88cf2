"""``diffusers-onestep``: the console command of the package (``[project.scripts]`` in ``pyproject.toml``).

    diffusers-onestep distill --teacher PixArt-alpha/PixArt-XL-2-512x512 --prompts prompts.txt --output_dir out
    diffusers-onestep generate out "a photo of a cat" --num_images 4 --out images
    diffusers-onestep demo --quick
    diffusers-onestep presets
    diffusers-onestep push out --repo_id me/pixart-onestep
    diffusers-onestep evaluate out --prompts captions.jsonl --reference coco-val-images
    diffusers-onestep serve out --port 7860

Each subcommand's ``--help`` is its manual. Bad input is refused with one sentence and a nonzero exit status: 2 for
arguments that are wrong before anything is loaded (as argparse does), 1 for a failure while running.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Callable, Dict, List, Optional, Sequence

from .errors import reason_of


PROG = "diffusers-onestep"

DESCRIPTION = """\
One-step text-to-image students for diffusers: distill a teacher, generate with a student, run the bundled digits
demo, list the supported public students, push a student to the Hub, serve a student as a live web page."""

EPILOG = """\
examples:
  diffusers-onestep distill --teacher PixArt-alpha/PixArt-XL-2-512x512 --prompts prompts.txt --output_dir out
  accelerate launch -m diffusers_onestep.distill ...   # the same training command on several processes / GPUs
  diffusers-onestep generate out "a photo of a cat" --num_images 4 --seed 0 --out images
  diffusers-onestep generate tianweiy/DMD2 "an astronaut riding a horse"
  diffusers-onestep demo --quick
  diffusers-onestep presets
  diffusers-onestep push out --repo_id me/pixart-onestep --private
  diffusers-onestep evaluate out --prompts captions.jsonl --caption_column caption --reference coco-val-images
  diffusers-onestep serve out --host 127.0.0.1 --port 7860

`diffusers-onestep SUBCOMMAND --help` prints the manual of a subcommand."""

DISTILL_HELP = "distill a teacher into a one-step student (the training script; --help lists every flag)"
DEMO_HELP = "distill the bundled digits teacher end to end, offline, from any directory (--quick: about a minute)"

GENERATE_EPILOG = """\
MODEL is anything OneStepPipeline.from_pretrained accepts: a student folder written by the training script or by
save_pretrained (full or LoRA), a supported public student's Hub id (see `diffusers-onestep presets`), or a
SDXL / PixArt / SANA / SANA-Sprint / SD 1.x-2.x pipeline run as a one-step model.

The student fixes its own timesteps: it was trained at a few conditioning timesteps (one for a one-step student)
and runs all of them by default. --steps N runs N of them, evenly spaced from the top (a 4-step student
[999, 749, 499, 249] at --steps 2 runs [999, 499]); N above the number it was trained at is refused.

examples:
  diffusers-onestep generate out "a photo of a cat" --num_images 4 --out images
  diffusers-onestep generate tianweiy/DMD2 "an astronaut riding a horse" --seed 3 --height 1024 --width 1024"""

PUSH_EPILOG = """\
FOLDER is a saved student: the training script's --output_dir (it holds the model card README.md) or a folder
written by OneStepPipeline.save_pretrained. Checkpoints, logs and validation images in it stay local. Log in first
with `hf auth login` (or pass --token). A LoRA student names its base model (onestep_lora.json); one trained from a
local teacher folder names that folder, so pushing it needs --base_model_id with the teacher's Hub id.

examples:
  diffusers-onestep push out --repo_id me/pixart-onestep --private
  diffusers-onestep push lora-out --repo_id me/pixart-lora --base_model_id PixArt-alpha/PixArt-XL-2-512x512"""

SERVE_EPILOG = """\
MODEL is anything OneStepPipeline.from_pretrained accepts (see `diffusers-onestep generate --help`). The page
regenerates as the prompt is typed; seed, steps (1-4, at most the student's own), size and the number of variations
are controls, and each answer shows the measured generation latency per image. Requests share one queue:
--concurrency generate at once, --max_queue wait, and a request past that is refused ("queue is full"). Needs the
serve extra: pip install "diffusers-onestep[serve]".

examples:
  diffusers-onestep serve out
  diffusers-onestep serve tianweiy/DMD2 --host 0.0.0.0 --port 8000 --max_batch 2"""


EVALUATE_EPILOG = """\
FID and KID follow clean-fid's protocol: its TorchScript Inception-V3 (inception-2015-12-05.pt, read from the cache
~/.cache/diffusers-onestep or --inception_path, downloaded once when online) and its 'clean' resize (uint8 images,
PIL bicubic to 299x299 in float32). --features digits uses the bundled digits classifier instead (the digits
benchmark's feature space). The CLIP score is torchmetrics' (100 cos, clipped at 0) with --clip_model.

Image i is generated from prompt i (the first --num_images captions of --prompts) with its own generator seeded
--seed + i and saved as OUTPUT_DIR/images/<i>.png as it is made: run a killed evaluation again with the same
settings and it continues where it stopped (other settings in the same --output_dir are refused).

Writes OUTPUT_DIR/metrics.json (the metrics and the full protocol) and OUTPUT_DIR/grid.png; `diffusers-onestep push`
puts them into the model card when OUTPUT_DIR is MODEL/evaluation (the default for a local MODEL).

examples:
  diffusers-onestep evaluate out --prompts coco-captions.jsonl --caption_column caption --reference coco-val2014 \\
      --num_images 5000 --batch_size 16
  diffusers-onestep evaluate demo-output/student --prompts digits-prompts.txt --reference digits-heldout \\
      --features digits --clip_model none --num_images 1000"""


class CommandError(Exception):
    """A failure to report as one sentence with ``status`` (1: while running, 2: bad arguments)."""

    def __init__(self, message: str, status: int = 1):
        super().__init__(message)
        self.status = status


# ------------------------------------------------------------------------------------------------------------------
# subcommands
# ------------------------------------------------------------------------------------------------------------------


def run_distill(argv: Sequence[str]) -> int:
    from .distill.cli import main as distill_main

    return distill_main(list(argv), prog="diffusers-onestep distill", launcher=True)


def run_demo(argv: Sequence[str]) -> int:
    from .demo.__main__ import main as demo_main

    return demo_main(list(argv), prog=f"{PROG} demo")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def nonnegative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def negative_prompt_kwargs(negative_prompt: Optional[str], negative_scale: Optional[float]) -> dict:
    """The pipeline's NASA arguments (``negative_prompt``, ``negative_scale``) of the commands' flags; nothing when
    no negative prompt is given (an empty one is none)."""
    if not negative_prompt:
        return {}
    kwargs = {"negative_prompt": negative_prompt}
    if negative_scale is not None:
        kwargs["negative_scale"] = negative_scale
    return kwargs


def run_generate(args: argparse.Namespace) -> int:
    import torch

    from . import OneStepPipeline

    if args.negative_scale is not None and not args.negative_prompt:
        raise CommandError(
            "--negative_scale weighs the negative prompt's attention (NASA) and needs --negative_prompt; pass one or "
            "remove --negative_scale.",
            status=2,
        )
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        pipe = OneStepPipeline.from_pretrained(args.model, **torch_dtype_kwargs(args.dtype))
    except (OSError, ValueError, KeyError) as error:
        raise CommandError(f"cannot load {args.model!r} as a one-step student: {reason_of(error)}") from None
    try:
        pipe.to(device)
    except (RuntimeError, AssertionError) as error:
        raise CommandError(f"cannot move the student to {device!r}: {reason_of(error)}", status=2) from None
    pipe.set_progress_bar_config(disable=True)
    try:
        timesteps = pipe.scheduler.select_timesteps(args.steps)
    except ValueError as error:
        raise CommandError(reason_of(error), status=2) from None
    os.makedirs(args.out, exist_ok=True)
    negative = negative_prompt_kwargs(args.negative_prompt, args.negative_scale)
    steering = ""
    if negative:
        from .pipelines.nasa import DEFAULT_NEGATIVE_SCALE

        steering = (
            f", away from {args.negative_prompt!r} (NASA λ {negative.get('negative_scale', DEFAULT_NEGATIVE_SCALE):g})"
        )
    print(
        f"{PROG} generate: {args.num_images} image(s) of {args.prompt!r}{steering} with {args.model} at "
        f"{len(timesteps)} step(s) (timesteps {[round(t, 2) for t in timesteps]}), seed {args.seed}, on {device}",
        flush=True,
    )
    generator = torch.Generator().manual_seed(args.seed)
    try:
        images = pipe(
            args.prompt,
            num_inference_steps=args.steps,
            num_images_per_prompt=args.num_images,
            height=args.height,
            width=args.width,
            generator=generator,
            **negative,
        ).images
    except ValueError as error:  # the pipeline's own input checks: one actionable sentence each
        raise CommandError(reason_of(error), status=2) from None
    for index, image in enumerate(images):
        path = os.path.join(args.out, f"seed{args.seed}_{index:03d}.png")
        image.save(path)
        print(f"wrote {path} ({image.width}x{image.height})", flush=True)
    return 0


def evaluation_output_dir(model: str, output_dir: Optional[str]) -> str:
    """``--output_dir``, else ``MODEL/evaluation`` for a local student (where ``push`` finds it), else
    ``evaluation-<name>`` in the working directory for a Hub id."""
    if output_dir:
        return output_dir
    if os.path.isdir(model):
        return os.path.join(model, "evaluation")
    return f"evaluation-{model.replace('/', '--')}"


def run_evaluate(args: argparse.Namespace) -> int:
    from . import evaluation
    from .distill.data import DataError, check_prompt_source

    # every check that needs no model first: bad input is refused before anything loads (exit status 2)
    if not os.path.isdir(args.model):
        from . import hub

        try:
            hub.check_repo_id(args.model)
        except ValueError as error:
            raise CommandError(str(error), status=2) from None
    try:
        check_prompt_source(args.prompts)
    except DataError as error:
        raise CommandError(str(error).replace("--prompts FILE_OR_DATASET", "--prompts"), status=2) from None
    if (args.reference.startswith((".", "/", "~")) or os.sep in args.reference) and not os.path.exists(args.reference):
        raise CommandError(f"The reference image source {args.reference} does not exist.", status=2)
    if args.num_images < 2:
        raise CommandError(f"--num_images must be at least 2 (FID needs two images), got {args.num_images}.", 2)
    if (
        args.clip_model != "none"
        and args.clip_model.startswith((".", "/", "~"))
        and not os.path.isdir(args.clip_model)
    ):
        raise CommandError(f"--clip_model {args.clip_model} is not a folder.", status=2)
    output_dir = evaluation_output_dir(args.model, args.output_dir)
    settings = evaluation.GenerationSettings(
        model=args.model,
        prompts=args.prompts,
        caption_column=args.caption_column,
        num_images=args.num_images,
        height=args.resolution,
        width=args.resolution,
        steps=args.steps,
        guidance=args.guidance,
        seed=args.seed,
    )
    try:
        done = evaluation.check_generation_folder(output_dir, settings)
        if args.features == "inception":
            evaluation.inception_path(args.inception_path)
        prompts = evaluation.load_captions(args.prompts, args.caption_column, args.num_images)
    except evaluation.EvaluationError as error:
        raise CommandError(str(error), status=2) from None
    return evaluate_command(args, output_dir, settings, prompts, done)


def evaluate_command(args, output_dir: str, settings, prompts: List[str], done: int) -> int:
    import torch

    from . import OneStepPipeline, evaluation
    from .storage import write_json

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    print(
        f"{PROG} evaluate: {settings.num_images} images of {args.model} from the first {settings.num_images} "
        f"captions of {args.prompts} (seed {settings.seed} + image index), on {device}; "
        f"{done} already in {output_dir}",
        flush=True,
    )
    if done < settings.num_images:
        try:
            pipe = OneStepPipeline.from_pretrained(args.model, **torch_dtype_kwargs(args.dtype))
        except (OSError, ValueError, KeyError) as error:
            raise CommandError(f"cannot load {args.model!r} as a one-step student: {reason_of(error)}") from None
        pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        try:
            timesteps = pipe.scheduler.select_timesteps(settings.steps)
            stats = evaluation.generate_images(pipe, prompts, output_dir, settings, batch_size=args.batch_size)
        except ValueError as error:  # the pipeline's own input checks (steps, size, guidance)
            raise CommandError(reason_of(error), status=2) from None
        timesteps = [round(float(t), 2) for t in timesteps]
        del pipe
    else:
        stats = evaluation.GenerationStats(0, done, 0.0, None, "none (every image was reused)")
        # the images were generated by an earlier run of the same settings: its record names the timesteps
        timesteps = ((evaluation.read_metrics(output_dir) or {}).get("protocol") or {}).get("timesteps")
    try:
        extractor = evaluation.feature_extractor(args.features, device=device, inception_path=args.inception_path)
        reference = evaluation.reference_features(extractor, args.reference, args.reference_column, args.num_reference)
        clip = None if args.clip_model == "none" else evaluation.CLIPScorer(args.clip_model, device=device)
        metrics = evaluation.evaluate_folder(output_dir, prompts, extractor, reference, clip)
    except evaluation.EvaluationError as error:
        raise CommandError(str(error)) from None
    first = next(evaluation.generated_arrays(output_dir, 1))
    grid_count = min(16, settings.num_images)
    evaluation.save_grid(
        list(evaluation.generated_arrays(output_dir, grid_count)), os.path.join(output_dir, evaluation.GRID_NAME)
    )
    metrics["images_per_s"] = stats.images_per_s
    metrics["peak_memory_gb"] = None if stats.peak_memory_bytes is None else stats.peak_memory_bytes / 2**30
    protocol = {
        "model": args.model,
        "dataset": args.prompts,
        "caption_column": args.caption_column,
        "num_images": settings.num_images,
        "resolution": [int(first.shape[0]), int(first.shape[1])],
        "steps": settings.steps,
        "timesteps": timesteps,
        "guidance": settings.guidance,
        "seed": settings.seed,
        "seeding": "image i from torch.Generator().manual_seed(seed + i)",
        "reference": args.reference,
        "reference_images": int(len(reference)),
        "features": extractor.protocol(),
        "kid": {
            "kernel": "(x.y/d + 1)^3",
            "subsets": evaluation.KID_SUBSETS,
            "subset_size": evaluation.KID_SUBSET_SIZE,
        },
        "clip": None if clip is None else clip.protocol(),
        "device": str(device),
        "peak_memory": stats.peak_memory_kind,
        "images_per_s": f"{stats.generated} images generated in this run (model loading excluded)",
    }
    record = {"metrics": metrics, "protocol": protocol, "grid": evaluation.GRID_NAME}
    write_json(os.path.join(output_dir, evaluation.METRICS_NAME), record)
    print(evaluation.protocol_text(protocol), flush=True)
    for name, value in metrics.items():
        print(f"  {name:<16}{'-' if value is None else f'{value:.6g}'}", flush=True)
    print(f"wrote {output_dir}/{evaluation.METRICS_NAME} and {output_dir}/{evaluation.GRID_NAME}", flush=True)
    return 0


def run_serve(args: argparse.Namespace) -> int:
    import importlib.util

    # checked before the model loads: a missing extra is a sentence, not a traceback after minutes of loading
    if importlib.util.find_spec("gradio") is None:
        raise CommandError('serve needs gradio: pip install "diffusers-onestep[serve]".', status=2)
    from .serve import ServeSettings, serve

    settings = ServeSettings(
        concurrency_limit=args.concurrency,
        max_queue=args.max_queue,
        max_batch=args.max_batch,
        default_prompt=args.prompt,
        default_negative_prompt=args.negative_prompt or "",
        default_negative_scale=args.negative_scale,
    )
    try:
        serve(args.model, host=args.host, port=args.port, device=args.device, settings=settings, dtype=args.dtype)
    except (OSError, ValueError, KeyError, RuntimeError) as error:  # loading, the device, a port in use
        raise CommandError(f"cannot serve {args.model!r}: {reason_of(error)}.") from None
    return 0


#: the weights' dtypes the model commands take (``--dtype``)
DTYPES = ("float32", "float16", "bfloat16")


def torch_dtype_kwargs(dtype: Optional[str]) -> dict:
    """``{"torch_dtype": torch.<dtype>}`` for ``from_pretrained``, or nothing (the saved dtype)."""
    if dtype is None:
        return {}
    import torch

    return {"torch_dtype": getattr(torch, dtype)}


def port_number(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a TCP port between 1 and 65535, got {text!r}") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a TCP port between 1 and 65535, got {text!r}")
    return value


def run_presets(args: argparse.Namespace) -> int:
    from .pipelines.presets import markdown_table

    print(markdown_table())
    return 0


def published_lora_files(folder: str, base_model_id: Optional[str]) -> Dict[str, bytes]:
    """What ``push`` uploads instead of a LoRA student's own config and card: nothing, unless ``--base_model_id``
    renames the base model. A LoRA student of a local teacher names the teacher's folder, which loads only on this
    machine: pushed as it is, it would load nowhere else, so it is refused."""
    import json

    from . import hub

    lora_config_name = "onestep_lora.json"
    path = os.path.join(folder, lora_config_name)
    if not os.path.isfile(path):
        if base_model_id is not None:
            raise CommandError(
                f"--base_model_id names the base model of a LoRA student, and {folder!r} is a full student; drop it.",
                status=2,
            )
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            base = json.load(f).get("base_model")
    except (OSError, ValueError) as error:
        raise CommandError(
            f"{path} cannot be read ({reason_of(error)}); export the student again.", status=2
        ) from None
    if base_model_id is not None:
        return hub.files_naming_base_model(folder, lora_config_name, base_model_id)
    if not isinstance(base, str) or not hub.is_hub_id(base):
        raise CommandError(
            f"{folder!r} is a LoRA student whose base model is the local folder {base}, which loads only on this "
            "machine; pass --base_model_id with the teacher's Hub id.",
            status=2,
        )
    return {}


def run_push(args: argparse.Namespace) -> int:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    from . import hub

    folder = args.folder
    if not os.path.isdir(folder):
        raise CommandError(f"{folder!r} is not a folder.", status=2)
    markers = ("model_index.json", "onestep_lora.json")
    if not any(os.path.isfile(os.path.join(folder, name)) for name in markers):
        raise CommandError(
            f"{folder!r} is not a saved student: it has neither model_index.json nor "
            "onestep_lora.json (save one with the training script or OneStepPipeline.save_pretrained).",
            status=2,
        )
    for flag, repo_id in (("--repo_id", args.repo_id), ("--base_model_id", args.base_model_id)):
        if repo_id is None:
            continue
        try:
            validate_repo_id(repo_id)
        except HFValidationError:
            raise CommandError(
                f"{flag} {repo_id!r} is not a valid Hub repo id (expected 'name' or 'org/name').", status=2
            ) from None
    replacements = published_lora_files(folder, args.base_model_id)
    evaluated = hub.card_with_evaluation(folder, replacements.get("README.md"), model_name=args.repo_id)
    if evaluated is not None:
        # the card gets the evaluation (model-index and its text); the folder's own README.md is left as it is
        replacements = {**replacements, "README.md": evaluated}
        print(f"{PROG} push: the card gets the evaluation of {folder}/evaluation/metrics.json", flush=True)
    if not os.path.isfile(os.path.join(folder, "README.md")):
        print(
            f"{PROG} push: {folder} has no model card (README.md); the training script writes one. Pushing the "
            "weights without it.",
            flush=True,
        )
    try:
        repo_id = hub.push_to_hub(
            folder, args.repo_id, private=args.private, token=args.token, replacements=replacements
        )
    except (OSError, ValueError) as error:  # huggingface_hub's HTTP errors are OSErrors
        raise CommandError(f"the upload to {args.repo_id!r} failed: {reason_of(error)}") from None
    print(f"pushed {folder} to https://huggingface.co/{repo_id}", flush=True)
    return 0


# ------------------------------------------------------------------------------------------------------------------
# parser
# ------------------------------------------------------------------------------------------------------------------

#: subcommands that hand their whole command line to a parser of their own (the training script, the demo)
FORWARDED: Dict[str, Callable[[Sequence[str]], int]] = {"distill": run_distill, "demo": run_demo}


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog=PROG, description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="SUBCOMMAND", required=True)

    # listed here for --help; main() hands their arguments to their own parsers
    commands.add_parser("distill", help=DISTILL_HELP, add_help=False)
    commands.add_parser("demo", help=DEMO_HELP, add_help=False)

    generate = commands.add_parser(
        "generate",
        help="generate images with a one-step student and write them as PNGs",
        description="Generate images with a one-step student (OneStepPipeline) and write them as PNG files.",
        epilog=GENERATE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    generate.add_argument("model", metavar="MODEL", help="student folder or Hub id (see below)")
    generate.add_argument("prompt", metavar="PROMPT", help="the text prompt (quote it)")
    generate.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        help="how many of the student's conditioning timesteps to run (default: all of them; "
        "a one-step student has one)",
    )
    generate.add_argument("--seed", type=int, default=0, help="seed of the initial noise (default: 0)")
    generate.add_argument("--num_images", type=positive_int, default=1, help="images to generate (default: 1)")
    generate.add_argument(
        "--height",
        type=positive_int,
        default=None,
        help="image height in pixels (default: the student's native resolution)",
    )
    generate.add_argument(
        "--width",
        type=positive_int,
        default=None,
        help="image width in pixels (default: the student's native resolution)",
    )
    generate.add_argument(
        "--negative_prompt",
        default=None,
        help="what to steer away from, by NASA (SNOOPI): every cross-attention layer subtracts the negative "
        "prompt's attention; SD3 and FLUX.1 (joint attention, our extension): the image tokens' attention to the "
        "negative prompt's text tokens, at the cost of a doubled denoiser batch (default: none)",
    )
    generate.add_argument(
        "--negative_scale",
        type=nonnegative_float,
        default=None,
        help="NASA's lambda >= 0, with --negative_prompt (default: 0.1, measured on the digits benchmark; "
        "docs/benchmarks.md)",
    )
    generate.add_argument(
        "--out",
        default="onestep-images",
        metavar="DIR",
        help="folder for the PNG files, created if missing (default: onestep-images)",
    )
    generate.add_argument(
        "--device", default=None, help="torch device, e.g. cpu or cuda:0 (default: cuda if available, else cpu)"
    )
    generate.add_argument(
        "--dtype",
        choices=DTYPES,
        default=None,
        help="weights' dtype, as from_pretrained's torch_dtype (default: as saved, float32 for most students; "
        "bfloat16 or float16 for the large ones on a GPU)",
    )
    generate.set_defaults(run=run_generate)

    presets = commands.add_parser(
        "presets",
        help="print the table of supported public one-step students",
        description="Print the supported public one-step students (Hub ids OneStepPipeline.from_pretrained resolves "
        "through a preset) as a Markdown table: weight variants, family, timesteps, prediction type, "
        "resolution and the model card's recipe.",
    )
    presets.set_defaults(run=run_presets)

    push = commands.add_parser(
        "push",
        help="push a saved student (with its model card) to the Hugging Face Hub",
        description="Create (or reuse) a Hub model repo and upload a saved student with its model card.",
        epilog=PUSH_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    push.add_argument("folder", metavar="FOLDER", help="the saved student folder")
    push.add_argument("--repo_id", required=True, help="the Hub repo to create or update, 'name' or 'org/name'")
    push.add_argument(
        "--private", action="store_true", help="create the repo as private (an existing repo keeps its visibility)"
    )
    push.add_argument(
        "--base_model_id",
        default=None,
        help="Hub id of the teacher of a LoRA student, uploaded as its base model (onestep_lora.json and the card's "
        "base_model) instead of the local teacher folder the student names; the folder itself is not changed",
    )
    push.add_argument("--token", default=None, help="Hub token (default: the one saved by `hf auth login`)")
    push.set_defaults(run=run_push)

    from .evaluation import DEFAULT_CLIP_MODEL, FEATURE_EXTRACTORS

    evaluate = commands.add_parser(
        "evaluate",
        help="FID / KID (clean-fid protocol), CLIP score, images/s and peak memory of a student",
        description="Generate images of a one-step student from captions and measure FID and KID against a "
        "reference image set (clean-fid's protocol), the CLIP score, images/s and peak memory.",
        epilog=EVALUATE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    evaluate.add_argument("model", metavar="MODEL", help="student folder or Hub id (as for generate)")
    evaluate.add_argument(
        "--prompts",
        required=True,
        metavar="SRC",
        help="captions: a datasets source (a Hub dataset id, a local folder, or a .txt/.jsonl/.json/.csv/.parquet "
        "file); the first --num_images are used",
    )
    evaluate.add_argument("--caption_column", default="text", help="column of the captions (default: text)")
    evaluate.add_argument(
        "--reference", required=True, metavar="SRC", help="reference images: an image folder or a Hub dataset id"
    )
    evaluate.add_argument("--reference_column", default="image", help="image column of --reference (default: image)")
    evaluate.add_argument(
        "--num_reference", type=positive_int, default=None, help="reference images used (default: all of them)"
    )
    evaluate.add_argument("--num_images", type=positive_int, default=5000, help="images to generate (default: 5000)")
    evaluate.add_argument(
        "--resolution", type=positive_int, default=None, help="image size (default: the student's native size)"
    )
    evaluate.add_argument(
        "--steps", type=positive_int, default=None, help="student timesteps to run (default: all, as generate)"
    )
    evaluate.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="guidance scale, only for students with embedded guidance (default: none)",
    )
    evaluate.add_argument("--seed", type=int, default=0, help="image i uses seed + i (default: 0)")
    evaluate.add_argument("--batch_size", type=positive_int, default=8, help="images per pipeline call (default: 8)")
    evaluate.add_argument(
        "--features",
        choices=FEATURE_EXTRACTORS,
        default="inception",
        help="feature space of FID/KID: inception (clean-fid) or digits (the bundled digits classifier)",
    )
    evaluate.add_argument(
        "--inception_path",
        default=None,
        help="clean-fid's inception-2015-12-05.pt (a file or its folder) (default: the cache, downloaded once)",
    )
    evaluate.add_argument(
        "--clip_model",
        default=DEFAULT_CLIP_MODEL,
        help=f"CLIP model (Hub id or folder) of the CLIP score, or none (default: {DEFAULT_CLIP_MODEL})",
    )
    evaluate.add_argument(
        "--output_dir",
        default=None,
        metavar="DIR",
        help="images, metrics.json and grid.png (default: MODEL/evaluation for a folder, else evaluation-<id>)",
    )
    evaluate.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    evaluate.add_argument(
        "--dtype",
        choices=DTYPES,
        default=None,
        help="weights' dtype, as from_pretrained's torch_dtype (default: as saved, float32 for most students; "
        "bfloat16 or float16 for the large ones on a GPU)",
    )
    evaluate.set_defaults(run=run_evaluate)

    serve = commands.add_parser(
        "serve",
        help="serve a one-step student as a live web page (Gradio): the image follows the prompt as you type",
        description="Serve a one-step student (OneStepPipeline) as a Gradio web page that regenerates as you type.",
        epilog=SERVE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument("model", metavar="MODEL", help="student folder or Hub id")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine)")
    serve.add_argument("--port", type=port_number, default=7860, help="TCP port (default: 7860)")
    serve.add_argument(
        "--device", default=None, help="torch device, e.g. cpu or cuda:0 (default: cuda if available, else cpu)"
    )
    serve.add_argument("--concurrency", type=positive_int, default=1, help="requests generating at once (default: 1)")
    serve.add_argument(
        "--max_queue",
        type=positive_int,
        default=16,
        help="requests waiting at most; one past that is refused (default: 16)",
    )
    serve.add_argument(
        "--max_batch", type=positive_int, default=4, help="the most variations one request may ask for (default: 4)"
    )
    serve.add_argument("--prompt", default="", help="the prompt the page opens with (default: none)")
    serve.add_argument(
        "--negative_prompt",
        default="",
        help="the negative prompt the page opens with (NASA) (default: none)",
    )
    serve.add_argument(
        "--negative_scale",
        type=nonnegative_float,
        default=None,
        help="the NASA lambda the page opens with (default: 0.1)",
    )
    serve.add_argument(
        "--dtype",
        choices=DTYPES,
        default=None,
        help="weights' dtype, as from_pretrained's torch_dtype (default: as saved, float32 for most students; "
        "bfloat16 or float16 for the large ones on a GPU)",
    )
    serve.set_defaults(run=run_serve)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in FORWARDED:
        return FORWARDED[argv[0]](argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except CommandError as error:
        print(f"{PROG} {args.command}: error: {error}", file=sys.stderr, flush=True)
        return error.status


if __name__ == "__main__":
    sys.exit(main())
