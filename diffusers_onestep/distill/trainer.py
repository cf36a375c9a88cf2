"""The accelerate training loop of a one-step distillation run.

``Trainer(config).run()`` loads the teacher through its family adapter, builds the roles (shared LoRA backbone or
separate copies), the registered method (``--method``) and one AdamW per trainable role, then runs DMD2's two
time-scale update rule (Yin et al. 2024b, arXiv 2405.14867; :func:`.models.roles_to_update`): every iteration updates the critic (and discriminator head); every
``critic_updates_per_student``-th iteration first updates the student. The checkpoint format and resumption live in
:mod:`.checkpoint`; validation samples and the exported student folder in :mod:`.export`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Union

import torch

from ..errors import reason_of
from ..families import get_adapter_class
from ..storage import write_json
from . import sharding
from .checkpoint import (
    CONFIG_NAME,
    RunIdentity,
    TrainingState,
    continued_run,
    find_resume_point,
    load_checkpoint,
    read_run,
    save_checkpoint,
    write_run,
)
from .config import TEACHER_REFERENCE, ConfigError, OptimizationConfig, TrainConfig
from .data import (
    DataError,
    ImageSettings,
    LatentCache,
    PromptSource,
    RealBatches,
    RealImageRows,
    StreamedBatches,
    TextEmbeddingCache,
    TrainingBatches,
    aspect_ratio_buckets,
    default_cache_root,
    fingerprint,
    load_prompts,
    module_fingerprint,
    open_real_images,
)
from .evaluate import BEST_CHECKPOINT_NAME, CostMeter, TrainingEvaluator, check_evaluation_inputs
from .export import StudentRenderer, export_student, write_validation
from .methods import build_method
from .models import RandomSource, roles_to_update
from .resolve import ResolvedConfig, resolve
from .roles import BackboneRoles
from .teacher_reference import ReferenceSettings, TeacherReferenceBatches, build_teacher_reference, dtype_name


logger = logging.getLogger(__name__)


#: Non-finite gradients under a loss scale at or below this are not a loss-scale overflow: they are non-finite
#: without any scaling, and ``--on_nonfinite`` handles them (DeepSpeed's fp16 likewise stops at its ``min_loss_scale``
#: of 1 instead of lowering the scale forever).
MIN_LOSS_SCALE = 1.0


def is_loss_scale_overflow(grad_scaler) -> bool:
    """Whether non-finite gradients are a loss-scale overflow to skip: a GradScaler (fp16) scales the loss, and its
    scale is still above :data:`MIN_LOSS_SCALE`."""
    return grad_scaler is not None and grad_scaler.is_enabled() and grad_scaler.get_scale() > MIN_LOSS_SCALE


class NonFiniteError(RuntimeError):
    """A loss or gradient became NaN/inf; the message names the step and the term."""


class TrainingInterrupted(RuntimeError):
    """SIGINT/SIGTERM arrived; a checkpoint of the current step was saved (unless disabled)."""


class HubError(RuntimeError):
    """The Hub repo of ``--push_to_hub`` could not be created (bad token, no write access); nothing was loaded."""


@dataclass
class TrainingResult:
    output_dir: str
    global_step: int
    logs: Dict[str, float]


class Trainer:
    """One distillation run (see the module docstring).

    Args:
        config: a :class:`TrainConfig` (resolved here) or the :class:`ResolvedConfig` of :func:`.resolve.resolve`.
        hooks: optional callables ``hook(event, trainer, **info)`` called at named points: ``"loss"`` (``role``,
            0-based ``step``, ``loss``, ``logs``; may return a replacement loss), ``"optimizer_step"`` (``role``,
            ``step``; not for a skipped update), ``"after_step"`` (completed ``step``, ``logs``), ``"before_checkpoint_commit"`` and
            ``"checkpoint_written"`` (``path``, ``step``). The test suite injects faults through them.
    """

    def __init__(self, config: Union[TrainConfig, ResolvedConfig], hooks: Optional[List[Callable]] = None):
        #: the run's settings with every family and method default filled in (a TrainConfig is resolved here, as
        #: the CLI resolves it, so the Python API and the CLI train the same thing)
        self.resolved: ResolvedConfig = config if isinstance(config, ResolvedConfig) else resolve(config)
        self.config: TrainConfig = self.resolved.config
        self.hooks = list(hooks or [])
        self.state: Optional[TrainingState] = None
        #: the full id of the Hub repo the student is pushed to (created at the start of ``run``)
        self.hub_repo_id: Optional[str] = None
        #: the step of the newest checkpoint this run wrote or resumed (an interrupt there saves no second one)
        self.checkpointed_step: Optional[int] = None
        self._interrupt_signal: Optional[int] = None
        #: whether the run's modules are FSDP-sharded (then every process takes part in sampling and export)
        self.sharded = False

    @property
    def global_step(self) -> int:
        """Completed optimization steps (restored on resume)."""
        return self.state.global_step if self.state is not None else 0

    @property
    def interrupt_signal(self) -> Optional[int]:
        """The signal (SIGINT/SIGTERM) that asked the run to stop after the current step, if one arrived."""
        return self._interrupt_signal

    def _hook(self, event: str, **info):
        result = None
        for hook in self.hooks:
            out = hook(event, self, **info)
            if out is not None:
                result = out
        return result

    @contextlib.contextmanager
    def _stop_after_step_on_signal(self):
        """SIGINT/SIGTERM set :attr:`interrupt_signal` (the loop stops after the step); a second one stops at once."""

        def handler(signum, frame):
            if self._interrupt_signal is not None:
                raise KeyboardInterrupt
            self._interrupt_signal = signum

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, old_handler in previous.items():
                signal.signal(s, old_handler)

    # ------------------------------------------------------------------------------------------------------------
    # setup
    # ------------------------------------------------------------------------------------------------------------

    def _setup_accelerator(self):
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, DistributedType, ProjectConfiguration

        cfg = self.config
        # Unset on the command line, the precision is left to accelerate, which takes its config's (what
        # `accelerate launch` passes on); the resolver read the same value, so the two agree.
        explicit = self.resolved.mixed_precision_source == "flag"
        self.accelerator = Accelerator(
            # Several processes without CUDA: accelerate only forms a gloo group when told to use the CPU.
            cpu=not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1,
            mixed_precision=cfg.optim.mixed_precision if explicit else None,
            log_with=None if cfg.output.report_to == "none" else cfg.output.report_to,
            project_config=ProjectConfiguration(
                project_dir=cfg.output.output_dir,
                logging_dir=os.path.join(cfg.output.output_dir, cfg.output.logging_dir),
            ),
            # A shared backbone runs one adapter per forward: the other adapter's parameters are unused (and DDP
            # must hook them when wrapping, so they require grad at prepare time; see roles.py).
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        )
        if self.accelerator.distributed_type == DistributedType.DEEPSPEED:
            raise ConfigError(
                "DeepSpeed is not supported: the student and the critic have separate optimizers while accelerate gives "
                "DeepSpeed one engine per model; use FSDP (training/accelerate_configs/fsdp.yaml) or DDP "
                "(training/accelerate_configs/multi_gpu.yaml)."
            )
        # Several CPU processes asked for FSDP: accelerate keeps MULTI_CPU there; give it the FSDP2 plugin it dropped.
        sharding.enable_fsdp_on_cpu(self.accelerator)
        sharding.check_fsdp_support(self.accelerator, cfg)
        self.sharded = self.accelerator.distributed_type == DistributedType.FSDP
        if self.accelerator.mixed_precision != cfg.optim.mixed_precision:
            # accelerate keeps the first Accelerator's settings for the whole process (a second run in a notebook)
            raise ConfigError(
                f"This process's Accelerator already runs with mixed_precision {self.accelerator.mixed_precision}, "
                f"but this run resolved {cfg.optim.mixed_precision}; start it in a new process or pass "
                f"--mixed_precision {self.accelerator.mixed_precision}."
            )
        self.device = self.accelerator.device
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.accelerator.mixed_precision)
        if cfg.optim.allow_tf32:
            # As the diffusers training examples: TF32 matmuls and convolutions on Ampere and newer GPUs.
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if self.weight_dtype is None:
            precision = "every network runs in float32"
        else:
            frozen = str(self.weight_dtype).replace("torch.", "")
            precision = f"the frozen teacher runs in {frozen}, trainable weights in float32"
        self.accelerator.print(f"{self.resolved.mixed_precision_explained}: {precision}.")

    def _create_hub_repo(self) -> Optional[str]:
        """With ``--push_to_hub``, create (or reuse) the repo first, on the main process: a bad token or a name
        without write access fails here, in seconds, before any weights load. Returns the repo's full id."""
        cfg, acc = self.config, self.accelerator
        if not (cfg.output.push_to_hub and acc.is_main_process):
            return None
        from .. import hub

        repo_id = cfg.output.hub_model_id or os.path.basename(os.path.abspath(cfg.output.output_dir))
        try:
            return hub.create_repo(repo_id, private=cfg.output.private)
        except (OSError, ValueError) as error:  # huggingface_hub's HTTP errors are OSErrors
            raise HubError(
                f"--push_to_hub could not create the Hub repo {repo_id!r} ({reason_of(error)}); check HF_TOKEN or "
                "`hf auth login` and --hub_model_id."
            ) from None

    def _load_teacher(self):
        cfg = self.config
        self.family = self.resolved.family
        adapter_cls = get_adapter_class(self.family)
        model_index = self.resolved.teacher_configs.get("model_index")
        self.teacher_pipeline = load_teacher_pipeline(cfg, adapter_cls.denoiser_name, self.weight_dtype, model_index)
        self.adapter = adapter_cls(self.teacher_pipeline.components, max_sequence_length=cfg.max_sequence_length)
        for name in (adapter_cls.denoiser_name, "vae") + adapter_cls.text_component_names:
            module = self.teacher_pipeline.components.get(name)
            if isinstance(module, torch.nn.Module):
                module.to(self.device).eval()
                module.requires_grad_(False)

    def _trainable_copy(self) -> Optional[Callable[[], torch.nn.Module]]:
        """What a full role starts from: a copy of the frozen backbone (``None``), or -- when that was loaded in a
        lower precision -- the teacher's denoiser loaded again in float32, so full roles start from the exact
        teacher."""
        if self.weight_dtype is None:
            return None
        return trainable_denoiser_loader(
            self.config, type(self.adapter.denoiser), self.adapter.denoiser_name, self.device
        )

    def _setup_data(self):
        """Prompts, real images and caches. Nothing is decoded here: real images are read per batch (or from the
        latent cache); the caches are built once, by the main process first, into files every process maps."""
        cfg, adapter, acc, data = self.config, self.adapter, self.accelerator, self.config.data
        self.prompts = load_prompts(
            data.prompts, data.prompt_column, cache_dir=cfg.cache_dir, max_samples=data.max_train_samples
        )
        self.validation_prompts = list(cfg.output.validation_prompts or self.prompts[:4])
        self.validation_conditions = adapter.encode_prompt(self.validation_prompts, device=self.device)
        self.resolution = data.resolution or adapter.default_resolution
        cache_root = data.data_cache_dir or default_cache_root(cfg.cache_dir)
        frozen_dtype = self.weight_dtype or torch.float32
        self.real_batches = self.real_conditions = None
        #: whether texts reach the text encoders while training (streamed captions, or no text cache)
        self.encodes_text_while_training = not data.cache_text_embeddings
        captions: List[str] = []
        self.evaluator = None
        if cfg.output.eval_steps and self.accelerator.is_main_process:
            self.evaluator = TrainingEvaluator(cfg, adapter, self.device, cfg.optim.seed)
        if data.real_images == TEACHER_REFERENCE:
            self._setup_teacher_reference()
            captions = list(self.prompts)  # the references are judged under the prompts they were sampled from
        elif cfg.method.uses_discriminator:
            dataset = open_real_images(
                data.real_images,
                data.image_column,
                data.caption_column,
                cache_dir=cfg.cache_dir,
                streaming=data.streaming,
                max_samples=data.max_train_samples,
            )
            if data.aspect_ratio_buckets and adapter.noise_path.resolution_dependent:
                # the run's noise levels and the student's conditioning are set for the square resolution's token
                # count (FLUX.1's dynamic shift); other sizes would be trained on another schedule
                raise ConfigError(
                    f"--aspect_ratio_buckets is not supported for {adapter.display_name} teachers, whose noise "
                    "schedule shifts with the image size; train at one --resolution."
                )
            buckets = aspect_ratio_buckets(adapter, self.resolution) if data.aspect_ratio_buckets else None
            images = ImageSettings(self.resolution, data.center_crop, data.random_flip, cfg.optim.seed, buckets)
            global_batch = cfg.optim.train_batch_size * acc.num_processes
            mine = slice(
                acc.process_index * cfg.optim.train_batch_size, (acc.process_index + 1) * cfg.optim.train_batch_size
            )
            rows = stream = latent_cache = None
            if data.streaming:

                def stream(start: int) -> StreamedBatches:
                    return StreamedBatches(
                        dataset,
                        data.real_images,
                        data.image_column,
                        data.caption_column,
                        images,
                        global_batch,
                        mine,
                        start,
                    )

                self.encodes_text_while_training |= data.caption_column is not None
            else:
                rows = RealImageRows(dataset, data.real_images, data.image_column, data.caption_column, images)
                if data.caption_column:
                    captions = [str(c) for c in rows.undecoded[data.caption_column]]
                if data.cache_latents:
                    latent_cache = LatentCache(
                        adapter, rows, cache_root, frozen_dtype, acc.main_process_first, device=self.device
                    )
            self.real_batches = RealBatches(
                adapter,
                cfg.optim.seed + 1,
                cfg.optim.seed,
                global_batch,
                acc.process_index,
                cfg.optim.train_batch_size,
                rows=rows,
                cache=latent_cache,
                stream=stream,
                num_workers=data.dataloader_num_workers,
                device=self.device,
            )
        text_cache = None
        if data.cache_text_embeddings:
            text_cache = TextEmbeddingCache(
                adapter,
                self.prompts + captions,
                cache_root,
                frozen_dtype,
                settings=[cfg.teacher, cfg.revision, cfg.variant],
                main_process_first=acc.main_process_first,
                device=self.device,
            )
        self.prompt_source = PromptSource(adapter, self.prompts, text_cache, device=self.device)
        if self.real_batches is not None and (data.caption_column or data.real_images == TEACHER_REFERENCE):
            self.real_conditions = PromptSource(
                adapter, captions, None if data.streaming else text_cache, device=self.device
            )

    def _setup_teacher_reference(self):
        """``--real_images teacher``: build (or finish, or reuse) the teacher's reference set -- its own multi-step
        samples of the training prompts -- with the missing chunks split across the processes, and read it as the
        run's real latents (with each one's prompt and starting noise)."""
        cfg, data, acc = self.config, self.config.data, self.accelerator
        frozen_dtype = self.weight_dtype or torch.float32
        scheduler = self.teacher_pipeline.components.get("scheduler")
        settings = ReferenceSettings(
            teacher=cfg.teacher,
            revision=cfg.revision,
            variant=cfg.variant,
            teacher_fingerprint=fingerprint(
                module_fingerprint(self.adapter.denoiser), dict(scheduler.config) if scheduler is not None else None
            ),
            prompts_fingerprint=fingerprint(self.prompts),
            num_prompts=len(self.prompts),
            count=data.teacher_reference_count,
            steps=data.teacher_reference_steps,
            guidance_scale=float(data.teacher_reference_guidance_scale),
            seed=cfg.optim.seed,
            height=self.resolution,
            width=self.resolution,
            dtype=dtype_name(frozen_dtype),
            max_sequence_length=cfg.max_sequence_length,
        )
        # the pipeline's own per-call progress bar would print once per chunk; the set's bar counts latents
        self.teacher_pipeline.set_progress_bar_config(disable=True)
        reference = build_teacher_reference(
            self.adapter,
            self.teacher_pipeline,
            self.prompts,
            settings,
            data.teacher_reference_dir,
            device=self.device,
            accelerator=acc if acc.num_processes > 1 else None,
            autocast=acc.autocast,
            progress=acc.is_local_main_process,
        )
        acc.print(f"Teacher reference set: {len(reference)} latents in {reference.folder}.")
        self.real_batches = TeacherReferenceBatches(
            self.adapter,
            reference,
            cfg.optim.seed + 1,
            cfg.optim.train_batch_size * acc.num_processes,
            acc.process_index,
            cfg.optim.train_batch_size,
            device=self.device,
        )

    def _setup_models(self):
        from diffusers.optimization import get_scheduler

        cfg, optim, acc = self.config, self.config.optim, self.accelerator
        student_timesteps = self.resolved.student_timesteps
        # A resolution-dependent path (FLUX.1's dynamic shift) is trained at the run's resolution: noise levels are
        # drawn on its shifted schedule, and the student is conditioned where its scheduler will put the stored
        # timesteps at this size (NoisePath.timesteps_at); other paths are the same at every size.
        image_seq_len = self.adapter.image_seq_len(self.resolution, self.resolution)
        roles = BackboneRoles(
            self.adapter,
            cfg.roles,
            discriminator=cfg.method.uses_discriminator,
            dtype=self.weight_dtype,
            trainable_copy=self._trainable_copy(),
            image_seq_len=image_seq_len,
        )
        method = build_method(
            cfg.method, roles, self.adapter.noise_path.timesteps_at(student_timesteps, image_seq_len)
        )
        if not self.encodes_text_while_training:
            # Every condition is cached: move the text encoders off the accelerator (kept for the export).
            for name in self.adapter.text_component_names:
                module = self.adapter.components.get(name)
                if isinstance(module, torch.nn.Module):
                    module.to("cpu")

        if self.sharded:
            optimizers = self._shard_roles(roles)
        else:
            optimizers = build_optimizers(roles, optim)
            modules = roles.trainable_modules()
            prepared = acc.prepare(*modules.values(), optimizers["student"], optimizers["critic"])
            for name, module in zip(modules, prepared[: len(modules)]):
                roles.set_prepared(name, module)
            optimizers = {"student": prepared[len(modules)], "critic": prepared[len(modules) + 1]}
        lr_schedulers = {
            role: get_scheduler(
                optim.lr_scheduler,
                opt,
                num_warmup_steps=optim.lr_warmup_steps,
                num_training_steps=optim.max_train_steps,
            )
            for role, opt in optimizers.items()
        }

        ema = None
        if optim.ema_decay:
            # --offload_ema keeps the average in CPU memory: a full SDXL student's float32 EMA is 10 GB. Under FSDP
            # each process averages its own shard of the student (a sharded EMA).
            ema_device = "cpu" if optim.offload_ema else None
            ema = {
                name: sharding.local(p.detach()).to(device=ema_device, dtype=torch.float32, copy=True)
                for name, p in roles.named_role_parameters("student")
            }
        random_source = RandomSource(
            torch.Generator().manual_seed(optim.seed),
            rank=acc.process_index,
            world_size=acc.num_processes,
            device=self.device,
        )
        self.state = TrainingState(
            roles=roles,
            method=method,
            optimizers=optimizers,
            lr_schedulers=lr_schedulers,
            random_source=random_source,
            ema=ema,
            # fp16: the GradScaler accelerate made (it scales in backward and steps the optimizers through it)
            grad_scaler=acc.scaler,
        )
        self.batches = TrainingBatches(
            self.prompt_source,
            self.adapter.latent_shape,
            random_source,
            optim.seed,
            optim.train_batch_size,
            self.resolution,
            acc.process_index,
            acc.num_processes,
            optim.gradient_accumulation_steps,
            self.real_batches,
            self.real_conditions,
            device=self.device,
        )
        self.renderer = StudentRenderer(
            roles,
            self.adapter,
            self.teacher_pipeline.components,
            self.family,
            student_timesteps,
            self.resolution,
            cfg.max_sequence_length,
            solver=method.sampler_solver,
        )

    def _shard_roles(self, roles: BackboneRoles) -> Dict[str, torch.optim.Optimizer]:
        """FSDP: shard every module a role runs through -- the frozen backbone (teacher, and LoRA roles) first, then
        the full copies and the discriminator head -- each with ``Accelerator.prepare`` (accelerate's FSDP2 path takes
        one model per call). ``fully_shard`` converts in place, so the roles keep calling the same objects. The
        optimizers are built afterwards, over the sharded parameters."""
        acc = self.accelerator
        modules = {"backbone": roles.backbone, **roles.trainable_modules()}
        for name, module in modules.items():
            if name == "discriminator_head":
                # The plugin's transformer auto-wrap policy keeps the block classes of the first model it saw (the
                # denoiser's) and refuses a model without them; the small head is one FSDP unit, sharded as
                # fsdp2_prepare_model shards a root, with the plugin's settings.
                sharding.shard_whole(acc, module)
                roles.set_prepared(name, module)
                continue
            prepared = acc.prepare(module)
            if prepared is not module:  # fully_shard works in place; anything else would leave the roles unsharded
                raise RuntimeError(f"accelerate's FSDP2 preparation replaced the {name} instead of sharding it.")
            roles.set_prepared(name, prepared)
        roles.sharded = True
        return build_optimizers(roles, self.config.optim)

    # ------------------------------------------------------------------------------------------------------------
    # one update
    # ------------------------------------------------------------------------------------------------------------

    def _all_finite(self, value: bool) -> bool:
        flag = torch.tensor([1.0 if value else 0.0], device=self.device)
        return bool(self.accelerator.gather(flag).min().item() > 0)

    def _nonfinite(self, step: int, role: str, term: str) -> bool:
        """Handle a non-finite value: raise (stop) or count a skip; returns True when the update is skipped."""
        optim, state = self.config.optim, self.state
        message = f"Non-finite {term} in the {role} update at step {step + 1}"
        if optim.on_nonfinite == "skip" and state.nonfinite_skips < optim.max_nonfinite_skips:
            state.nonfinite_skips += 1
            logger.warning(f"{message}; skipping the update ({state.nonfinite_skips}/{optim.max_nonfinite_skips}).")
            for optimizer in state.optimizers.values():
                optimizer.zero_grad(set_to_none=True)
            return True
        if optim.on_nonfinite == "skip":
            message += f", and the limit of {optim.max_nonfinite_skips} skipped updates is reached"
        raise NonFiniteError(
            message + "; the last good checkpoint is intact. Lower the learning rate or use "
            "--mixed_precision no, then resume."
        )

    def _gradient_sync(self, sync: bool):
        """Around one micro-batch's forward and backward: with ``sync`` false (every micro-batch of an accumulated
        update but the last), accelerate's ``no_sync`` on every prepared module, so DDP all-reduces the accumulated
        gradients once per update instead of once per micro-batch. (``accelerator.accumulate`` would decide this
        from its own call counter, which the two roles' alternating updates do not fit.)"""
        stack = contextlib.ExitStack()
        if not sync:
            for module in self.state.roles.prepared.values():
                stack.enter_context(self.accelerator.no_sync(module))
        return stack

    def _update(self, role: str, step: int) -> Dict[str, float]:
        cfg, state = self.config, self.state
        accum = cfg.optim.gradient_accumulation_steps
        step_fn = state.method.student_step if role == "student" else state.method.critic_step
        logs: Dict[str, float] = {}
        for micro in range(accum):
            batch = self.batches(step, micro)
            with self._gradient_sync(micro == accum - 1):
                with self.accelerator.autocast():
                    loss, micro_logs = step_fn(batch, state.random_source)
                replaced = self._hook("loss", role=role, step=step, loss=loss, logs=micro_logs)
                if replaced is not None:
                    loss = replaced
                # checked before scaling: a NaN/inf loss is no loss-scale overflow, --on_nonfinite handles it
                if not self._all_finite(bool(torch.isfinite(loss.detach()).all())):
                    bad = [k for k, v in micro_logs.items() if not math.isfinite(v)] or [f"{role}/loss"]
                    if self._nonfinite(step, role, f"loss ({', '.join(bad)})"):
                        return {}
                self.accelerator.backward(loss / accum)
            for key, value in micro_logs.items():
                logs[key] = logs.get(key, 0.0) + value / accum
        parameters = self.state.roles.role_parameters(role)
        if self.sharded:
            grad_norm = sharding.clip_grad_norm_(parameters, cfg.optim.max_grad_norm)
        else:  # (under fp16, accelerate unscales the gradients here first)
            grad_norm = self.accelerator.clip_grad_norm_(parameters, cfg.optim.max_grad_norm)
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        if not self._all_finite(math.isfinite(grad_norm)):
            if is_loss_scale_overflow(state.grad_scaler):
                return self._skip_overflow(role, step, logs)
            if self._nonfinite(step, role, "gradient norm"):
                if state.grad_scaler is not None:  # the unscaled gradients are dropped: same scale, next update
                    state.grad_scaler.update(state.grad_scaler.get_scale())
                return {}
        state.optimizers[role].step()
        self._hook("optimizer_step", role=role, step=step)
        state.lr_schedulers[role].step()
        for optimizer in state.optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        self.state.roles.end_phase()
        self.state.roles.reshard()  # FSDP: the EMA and the next phase's grad flags read the shards
        if role == "student" and state.ema is not None:
            self._update_ema()
        logs[f"{role}/grad_norm"] = grad_norm
        logs[f"{role}/lr"] = state.lr_schedulers[role].get_last_lr()[0]
        return logs

    def _skip_overflow(self, role: str, step: int, logs: Dict[str, float]) -> Dict[str, float]:
        """An fp16 loss-scale overflow (inf/NaN gradients under a GradScaler), handled as torch's GradScaler does:
        the optimizer step is skipped (``GradScaler.step`` sees the overflow), the loss scale is multiplied by its
        backoff factor (halved by default), and the run goes on. The LR schedule and the EMA stay where they are (no
        update happened); the iteration still counts, and so does the overflow (``overflow_skips`` in
        ``trainer_state.json``, ``fp16/overflow_skips`` in the logs, which keep the update's finite losses)."""
        state, scaler = self.state, self.state.grad_scaler
        scale = scaler.get_scale()
        state.optimizers[role].step()  # GradScaler.step skips the update, GradScaler.update lowers the scale
        state.overflow_skips += 1
        for optimizer in state.optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        state.roles.end_phase()
        if self.accelerator.is_main_process:  # every process skipped the same update (the gradients are reduced)
            logger.warning(
                f"fp16 loss-scale overflow in the {role} update at step {step + 1}: update skipped, loss scale "
                f"{scale:g} -> {scaler.get_scale():g} ({state.overflow_skips} overflow skips in this run)."
            )
        return {**logs, f"{role}/overflow": 1.0}

    @torch.no_grad()
    def _update_ema(self):
        decay = self.config.optim.ema_decay
        for name, parameter in self.state.roles.named_role_parameters("student"):
            average = self.state.ema[name]
            shard = sharding.local(parameter.detach())
            average.mul_(decay).add_(shard.to(average.device, torch.float32), alpha=1 - decay)

    # ------------------------------------------------------------------------------------------------------------
    # checkpoints, validation, export
    # ------------------------------------------------------------------------------------------------------------

    def save_checkpoint(self) -> str:
        path = save_checkpoint(self.accelerator, self.state, self.config, on_event=self._hook)
        self.checkpointed_step = self.global_step
        return path

    def _record_cost(self) -> None:
        self.state.training_cost = self.cost.current()

    def evaluate_student(self) -> bool:
        """``--eval_steps``: evaluate the student (its EMA, as exported) on the main process, log ``eval/*`` to the
        tracker and write ``evaluation/metrics.json``; returns whether it is the best so far (``--keep_best``), a
        decision every process takes from the main process."""
        from accelerate.utils import broadcast_object_list

        from .export import ema_weights

        acc, state, step = self.accelerator, self.state, self.global_step
        best = [None]
        if acc.is_main_process:
            with ema_weights(state.roles, state.ema):
                metrics = self.evaluator(self.renderer, step)
            self.evaluator.write(self.config.output.output_dir, self.renderer, step, metrics)
            acc.print(f"Evaluation at step {step}: " + ", ".join(f"{k} {v:.5g}" for k, v in metrics.items()))
            value = metrics[self.evaluator.metric]
            if self.config.output.keep_best and (state.best is None or value < state.best["value"]):
                best = [
                    {"step": step, "metric": self.evaluator.metric, "value": value, "checkpoint": f"checkpoint-{step}"}
                ]
            metrics_to_log = {f"eval/{k}": v for k, v in metrics.items()}
        else:
            metrics_to_log = {}
        acc.log(metrics_to_log, step=step)
        if acc.num_processes > 1:
            broadcast_object_list(best)
        if best[0] is None:
            return False
        state.best = best[0]
        return True

    def validate(self):
        acc = self.accelerator
        # A sharded student's forward is a collective: every process samples, the main process writes.
        if acc.is_main_process or self.sharded:
            images = self.renderer.sample(self.validation_conditions.to(self.device), seed=self.config.optim.seed)
        if acc.is_main_process:
            write_validation(
                images,
                self.validation_prompts,
                os.path.join(self.config.output.output_dir, "validation"),
                self.global_step,
                acc.trackers,
            )

    def export(self) -> str:
        """Write the student into the output folder (full pipeline or LoRA + config), with samples and card (whose
        loading snippet names the Hub repo with ``--push_to_hub``). Under FSDP every process takes part (the full
        state dict is gathered from the shards) and the main process writes."""
        if self.accelerator.is_main_process or self.sharded:
            export_student(
                self.renderer,
                self.config,
                self.validation_conditions.to(self.device),
                self.validation_prompts,
                ema=self.state.ema,
                repo_id=self.hub_repo_id,
                training_cost=self.cost.current(),
                is_main_process=self.accelerator.is_main_process,
            )
        self.accelerator.wait_for_everyone()
        return self.config.output.output_dir

    # ------------------------------------------------------------------------------------------------------------
    # run
    # ------------------------------------------------------------------------------------------------------------

    def run(self) -> TrainingResult:
        from accelerate.utils import set_seed
        from tqdm.auto import tqdm

        cfg = self.config
        output_dir = cfg.output.output_dir
        self._setup_accelerator()
        acc = self.accelerator
        check_evaluation_inputs(cfg)
        self.cost = CostMeter(self.device, acc.num_processes)
        # Checked (again, for the Python API) before anything loads: the files of the checkpoint and an RNG state for
        # every process of this run.
        resume = find_resume_point(cfg.output.resume_from_checkpoint, output_dir, acc.num_processes)
        if resume.note:
            acc.print(resume.note)
        self.hub_repo_id = self._create_hub_repo()
        # Seeds python, numpy and torch (LoRA A matrices and discriminator heads are initialised randomly).
        set_seed(cfg.optim.seed)
        self._load_teacher()
        self._setup_data()
        # Written only once the teacher and the data have loaded: what fails while loading leaves the folder as it
        # was, so the same command can simply be run again.
        run = continued_run(resume.path, output_dir) if resume.path else RunIdentity.new()
        if acc.is_main_process:
            os.makedirs(output_dir, exist_ok=True)
            cfg.save(os.path.join(output_dir, CONFIG_NAME))
            write_run(output_dir, run)
        # Every process takes the run the main process named (a new run's id is random).
        acc.wait_for_everyone()
        run = read_run(output_dir) or run
        self._setup_models()
        self.state.run = run
        if resume.path is not None:
            load_checkpoint(resume.path, self.state, acc.process_index, device=self.device)
            self.checkpointed_step = self.global_step
            self.cost.resume_from(self.state.training_cost)
            logger.info(f"Resumed from {resume.path} at step {self.global_step}.")
        if cfg.output.report_to != "none":
            acc.init_trackers(cfg.output.tracker_project_name, config=_flat_config(cfg.to_dict()))

        progress = tqdm(
            total=cfg.optim.max_train_steps,
            initial=self.global_step,
            desc="Distilling",
            disable=not acc.is_local_main_process,
            dynamic_ncols=True,
        )
        logs: Dict[str, float] = {}
        with self._stop_after_step_on_signal():
            try:
                while self.state.global_step < cfg.optim.max_train_steps:
                    logs = self._iteration(progress)
            except TrainingInterrupted:
                progress.close()
                if cfg.output.save_on_interrupt and self.global_step != self.checkpointed_step:
                    self._record_cost()
                    path = self.save_checkpoint()
                    acc.print(
                        f"Interrupted at step {self.global_step}: saved {path}; resume with "
                        "--resume_from_checkpoint latest."
                    )
                self._end_training()
                raise
            finally:
                progress.close()
        output_dir = self.export()
        if self.hub_repo_id is not None:
            from .. import hub

            hub.upload_student(output_dir, self.hub_repo_id)
        self._end_training()
        return TrainingResult(output_dir=output_dir, global_step=self.global_step, logs=logs)

    def _end_training(self) -> None:
        """Release the wrapped (DDP) modules, then end the run (trackers, process group).

        The order prevents a hang at exit measured on 2 gloo processes: DDP's ``Reducer`` holds a reference to the
        process group, and its Python binding frees it with the GIL held. Had it dropped the last reference (after
        ``end_training`` unregistered the group), ``~ProcessGroupGloo`` would join gloo's worker threads while one
        of them waited for the GIL to free a finished collective's tensor (pytorch/pytorch#56297); the process then
        never exited after writing its student. Freed here, while the group is still registered, the reducers are
        not the last owners; ``destroy_process_group`` is, and its binding releases the GIL (pytorch/pytorch#154976).
        The roles keep the unwrapped modules, so the trainer stays usable for inspection after ``run``."""
        acc = self.accelerator
        roles = self.state.roles if self.state is not None else None
        if roles is not None:
            for name in list(roles.prepared):  # no local may keep a wrapper alive past free_memory's collection
                roles.set_prepared(name, acc.unwrap_model(roles.prepared[name]))
        acc.free_memory()  # accelerate's own references to the prepared modules and optimizers; runs gc
        acc.end_training()

    def _iteration(self, progress) -> Dict[str, float]:
        """One iteration of the schedule, then its logs, checkpoint and validation; returns the logs."""
        cfg, state = self.config, self.state
        step = state.global_step
        started = time.perf_counter()
        logs: Dict[str, float] = {}
        for role in roles_to_update(step, cfg.method.critic_updates_per_student):
            logs.update(self._update(role, step))
        state.global_step = step + 1
        logs["time/step_s"] = time.perf_counter() - started
        if state.grad_scaler is not None:
            logs["fp16/loss_scale"] = state.grad_scaler.get_scale()
            logs["fp16/overflow_skips"] = float(state.overflow_skips)
        progress.update(1)
        progress.set_postfix(
            {k.split("/")[0]: f"{v:.4g}" for k, v in logs.items() if k in ("student/loss", "critic/loss")}
        )
        self.accelerator.log(logs, step=state.global_step)
        self._hook("after_step", step=state.global_step, logs=logs)
        done = state.global_step == cfg.optim.max_train_steps
        new_best = False
        if cfg.output.eval_steps and (state.global_step % cfg.output.eval_steps == 0 or done):
            new_best = self.evaluate_student()
        if state.global_step % cfg.output.checkpointing_steps == 0 or done or new_best:
            self._record_cost()
            self.save_checkpoint()
        if new_best and self.accelerator.is_main_process:
            write_json(os.path.join(cfg.output.output_dir, BEST_CHECKPOINT_NAME), state.best)
        if state.global_step % cfg.output.validation_steps == 0 and not done:
            self.validate()
        if self._stop_requested():
            raise TrainingInterrupted(self._interrupt_signal)
        return logs

    def _stop_requested(self) -> bool:
        """Whether a signal reached any process: a process that got one sets accelerate's trigger, and
        ``check_trigger`` all-reduces it, so every process stops after the same step and saves the same checkpoint
        (a process that stopped alone would wait at the checkpoint's barrier while the others train on)."""
        if self._interrupt_signal is not None:
            self.accelerator.set_trigger()
        return self.accelerator.check_trigger()


