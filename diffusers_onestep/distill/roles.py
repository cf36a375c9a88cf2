"""Teacher, critic ("fake score") and student over one frozen backbone -- and the helper that keeps gradients honest.

Layouts (``RolesConfig.student`` × ``RolesConfig.critic``):

==============  ==============  ===================================================================================
student         critic          networks in memory
==============  ==============  ===================================================================================
``lora``        ``lora``        one backbone with adapters ``student`` and ``critic``; teacher = adapters disabled
``full``        ``lora``        backbone with the ``critic`` adapter (SwiftBrush) + a trainable student copy
``lora``        ``full``        backbone with the ``student`` adapter + a trainable critic copy (DMD2 LoRA recipe)
``full``        ``full``        frozen teacher + trainable student and critic copies (DMD2)
==============  ==============  ===================================================================================

Two silent traps are handled here (both reproduced by ``tests/test_roles.py``):

1. peft's ``set_adapter`` sets ``requires_grad=False`` on every other adapter and autograd skips such leaves at
   backward time, so switching to the teacher or critic after the student's forward silently drops the student's
   gradients. :meth:`BackboneRoles.train_phase` fixes the flags for the whole update: exactly the trained role's
   parameters require grad, re-applied after every adapter switch.
2. Under gradient checkpointing the forward is recomputed during backward with whatever adapter is active *then*.
   The shared backbone therefore checkpoints with its own function (:meth:`BackboneRoles._checkpoint`): each
   checkpointed block records the role that ran its forward and is recomputed under that role. Passes through a
   frozen role that are differentiated w.r.t. their input (the GAN term, SiD's teacher and fake score) keep their
   checkpointing, which is what keeps SiD's two input-gradient passes within the shared-LoRA memory.

Under DDP every trainable parameter requires grad when the modules are wrapped (DDP only hooks those), the only
forward through a DDP wrapper in an update is the trained role's, and every other pass uses the unwrapped module
with its parameters frozen, so DDP never sees gradients it did not expect (pass ``find_unused_parameters=True``).
PixArt's transformer has no ``PeftAdapterMixin``; adapters are injected with peft's functional API for all families.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import torch
import torch.utils.checkpoint
from torch import nn

from ..families import Condition, FamilyAdapter
from ..families.base import _unwrap
from . import sharding
from .config import RolesConfig
from .models import TRAINABLE_ROLES, DistillationModels, RolePhases, check_trainable_role


class DiscriminatorHead(nn.Module):
    """A small conv head on trunk feature maps giving one logit per sample (after DMD2's ``cls_pred_branch``).

    Stride-2 3×3 conv blocks with GroupNorm and SiLU, global average pooling, then a linear layer. Runs in float32
    whatever the trunk's precision. It works on any spatial size and batch size: where a map is so small that a
    GroupNorm group would hold fewer than :data:`MIN_VALUES_PER_GROUP` values (a 1×1 map with one or two channels per
    group), neighbouring groups are merged for that call (the per-channel affine weights stay the same).
    """

    #: normalizing one value gives 0 and two values give ±1 whatever they are: a group needs at least three
    MIN_VALUES_PER_GROUP = 3

    def __init__(self, in_channels: int, hidden_channels: Optional[int] = None, num_blocks: int = 2):
        super().__init__()
        hidden = hidden_channels or max(32, min(256, in_channels))
        layers: List[nn.Module] = []
        channels = in_channels
        for _ in range(num_blocks):
            groups = _groups(hidden)
            layers += [nn.Conv2d(channels, hidden, 3, stride=2, padding=1), nn.GroupNorm(groups, hidden), nn.SiLU()]
            channels = hidden
        self.body = nn.Sequential(*layers)
        self.out = nn.Linear(hidden, 1)

    def forward(self, features: torch.Tensor, t: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = features.to(self.out.weight.dtype)
        for layer in self.body:
            if isinstance(layer, nn.GroupNorm):
                groups = _groups(
                    layer.num_channels,
                    values_per_channel=x.shape[2:].numel(),
                    min_values=self.MIN_VALUES_PER_GROUP,
                    most=layer.num_groups,
                )
                x = nn.functional.group_norm(x, groups, layer.weight, layer.bias, layer.eps)
            else:
                x = layer(x)
        return self.out(x.mean(dim=(2, 3))).squeeze(-1)


def _groups(channels: int, values_per_channel: Optional[int] = None, min_values: int = 1, most: int = 32) -> int:
    """The most GroupNorm groups (32, 16, ..., 1, at most ``most``) that divide ``channels`` and leave every group at
    least ``min_values`` values when each channel holds ``values_per_channel`` (``None``: any number)."""
    for groups in (32, 16, 8, 4, 2):
        fits = values_per_channel is None or (channels // groups) * values_per_channel >= min_values
        if groups <= most and channels % groups == 0 and fits:
            return groups
    return 1


def _present_targets(model: nn.Module, targets: Sequence[str]) -> List[str]:
    names = [name for name, _ in model.named_modules()]
    present = [t for t in targets if any(n == t or n.endswith("." + t) for n in names)]
    if not present:
        raise ValueError(
            f"None of the LoRA target modules {list(targets)} exist in the {type(model).__name__}; pass "
            "--lora_target_modules with module names of this model (e.g. to_q,to_k,to_v,to_out.0)."
        )
    return present


class BackboneRoles(RolePhases, DistillationModels):
    """The networks of a distillation run over a family adapter (see the module docstring for the layouts).

    Args:
        adapter: the teacher's family adapter; its denoiser becomes the frozen backbone.
        config: the roles configuration.
        student_prediction_type: the student's output parameterization (default: the teacher's).
        discriminator: build a discriminator head on the trunk features.
        dtype: dtype of the frozen teacher weights (mixed precision); trainable weights stay float32.
        trainable_copy: makes the denoiser a full role starts from (default: a copy of the adapter's); the trainer
            loads it in float32 from the teacher's files when the frozen backbone was loaded in a lower precision.
        image_seq_len: latent tokens of the training images (``adapter.image_seq_len(height, width)``): a
            resolution-dependent noise path (dynamic shifting, FLUX.1) is taken at this resolution
            (``NoisePath.at_image_seq_len``), by default the denoiser's native size; other paths ignore it.
    """

    def __init__(
        self,
        adapter: FamilyAdapter,
        config: RolesConfig,
        student_prediction_type: Optional[str] = None,
        discriminator: bool = False,
        dtype: Optional[torch.dtype] = None,
        trainable_copy: Optional[Callable[[], nn.Module]] = None,
        image_seq_len: Optional[int] = None,
    ):
        self.adapter = adapter
        self.config = config
        self.path = adapter.noise_path
        if self.path.resolution_dependent:  # at the run's resolution; by default the denoiser's native size
            size = adapter.default_resolution
            self.path = self.path.at_image_seq_len(image_seq_len or adapter.image_seq_len(size, size))
        self.prediction_type = adapter.prediction_type
        self.student_prediction_type = student_prediction_type or adapter.prediction_type
        base = adapter.denoiser
        #: the denoiser's own class (FSDP2 swaps a sharded module's class for a subclass), to rebuild a plain copy
        self.denoiser_class = type(base)
        #: set by the trainer once the modules are FSDP-sharded (their parameters are then DTensor shards)
        self.sharded = False
        self.teacher_has_embedded_guidance = adapter.has_embedded_guidance and bool(
            getattr(base.config, "guidance_embeds", False)
        )
        # The null condition is encoded once, so text encoders can be dropped after caching.
        self._null_condition = adapter.unconditional(1)

        base.requires_grad_(False)
        # Full roles are float32 copies of the clean teacher, made before any adapter is injected.
        trainable_copy = trainable_copy or (lambda: copy.deepcopy(base))
        self.student_model = trainable_copy().float().requires_grad_(True) if config.student == "full" else None
        self.critic_model = trainable_copy().float().requires_grad_(True) if config.critic == "full" else None
        if dtype is not None and next(base.parameters()).dtype != dtype:  # the trainer loads it in its dtype
            base.to(dtype)

        self.lora_roles = [r for r in TRAINABLE_ROLES if getattr(config, r) == "lora"]
        self.backbone = base
        if self.lora_roles:
            self._inject_adapters()
        self._tuner_layers = self._find_tuner_layers()
        self.discriminator_head = DiscriminatorHead(adapter.feature_channels()) if discriminator else None

        # Wrapped (DDP/FSDP) versions; identical to the modules until `set_prepared` is called.
        self.prepared: Dict[str, nn.Module] = dict(self.trainable_modules().items())
        self._phase: Optional[str] = None
        self._active: Optional[str] = None
        self._apply_requires_grad()
        if config.gradient_checkpointing:
            modules = dict(self.trainable_modules())
            # The frozen backbone too: a pass through it differentiated w.r.t. its input stores activations.
            modules.setdefault("backbone", self.backbone)
            for name, module in modules.items():
                if not hasattr(module, "enable_gradient_checkpointing"):
                    continue
                if module is self.backbone:
                    module.enable_gradient_checkpointing(gradient_checkpointing_func=self._checkpoint)
                else:
                    module.enable_gradient_checkpointing()

    # ------------------------------------------------------------------------------------------------------------
    # construction
    # ------------------------------------------------------------------------------------------------------------

    def _inject_adapters(self) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        targets = _present_targets(
            self.backbone, self.config.lora_target_modules or self.adapter.default_lora_target_modules
        )
        for role in self.lora_roles:
            rank = self.config.lora_rank
            if role == "critic" and self.config.critic_lora_rank:
                rank = self.config.critic_lora_rank
            lora_config = LoraConfig(
                r=rank,
                lora_alpha=self.config.lora_alpha or rank,
                target_modules=targets,
                lora_dropout=0.0,
                init_lora_weights=True,  # B = 0: every role starts exactly at the teacher
            )
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                inject_adapter_in_model(lora_config, self.backbone, adapter_name=role)
        # LoRA weights train in float32 even when the frozen base runs in bf16/fp16.
        for name, parameter in self.backbone.named_parameters():
            if "lora_" in name:
                parameter.data = parameter.data.float()

    def _find_tuner_layers(self):
        from peft.tuners.tuners_utils import BaseTunerLayer

        return [m for m in self.backbone.modules() if isinstance(m, BaseTunerLayer)]

    def lora_config(self, role: str):
        return self.backbone.peft_config[role]

    # ------------------------------------------------------------------------------------------------------------
    # parameters and modules
    # ------------------------------------------------------------------------------------------------------------

    def trainable_modules(self) -> Dict[str, nn.Module]:
        """Modules that hold trainable parameters, by name (what ``accelerator.prepare`` wraps)."""
        modules: Dict[str, nn.Module] = {}
        if self.lora_roles:
            modules["backbone"] = self.backbone
        if self.student_model is not None:
            modules["student_model"] = self.student_model
        if self.critic_model is not None:
            modules["critic_model"] = self.critic_model
        if self.discriminator_head is not None:
            modules["discriminator_head"] = self.discriminator_head
        return modules

    def set_prepared(self, name: str, module: nn.Module) -> None:
        """Record the wrapped (e.g. DDP) version of a trainable module."""
        self.prepared[name] = module

    def reshard(self) -> None:
        """FSDP: put every sharded module back into its sharded state. FSDP2 leaves a root module's parameters
        gathered after a forward that no backward followed (a frozen or ``no_grad`` pass), and while gathered the
        module's registered parameters are the whole tensors, not the shards; call this before reading them."""
        if not self.sharded:
            return
        from torch.distributed.fsdp import FSDPModule

        for module in self.prepared.values():
            for sub in module.modules():
                if isinstance(sub, FSDPModule):
                    sub.reshard()

    def named_role_parameters(self, role: str) -> Iterator:
        """``(name, parameter)`` of a trainable role; the critic's include the discriminator head."""
        check_trainable_role(role)
        if getattr(self.config, role) == "lora":
            marker = f".{role}."
            for name, parameter in self.backbone.named_parameters():
                if "lora_" in name and marker in name:
                    yield f"backbone.{name}", parameter
        else:
            module = self.student_model if role == "student" else self.critic_model
            for name, parameter in module.named_parameters():
                yield f"{role}_model.{name}", parameter
        if role == "critic" and self.discriminator_head is not None:
            for name, parameter in self.discriminator_head.named_parameters():
                yield f"discriminator_head.{name}", parameter

    def trainable_state_dict(self) -> Dict[str, torch.Tensor]:
        """Every trainable tensor (both roles and the head), detached, by stable name."""
        state = {}
        for role in TRAINABLE_ROLES:
            for name, parameter in self.named_role_parameters(role):
                state[name] = parameter.detach()
        return state

    @torch.no_grad()
    def load_trainable_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        """Copy ``state`` into the trainable parameters -- into this process's shard of each when the roles are
        sharded (``state`` then holds the shards, as a sharded checkpoint stores them)."""
        own = {}
        for role in TRAINABLE_ROLES:
            own.update(dict(self.named_role_parameters(role)))
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise ValueError(
                f"The checkpoint does not fit these roles: {len(missing)} missing and {len(unexpected)} unexpected "
                f"tensors (e.g. {(missing + unexpected)[0]}); was it written with other --student/--critic settings?"
            )
        for name, parameter in own.items():
            target = sharding.local(parameter)
            if tuple(state[name].shape) != tuple(target.shape):
                raise ValueError(
                    f"The checkpoint's {name} has shape {tuple(state[name].shape)}, this run's is "
                    f"{tuple(target.shape)}; was it written with another model or number of FSDP processes?"
                )
            target.copy_(state[name].to(target.dtype))

    # ------------------------------------------------------------------------------------------------------------
    # role switching
    # ------------------------------------------------------------------------------------------------------------

    def activate(self, role: str) -> None:
        """Make the shared backbone compute ``role`` (teacher = adapters off); restore the phase's grad flags."""
        if role not in ("teacher",) + TRAINABLE_ROLES:
            raise ValueError(f"Unknown role {role!r}; expected teacher, critic or student.")
        if not self.lora_roles or self._active == role:
            return
        if role == "teacher" or role not in self.lora_roles:
            for layer in self._tuner_layers:
                layer.enable_adapters(False)
        else:
            for layer in self._tuner_layers:
                layer.enable_adapters(True)
                layer.set_adapter(role)
        self._active = role
        self._apply_requires_grad()

    def _leave_phase_forward(self, role: str) -> None:
        # Backward (and checkpoint recomputation) must run under the adapter the loss was computed with.
        self.activate(role)

    @contextlib.contextmanager
    def input_grad_pass(self, role: str):
        """A pass through a frozen role differentiated w.r.t. its input. Nothing is switched: gradient
        checkpointing stays on (:meth:`_checkpoint` recomputes under this role); only a misuse is caught."""
        if role == self._phase:
            raise RuntimeError(f"input_grad_pass({role!r}) inside the {role} phase: that role is not frozen.")
        yield

    def _checkpoint(self, block: nn.Module, *args):
        """The shared backbone's gradient-checkpointing function (diffusers' ``gradient_checkpointing_func``): torch's
        non-reentrant checkpoint whose recomputation runs under the role that ran the forward (teacher, critic or
        student), whatever role is active when backward reaches the block."""
        role = self._active

        def contexts():
            return contextlib.nullcontext(), self._recomputing_as(role)

        return torch.utils.checkpoint.checkpoint(block.__call__, *args, use_reentrant=False, context_fn=contexts)

    @contextlib.contextmanager
    def _recomputing_as(self, role: Optional[str]):
        previous = self._active
        if role is not None:
            self.activate(role)
        try:
            yield
        finally:
            if previous is not None:
                self.activate(previous)

    def _module_name(self, role: str) -> str:
        if role == "student" and self.student_model is not None:
            return "student_model"
        if role == "critic" and self.critic_model is not None:
            return "critic_model"
        return "backbone"

    def _module_of(self, role: str) -> nn.Module:
        return getattr(self, self._module_name(role))

    def _callable_of(self, role: str) -> nn.Module:
        """The module to call: the wrapped (DDP) one only for the trained role's forward with grad."""
        module = self._module_of(role)
        if role == self._phase and torch.is_grad_enabled():
            return self.prepared.get(self._module_name(role), module)
        return module

    # ------------------------------------------------------------------------------------------------------------
    # DistillationModels
    # ------------------------------------------------------------------------------------------------------------

    def _run(self, role, x_t, t, condition, guidance=None, return_features=False):
        module = self._module_of(role)
        if module is self.backbone:
            self.activate(role)
        dtype = _unwrap(module).dtype
        condition = condition.to(dtype=dtype)
        out = self.adapter.denoise(
            x_t.to(dtype),
            t,
            condition,
            denoiser=self._callable_of(role),
            guidance=guidance,
            return_features=return_features,
        )
        if return_features:
            pred, features = out
            return pred.float(), features
        return out.float()

    def teacher(self, x_t, t, condition, *, guidance=None, return_features=False):
        return self._run("teacher", x_t, t, condition, guidance=guidance, return_features=return_features)

    def critic(self, x_t, t, condition, *, return_features=False):
        return self._run("critic", x_t, t, condition, return_features=return_features)

    def student(self, x_t, t, condition):
        return self._run("student", x_t, t, condition)

    def discriminator(self, features, t):
        head = self.discriminator_head
        if self._phase == "critic" and torch.is_grad_enabled():
            head = self.prepared.get("discriminator_head", head)
        return head(features, t)

    def unconditional(self, condition: Condition) -> Condition:
        null = self._null_condition.to(device=condition.embeds.device)
        return null.repeat_interleave(condition.batch_size)

    def concat(self, conditions):
        return Condition.cat(list(conditions))

    # ------------------------------------------------------------------------------------------------------------
    # export
    # ------------------------------------------------------------------------------------------------------------

    def student_lora_state_dict(self) -> Dict[str, torch.Tensor]:
        """The student adapter in peft naming, without the adapter name (for ``save_lora_weights``)."""
        from peft import get_peft_model_state_dict

        if "student" not in self.lora_roles:
            raise ValueError("The student is a full model, not a LoRA.")
        if self.sharded:  # gather the adapter's shards (a collective: every process calls this)
            marker = ".student."
            named = ((n, p) for n, p in self.backbone.named_parameters() if "lora_" in n and marker in n)
            return get_peft_model_state_dict(
                self.backbone, state_dict=sharding.full_state(named), adapter_name="student"
            )
        return get_peft_model_state_dict(self.backbone, adapter_name="student")

    def student_denoiser(self) -> Optional[nn.Module]:
        """A plain denoiser with the student's weights (the copy, or the backbone with the student LoRA fused).

        Sharded roles (a full student): the weights are gathered from the shards -- a collective, every process
        calls this -- into a new plain module on the main process; the other processes get ``None``.
        """
        if self.sharded:
            if self.student_model is None:
                raise ValueError("A sharded LoRA student is exported as its LoRA (student_lora_state_dict).")
            weights = sharding.full_state(self.student_model.state_dict().items())
            if torch.distributed.get_rank() != 0:
                return None
            plain = self.denoiser_class.from_config(self.student_model.config)
            plain.load_state_dict(weights, strict=True)
            return plain.to(device=_device_of(self.student_model), dtype=torch.float32).eval()
        if self.student_model is not None:
            return copy.deepcopy(_unwrap(self.student_model))
        from peft.tuners.tuners_utils import BaseTunerLayer

        from ..lora import fuse_lora

        # Merge in float32: a bf16/fp16 teacher base would round the LoRA delta away.
        clone = copy.deepcopy(self.backbone).float()
        for layer in clone.modules():
            if isinstance(layer, BaseTunerLayer):
                layer.enable_adapters(True)
        fuse_lora(clone, ["student"])
        return clone


def _device_of(module: nn.Module) -> torch.device:
    return next(iter(sharding.local(p) for p in module.parameters())).device
