"""Methods are plug-ins: a method defined in this file (one class, registered from outside the library) is resolved,
listed by ``--help``, computes its closed-form gradient, and trains through ``accelerate launch``. Also the method
defects fixed with the registry: embedded-guidance teachers as discriminator trunks, and the conditioning the
discriminator judges real and generated samples under."""

import json
import os

import pytest
import torch
from training_utils import TINY_FLAGS, launch, write_prompts

from diffusers_onestep.distill import cli
from diffusers_onestep.distill.config import MethodConfig, RolesConfig
from diffusers_onestep.distill.methods import (
    DMD2,
    DistillationMethod,
    FDistill,
    build_method,
    method_names,
    register_method,
    resolve_method_config,
)
from diffusers_onestep.distill.models import Batch, RandomSource
from diffusers_onestep.distill.roles import BackboneRoles
from diffusers_onestep.families import get_adapter_class
from diffusers_onestep.testing import TINY_PROMPTS, save_tiny_native_pipeline, tiny_components


TESTS = os.path.dirname(os.path.abspath(__file__))


@register_method
class TeacherRegression(DistillationMethod):
    """Regress the student's sample onto the guided teacher's denoised estimate: ``0.5 mean (x - sg(x̂0_real))^2``."""

    name = "teacher_regression"
    description = "regression of the student's sample onto the guided teacher's x0 estimate (a test method)"
    reference = "this test file"
    tags = ("teacher-regression",)

    def generator_loss(self, terms):
        loss = 0.5 * torch.mean((terms.x.float() - terms.x0_real.float()) ** 2)
        return loss, {"regression_loss": float(loss.detach())}


def make_roles(family, discriminator=False):
    adapter = get_adapter_class(family)(tiny_components(family), max_sequence_length=16)
    roles = BackboneRoles(adapter, RolesConfig(lora_rank=4), discriminator=discriminator)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in roles.backbone.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return adapter, roles


def make_batch(adapter, size, real=False, captions=False):
    condition = adapter.encode_prompt(TINY_PROMPTS[:2])
    noise = torch.randn(adapter.latent_shape(2, size, size), generator=torch.Generator().manual_seed(1))
    batch = Batch(condition=condition, noise=noise)
    if real:
        batch.real = torch.randn(noise.shape, generator=torch.Generator().manual_seed(2))
        batch.real_condition = adapter.encode_prompt(TINY_PROMPTS[2:4]) if captions else None
    return batch


def test_a_registered_method_is_resolved_and_listed():
    assert {"dmd2", "fdistill", "teacher_regression"} <= set(method_names())
    config = resolve_method_config(MethodConfig(method="teacher_regression"))
    assert config.method == "teacher_regression" and config.divergence == "reverse_kl" and config.gan_weight == 0
    assert resolve_method_config(MethodConfig(divergence="js")).method == "fdistill"  # --divergence js alone
    assert resolve_method_config(MethodConfig()).method == "dmd2"
    text = cli.build_parser().format_help()
    assert "teacher_regression" in text and "--method" in text


def test_a_method_rejects_a_divergence_it_does_not_take():
    with pytest.raises(ValueError, match="takes the reverse_kl divergence"):
        resolve_method_config(MethodConfig(method="dmd2", divergence="js"))
    with pytest.raises(ValueError, match="gan_weight"):
        resolve_method_config(MethodConfig(method="fdistill", gan_weight=0.0))


def test_the_generator_loss_hook_gives_the_closed_form_gradient():
    """d/dx of 0.5 mean (x - c)^2 is (x - c) / N; DMD2's loss on the same terms has another gradient (control)."""
    adapter, roles = make_roles("pixart_alpha")
    batch = make_batch(adapter, 8)
    seen = {}
    method = build_method(MethodConfig(method="teacher_regression", guidance_scale=2.0), roles, [400])
    assert type(method) is TeacherRegression
    original = method.generator_loss

    def spy(terms):
        terms.x.retain_grad()
        seen["terms"] = terms
        return original(terms)

    method.generator_loss = spy
    loss, logs = method.student_step(batch, RandomSource.from_seed(0))
    loss.backward()
    terms = seen["terms"]
    expected = (terms.x.detach() - terms.x0_real) / terms.x.numel()
    torch.testing.assert_close(terms.x.grad, expected, rtol=1e-5, atol=1e-9)
    assert logs["student/regression_loss"] == pytest.approx(logs["student/loss"])
    assert all(p.grad is not None for p in roles.role_parameters("student"))

    dmd2 = build_method(MethodConfig(guidance_scale=2.0), roles, [400])
    x = terms.x.detach().clone().requires_grad_(True)
    other, _ = dmd2.generator_loss(type(terms)(**{**vars(terms), "x": x}))
    other.backward()
    assert not torch.allclose(x.grad, expected, atol=1e-9)


