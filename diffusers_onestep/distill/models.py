"""What a distillation method sees of the networks, the randomness of a step, and a batch.

:class:`DistillationModels` is the protocol every method is written against: the teacher, critic, student and
discriminator as *native-prediction* functions over one noise path. :class:`.roles.BackboneRoles` implements it for
real backbones, :class:`diffusers_onestep.testing.toy.ToyModels` for exact 2-D teachers.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence

import torch

from .. import parameterization as param
from . import losses

class DistillationModels:
    """What a method needs from the networks. :class:`.roles.BackboneRoles` implements it for real backbones.

    Every network call takes ``(x_t, t, condition)`` with natural path times ``t`` of shape ``[B]`` and returns the
    network's native prediction (``prediction_type`` for teacher and critic, ``student_prediction_type`` for the
    student); with ``return_features=True`` it also returns the trunk features a discriminator head reads.
    """

    path: param.NoisePath
    prediction_type: str
    student_prediction_type: str
    #: the teacher takes a guidance scale as an input (SANA-Sprint) instead of classifier-free guidance
    teacher_has_embedded_guidance: bool = False

    def teacher(self, x_t, t, condition, *, guidance=None, return_features=False):
        raise NotImplementedError

    def critic(self, x_t, t, condition, *, return_features=False):
        raise NotImplementedError

    def student(self, x_t, t, condition):
        raise NotImplementedError

    def discriminator(self, features: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def unconditional(self, condition):
        """The null condition of the same batch size (classifier-free guidance)."""
        raise NotImplementedError

    def concat(self, conditions: Sequence[Any]):
        """Concatenate conditions along the batch (to run several passes as one)."""
        raise NotImplementedError

    def batch_size_of(self, condition) -> int:
        raise NotImplementedError

    def train_phase(self, role: str):
        """Context for one update of ``role``: only its parameters require grad; on exit its forward role is
        active again so that backward (and gradient checkpointing's recomputation) sees the same adapter."""
        return contextlib.nullcontext()

    def input_grad_pass(self, role: str):
        """Context for a pass through a *frozen* role whose output is differentiated w.r.t. its input."""
        return contextlib.nullcontext()


class RandomSource:
    """All randomness of a step, drawn for the *global* batch and sliced to this process's share.

    Every process holds the same generator state, so sample ``i`` of the global batch gets the same noise, times and
    guidance scales however the batch is split across processes: a 2-process run equals a 1-process run with the
    same global batch (up to the order of floating-point sums). Scalars (e.g. DMD2's backward-simulation step count)
    are identical on every process, without a broadcast.
    """

    def __init__(self, generator: torch.Generator, rank: int = 0, world_size: int = 1, device="cpu"):
        self.generator = generator
        self.rank = rank
        self.world_size = world_size
        self.device = torch.device(device)

    @classmethod
    def from_seed(cls, seed: int, **kwargs) -> "RandomSource":
        return cls(torch.Generator().manual_seed(seed), **kwargs)

    def _slice(self, full: torch.Tensor, local: int) -> torch.Tensor:
        return full[self.rank * local:(self.rank + 1) * local].to(self.device)

    def randn(self, shape, dtype=torch.float32) -> torch.Tensor:
        """Standard normal noise of the local ``shape`` (batch first)."""
        shape = tuple(shape)
        full = torch.randn((shape[0] * self.world_size,) + shape[1:], generator=self.generator, dtype=dtype)
        return self._slice(full, shape[0])

    def times(self, path: param.NoisePath, batch_size: int, time_range) -> torch.Tensor:
        """Training times of ``path`` (natural units) for the local batch."""
        full = path.sample_training_times(batch_size * self.world_size, self.generator, time_range)
        return self._slice(full, batch_size)

    def guidance(self, batch_size: int, scale: float, scale_range=None) -> torch.Tensor:
        full = losses.sample_guidance_scale(batch_size * self.world_size, scale, scale_range, generator=self.generator)
        return self._slice(full, batch_size)

    def randint(self, high: int) -> int:
        """A scalar in ``[0, high)``, the same on every process."""
        return int(torch.randint(0, high, (1,), generator=self.generator).item())

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])


@dataclass
class Batch:
    """One training batch. ``noise`` is the student's input noise; ``real`` are real clean latents (optional)."""

    condition: Any
    noise: torch.Tensor
    real: Optional[torch.Tensor] = None
    real_condition: Any = None
