"""Roles: one frozen backbone with student/critic LoRA adapters (or separate copies) -- gradients land only on the
intended parameters, with and without gradient checkpointing, and the teacher is exactly the base model. Also the
shared rules of ``distill.models``: the gradient phases (``RolePhases``) and the update schedule (``roles_to_update``).
"""

import copy

import pytest
import torch

from diffusers_onestep.distill.config import MethodConfig, RolesConfig
from diffusers_onestep.distill.methods import build_method
from diffusers_onestep.distill.models import Batch, RandomSource, RolePhases, roles_to_update
from diffusers_onestep.distill.roles import BackboneRoles
from diffusers_onestep.families import get_adapter_class
from diffusers_onestep.testing import TINY_PROMPTS, tiny_components


FAMILIES = ["sdxl", "pixart_alpha", "sana", "flux", "sd3"]
TIMESTEPS = {"sdxl": [399], "pixart_alpha": [400], "sana": [1.0], "flux": [1.0], "sd3": [1.0]}
#: LoRA layers with no path to the output: SD3's last joint block discards its text stream (`context_pre_only`), so the
#: text-token queries of its attention (`add_q_proj`, a target of diffusers' SD3 LoRA examples) get zero gradients
NO_OUTPUT_PATH = {"sd3": ("transformer_blocks.2.attn.add_q_proj.",)}


def make_adapter(family):
    adapter_cls = get_adapter_class(family)
    adapter = adapter_cls(tiny_components(family), max_sequence_length=16)
    return adapter


def perturb_lora(roles, seed=0):
    """LoRA B starts at zero (students start at the teacher); make it non-zero so every LoRA tensor gets gradients."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in roles.backbone.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)


def make_batch(adapter, batch_size=2, seed=0):
    condition = adapter.encode_prompt(TINY_PROMPTS[:batch_size])
    res = adapter.default_resolution if adapter.name != "sdxl" else 32
    noise = torch.randn(adapter.latent_shape(batch_size, res, res), generator=torch.Generator().manual_seed(seed))
    return Batch(condition=condition, noise=noise)


def grads(params):
    return [p.grad for p in params]


def run_step(roles, method, role, batch, seed=0):
    rng = RandomSource.from_seed(seed)
    step = method.student_step if role == "student" else method.critic_step
    loss, logs = step(batch, rng)
    loss.backward()
    assert torch.isfinite(loss)
    return logs


@pytest.mark.parametrize("family", FAMILIES)
def test_teacher_is_the_base_model(family):
    adapter = make_adapter(family)
    reference = copy.deepcopy(adapter.denoiser)
    roles = BackboneRoles(adapter, RolesConfig(lora_rank=4))
    perturb_lora(roles)
    batch = make_batch(adapter)
    t = torch.full((2,), adapter.noise_path.t_max * 0.5, dtype=torch.float64)
    with torch.no_grad():
        teacher = roles.teacher(batch.noise, t, batch.condition)
        base = adapter.denoise(batch.noise, t, batch.condition, denoiser=reference)
        student = roles.student(batch.noise, t, batch.condition)
        critic = roles.critic(batch.noise, t, batch.condition)
    torch.testing.assert_close(teacher, base.float(), rtol=0, atol=1e-6)
    # ...and the adapters really change the outputs, each in its own way.
    assert (student - teacher).abs().max() > 1e-4
    assert (critic - teacher).abs().max() > 1e-4
    assert (critic - student).abs().max() > 1e-4


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradients_reach_only_the_trained_adapter(family, checkpointing):
    adapter = make_adapter(family)
    roles = BackboneRoles(adapter, RolesConfig(lora_rank=4, gradient_checkpointing=checkpointing))
    perturb_lora(roles)
    method = build_method(MethodConfig(guidance_scale=3.0).validate(), roles, TIMESTEPS[family])
    batch = make_batch(adapter)
    student, critic = roles.role_parameters("student"), roles.role_parameters("critic")
    base = [p for n, p in roles.backbone.named_parameters() if "lora_" not in n]
    assert len(student) == len(critic) > 0

    dead = NO_OUTPUT_PATH.get(family, ())
    live = {
        role: [p for n, p in roles.named_role_parameters(role) if not any(d in n for d in dead)]
        for role in ("student", "critic")
    }
    assert len(student) - len(live["student"]) == 2 * len(dead)  # lora_A and lora_B of each

    run_step(roles, method, "student", batch)
    assert all(g is not None for g in grads(student)), "student LoRA lost gradients"
    assert all(g.abs().sum() > 0 for g in grads(live["student"])), "student LoRA lost gradients"
    assert all(g is None for g in grads(critic)), "critic LoRA got student gradients"
    assert all(g is None for g in grads(base)), "the frozen base got gradients"

    for p in student:
        p.grad = None
    run_step(roles, method, "critic", batch)
    assert all(g is not None for g in grads(critic)), "critic LoRA lost gradients"
    assert all(g.abs().sum() > 0 for g in grads(live["critic"])), "critic LoRA lost gradients"
    assert all(g is None for g in grads(student)), "student LoRA got critic gradients"
    assert all(g is None for g in grads(base))


@pytest.mark.parametrize("family", ["sdxl", "pixart_alpha"])
def test_checkpointing_gives_the_same_gradients(family):
    """diffusers' checkpointing recomputes forwards during backward under whatever adapter is active then; the
    roles helper must make that the trained role's adapter (diffusers-facts §5.3 'Fix B' is wrong here)."""
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        adapter = make_adapter(family)
        roles = BackboneRoles(adapter, RolesConfig(lora_rank=4, gradient_checkpointing=checkpointing))
        perturb_lora(roles)
        method = build_method(MethodConfig(guidance_scale=3.0).validate(), roles, TIMESTEPS[family])
        batch = make_batch(adapter)
        run_step(roles, method, "student", batch, seed=1)
        run_step(roles, method, "critic", batch, seed=2)
        results.append([p.grad.clone() for p in roles.role_parameters("student") + roles.role_parameters("critic")])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def sid_student_grads(family, checkpointing, default_checkpoint_function=False):
    torch.manual_seed(0)
    adapter = make_adapter(family)
    roles = BackboneRoles(adapter, RolesConfig(lora_rank=4, gradient_checkpointing=checkpointing))
    if default_checkpoint_function:
        roles.backbone.enable_gradient_checkpointing()  # diffusers' own: recomputes under the active adapter
    perturb_lora(roles)
    config = MethodConfig(method="sid", guidance_scale=3.0, fake_guidance_scale=2.0).validate()
    method = build_method(config, roles, TIMESTEPS[family])
    run_step(roles, method, "student", make_batch(adapter), seed=1)
    return [p.grad.clone() for p in roles.role_parameters("student")]


