"""The ``dmd2_config`` block of ``model_index.json`` that serving engines read to run a distilled flow student.

vLLM-Omni's ``DMD2EulerScheduler`` (vllm-project/vllm-omni PR #2749 and #2974) ignores the caller's step count and
reads the student's sampling settings from a nested block of ``model_index.json``::

    "dmd2_config": {"num_inference_steps": 4, "denoising_timesteps": [999, 937, 833, 624],
                    "solver": "ode", "guidance_scale": 1.0}

``denoising_timesteps`` are the timesteps the denoiser is called at, in ``num_train_timesteps`` units, and the noise
level at each is ``sigma = t / num_train_timesteps`` (the published example's values are the shift-5 sigmas of
``[1, 0.75, 0.5, 0.25]`` times 1000: the shift is already applied). ``solver`` is ``"sde"`` for DMD2's re-noising
with fresh noise and ``"ode"`` for deterministic Euler steps; ``guidance_scale`` is the guidance the student runs
at (1 for students with guidance distilled in, the embedded scale for guidance-embedded ones).

The block describes flow-matching students only (the engines run them with a flow-matching Euler scheduler): VP and
TrigFlow students are written without it, and so are multi-step students whose schedule shifts with the resolution
(FLUX.1-dev's dynamic shifting), whose final timesteps depend on the image size. :class:`~diffusers_onestep.OneStepScheduler` stays the source of truth of
our own folders -- :meth:`OneStepPipeline.save_pretrained` writes the block from it -- and a folder that carries the
block next to a native flow scheduler (a student converted for a serving engine) loads with these settings.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional


#: the ``model_index.json`` key serving engines read
DMD2_CONFIG_KEY = "dmd2_config"


def _plain_number(value: float) -> float:
    """``1000.0`` as ``1000`` and ``749.99999`` as ``750`` (float32 noise), other values rounded to 6 digits."""
    rounded = round(float(value), 4)
    return int(rounded) if rounded == int(rounded) else round(float(value), 6)


def dmd2_config_for(scheduler, guidance_scale: float) -> Optional[Dict[str, Any]]:
    """The ``dmd2_config`` block of a student sampled by ``scheduler`` (a OneStepScheduler), ``None`` unless it is a
    flow-matching student (a flow path and the ``flow_prediction`` velocity)."""
    path = scheduler.path
    # the engines integrate the flow-matching velocity eps - x0: a student predicting anything else on a flow path
    # (InstaFlow's velocity toward the data, x0 - eps) would run with the wrong sign, so it gets no block
    if path.kind != "flow" or scheduler.config.prediction_type != "flow_prediction":
        return None
    sigmas = [float(t) for t in scheduler.config.conditioning_timesteps]
    if path.resolution_dependent and len(sigmas) > 1:
        # the block's timesteps are final (shift applied); a dynamically shifted schedule (FLUX.1-dev) has none that
        # hold at every resolution -- only the one-step schedule, sigma 1, which no shift moves
        return None
    return {
        "num_inference_steps": len(sigmas),
        "denoising_timesteps": [_plain_number(s * path.num_train_timesteps) for s in sigmas],
        "solver": scheduler.config.solver,
        "guidance_scale": float(guidance_scale),
    }


def read_dmd2_config(block: Any, source: str) -> Dict[str, Any]:
    """Check a ``dmd2_config`` block read from ``source`` and return it with ``num_inference_steps`` filled in; one
    sentence naming the bad field otherwise."""
    if not isinstance(block, dict):
        raise ValueError(f"{source}: `{DMD2_CONFIG_KEY}` in model_index.json must be an object, got {block!r}.")
    timesteps = block.get("denoising_timesteps")
    if (
        not isinstance(timesteps, list)
        or not timesteps
        or not all(isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) for t in timesteps)
    ):
        raise ValueError(
            f"{source}: `{DMD2_CONFIG_KEY}.denoising_timesteps` must be a non-empty list of numbers, "
            f"got {timesteps!r}."
        )
    steps = block.get("num_inference_steps", len(timesteps))
    if steps != len(timesteps):
        raise ValueError(
            f"{source}: `{DMD2_CONFIG_KEY}` says num_inference_steps={steps} but lists "
            f"{len(timesteps)} denoising_timesteps {timesteps}."
        )
    solver = block.get("solver", "sde")
    if solver not in ("sde", "ode"):
        raise ValueError(f"{source}: `{DMD2_CONFIG_KEY}.solver` must be 'sde' or 'ode', got {solver!r}.")
    guidance = block.get("guidance_scale", 1.0)
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or guidance < 0:
        raise ValueError(
            f"{source}: `{DMD2_CONFIG_KEY}.guidance_scale` must be a non-negative number, got {guidance!r}."
        )
    return {
        "num_inference_steps": steps,
        "denoising_timesteps": list(timesteps),
        "solver": solver,
        "guidance_scale": float(guidance),
    }


def conditioning_sigmas(block: Dict[str, Any], num_train_timesteps: int) -> List[float]:
    """The flow sigmas (OneStepScheduler's ``conditioning_timesteps``) of a checked block."""
    return [float(t) / num_train_timesteps for t in block["denoising_timesteps"]]
