"""What a distillation method sees of the networks, the randomness of a step, and a batch -- and the rules that
every training loop over them shares.

:class:`DistillationModels` is the protocol every method is written against: the teacher, critic, student and
discriminator as *native-prediction* functions over one noise path. :class:`.roles.BackboneRoles` implements it for
real backbones, :class:`diffusers_onestep.testing.toy.ToyModels` for exact 2-D teachers. Both take their gradient
phases from :class:`RolePhases`, and both loops (the trainer and ``testing.toy.train_toy``) take the order of the
updates from :func:`roles_to_update`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from .. import parameterization as param
from . import losses


#: The roles that own trainable parameters (the critic's include the discriminator's).
TRAINABLE_ROLES = ("student", "critic")


def check_trainable_role(role: str) -> None:
    if role not in TRAINABLE_ROLES:
        raise ValueError(f"Unknown trainable role {role!r}; expected student or critic.")


def roles_to_update(iteration: int, critic_updates_per_student: int) -> Tuple[str, ...]:
    """The roles updated at the 0-based ``iteration``, in order: DMD2's two time-scale update rule (Yin et al. 2024b,
    "Improved Distribution Matching Distillation", arXiv 2405.14867).

    The critic (fake score, with the discriminator) is updated every iteration; on every
    ``critic_updates_per_student``-th iteration, starting with the first, the student is updated first. So ``N``
    iterations make ``N`` critic updates and ``ceil(N / critic_updates_per_student)`` student updates.
    """
    if critic_updates_per_student < 1:
        raise ValueError(f"critic_updates_per_student must be at least 1, got {critic_updates_per_student}.")
    if iteration % critic_updates_per_student == 0:
        return ("student", "critic")
    return ("critic",)


class RolePhases:
    """The gradient-phase rule of the trainable roles, over an abstract :meth:`named_role_parameters`.

    Inside an update of ``role`` exactly that role's parameters require grad; outside any phase every trainable
    parameter does (what DDP wrapping and the optimizers are set up with). A phase starts with :meth:`train_phase`
    and lasts until :meth:`end_phase`, *after* the optimizer step: backward then sees the flags the forward was
    computed with, and a frozen role's parameters collect no gradient even when the loss flows through it (the
    teacher-trunk discriminator term, the student's sample fed to the critic). Subclasses call
    :meth:`_apply_requires_grad` at the end of their construction, and again whenever something else may have flipped
    the flags (peft's ``set_adapter`` does).
    """

    _phase: Optional[str] = None

    def named_role_parameters(self, role: str) -> Iterator[Tuple[str, torch.nn.Parameter]]:
        """``(name, parameter)`` of a trainable role, by stable name."""
        raise NotImplementedError

    def role_parameters(self, role: str) -> List[torch.nn.Parameter]:
        return [p for _, p in self.named_role_parameters(role)]

    @property
    def phase(self) -> Optional[str]:
        """The role being updated, or ``None`` outside an update."""
        return self._phase

    def _apply_requires_grad(self) -> None:
        """Exactly the parameters of the phase's role require grad (all trainable ones outside a phase)."""
        for role in TRAINABLE_ROLES:
            flag = self._phase is None or self._phase == role
            for parameter in self.role_parameters(role):
                parameter.requires_grad_(flag)

    def _leave_phase_forward(self, role: str) -> None:
        """Runs when the ``train_phase(role)`` block exits, before backward (nothing to do by default)."""

    @contextlib.contextmanager
    def train_phase(self, role: str):
        """Context for the forward of one update of ``role``: only its parameters require grad, until
        :meth:`end_phase`."""
        check_trainable_role(role)
        self._phase = role
        self._apply_requires_grad()
        try:
            yield
        finally:
            self._leave_phase_forward(role)

    def end_phase(self) -> None:
        """Leave the current phase (every trainable parameter requires grad again); call after the optimizer step."""
        self._phase = None
        self._apply_requires_grad()


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
        return full[self.rank * local : (self.rank + 1) * local].to(self.device)

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
    """One training batch. ``noise`` is the student's input noise; ``real`` are real clean latents (optional);
    ``real_noise`` is, for a teacher reference set (``--real_images teacher``), the noise each ``real`` latent was
    sampled from by the teacher (the pairs of DMD's regression loss)."""

    condition: Any
    noise: torch.Tensor
    real: Optional[torch.Tensor] = None
    real_condition: Any = None
    real_noise: Optional[torch.Tensor] = None
