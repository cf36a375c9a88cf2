"""Community-pipeline entry point for diffusers (needs ``pip install diffusers-onestep``).

    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(
        "path/or/hub-id-of-a-student", custom_pipeline="pipelines/onestep.py", trust_remote_code=True
    )
    image = pipe("a photo of a cat").images[0]

diffusers picks the one ``DiffusionPipeline`` subclass this file exposes (diffusers' ``find_pipeline_class`` in
``utils/dynamic_modules_utils.py``); the implementation lives in the installed ``diffusers_onestep`` package, so this
file never goes stale.
"""

from diffusers_onestep import OneStepPipeline


__all__ = ["OneStepPipeline"]
