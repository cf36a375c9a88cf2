"""The accelerate training loop of a one-step distillation run.

``Trainer(config).run()`` loads the teacher through its family adapter, builds the roles (shared LoRA backbone or
separate copies), the method (VSD or f-distill) and one AdamW per trainable role, then runs the two-time-scale
schedule of DMD2 §4.3: every iteration updates the critic (and discriminator head); every
``critic_updates_per_student``-th iteration first updates the student. It checkpoints the complete state in
safetensors/JSON (weights, optimizers, LR schedulers, EMA, ratio-normalizer bins, RNG states, step), resumes from it
exactly, validates with the real :class:`OneStepPipeline` code path, and exports a folder that
``OneStepPipeline.from_pretrained`` loads.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import shutil
import signal
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from .. import storage
from ..families import Condition, get_adapter_class
from ..lora import LORA_WEIGHT_NAME, lora_metadata
from ..schedulers import OneStepScheduler
from .config import ConfigError, TrainConfig, config_differences
from .resolve import ResolvedConfig, resolve
from .data import DataError, PromptSource, batch_indices, load_prompts, load_real_images
from .methods import build_method
from .models import Batch, RandomSource
from .roles import BackboneRoles

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
CONFIG_NAME = "training_config.json"
TRAINER_STATE_NAME = "trainer_state.json"
#: the file whose presence marks a complete checkpoint
CHECKPOINT_COMMIT_FILE = TRAINER_STATE_NAME
#: fault-injection variable of the crash-safety tests (see ``Trainer._fault``)
FAULT_ENV = "DIFFUSERS_ONESTEP_FAULT"


class NonFiniteError(RuntimeError):
    """A loss or gradient became NaN/inf; the message names the step and the term."""


class TrainingInterrupted(RuntimeError):
    """SIGINT/SIGTERM arrived; a checkpoint of the current step was saved (unless disabled)."""


# ----------------------------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------------------------


def list_checkpoints(output_dir: str) -> List[Tuple[int, str]]:
    """Complete checkpoints (``checkpoint-N`` with their commit file), sorted by step."""
    if not os.path.isdir(output_dir):
        return []
    out = []
    for name in os.listdir(output_dir):
        match = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", name)
        path = os.path.join(output_dir, name)
        if match and os.path.isfile(os.path.join(path, CHECKPOINT_COMMIT_FILE)):
            out.append((int(match.group(1)), path))
    return sorted(out)


def resolve_resume_path(resume: Optional[str], output_dir: str) -> Optional[str]:
    """The checkpoint folder to resume from (``latest`` -> newest complete one, or ``None`` for a fresh run)."""
    if not resume:
        return None
    if resume == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1][1] if checkpoints else None
    if not os.path.isfile(os.path.join(resume, CHECKPOINT_COMMIT_FILE)):
        raise ConfigError(
            f"--resume_from_checkpoint {resume} is not a complete checkpoint folder (it has no {CHECKPOINT_COMMIT_FILE}); "
            f"pass 'latest' or a {CHECKPOINT_PREFIX}N folder written by this script."
        )
    return resume


#: config keys that may change between a checkpoint and its resumption
RESUMABLE_CHANGES = ("optim.max_train_steps", "output.", "data.dataloader_num_workers", "optim.on_nonfinite",
                     "optim.max_nonfinite_skips")


def check_resume_config(checkpoint: str, config: TrainConfig) -> None:
    """Refuse to resume with settings that change what is trained; the message lists the differences."""
    saved_path = os.path.join(checkpoint, CONFIG_NAME)
    if not os.path.isfile(saved_path):
        return
    saved = TrainConfig.load(saved_path).to_dict()
    differences = [d for d in config_differences(saved, config.to_dict())
                   if not d.split(":")[0].startswith(RESUMABLE_CHANGES)]
    if differences:
        raise ConfigError(
            f"The run conflicts with the configuration of {checkpoint} ({'; '.join(differences)}); resume with "
            "the same settings, or start a new --output_dir."
        )


def _optimizer_to_tensors(state: Dict[str, Any]) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Split an optimizer state_dict into tensors (safetensors) and plain values (JSON)."""
    tensors, plain_state = {}, {}
    for index, entry in state["state"].items():
        plain_state[str(index)] = {}
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value
            else:
                plain_state[str(index)][key] = value
    return tensors, {"state": plain_state, "param_groups": state["param_groups"]}