# ----------------------------------------------------------------------------------------------------------------
# loading the teacher
# ----------------------------------------------------------------------------------------------------------------


def build_optimizers(roles: BackboneRoles, optim: OptimizationConfig) -> Dict[str, torch.optim.Optimizer]:
    """One AdamW per trainable role (DMD2), or bitsandbytes' 8-bit AdamW with ``--use_8bit_adam``."""
    optimizer_class = torch.optim.AdamW
    if optim.use_8bit_adam:
        import bitsandbytes  # checked by OptimizationConfig.validate

        optimizer_class = bitsandbytes.optim.AdamW8bit
    optimizers = {}
    for role in ("student", "critic"):
        optimizers[role] = optimizer_class(
            roles.role_parameters(role),
            lr=optim.learning_rate if role == "student" else optim.critic_learning_rate,
            betas=optim.betas,
            weight_decay=optim.adam_weight_decay,
            eps=optim.adam_epsilon,
        )
    return optimizers


def teacher_loading_kwargs(config: TrainConfig) -> Dict[str, Any]:
    """Where and which teacher weights to read: ``revision``, ``variant`` and ``cache_dir``, as every
    ``from_pretrained`` of the run takes them (only the ones that are set)."""
    kwargs = {"revision": config.revision, "variant": config.variant, "cache_dir": config.cache_dir}
    return {key: value for key, value in kwargs.items() if value}