@pytest.mark.parametrize("method_cls", [FDistill, DMD2])
def test_an_embedded_guidance_teacher_feeds_the_discriminator(method_cls):
    """SANA-Sprint takes its guidance as an input: with the teacher as the discriminator trunk f-distill crashed on
    missing logits and DMD2 silently dropped its GAN term."""
    adapter, roles = make_roles("sana_sprint", discriminator=True)
    assert roles.teacher_has_embedded_guidance
    config = MethodConfig(method=method_cls.name, gan_weight=5e-3, discriminator_trunk="teacher")
    method = build_method(config, roles, [1.5708])
    batch = make_batch(adapter, 32, real=True)
    loss, logs = method.student_step(batch, RandomSource.from_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and "student/gan_loss" in logs and logs["student/gan_loss"] > 0
    assert all(p.grad is not None for p in roles.role_parameters("student"))
    assert all(p.grad is None for p in roles.role_parameters("critic"))
    roles.end_phase()
    for p in roles.role_parameters("student"):
        p.grad = None
    loss, logs = method.critic_step(batch, RandomSource.from_seed(1))
    loss.backward()
    assert "critic/discriminator_loss" in logs
    assert all(p.grad is not None for p in roles.discriminator_head.parameters())


def record_feature_conditions(roles):
    """Wrap the roles' teacher and critic to record the condition of every pass that returns trunk features."""
    seen = []
    for role in ("teacher", "critic"):
        original = getattr(roles, role)

        def wrapper(x_t, t, condition, *args, _original=original, _role=role, **kwargs):
            if kwargs.get("return_features"):
                seen.append((_role, condition.embeds.detach().clone()))
            return _original(x_t, t, condition, *args, **kwargs)

        setattr(roles, role, wrapper)
    return seen


@pytest.mark.parametrize("trunk", ["critic", "teacher"])
@pytest.mark.parametrize("captions", [False, True])
def test_the_discriminator_judges_both_sides_under_the_same_kind_of_condition(trunk, captions):
    """Without captions, real and generated samples are both judged under the null prompt (generated ones used to
    carry their prompts, so conditioning alone told them apart); with captions each side carries its own text."""
    adapter, roles = make_roles("sdxl", discriminator=True)
    batch = make_batch(adapter, 32, real=True, captions=captions)
    null = roles.unconditional(batch.condition).embeds
    method = build_method(MethodConfig(gan_weight=5e-3, discriminator_trunk=trunk), roles, [399])
    seen = record_feature_conditions(roles)
    method.student_step(batch, RandomSource.from_seed(0))[0].backward()
    roles.end_phase()
    ((_, student_condition),) = seen
    expected_fake = batch.condition.embeds if captions else null
    torch.testing.assert_close(student_condition, expected_fake.to(student_condition.dtype))
    seen.clear()
    method.critic_step(batch, RandomSource.from_seed(1))[0].backward()
    ((_, critic_conditions),) = seen
    n = batch.noise.shape[0]
    discriminated = critic_conditions[-2 * n :]  # fake then real (after the DSM batch on the critic trunk)
    expected_real = batch.real_condition.embeds if captions else null
    torch.testing.assert_close(discriminated[:n], expected_fake.to(discriminated.dtype))
    torch.testing.assert_close(discriminated[n:], expected_real.to(discriminated.dtype))
    if not captions:  # the negative control: the prompts differ from the null prompt
        assert not torch.allclose(batch.condition.embeds, null)


LAUNCHER = """\
import sys
sys.path.insert(0, {tests!r})
import test_method_plugins  # registers the method defined there
from diffusers_onestep.distill.cli import main
sys.exit(main())
"""


def test_a_method_from_outside_the_library_trains_through_accelerate_launch(tmp_path):
    teacher = save_tiny_native_pipeline("pixart_alpha", str(tmp_path / "teacher"))
    script = tmp_path / "train_with_plugin.py"
    script.write_text(LAUNCHER.format(tests=TESTS))
    out = tmp_path / "out"
    launch(
        [
            "--teacher",
            teacher,
            "--prompts",
            write_prompts(str(tmp_path)),
            "--output_dir",
            out,
            "--resolution",
            "8",
            "--method",
            "teacher_regression",
            "--max_train_steps",
            "2",
            "--critic_updates_per_student",
            "1",
            *TINY_FLAGS,
        ],
        script=str(script),
    )
    with open(out / "training_config.json") as f:
        saved = json.load(f)
    assert saved["method"]["method"] == "teacher_regression"
    assert os.path.isfile(out / "checkpoint-2" / "trainer_state.json")
    card = (out / "README.md").read_text()
    assert TeacherRegression.description in card and "teacher-regression" in card
    assert os.path.isfile(out / "pytorch_lora_weights.safetensors")


def test_the_methods_doc_example_defines_a_method_that_resolves():
    import re

    with open(os.path.join(os.path.dirname(TESTS), "docs", "methods.md"), encoding="utf-8") as f:
        blocks = re.findall(r"^<!-- test -->\n```python\n(.*?)^```", f.read(), flags=re.S | re.M)
    assert blocks
    namespace = {"__name__": "docs_methods"}
    for code in blocks:
        exec(compile(code, "docs/methods.md", "exec"), namespace)
    assert "teacher_regression_doc" in method_names()
    assert resolve_method_config(MethodConfig(method="teacher_regression_doc")).method == "teacher_regression_doc"
