"""Fully sharded data parallel (FSDP2) for a distillation run, through accelerate's FSDP2 plugin.

``accelerate launch --config_file training/accelerate_configs/fsdp.yaml`` (or ``--use_fsdp --fsdp_version 2``)
makes every trainable module -- the LoRA backbone, full student and critic copies, the discriminator head -- and the
frozen teacher backbone ``torch.distributed.fsdp.fully_shard`` modules, each through ``Accelerator.prepare`` (one
model per call, as accelerate's FSDP2 path requires). ``fully_shard`` converts a module in place, so every role's pass
(teacher = adapters off, critic, student, discriminator trunk) runs through the sharded module: parameters are
``DTensor`` shards, all-gathered for each forward and backward and resharded after.

**The CPU seam.** accelerate 1.15 turns ``ACCELERATE_USE_FSDP`` into ``DistributedType.FSDP`` only for accelerator
device types (CUDA, XPU, ...); on several CPU processes it keeps ``MULTI_CPU`` (gloo) and drops the plugin, although
``fully_shard`` itself runs on the CPU over gloo. :func:`enable_fsdp_on_cpu` restores what accelerate would have set on
a GPU machine -- the ``FullyShardedDataParallelPlugin`` read from the same environment variables and the distributed
type ``FSDP`` on the (shared) accelerator and partial states -- so that ``Accelerator.prepare`` takes accelerate's own
FSDP2 preparation (``fsdp2_prepare_model``: auto-wrap policy, ``fully_shard`` of the blocks and the root). The test
suite launches the real command with the FSDP flags on 2 CPU processes and so runs the same code as a GPU run; only
the device and the collective backend differ.
"""

from __future__ import annotations

import os
from typing import Dict

import torch

from .config import ConfigError


def fsdp_requested() -> bool:
    """Whether the launcher asked for FSDP (``accelerate launch --use_fsdp`` / ``distributed_type: FSDP``)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def enable_fsdp_on_cpu(accelerator) -> bool:
    """Give a multi-process CPU run the FSDP2 plugin accelerate dropped (see the module docstring); returns whether
    it did. Does nothing unless FSDP was requested and accelerate formed a gloo group of CPU processes."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if not fsdp_requested() or accelerator.distributed_type != DistributedType.MULTI_CPU:
        return False
    plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* variables the launcher set, as accelerate does
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    accelerator.state.fsdp_plugin = plugin
    # Both states: a later AcceleratorState() copies the partial state's distributed type back over its own.
    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState().distributed_type = DistributedType.FSDP
    return True


def shard_whole(accelerator, module: torch.nn.Module) -> torch.nn.Module:
    """``fully_shard`` ``module`` as one unit with the accelerator's FSDP2 plugin settings (what
    ``fsdp2_prepare_model`` does to a model none of whose submodules its wrap policy selects)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    plugin = accelerator.state.fsdp_plugin
    module.to(accelerator.device)
    return fully_shard(
        module,
        mp_policy=plugin.mixed_precision_policy or MixedPrecisionPolicy(),
        offload_policy=plugin.cpu_offload,
    )


def clip_grad_norm_(parameters, max_norm: float) -> torch.Tensor:
    """Clip sharded gradients to a global norm; returns the norm (the same on every process).

    The torchtitan recipe over public torch APIs: the total norm of ``DTensor`` gradients is reduced across the shards
    (``full_tensor``) before the gradients are scaled. (``Accelerator.clip_grad_norm_`` cannot be used here: under
    FSDP it compares the parameter list with every prepared model's by ``==``, which fails on same-length lists of
    other tensors, e.g. a full student's against the frozen teacher's.)
    """
    parameters = list(parameters)
    grads = [p.grad for p in parameters if p.grad is not None]
    total_norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    total_norm = full(total_norm)
    torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total_norm)
    return total_norm


def check_fsdp_support(accelerator, config) -> None:
    """Refuse, in one sentence each, what this trainer does not run under FSDP."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.FSDP:
        return
    if not accelerator.is_fsdp2:
        raise ConfigError(
            "FSDP version 1 is not supported: the role passes need FSDP2's in-place sharding; set fsdp_version: 2 "
            "(training/accelerate_configs/fsdp.yaml) or pass --fsdp_version 2 to accelerate launch."
        )
    if config.optim.mixed_precision == "fp16":
        raise ConfigError(
            "--mixed_precision fp16 is not supported with FSDP (accelerate's FSDP2 path has no sharded gradient "
            "scaler); use bf16."
        )
    if config.optim.use_8bit_adam:
        raise ConfigError(
            "--use_8bit_adam is not supported with FSDP (bitsandbytes' optimizer does not take sharded DTensor "
            "parameters); drop it or use DDP."
        )
    if config.output.eval_steps:
        raise ConfigError(
            "--eval_steps is not supported with FSDP yet (the evaluation renders on the main process alone, while a "
            "sharded student needs every process in its passes); evaluate the exported student with "
            "`diffusers-onestep evaluate` instead."
        )


def is_sharded(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a sharded tensor (the tensor itself otherwise)."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def like(reference: torch.Tensor, local_tensor: torch.Tensor) -> torch.Tensor:
    """``local_tensor`` as a shard laid out as ``reference`` (a ``DTensor``), or as it is when ``reference`` is not
    sharded."""
    if not is_sharded(reference):
        return local_tensor
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        local_tensor.to(reference.device),
        reference.device_mesh,
        reference.placements,
        shape=reference.shape,
        stride=reference.stride(),
    )


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor (a collective: every process must call it, in the same order)."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def full_state(named_tensors) -> Dict[str, torch.Tensor]:
    """``{name: whole tensor on the CPU}`` of ``(name, tensor)`` pairs; a collective for sharded tensors."""
    return {name: full(tensor.detach()).cpu() for name, tensor in named_tensors}