def load_teacher_pipeline(
    config: TrainConfig,
    denoiser_name: str,
    weight_dtype: Optional[torch.dtype] = None,
    model_index: Optional[Dict[str, Any]] = None,
):
    """The teacher pipeline, its frozen denoiser loaded straight into ``weight_dtype`` (``torch_dtype=``, never a
    float32 copy first); the other components load as the pipeline's own ``from_pretrained`` loads them.

    ``model_index`` (the teacher's ``model_index.json``, read by the resolver) names the denoiser's class.
    """
    import importlib

    from diffusers import DiffusionPipeline

    from ..hub import read_json

    kwargs = teacher_loading_kwargs(config)
    if model_index is None:
        model_index = (
            read_json(config.teacher, "model_index.json", {k: v for k, v in kwargs.items() if k != "variant"}) or {}
        )
    library, class_name = model_index[denoiser_name][:2]
    denoiser_cls = getattr(importlib.import_module(library), class_name)
    # Preflight checked the folder's configs and safetensors headers; what only a load shows (a download that
    # fails, a tokenizer file that does not parse) is still one sentence, and the run has written nothing yet.
    try:
        denoiser = denoiser_cls.from_pretrained(
            config.teacher, subfolder=denoiser_name, torch_dtype=weight_dtype, **kwargs
        )
        # Components the folder was saved without (`[null, null]` in model_index.json, e.g. SD3 without T5):
        # diffusers' from_pretrained refuses such a folder unless they are named again as None.
        absent = {
            name: None for name, entry in model_index.items() if isinstance(entry, list) and entry == [None, None]
        }
        absent.pop(denoiser_name, None)
        return DiffusionPipeline.from_pretrained(config.teacher, **{denoiser_name: denoiser}, **absent, **kwargs)
    except (OSError, ValueError) as error:
        raise ConfigError(f"The teacher {config.teacher} could not be loaded ({reason_of(error)}).") from None


def trainable_denoiser_loader(
    config: TrainConfig, denoiser_cls, denoiser_name: str, device=None
) -> Callable[[], torch.nn.Module]:
    """A function that loads the teacher's denoiser in float32 on ``device``: the start of a full (trainable) role
    when the frozen backbone runs in a lower precision."""

    def load() -> torch.nn.Module:
        model = denoiser_cls.from_pretrained(
            config.teacher, subfolder=denoiser_name, torch_dtype=torch.float32, **teacher_loading_kwargs(config)
        )
        return model.to(device) if device is not None else model

    return load


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------


def _flat_config(data: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """A nested config as flat ``section.key`` scalars, the form trackers accept."""
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flat_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out


__all__ = [
    "Trainer",
    "TrainingResult",
    "NonFiniteError",
    "TrainingInterrupted",
    "HubError",
    "ConfigError",
    "DataError",
    "load_teacher_pipeline",
    "teacher_loading_kwargs",
    "trainable_denoiser_loader",
]