@pytest.mark.parametrize("family", ["sdxl", "pixart_alpha"])
def test_checkpointed_input_gradient_passes_recompute_under_their_own_role(family):
    """SiD's student step differentiates the frozen teacher (adapters off) and the frozen critic adapter w.r.t. x_t
    on the one shared backbone. With checkpointing kept on for those passes, each block must be recomputed under
    the role that ran it: the gradients equal the uncheckpointed ones. Negative control: diffusers' default
    checkpoint function recomputes the teacher's and critic's blocks under the student adapter (active at
    backward), and torch refuses the recomputation: the LoRA layers save tensors the teacher's forward did not."""
    plain = sid_student_grads(family, checkpointing=False)
    ours = sid_student_grads(family, checkpointing=True)
    for a, b in zip(plain, ours):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    with pytest.raises(torch.utils.checkpoint.CheckpointError, match="different metadata"):
        sid_student_grads(family, checkpointing=True, default_checkpoint_function=True)


@pytest.mark.parametrize("student,critic", [("full", "lora"), ("lora", "full"), ("full", "full")])
def test_separate_copy_layouts(student, critic):
    adapter = make_adapter("pixart_alpha")
    reference = copy.deepcopy(adapter.denoiser)
    roles = BackboneRoles(adapter, RolesConfig(student=student, critic=critic, lora_rank=4))
    perturb_lora(roles)
    if student == "full":
        assert roles.student_model is not None and roles.student_model is not roles.backbone
    if critic == "full":
        assert roles.critic_model is not None and roles.critic_model is not roles.backbone
    batch = make_batch(adapter)
    method = build_method(MethodConfig(guidance_scale=3.0).validate(), roles, [400])
    t = torch.full((2,), 500.0, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(
            roles.teacher(batch.noise, t, batch.condition),
            adapter.denoise(batch.noise, t, batch.condition, denoiser=reference).float(),
            rtol=0,
            atol=1e-6,
        )
    frozen = [p for n, p in roles.backbone.named_parameters() if "lora_" not in n]
    run_step(roles, method, "student", batch)
    assert all(p.grad is not None for p in roles.role_parameters("student"))
    assert all(p.grad is None for p in roles.role_parameters("critic"))
    assert all(p.grad is None for p in frozen)
    for p in roles.role_parameters("student"):
        p.grad = None
    run_step(roles, method, "critic", batch)
    assert all(p.grad is not None for p in roles.role_parameters("critic"))
    assert all(p.grad is None for p in roles.role_parameters("student"))
    assert all(p.grad is None for p in frozen)


def test_discriminator_on_critic_trunk_trains_head_and_critic_only():
    """DMD2: the GAN head sits on the critic's features; in the student step the critic is frozen."""
    adapter = make_adapter("sdxl")
    roles = BackboneRoles(adapter, RolesConfig(lora_rank=4), discriminator=True)
    perturb_lora(roles)
    config = MethodConfig(guidance_scale=3.0, gan_weight=5e-3, discriminator_trunk="critic").validate()
    method = build_method(config, roles, [399])
    batch = make_batch(adapter)
    batch.real = torch.randn_like(batch.noise)
    batch.real_condition = batch.condition
    head = list(roles.discriminator_head.parameters())
    logs = run_step(roles, method, "student", batch)
    assert "student/gan_loss" in logs
    assert all(p.grad is not None for p in roles.role_parameters("student"))
    assert all(p.grad is None for p in roles.role_parameters("critic"))  # head included
    for p in roles.role_parameters("student"):
        p.grad = None
    logs = run_step(roles, method, "critic", batch)
    assert "critic/discriminator_loss" in logs
    assert all(p.grad is not None for p in head)
    assert all(p.grad is not None for p in roles.role_parameters("critic"))
    assert all(p.grad is None for p in roles.role_parameters("student"))


def test_f_divergence_on_teacher_trunk_freezes_the_teacher():
    adapter = make_adapter("sana")
    roles = BackboneRoles(adapter, RolesConfig(lora_rank=4), discriminator=True)
    perturb_lora(roles)
    method = build_method(MethodConfig(divergence="js", guidance_scale=3.0).validate(), roles, [1.0])
    batch = make_batch(adapter)
    batch.real = torch.randn_like(batch.noise)
    batch.real_condition = batch.condition
    logs = run_step(roles, method, "student", batch)
    assert logs["student/dm_weight_mean"] == pytest.approx(1.0, abs=1e-3)  # h / mean(h)
    base = [p for n, p in roles.backbone.named_parameters() if "lora_" not in n]
    assert all(p.grad is None for p in base)
    assert all(p.grad is None for p in roles.role_parameters("critic"))
    assert all(p.grad is not None for p in roles.role_parameters("student"))


class TwoLinearRoles(RolePhases):
    """The smallest ``RolePhases``: one linear layer per trainable role, recording when the forward phase is left."""

    def __init__(self):
        self.student_net, self.critic_net = torch.nn.Linear(2, 2), torch.nn.Linear(2, 1)
        self.left = []
        self._apply_requires_grad()

    def named_role_parameters(self, role):
        module = self.student_net if role == "student" else self.critic_net
        return module.named_parameters()

    def _leave_phase_forward(self, role):
        self.left.append(role)


def requires_grad_of(models, role):
    return {p.requires_grad for p in models.role_parameters(role)}


def test_role_phases_freeze_the_other_role_until_the_phase_ends():
    models = TwoLinearRoles()
    assert models.phase is None and requires_grad_of(models, "student") == requires_grad_of(models, "critic") == {True}
    for role, other in (("student", "critic"), ("critic", "student")):
        with models.train_phase(role):
            assert models.phase == role
            assert requires_grad_of(models, role) == {True} and requires_grad_of(models, other) == {False}
        # the phase outlives the forward block: backward and the optimizer step see the same flags
        assert models.left[-1] == role and models.phase == role and requires_grad_of(models, other) == {False}
        models.end_phase()
        assert models.phase is None and requires_grad_of(models, other) == {True}
    with pytest.raises(RuntimeError, match="boom"), models.train_phase("critic"):
        raise RuntimeError("boom")
    assert models.left == ["student", "critic", "critic"]
    with pytest.raises(ValueError, match="Unknown trainable role 'teacher'"), models.train_phase("teacher"):
        pass


def test_backbone_roles_leave_a_phase_with_the_trained_adapter_active():
    """After the forward block the shared backbone computes the trained role again, whatever ran last inside it,
    so that gradient checkpointing recomputes the forward under the right adapter."""
    adapter = make_adapter("pixart_alpha")
    roles = BackboneRoles(adapter, RolesConfig(lora_rank=4))
    assert isinstance(roles, RolePhases)
    perturb_lora(roles)
    batch = make_batch(adapter)
    t = torch.full((2,), 500.0, dtype=torch.float64)
    with torch.no_grad():
        with roles.train_phase("student"):
            roles.teacher(batch.noise, t, batch.condition)
        after = adapter.denoise(batch.noise, t, batch.condition, denoiser=roles.backbone).float()
        assert roles.phase == "student"
        assert requires_grad_of(roles, "student") == {True} and requires_grad_of(roles, "critic") == {False}
        teacher = roles.teacher(batch.noise, t, batch.condition)
        student = roles.student(batch.noise, t, batch.condition)
    torch.testing.assert_close(after, student, rtol=0, atol=0)
    assert (after - teacher).abs().max() > 1e-4
    roles.end_phase()
    assert requires_grad_of(roles, "student") == requires_grad_of(roles, "critic") == {True}


def test_roles_to_update_is_the_two_time_scale_rule():
    """DMD2 §4.3: the critic every iteration, the student first on every k-th, starting with the first."""
    schedule = [roles_to_update(i, 3) for i in range(7)]
    assert schedule == [("student", "critic"), ("critic",), ("critic",)] * 2 + [("student", "critic")]
    assert all(roles_to_update(i, 1) == ("student", "critic") for i in range(4))
    with pytest.raises(ValueError, match="at least 1"):
        roles_to_update(0, 0)
