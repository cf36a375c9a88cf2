from .pipeline_onestep import OneStepPipeline
from .presets import PRESETS, Preset, find_preset


__all__ = ["OneStepPipeline", "PRESETS", "Preset", "find_preset"]