def _optimizer_from_tensors(tensors: Dict[str, torch.Tensor], plain: Dict[str, Any]) -> Dict[str, Any]:
    state: Dict[int, Dict[str, Any]] = {int(i): dict(v) for i, v in plain["state"].items()}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": plain["param_groups"]}


def _scheduler_state(scheduler) -> Dict[str, Any]:
    state = dict(scheduler.state_dict())
    state.pop("lr_lambdas", None)  # functions; rebuilt from the config
    return state


@dataclass
class TrainingResult:
    output_dir: str
    global_step: int
    logs: Dict[str, float]


class Trainer:
    """One distillation run (see the module docstring).

    Args:
        config: a validated :class:`TrainConfig`.
        hooks: optional callables ``hook(event, trainer, **info)`` called at named points (``"after_step"``,
            ``"checkpoint_written"``, ``"before_checkpoint_commit"``, ``"loss"``); the test suite uses them to inject
            faults. ``"loss"`` hooks may return a replacement loss.
    """

    def __init__(self, config, hooks: Optional[List[Callable]] = None):
        #: the run's settings with every family and method default filled in (a TrainConfig is resolved here, as
        #: the CLI resolves it, so the Python API and the CLI train the same thing)
        self.resolved: ResolvedConfig = config if isinstance(config, ResolvedConfig) else resolve(config)
        self.config: TrainConfig = self.resolved.config
        self.hooks = list(hooks or [])
        self.global_step = 0
        self.nonfinite_skips = 0
        self._interrupt_signal: Optional[int] = None

    # ------------------------------------------------------------------------------------------------------------
    # hooks and signals
    # ------------------------------------------------------------------------------------------------------------

    def _hook(self, event: str, **info):
        result = None
        for hook in self.hooks:
            out = hook(event, self, **info)
            if out is not None:
                result = out
        fault = self._fault(event, info)
        return fault if fault is not None else result

    def _fault(self, event: str, info: Dict[str, Any]):
        """Fault injection for the crash-safety tests, from ``DIFFUSERS_ONESTEP_FAULT="event@step[:action],..."``.

        ``pause`` (the default) writes ``<output_dir>/.fault-<event>-<step>`` and waits until the process is killed
        or interrupted; ``nan`` replaces the loss of a ``loss`` event with NaN. Steps are those the hooks report:
        the 0-based iteration for ``loss``/``optimizer_step``, completed steps for checkpoint and ``after_step``.
        """
        spec = os.environ.get(FAULT_ENV)
        if not spec:
            return None
        for item in spec.split(","):
            where, _, action = item.partition(":")
            name, _, step = where.partition("@")
            if name != event or str(info.get("step")) != step:
                continue
            if (action or "pause") == "nan" and "loss" in info:
                return info["loss"] * float("nan")
            marker = os.path.join(self.config.output.output_dir, f".fault-{event}-{step}")
            with open(marker, "w") as f:
                f.write(str(os.getpid()))
            while self._interrupt_signal is None:
                time.sleep(0.05)
        return None

    def _install_signal_handlers(self):
        def handler(signum, frame):
            if self._interrupt_signal is not None:  # a second Ctrl-C: stop now, without the checkpoint
                raise KeyboardInterrupt
            self._interrupt_signal = signum

        self._previous_handlers = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}

    def _restore_signal_handlers(self):
        for s, previous in getattr(self, "_previous_handlers", {}).items():
            signal.signal(s, previous)

    # ------------------------------------------------------------------------------------------------------------
    # setup
    # ------------------------------------------------------------------------------------------------------------

    def _setup_accelerator(self):
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

        cfg = self.config
        report_to = None if cfg.output.report_to == "none" else cfg.output.report_to
        self.accelerator = Accelerator(
            # Several processes without CUDA: accelerate only forms a gloo group when told to use the CPU.
            cpu=not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1,
            mixed_precision=cfg.optim.mixed_precision,
            log_with=report_to,
            project_config=ProjectConfiguration(
                project_dir=cfg.output.output_dir,
                logging_dir=os.path.join(cfg.output.output_dir, cfg.output.logging_dir),
            ),
            # A shared backbone runs one adapter per forward: the other adapter's parameters are unused (and DDP
            # must hook them when wrapping, so they require grad at prepare time; see roles.py).
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        )
        from accelerate.utils import DistributedType

        if self.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            raise ConfigError(
                f"{self.accelerator.distributed_type.value} is not supported yet: the frozen teacher and critic passes "
                "run outside the wrapper and the two roles have separate optimizers; use DDP "
                "(training/accelerate_configs/multi_gpu.yaml) with LoRA roles and --gradient_checkpointing."
            )
        self.device = self.accelerator.device
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.accelerator.mixed_precision)

    def _load_teacher(self):
        from diffusers import DiffusionPipeline

        cfg = self.config
        family = self.resolved.family
        kwargs = {"revision": cfg.revision} if cfg.revision else {}
        self.teacher_pipeline = DiffusionPipeline.from_pretrained(cfg.teacher, **kwargs)
        self.family = family
        adapter_cls = get_adapter_class(family)
        self.adapter = adapter_cls(self.teacher_pipeline.components, max_sequence_length=cfg.max_sequence_length)
        for name in (adapter_cls.denoiser_name, "vae") + adapter_cls.text_component_names:
            module = self.teacher_pipeline.components.get(name)
            if isinstance(module, torch.nn.Module):
                module.to(self.device).eval()
                module.requires_grad_(False)

    def _setup_data(self):
        cfg = self.config
        adapter = self.adapter
        self.prompts = load_prompts(cfg.data.prompts, cfg.data.prompt_column)
        self.prompt_source = PromptSource(adapter, self.prompts, cache=cfg.data.cache_text_embeddings,
                                          device=self.device)
        validation_prompts = cfg.output.validation_prompts or self.prompts[:4]
        self.validation_prompts = list(validation_prompts)
        self.validation_conditions = adapter.encode_prompt(self.validation_prompts, device=self.device)
        self.resolution = cfg.data.resolution or adapter.default_resolution
        self.real_latents = None
        self.real_conditions = None
        if cfg.method.uses_discriminator:
            images, captions = load_real_images(cfg.data.real_images, self.resolution, cfg.data.image_column,
                                                cfg.data.caption_column)
            with torch.no_grad():
                latents = [adapter.encode_images(images[i:i + 32].to(self.device),
                                                 generator=torch.Generator().manual_seed(cfg.optim.seed + i))
                           for i in range(0, len(images), 32)]
            self.real_latents = torch.cat(latents).float().cpu()
            if captions is not None:
                self.real_conditions = PromptSource(adapter, captions, cache=True, device=self.device)

    def _setup_models(self):
        cfg = self.config
        self.student_timesteps = self.resolved.student_timesteps
        self.roles = BackboneRoles(
            self.adapter,
            cfg.roles,
            discriminator=cfg.method.uses_discriminator,
            dtype=self.weight_dtype,
        )
        self.method = build_method(cfg.method, self.roles, self.student_timesteps)
        if cfg.data.cache_text_embeddings:
            # Every condition is cached: move the text encoders off the accelerator (kept for the export).
            for name in self.adapter.text_component_names:
                module = self.adapter.components.get(name)
                if isinstance(module, torch.nn.Module):
                    module.to("cpu")

        optim = cfg.optim
        self.optimizers = {}
        for role in ("student", "critic"):
            lr = optim.learning_rate if role == "student" else (optim.critic_learning_rate or optim.learning_rate)
            self.optimizers[role] = torch.optim.AdamW(
                self.roles.role_parameters(role), lr=lr, betas=(optim.adam_beta1, optim.adam_beta2),
                weight_decay=optim.adam_weight_decay, eps=optim.adam_epsilon,
            )
        self.lr_schedulers = {role: self._make_scheduler(opt) for role, opt in self.optimizers.items()}

        modules = self.roles.trainable_modules()
        names = list(modules)
        prepared = self.accelerator.prepare(*modules.values(), self.optimizers["student"], self.optimizers["critic"])
        for name, module in zip(names, prepared[: len(names)]):
            self.roles.set_prepared(name, module)
        self.optimizers = {"student": prepared[len(names)], "critic": prepared[len(names) + 1]}

        self.ema = None
        if optim.ema_decay:
            self.ema = {name: p.detach().clone().float() for name, p in self.roles.named_role_parameters("student")}

        acc = self.accelerator
        self.rng = RandomSource(torch.Generator().manual_seed(optim.seed), rank=acc.process_index,
                                world_size=acc.num_processes, device=self.device)

    def _make_scheduler(self, optimizer):
        from diffusers.optimization import get_scheduler

        optim = self.config.optim
        return get_scheduler(optim.lr_scheduler, optimizer, num_warmup_steps=optim.lr_warmup_steps,
                             num_training_steps=optim.max_train_steps)

    # ------------------------------------------------------------------------------------------------------------
    # batches
    # ------------------------------------------------------------------------------------------------------------

    def _batch(self, step: int, micro: int) -> Batch:
        """The local share of the global batch of (step, micro-batch): a pure function of seed and position."""
        cfg = self.config
        acc = self.accelerator
        local = cfg.optim.train_batch_size
        global_batch = local * acc.num_processes
        position = step * cfg.optim.gradient_accumulation_steps + micro
        seed = cfg.optim.seed
        indices = batch_indices(seed, position, global_batch, len(self.prompt_source))
        mine = indices[acc.process_index * local:(acc.process_index + 1) * local]
        condition = self.prompt_source.conditions(mine)
        shape = self.adapter.latent_shape(local, self.resolution, self.resolution)
        noise = self.rng.randn(shape)
        real = real_condition = None
        if self.real_latents is not None:
            real_indices = batch_indices(seed + 1, position, global_batch, len(self.real_latents))
            real_mine = real_indices[acc.process_index * local:(acc.process_index + 1) * local]
            real = self.real_latents[real_mine].to(self.device)
            if self.real_conditions is not None:  # captions: each real image is judged under its own
                real_condition = self.real_conditions.conditions(real_mine)
        return Batch(condition=condition, noise=noise, real=real, real_condition=real_condition)

    # ------------------------------------------------------------------------------------------------------------
    # one update
    # ------------------------------------------------------------------------------------------------------------

    def _all_finite(self, value: bool) -> bool:
        flag = torch.tensor([1.0 if value else 0.0], device=self.device)
        return bool(self.accelerator.gather(flag).min().item() > 0)

    def _nonfinite(self, step: int, role: str, term: str) -> bool:
        """Handle a non-finite value: raise (stop) or count a skip; returns True when the update is skipped."""
        optim = self.config.optim
        message = f"Non-finite {term} in the {role} update at step {step + 1}"
        if optim.on_nonfinite == "skip" and self.nonfinite_skips < optim.max_nonfinite_skips:
            self.nonfinite_skips += 1
            logger.warning(f"{message}; skipping the update ({self.nonfinite_skips}/{optim.max_nonfinite_skips}).")
            for optimizer in self.optimizers.values():
                optimizer.zero_grad(set_to_none=True)
            return True
        if optim.on_nonfinite == "skip":
            message += f", and the limit of {optim.max_nonfinite_skips} skipped updates is reached"
        raise NonFiniteError(message + "; the last good checkpoint is intact. Lower the learning rate or use "
                             "--mixed_precision no, then resume.")

    def _update(self, role: str, step: int) -> Dict[str, float]:
        cfg = self.config
        accum = cfg.optim.gradient_accumulation_steps
        optimizer = self.optimizers[role]
        logs: Dict[str, float] = {}
        for micro in range(accum):
            batch = self._batch(step, micro)
            step_fn = self.method.student_step if role == "student" else self.method.critic_step
            with self.accelerator.autocast():
                loss, micro_logs = step_fn(batch, self.rng)
            replaced = self._hook("loss", role=role, step=step, loss=loss, logs=micro_logs)
            if replaced is not None:
                loss = replaced
            if not self._all_finite(bool(torch.isfinite(loss.detach()).all())):
                bad = [k for k, v in micro_logs.items() if not math.isfinite(v)] or [f"{role}/loss"]
                if self._nonfinite(step, role, f"loss ({', '.join(bad)})"):
                    return {}
            self.accelerator.backward(loss / accum)
            for key, value in micro_logs.items():
                logs[key] = logs.get(key, 0.0) + value / accum
        params = self.roles.role_parameters(role)
        grad_norm = self.accelerator.clip_grad_norm_(params, cfg.optim.max_grad_norm)
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        if not self._all_finite(math.isfinite(grad_norm)):
            if self._nonfinite(step, role, "gradient norm"):
                return {}
        optimizer.step()
        self._hook("optimizer_step", role=role, step=step)
        self.lr_schedulers[role].step()
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        self.roles.end_phase()
        if role == "student" and self.ema is not None:
            self._update_ema()
        logs[f"{role}/grad_norm"] = grad_norm
        logs[f"{role}/lr"] = self.lr_schedulers[role].get_last_lr()[0]
        return logs

    @torch.no_grad()
    def _update_ema(self):
        decay = self.config.optim.ema_decay
        for name, parameter in self.roles.named_role_parameters("student"):
            self.ema[name].mul_(decay).add_(parameter.detach().float(), alpha=1 - decay)

    # ------------------------------------------------------------------------------------------------------------
    # checkpointing
    # ------------------------------------------------------------------------------------------------------------

    def save_checkpoint(self) -> str:
        """Write ``checkpoint-<step>`` crash-safely: a hidden sibling folder renamed into place when complete."""
        acc = self.accelerator
        output_dir = self.config.output.output_dir
        target = os.path.join(output_dir, f"{CHECKPOINT_PREFIX}{self.global_step}")
        staging = os.path.join(output_dir, f".{CHECKPOINT_PREFIX}{self.global_step}.tmp")
        if acc.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
            os.makedirs(staging)
        acc.wait_for_everyone()
        # Every process writes its own RNG state; the main process writes the shared state.
        rank = acc.process_index
        storage.save_tensors(os.path.join(staging, f"rng_{rank}.safetensors"), {
            "torch": torch.get_rng_state(),
            **{f"cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())},
            **{f"source_{k}": v for k, v in self.rng.state_dict().items()},
        })
        storage.write_json(os.path.join(staging, f"rng_{rank}.json"), {
            "python": _python_rng_state(), "numpy": _numpy_rng_state(),
        })
        if acc.is_main_process:
            storage.save_tensors(os.path.join(staging, "trainable.safetensors"), self.roles.trainable_state_dict())
            if self.ema is not None:
                storage.save_tensors(os.path.join(staging, "ema.safetensors"), self.ema)
            method_state = _flatten(self.method.state_dict())
            if method_state:
                storage.save_tensors(os.path.join(staging, "method.safetensors"), method_state)
            for role, optimizer in self.optimizers.items():
                tensors, plain = _optimizer_to_tensors(optimizer.state_dict())
                storage.save_tensors(os.path.join(staging, f"optimizer_{role}.safetensors"), tensors)
                storage.write_json(os.path.join(staging, f"optimizer_{role}.json"), plain)
                storage.write_json(os.path.join(staging, f"scheduler_{role}.json"), _scheduler_state(self.lr_schedulers[role]))
            self.config.save(os.path.join(staging, CONFIG_NAME))
            self._hook("before_checkpoint_commit", path=staging, step=self.global_step)
            storage.write_json(os.path.join(staging, TRAINER_STATE_NAME), {
                "global_step": self.global_step,
                "nonfinite_skips": self.nonfinite_skips,
                "num_processes": acc.num_processes,
                "format": 1,
            })
        acc.wait_for_everyone()
        if acc.is_main_process:
            storage.replace_directory(staging, target)
            self._prune_checkpoints()
            self._hook("checkpoint_written", path=target, step=self.global_step)
        acc.wait_for_everyone()
        return target

    def _prune_checkpoints(self):
        limit = self.config.output.checkpoints_total_limit
        if not limit:
            return
        checkpoints = list_checkpoints(self.config.output.output_dir)
        # The newest complete checkpoint is never removed, whatever the limit.
        for _, path in checkpoints[:-1][: max(0, len(checkpoints) - limit)]:
            shutil.rmtree(path, ignore_errors=True)

    def load_checkpoint(self, path: str):
        acc = self.accelerator
        with open(os.path.join(path, TRAINER_STATE_NAME), encoding="utf-8") as f:
            state = json.load(f)
        self.roles.load_trainable_state_dict(storage.load_tensors(os.path.join(path, "trainable.safetensors")))
        if self.ema is not None:
            ema_path = os.path.join(path, "ema.safetensors")
            if os.path.isfile(ema_path):
                self.ema = {k: v.to(self.device) for k, v in storage.load_tensors(ema_path).items()}
        method_path = os.path.join(path, "method.safetensors")
        if os.path.isfile(method_path):
            self.method.load_state_dict(_unflatten(storage.load_tensors(method_path)))
        for role, optimizer in self.optimizers.items():
            with open(os.path.join(path, f"optimizer_{role}.json"), encoding="utf-8") as f:
                plain = json.load(f)
            tensors = storage.load_tensors(os.path.join(path, f"optimizer_{role}.safetensors"))
            optimizer.load_state_dict(_optimizer_from_tensors(tensors, plain))
            with open(os.path.join(path, f"scheduler_{role}.json"), encoding="utf-8") as f:
                self.lr_schedulers[role].load_state_dict({**self.lr_schedulers[role].state_dict(), **json.load(f)})
        rank = acc.process_index
        rng_file = os.path.join(path, f"rng_{rank}.safetensors")
        if os.path.isfile(rng_file):
            rng = storage.load_tensors(rng_file)
            torch.set_rng_state(rng["torch"])
            cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda_"))]
            if cuda and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(cuda)
            self.rng.load_state_dict({k[len("source_"):]: v for k, v in rng.items() if k.startswith("source_")})
            with open(os.path.join(path, f"rng_{rank}.json"), encoding="utf-8") as f:
                plain = json.load(f)
            _set_python_rng_state(plain["python"])
            _set_numpy_rng_state(plain["numpy"])
        self.global_step = int(state["global_step"])
        self.nonfinite_skips = int(state.get("nonfinite_skips", 0))

    # ------------------------------------------------------------------------------------------------------------
    # validation and export
    # ------------------------------------------------------------------------------------------------------------

    def student_scheduler(self) -> OneStepScheduler:
        return OneStepScheduler.from_noise_path(self.adapter.noise_path, self.student_timesteps,
                                                self.roles.student_prediction_type)

    def _student_pipeline(self, denoiser):
        from ..pipelines import OneStepPipeline

        components = self.teacher_pipeline.components
        kwargs = {n: components.get(n) for n in self.adapter.text_component_names}
        kwargs[self.adapter.denoiser_name] = denoiser
        pipe = OneStepPipeline(
            vae=components["vae"], scheduler=self.student_scheduler(), family=self.family,
            max_sequence_length=self.config.max_sequence_length, **kwargs,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @torch.no_grad()
    def sample_images(self, conditions: Condition, seed: int = 0, denoiser=None) -> np.ndarray:
        """Student images ``[N, H, W, 3]`` in [0, 1] through the real OneStepPipeline code path."""
        if denoiser is None:
            self.roles.activate("student")
            denoiser = self.roles._module_of("student")
        pipe = self._student_pipeline(denoiser)
        generator = torch.Generator().manual_seed(seed)
        images = pipe(
            prompt_embeds=conditions.embeds, prompt_attention_mask=conditions.mask,
            pooled_prompt_embeds=conditions.pooled, height=self.resolution, width=self.resolution,
            generator=generator, output_type="np",
        ).images
        return images

    def validate(self):
        acc = self.accelerator
        if not acc.is_main_process:
            return
        images = self.sample_images(self.validation_conditions.to(self.device), seed=self.config.optim.seed)
        folder = os.path.join(self.config.output.output_dir, "validation")
        os.makedirs(folder, exist_ok=True)
        grid = image_grid(images)
        grid.save(os.path.join(folder, f"step-{self.global_step:06d}.png"))
        for tracker in acc.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_images("validation", images, self.global_step, dataformats="NHWC")
            elif tracker.name == "wandb":
                import wandb

                tracker.log({"validation": [wandb.Image(img, caption=p)
                                            for img, p in zip(images, self.validation_prompts)]},
                            step=self.global_step)

    def export(self) -> str:
        """Write the student into the output folder (full pipeline or LoRA + config), with samples and card."""
        from .. import hub

        acc = self.accelerator
        cfg = self.config
        output_dir = cfg.output.output_dir
        if not acc.is_main_process:
            acc.wait_for_everyone()
            return output_dir
        if self.ema is not None:
            backup = {k: v.detach().clone() for k, v in self.roles.named_role_parameters("student")}
            with torch.no_grad():
                for name, parameter in self.roles.named_role_parameters("student"):
                    parameter.copy_(self.ema[name])
        staging = storage.staging_path(os.path.join(output_dir, "export"))
        os.makedirs(staging)
        if cfg.roles.student == "full":
            denoiser = self.roles.student_denoiser()
            pipe = self._student_pipeline(denoiser)
            pipe.save_pretrained(os.path.join(staging, "pipeline"))
            for name in os.listdir(os.path.join(staging, "pipeline")):
                os.replace(os.path.join(staging, "pipeline", name), os.path.join(staging, name))
            os.rmdir(os.path.join(staging, "pipeline"))
            commit = "model_index.json"
        else:
            import diffusers

            lora_state = self.roles.student_lora_state_dict()
            saver = getattr(diffusers, self.adapter.lora_pipeline_class_name)
            saver.save_lora_weights(
                staging,
                **self.adapter.lora_save_kwargs(lora_state, lora_metadata(self.roles.lora_config("student"))),
                weight_name=LORA_WEIGHT_NAME,
                safe_serialization=True,
            )
            self.student_scheduler().save_pretrained(os.path.join(staging, "scheduler"))
            storage.write_json(os.path.join(staging, "onestep_lora.json"), {
                "base_model": teacher_reference(cfg.teacher),
                "family": self.family,
                "weight_name": LORA_WEIGHT_NAME,
                "lora_scale": 1.0,
                "base_revision": cfg.revision,
            })
            commit = "onestep_lora.json"
            self.roles.activate("student")
            denoiser = None
        images = self.sample_images(self.validation_conditions.to(self.device), seed=cfg.optim.seed,
                                    denoiser=denoiser)
        image_grid(images).save(os.path.join(staging, "samples.png"))
        cfg.save(os.path.join(staging, CONFIG_NAME))
        hub.write_model_card(staging, cfg, family=self.family, student_timesteps=self.student_timesteps,
                             method=self.resolved.method_class,
                             sample_grid="samples.png", prompts=self.validation_prompts,
                             lora=cfg.roles.student == "lora")
        storage.publish_entries(staging, output_dir, commit_file=commit)
        if self.ema is not None:
            with torch.no_grad():
                for name, parameter in self.roles.named_role_parameters("student"):
                    parameter.copy_(backup[name])
        acc.wait_for_everyone()
        return output_dir

    # ------------------------------------------------------------------------------------------------------------
    # run
    # ------------------------------------------------------------------------------------------------------------

    def run(self) -> TrainingResult:
        from tqdm.auto import tqdm

        cfg = self.config
        resume = resolve_resume_path(cfg.output.resume_from_checkpoint, cfg.output.output_dir)
        self._setup_accelerator()
        acc = self.accelerator
        if acc.is_main_process:
            os.makedirs(cfg.output.output_dir, exist_ok=True)
            cfg.save(os.path.join(cfg.output.output_dir, CONFIG_NAME))
        from accelerate.utils import set_seed

        # Seeds python, numpy and torch (LoRA A matrices and discriminator heads are initialised randomly).
        set_seed(cfg.optim.seed)
        self._load_teacher()
        self._setup_data()
        self._setup_models()
        if resume is not None:
            self.load_checkpoint(resume)
            logger.info(f"Resumed from {resume} at step {self.global_step}.")
        if cfg.output.report_to != "none":
            acc.init_trackers(cfg.output.tracker_project_name, config=_flat_config(cfg.to_dict()))

        self._install_signal_handlers()
        progress = tqdm(total=cfg.optim.max_train_steps, initial=self.global_step, desc="Distilling",
                        disable=not acc.is_local_main_process, dynamic_ncols=True)
        logs: Dict[str, float] = {}
        ratio = cfg.method.critic_updates_per_student
        try:
            while self.global_step < cfg.optim.max_train_steps:
                step = self.global_step
                started = time.perf_counter()
                logs = {}
                if step % ratio == 0:
                    logs.update(self._update("student", step))
                logs.update(self._update("critic", step))
                self.global_step = step + 1
                logs["time/step_s"] = time.perf_counter() - started
                progress.update(1)
                progress.set_postfix({k.split("/")[0]: f"{v:.4g}"
                                      for k, v in logs.items() if k in ("student/loss", "critic/loss")})
                acc.log(logs, step=self.global_step)
                self._hook("after_step", step=self.global_step, logs=logs)
                done = self.global_step == cfg.optim.max_train_steps
                if self.global_step % cfg.output.checkpointing_steps == 0 or done:
                    self.save_checkpoint()
                if self.global_step % cfg.output.validation_steps == 0 and not done:
                    self.validate()
                if self._interrupt_signal is not None:
                    raise TrainingInterrupted(self._interrupt_signal)
        except TrainingInterrupted:
            progress.close()
            if cfg.output.save_on_interrupt and not any(
                s == self.global_step for s, _ in list_checkpoints(cfg.output.output_dir)
            ):
                path = self.save_checkpoint()
                acc.print(f"Interrupted at step {self.global_step}: saved {path}; resume with "
                          "--resume_from_checkpoint latest.")
            acc.end_training()
            self._restore_signal_handlers()
            raise
        finally:
            progress.close()
        self._restore_signal_handlers()
        output_dir = self.export()
        if cfg.output.push_to_hub and acc.is_main_process:
            from .. import hub

            hub.push_to_hub(output_dir, cfg.output.hub_model_id or os.path.basename(os.path.abspath(output_dir)),
                            private=cfg.output.private)
        acc.end_training()
        return TrainingResult(output_dir=output_dir, global_step=self.global_step, logs=logs)


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------


def teacher_reference(teacher: str) -> str:
    """A Hub id as given, a local folder as an absolute path (so the LoRA config resolves from anywhere)."""
    return os.path.abspath(teacher) if os.path.isdir(teacher) else teacher


def image_grid(images: np.ndarray, columns: Optional[int] = None):
    from PIL import Image

    images = (np.clip(images, 0, 1) * 255).round().astype(np.uint8)
    n, h, w = images.shape[:3]
    columns = columns or min(n, 8)
    rows = math.ceil(n / columns)
    grid = Image.new("RGB", (columns * w, rows * h))
    for i, image in enumerate(images):
        grid.paste(Image.fromarray(image), ((i % columns) * w, (i // columns) * h))
    return grid


def _flatten(state: Dict[str, Any], prefix: str = "") -> Dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        elif torch.is_tensor(value):
            out[f"{prefix}{key}"] = value
    return out


def _unflatten(tensors: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for key, value in tensors.items():
        head, _, tail = key.partition(".")
        out.setdefault(head, {})[tail] = value
    return out


def _flat_config(data: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flat_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out


def _python_rng_state():
    version, state, gauss = random.getstate()
    return [version, list(state), gauss]


def _set_python_rng_state(state):
    random.setstate((state[0], tuple(state[1]), state[2]))


def _numpy_rng_state():
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def _set_numpy_rng_state(state):
    np.random.set_state((state[0], np.array(state[1], dtype=np.uint32), state[2], state[3], state[4]))


__all__ = ["Trainer", "TrainingResult", "NonFiniteError", "TrainingInterrupted", "ConfigError", "DataError",
           "list_checkpoints", "resolve_resume_path", "check_resume_config"]
