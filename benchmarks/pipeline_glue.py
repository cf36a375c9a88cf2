"""Where OneStepPipeline's own time goes inside a call, stage by stage (a diagnostic printed per family, no target).

Each stage the pipeline runs is wrapped with a timer (``torch.cuda.synchronize()`` on entering and leaving it on a
GPU): input checks, the execution-device lookup (``_compute_device``, diffusers' ``_execution_device``), prompt
encoding, the scheduler's ``set_timesteps`` and ``step``, the initial noise, the denoiser call, decoding,
post-processing and the hook reset; the text encoders', denoiser's and VAE's own forwards are timed too, so that ``*_glue`` = a stage minus
the forwards inside it (``encode_glue`` includes the tokenizers). ``modules`` is the number of submodules of the
pipeline's models (diffusers' device and dtype lookups walk them). Times in ms, median of ``--calls`` calls.

    HF_HUB_OFFLINE=1 python benchmarks/pipeline_glue.py --device cuda          # real-size architectures
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/pipeline_glue.py --device cpu --tiny

Output of the H200 run quoted in docs/benchmarks.md: ``benchmarks/results/real_size/h200_glue_sections.txt`` (written by
the first form of this script, whose keys were ``te_fwd``, ``den_fwd`` and ``TOTAL`` for ``text_encoder_forwards``,
``denoiser_forward`` and ``call``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time


os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from diffusers.utils import logging as diffusers_logging  # noqa: E402
from real_size_overhead import DTYPES, build_components  # noqa: E402

import diffusers_onestep.pipelines.pipeline_onestep as pipeline_module  # noqa: E402
from diffusers_onestep import OneStepPipeline  # noqa: E402
from diffusers_onestep.pipelines.loading import scheduler_for  # noqa: E402
from diffusers_onestep.testing import TINY_FAMILIES, TINY_PROMPTS, tiny_fixture  # noqa: E402


PIPELINE_COMPONENTS = ("vae", "unet", "transformer", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")


def measure(family: str, args, device: torch.device, dtype: torch.dtype) -> dict:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    components = build_components(family, args.tiny, device, dtype)
    pipe = OneStepPipeline(
        scheduler=scheduler_for(
            family, dict(components["scheduler"].config), tiny_fixture(family).parity_timesteps, None
        ),
        family=family,
        **{k: v for k, v in components.items() if k in PIPELINE_COMPONENTS},
    )
    pipe.set_progress_bar_config(disable=True)
    totals: dict = {}

    def wrap(owner, name, label=None):
        original, label = getattr(owner, name), label or name

        def timed(*a, **k):
            sync()
            start = time.perf_counter()
            try:
                return original(*a, **k)
            finally:
                sync()
                totals[label] = totals.get(label, 0.0) + time.perf_counter() - start

        setattr(owner, name, timed)

    for name in ("check_inputs", "_compute_device", "maybe_free_model_hooks"):
        wrap(pipe, name)
    adapter = pipe.adapter
    for name in ("encode_prompt", "denoise", "decode"):
        wrap(adapter, name)
    wrap(pipe.scheduler, "set_timesteps")
    wrap(pipe.scheduler, "step")
    wrap(pipeline_module, "randn_tensor")
    wrap(pipe.image_processor, "postprocess")
    wrap(pipe.vae, "decode", "vae.decode")
    for name in ("text_encoder", "text_encoder_2"):
        if getattr(pipe, name, None) is not None:
            wrap(getattr(pipe, name), "forward", "text_encoder_forwards")
    wrap(pipe.denoiser, "forward", "denoiser_forward")

    def run():
        return pipe(TINY_PROMPTS[0], generator=torch.Generator().manual_seed(0), output_type="np")

    for _ in range(args.warmup):
        run()
    rows = []
    for _ in range(args.calls):
        totals.clear()
        sync()
        start = time.perf_counter()
        run()
        sync()
        totals["call"] = time.perf_counter() - start
        rows.append(dict(totals))
    result = {k: 1e3 * statistics.median(r.get(k, 0.0) for r in rows) for k in rows[0]}
    result["encode_glue"] = result["encode_prompt"] - result["text_encoder_forwards"]
    result["denoise_glue"] = result["denoise"] - result["denoiser_forward"]
    result["decode_glue"] = result["decode"] - result["vae.decode"]
    models = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
    result["modules"] = sum(1 for m in models for _ in m.modules())
    return {k: round(v, 3) for k, v in result.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--families", nargs="+", default=["sdxl", "pixart_alpha", "sana", "sana_sprint"], choices=TINY_FAMILIES
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bf16 on a GPU, fp32 on a CPU")
    parser.add_argument("--calls", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="the tiny components of diffusers_onestep.testing")
    args = parser.parse_args(argv)
    diffusers_logging.set_verbosity_error()
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    for family in args.families:
        print(family, json.dumps(measure(family, args, device, dtype)), flush=True)
        gc.collect()  # the family's models went with measure's frame: free their memory before the next
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
