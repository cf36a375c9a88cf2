"""The student out of a run: samples through the real :class:`OneStepPipeline`, validation grids, and the exported
folder (a full pipeline, or a LoRA with its scheduler and base reference) with a sample grid and a model card.

The folder loads with ``OneStepPipeline.from_pretrained``. With ``--ema_decay`` the exported weights are the EMA:
:func:`ema_weights` swaps it into the live student and restores the trained weights however the export ends.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .. import storage
from ..families import Condition
from ..lora import LORA_WEIGHT_NAME, lora_metadata
from ..schedulers import OneStepScheduler
from . import sharding
from .checkpoint import CONFIG_NAME
from .config import TrainConfig


#: written last into a LoRA student's folder (it names the base model)
LORA_CONFIG_NAME = "onestep_lora.json"
SAMPLE_GRID_NAME = "samples.png"


class StudentRenderer:
    """The student as a :class:`OneStepPipeline` over the teacher's VAE and text encoders.

    Args:
        roles: the run's :class:`~.roles.BackboneRoles` (the student's weights and prediction type).
        adapter: the teacher's family adapter.
        components: the teacher pipeline's components (VAE and text encoders are shared with the student).
        family: the family name the exported pipeline records.
        student_timesteps: the student's conditioning timesteps (carried by its scheduler).
        resolution: the image size of samples.
        max_sequence_length: the prompt length of the text encoders.
        solver: how the student's scheduler moves between its timesteps (the method's ``sampler_solver``).
    """

    def __init__(
        self,
        roles,
        adapter,
        components: Dict,
        family: str,
        student_timesteps: Sequence[float],
        resolution: int,
        max_sequence_length: Optional[int] = None,
        solver: str = "sde",
    ):
        self.roles = roles
        self.solver = solver
        self.adapter = adapter
        self.components = components
        self.family = family
        self.student_timesteps = list(student_timesteps)
        self.resolution = resolution
        self.max_sequence_length = max_sequence_length

    def scheduler(self) -> OneStepScheduler:
        return OneStepScheduler.from_noise_path(
            self.adapter.noise_path, self.student_timesteps, self.roles.student_prediction_type, solver=self.solver
        )

    def pipeline(self, denoiser):
        from ..pipelines import OneStepPipeline

        kwargs = {n: self.components.get(n) for n in self.adapter.text_component_names}
        kwargs[self.adapter.denoiser_name] = denoiser
        pipe = OneStepPipeline(
            vae=self.components["vae"],
            scheduler=self.scheduler(),
            family=self.family,
            max_sequence_length=self.max_sequence_length,
            **kwargs,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @torch.no_grad()
    def sample(self, conditions: Condition, seed: Union[int, Sequence[int]] = 0, denoiser=None) -> np.ndarray:
        """Student images ``[N, H, W, 3]`` in [0, 1]; ``denoiser=None`` runs the live student. ``seed``: one seed
        for the batch, or one per image (``--eval_steps``: image ``i`` from ``seed + i``)."""
        if denoiser is None:
            self.roles.activate("student")
            denoiser = self.roles._module_of("student")
        return self.pipeline(denoiser)(
            prompt_embeds=conditions.embeds,
            prompt_attention_mask=conditions.mask,
            pooled_prompt_embeds=conditions.pooled,
            height=self.resolution,
            width=self.resolution,
            generator=(
                torch.Generator().manual_seed(seed)
                if isinstance(seed, int)
                else [torch.Generator().manual_seed(int(s)) for s in seed]
            ),
            output_type="np",
        ).images


@contextlib.contextmanager
def ema_weights(roles, ema: Optional[Dict[str, torch.Tensor]]):
    """Inside the block the student holds its EMA weights; the trained weights come back even on an exception."""
    if ema is None:
        yield
        return
    # Under FSDP the parameters are shards and the EMA holds this process's shard of each: swap shard for shard.
    parameters = {name: sharding.local(p) for name, p in roles.named_role_parameters("student")}
    backup = {name: parameter.detach().clone() for name, parameter in parameters.items()}
    try:
        with torch.no_grad():
            for name, parameter in parameters.items():
                parameter.copy_(ema[name])
        yield
    finally:
        with torch.no_grad():
            for name, parameter in parameters.items():
                parameter.copy_(backup[name])


def export_student(
    renderer: StudentRenderer,
    config: TrainConfig,
    conditions: Condition,
    prompts: Sequence[str],
    ema: Optional[Dict[str, torch.Tensor]] = None,
    repo_id: Optional[str] = None,
    training_cost: Optional[Dict] = None,
    is_main_process: bool = True,
) -> str:
    """Write the student into ``config.output.output_dir`` (call on the main process; with FSDP-sharded roles on
    every process, ``is_main_process`` telling which one writes); returns the folder. The card's loading snippet names
    ``repo_id`` (the Hub repo it is pushed to) when given.

    Everything is written into a staging folder first and moved in with the commit file (``model_index.json`` or
    ``onestep_lora.json``) last, so a crash never leaves a folder that looks loadable but is not.
    """
    from .. import hub
    from .methods import get_method_class

    output_dir = config.output.output_dir
    roles = renderer.roles
    lora = config.roles.student == "lora"
    sharded = getattr(roles, "sharded", False)
    if sharded:
        roles.reshard()  # the EMA swap below works shard by shard
    staging = storage.staging_path(os.path.join(output_dir, "export")) if is_main_process else None
    if is_main_process:
        os.makedirs(staging)
    with ema_weights(roles, ema):
        # Sharded roles: gathering the student's full weights is a collective (every process), and so is sampling
        # the live (sharded) LoRA student; the full student is sampled from its gathered copy on the main process.
        if lora:
            lora_state = roles.student_lora_state_dict()
            if is_main_process:
                _save_lora_student(staging, renderer, config, lora_state)
            commit, denoiser = LORA_CONFIG_NAME, None
        else:
            denoiser = roles.student_denoiser()
            if is_main_process:
                _save_full_student(staging, renderer.pipeline(denoiser))
            commit = "model_index.json"
        if is_main_process or (sharded and lora):
            images = renderer.sample(conditions, seed=config.optim.seed, denoiser=denoiser)
    if not is_main_process:
        return output_dir
    image_grid(images).save(os.path.join(staging, SAMPLE_GRID_NAME))
    config.save(os.path.join(staging, CONFIG_NAME))
    hub.write_model_card(
        staging,
        config,
        family=renderer.family,
        student_timesteps=renderer.student_timesteps,
        sample_grid=SAMPLE_GRID_NAME,
        prompts=list(prompts),
        lora=lora,
        repo_id=repo_id,
        method=get_method_class(config.method.method),
        training_cost=training_cost,
        evaluation=run_evaluation(config, output_dir),
    )
    storage.publish_entries(staging, output_dir, commit_file=commit)
    return output_dir


def run_evaluation(config: TrainConfig, output_dir: str) -> Optional[Dict]:
    """The evaluation of this run's final step (``--eval_steps``) for the card; an ``evaluation/metrics.json`` that
    this run did not write at its last step (an older run's, or ``evaluate``'s of an older student) is left out."""
    from .. import hub

    if config.output.eval_steps is None:
        return None
    record = hub.read_evaluation(output_dir)
    if record is None or (record.get("protocol") or {}).get("step") != config.optim.max_train_steps:
        return None
    return record


def _save_full_student(staging: str, pipe) -> None:
    # save_pretrained wants an empty folder of its own; its entries are then moved up beside the card.
    folder = os.path.join(staging, "pipeline")
    pipe.save_pretrained(folder)
    for name in os.listdir(folder):
        os.replace(os.path.join(folder, name), os.path.join(staging, name))
    os.rmdir(folder)


def _save_lora_student(
    staging: str, renderer: StudentRenderer, config: TrainConfig, lora_state: Dict[str, torch.Tensor]
) -> None:
    import diffusers

    roles, adapter = renderer.roles, renderer.adapter
    saver = getattr(diffusers, adapter.lora_pipeline_class_name)
    saver.save_lora_weights(
        staging,
        **adapter.lora_save_kwargs(lora_state, lora_metadata(roles.lora_config("student"))),
        weight_name=LORA_WEIGHT_NAME,
        safe_serialization=True,
    )
    renderer.scheduler().save_pretrained(os.path.join(staging, "scheduler"))
    base_model, base_revision = student_base(config)
    storage.write_json(
        os.path.join(staging, LORA_CONFIG_NAME),
        {
            "base_model": base_model,
            "family": renderer.family,
            "weight_name": LORA_WEIGHT_NAME,
            "lora_scale": 1.0,
            "base_revision": base_revision,
        },
    )


def write_validation(images: np.ndarray, prompts: Sequence[str], folder: str, step: int, trackers=()) -> None:
    """Save the grid as ``<folder>/step-<step>.png`` and log the images to tensorboard / wandb trackers."""
    os.makedirs(folder, exist_ok=True)
    image_grid(images).save(os.path.join(folder, f"step-{step:06d}.png"))
    for tracker in trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images("validation", images, step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": [wandb.Image(img, caption=p) for img, p in zip(images, prompts)]}, step=step)


def student_base(config: TrainConfig) -> Tuple[str, Optional[str]]:
    """``(base model, revision)`` a LoRA student records: ``--base_model_id`` when given (pinned to ``--revision``
    only when it is the teacher's own id), else the teacher (:func:`teacher_reference`) at ``--revision``."""
    base_model_id = config.output.base_model_id
    if base_model_id is None:
        return teacher_reference(config.teacher), config.revision
    return base_model_id, config.revision if base_model_id == config.teacher else None


def teacher_reference(teacher: str) -> str:
    """A Hub id as given, a local folder as an absolute path (so the LoRA config resolves from anywhere)."""
    return os.path.abspath(teacher) if os.path.isdir(teacher) else teacher


def image_grid(images: np.ndarray, columns: Optional[int] = None):
    """A PIL grid of ``[N, H, W, 3]`` images in [0, 1], ``columns`` wide (at most 8 by default)."""
    from PIL import Image

    images = (np.clip(images, 0, 1) * 255).round().astype(np.uint8)
    n, h, w = images.shape[:3]
    columns = columns or min(n, 8)
    rows = math.ceil(n / columns)
    grid = Image.new("RGB", (columns * w, rows * h))
    for i, image in enumerate(images):
        grid.paste(Image.fromarray(image), ((i % columns) * w, (i // columns) * h))
    return grid
