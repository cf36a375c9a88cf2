"""``--eval_steps``: the student evaluated during training on held-out prompts, and ``--keep_best``.

The evaluation is :mod:`diffusers_onestep.evaluation`'s (the same Fréchet distance, KID, feature extractors and CLIP
score as ``diffusers-onestep evaluate``): the student (its EMA when ``--ema_decay`` is set, as exported) renders the
first ``--eval_num_images`` prompts of ``--eval_prompts``, prompt ``i`` from a generator seeded ``seed + i``; the
reference features of ``--eval_reference`` are computed once. It runs on the main process only.
"""

from __future__ import annotations

import os
import platform
import time
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from .. import evaluation
from ..storage import write_json
from .config import ConfigError, TrainConfig


#: names the best checkpoint of ``--keep_best`` (also recorded in every later checkpoint's ``trainer_state.json``)
BEST_CHECKPOINT_NAME = "best_checkpoint.json"


def check_evaluation_inputs(config: TrainConfig) -> None:
    """What can be checked before anything loads: the prompt source and the Inception weights (offline)."""
    out = config.output
    if out.eval_steps is None:
        return
    from .data import DataError, check_prompt_source

    try:
        check_prompt_source(out.eval_prompts)
        if out.eval_features == "inception":
            evaluation.inception_path(out.eval_inception_path)
    except (DataError, evaluation.EvaluationError) as error:
        message = str(error).replace("--inception_path", "--eval_inception_path")
        raise ConfigError(f"--eval_steps: {message}") from None


class TrainingEvaluator:
    """Set up once (prompts, their conditions, the feature extractor, the reference features, the CLIP model); each
    :meth:`__call__` renders the student and returns its metrics."""

    def __init__(self, config: TrainConfig, adapter, device, seed: int):
        out = config.output
        self.config = config
        self.seed = seed
        try:
            self.prompts = evaluation.load_captions(out.eval_prompts, out.eval_prompt_column, out.eval_num_images)
            self.extractor = evaluation.feature_extractor(
                out.eval_features, device=device, inception_path=out.eval_inception_path
            )
            self.reference = evaluation.reference_features(self.extractor, out.eval_reference, progress=False)
            self.clip = (
                evaluation.CLIPScorer(out.eval_clip_model, device=device, cache_dir=config.cache_dir)
                if out.eval_clip_model
                else None
            )
        except evaluation.EvaluationError as error:
            raise ConfigError(f"--eval_steps: {error}") from None
        self.conditions = [
            adapter.encode_prompt(self.prompts[i : i + 16], device=device) for i in range(0, len(self.prompts), 16)
        ]
        self.metric = self.extractor.metric
        #: the images of the latest evaluation (uint8), for its grid
        self.arrays: List[np.ndarray] = []

    def __call__(self, renderer, step: int) -> Dict[str, float]:
        arrays: List[np.ndarray] = []
        for conditions in self.conditions:
            # one generator per image (seed + index), as `diffusers-onestep evaluate`
            seeds = [self.seed + len(arrays) + offset for offset in range(conditions.batch_size)]
            images = renderer.sample(conditions, seed=seeds)
            arrays += list((images * 255).round().clip(0, 255).astype(np.uint8))
        generated = self.extractor.features_of_arrays(arrays)
        metrics = evaluation.feature_metrics(self.extractor, generated, self.reference)
        if self.clip is not None:
            scores = [self.clip(arrays[i : i + 16], self.prompts[i : i + 16]) for i in range(0, len(arrays), 16)]
            metrics["clip_score"] = float(np.concatenate(scores).mean())
        self.arrays = arrays
        return metrics

    def protocol(self, renderer, step: int) -> Dict[str, Any]:
        out = self.config.output
        return {
            "model": f"the student at step {step}" + (" (EMA weights)" if self.config.optim.ema_decay else ""),
            "step": step,
            "dataset": out.eval_prompts,
            "caption_column": out.eval_prompt_column,
            "num_images": len(self.prompts),
            "resolution": [renderer.resolution, renderer.resolution],
            "steps": len(renderer.student_timesteps),
            "timesteps": list(renderer.student_timesteps),
            "guidance": None,
            "seed": self.seed,
            "seeding": "image i from torch.Generator().manual_seed(seed + i)",
            "reference": out.eval_reference,
            "reference_images": int(len(self.reference)),
            "features": self.extractor.protocol(),
            "kid": {
                "kernel": "(x.y/d + 1)^3",
                "subsets": evaluation.KID_SUBSETS,
                "subset_size": evaluation.KID_SUBSET_SIZE,
            },
            "clip": None if self.clip is None else self.clip.protocol(),
            "device": str(renderer.roles.device) if hasattr(renderer.roles, "device") else "training device",
            "peak_memory": "see the training cost",
        }

    def write(self, output_dir: str, renderer, step: int, metrics: Dict[str, float]) -> str:
        """``output_dir/evaluation/metrics.json`` (the latest evaluation, in ``evaluate``'s format) and its grid."""
        folder = os.path.join(output_dir, evaluation_dir_name())
        os.makedirs(folder, exist_ok=True)
        grid = None
        if self.arrays:
            grid = evaluation.GRID_NAME
            evaluation.save_grid(self.arrays[:16], os.path.join(folder, grid))
        record = {"metrics": metrics, "protocol": self.protocol(renderer, step), "grid": grid}
        write_json(os.path.join(folder, evaluation.METRICS_NAME), record)
        return folder


def evaluation_dir_name() -> str:
    from ..hub import EVALUATION_DIR

    return EVALUATION_DIR


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


class CostMeter:
    """The training cost the card states: wall time summed over the run's sessions (a resumed run adds to what its
    checkpoint recorded), the device and the peak memory (the largest of every session's)."""

    def __init__(self, device: torch.device, num_processes: int):
        self.device = device
        self.num_processes = num_processes
        self.started = time.perf_counter()
        self.previous: Optional[Dict[str, Any]] = None

    def resume_from(self, recorded: Optional[Dict[str, Any]]) -> None:
        self.previous = recorded

    def current(self) -> Dict[str, Any]:
        previous = self.previous or {}
        memory, kind = evaluation.peak_memory(self.device)
        earlier_memory = previous.get("peak_memory_bytes")
        return {
            "wall_seconds": float(previous.get("wall_seconds", 0.0)) + time.perf_counter() - self.started,
            "sessions": int(previous.get("sessions", 0)) + 1,
            "device": device_name(self.device),
            "num_processes": self.num_processes,
            "peak_memory_bytes": max(memory, int(earlier_memory)) if earlier_memory else memory,
            "peak_memory_kind": kind + (", per process" if self.num_processes > 1 else ""),
        }
