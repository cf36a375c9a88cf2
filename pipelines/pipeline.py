"""The same entry point under the file name diffusers looks for when ``custom_pipeline`` is a folder or a Hub repo
(``custom_pipeline="path/to/pipelines"`` reads ``pipelines/pipeline.py``); see ``onestep.py``."""

from diffusers_onestep import OneStepPipeline


__all__ = ["OneStepPipeline"]
