"""diffusers-onestep: one-step text-to-image generation and distillation for diffusers.

``SchedulerMixin``, ``ModelMixin`` and ``ConfigMixin`` are re-exported at top level on purpose: a saved folder whose
``model_index.json`` names ``["diffusers_onestep", "OneStepScheduler"]`` is loaded by diffusers, which looks up those
base classes in this module to find the loading method (diffusers' ``get_class_obj_and_candidates`` in
``pipelines/pipeline_loading_utils.py`` does a ``getattr`` of each importable base-class name on the library).
"""

from diffusers import ConfigMixin, ModelMixin, SchedulerMixin

from .families import Condition, FamilyAdapter, adapter_for_pipeline, detect_family
from .pipelines import OneStepPipeline
from .schedulers import OneStepScheduler, OneStepSchedulerOutput


__version__ = "0.1.0.dev0"

__all__ = [
    "Condition",
    "ConfigMixin",
    "FamilyAdapter",
    "ModelMixin",
    "OneStepPipeline",
    "OneStepScheduler",
    "OneStepSchedulerOutput",
    "SchedulerMixin",
    "adapter_for_pipeline",
    "detect_family",
]
