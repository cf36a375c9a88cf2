"""Prompts only: the teacher's reference set (``--real_images teacher``) and DMD's regression loss on its pairs.

The set is built with the teacher's own pipeline, cached, reused without a teacher call, rebuilt when a setting
changes, and resumed after a kill to the same bytes as an uninterrupted build; each cached latent is the native
pipeline's own sample from the stored noise under its prompt. f-distill and DMD2 with its GAN train from prompts
alone, and the regression loss has the closed-form gradient of ``λ·MSE`` on the same (noise, sample) pairs.
"""

import dataclasses
import os

import pytest
import torch
from training_utils import TINY_FLAGS, tiny_pixart_roles, tiny_run_argv, write_prompts

from diffusers_onestep.distill import cli, losses
from diffusers_onestep.distill.config import ConfigError, MethodConfig
from diffusers_onestep.distill.methods import build_method
from diffusers_onestep.distill.models import Batch, RandomSource
from diffusers_onestep.distill.teacher_reference import (
    ReferenceSettings,
    build_teacher_reference,
    missing_chunks,
    row_noise,
    row_prompts,
)
from diffusers_onestep.distill.trainer import Trainer
from diffusers_onestep.families import FamilyAdapter, PixArtAlphaAdapter
from diffusers_onestep.testing import TINY_PROMPTS, save_tiny_native_pipeline, tiny_native_pipeline


os.environ.setdefault("HF_HUB_OFFLINE", "1")

SEQUENCE_LENGTH = 8


@pytest.fixture(scope="module")
def teacher():
    pipe = tiny_native_pipeline("pixart_alpha")
    return pipe, PixArtAlphaAdapter.from_pipeline(pipe, max_sequence_length=SEQUENCE_LENGTH)


def settings(**changes):
    base = ReferenceSettings(
        teacher="tiny",
        revision=None,
        variant=None,
        teacher_fingerprint="t",
        prompts_fingerprint="p",
        num_prompts=len(TINY_PROMPTS),
        count=5,
        steps=3,
        guidance_scale=3.0,
        seed=0,
        height=8,
        width=8,
        dtype="float32",
        max_sequence_length=SEQUENCE_LENGTH,
        chunk_rows=2,
    )
    return dataclasses.replace(base, **changes)


class CountingSampler:
    """Counts the teacher's sampler calls (and can stop the build after some, as a kill would)."""

    def __init__(self, monkeypatch, stop_after=None):
        self.calls = 0
        self.stop_after = stop_after
        original = FamilyAdapter.sample_with_pipeline

        def sample(adapter, *args, **kwargs):
            if self.stop_after is not None and self.calls >= self.stop_after:
                raise KeyboardInterrupt  # the process is killed between two chunks
            self.calls += 1
            return original(adapter, *args, **kwargs)

        monkeypatch.setattr(FamilyAdapter, "sample_with_pipeline", sample)


def read_all(reference):
    return reference.get(list(range(len(reference))))


def test_reference_set_is_cached_reused_rebuilt_and_resumed(teacher, tmp_path, monkeypatch):
    pipe, adapter = teacher
    prompts = list(TINY_PROMPTS)
    counter = CountingSampler(monkeypatch)
    built = build_teacher_reference(adapter, pipe, prompts, settings(), str(tmp_path / "a"), progress=False)
    assert counter.calls == 3  # 5 rows in chunks of 2
    latents, noise, row_texts = read_all(built)
    assert latents.shape == noise.shape == adapter.latent_shape(5, 8, 8) and latents.dtype == torch.float32
    assert row_texts == [prompts[i] for i in row_prompts(0, 5, len(prompts))]
    assert sorted(set(row_texts)) == sorted(set(prompts))  # every prompt before any repeat

    # the same settings: the cache is reused, the teacher is not called
    again = build_teacher_reference(adapter, pipe, prompts, settings(), str(tmp_path / "a"), progress=False)
    assert counter.calls == 3 and again.folder == built.folder
    for a, b in zip(read_all(again)[:2], (latents, noise)):
        assert torch.equal(a, b)

    # another setting (steps, guidance, seed, count, prompts) is another set
    for change in ({"steps": 2}, {"guidance_scale": 1.0}, {"seed": 1}, {"count": 4}, {"prompts_fingerprint": "q"}):
        assert settings(**change).name != settings().name
    other = build_teacher_reference(adapter, pipe, prompts, settings(steps=2), str(tmp_path / "a"), progress=False)
    assert other.folder != built.folder and counter.calls == 6
    assert not torch.equal(read_all(other)[0], latents) and torch.equal(read_all(other)[1], noise)

    # killed after the first chunk: whole chunks only on disk; resumed, the set equals the uninterrupted one
    monkeypatch.undo()
    killed = CountingSampler(monkeypatch, stop_after=1)
    with pytest.raises(KeyboardInterrupt):
        build_teacher_reference(adapter, pipe, prompts, settings(), str(tmp_path / "b"), progress=False)
    assert killed.calls == 1
    folder = os.path.join(tmp_path / "b", settings().name)
    assert missing_chunks(folder, settings()) == [1, 2]
    assert not [name for name in os.listdir(folder) if "tmp" in name]
    monkeypatch.undo()
    resumed_counter = CountingSampler(monkeypatch)
    resumed = build_teacher_reference(adapter, pipe, prompts, settings(), str(tmp_path / "b"), progress=False)
    assert resumed_counter.calls == 2  # only the missing chunks
    for a, b in zip(read_all(resumed)[:2], (latents, noise)):
        assert torch.equal(a, b)


def native_sample(pipe, prompt, noise):
    """The teacher's own pipeline from ``noise``: 3 steps, CFG 3 and the set's sequence length, as ``settings()``
    builds the set."""
    return pipe(
        prompt,
        latents=noise,
        num_inference_steps=3,
        guidance_scale=3.0,
        height=8,
        width=8,
        output_type="latent",
        use_resolution_binning=False,
        clean_caption=False,
        max_sequence_length=SEQUENCE_LENGTH,
    ).images


def test_cached_latent_is_the_native_pipelines_sample_from_its_noise_and_prompt(teacher, tmp_path):
    """Row i of the set is ``pipe(prompt_i, latents=z_i)`` of the teacher's own pipeline (text encoded by the
    pipeline itself, negative prompt "" as it encodes it), row by row."""
    pipe, adapter = teacher
    prompts = list(TINY_PROMPTS)
    reference = build_teacher_reference(adapter, pipe, prompts, settings(), str(tmp_path), progress=False)
    latents, noise, row_texts = read_all(reference)
    for row in range(len(reference)):
        assert torch.equal(noise[row], row_noise(0, row, adapter.latent_shape(1, 8, 8)[1:]))
        native = native_sample(pipe, row_texts[row], noise[row : row + 1])
        torch.testing.assert_close(latents[row : row + 1], native, rtol=1e-5, atol=1e-5)
    # negative control: another row's prompt gives another sample from the same noise
    wrong = native_sample(pipe, row_texts[1] if row_texts[1] != row_texts[0] else row_texts[2], noise[0:1])
    assert (wrong - latents[0:1]).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------------------------
# DMD's regression loss
# ---------------------------------------------------------------------------------------------------------------


def test_regression_loss_gradient_is_the_closed_form():
    """d/dG of λ·mean((G − y)²) is 2λ(G − y)/n (n: the element count); a mispaired target (another row's sample)
    gives another gradient."""
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(3, 4, 2, 2, generator=generator, requires_grad=True)
    target = torch.randn(3, 4, 2, 2, generator=generator)
    weight = 0.25
    (weight * losses.regression_loss(student, target)).backward()
    expected = 2 * weight * (student.detach() - target) / student.numel()
    torch.testing.assert_close(student.grad, expected, rtol=1e-6, atol=1e-8)
    mispaired = 2 * weight * (student.detach() - target.roll(1, 0)) / student.numel()
    assert (student.grad - mispaired).abs().max() > 1e-3
    with pytest.raises(ValueError, match="differ in shape"):
        losses.regression_loss(student, target[:, :, :1])


@pytest.fixture(scope="module")
def roles():
    return tiny_pixart_roles(tiny_native_pipeline("pixart_alpha").components, max_sequence_length=SEQUENCE_LENGTH)


def test_regression_term_pairs_the_students_map_of_the_stored_noise_with_the_teachers_sample(roles):
    """The student loss with λ minus the loss without is λ·MSE(G(z_ref | c_ref), y_ref) at the student's first
    timestep, from the *stored* noise (not the batch's own noise), and its gradient reaches the student."""
    adapter, roles = roles
    condition = adapter.encode_prompt(TINY_PROMPTS[:2])
    reference_condition = adapter.encode_prompt(TINY_PROMPTS[2:4])
    generator = torch.Generator().manual_seed(0)
    shape = adapter.latent_shape(2, 8, 8)
    batch = Batch(
        condition=condition,
        noise=torch.randn(shape, generator=generator),
        real=torch.randn(shape, generator=generator),
        real_condition=reference_condition,
        real_noise=torch.randn(shape, generator=generator),
    )
    weight = 0.5

    def student_loss(regression_weight):
        method = build_method(
            MethodConfig(gan_weight=0.0, regression_weight=regression_weight).validate(), roles, [400]
        )
        loss, logs = method.student_step(batch, RandomSource.from_seed(0))
        return method, loss, logs

    _, without, logs_without = student_loss(None)
    method, with_regression, logs = student_loss(weight)
    roles.end_phase()
    with torch.no_grad():
        t = method._full_time(400.0, batch.real_noise)
        paired = losses.regression_loss(method._student_x0(batch.real_noise, t, reference_condition), batch.real)
        unpaired = losses.regression_loss(method._student_x0(batch.noise, t, reference_condition), batch.real)
    assert "student/regression_loss" in logs and "student/regression_loss" not in logs_without
    torch.testing.assert_close(logs["student/regression_loss"], float(paired), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        float((with_regression - without).detach()), weight * float(paired), rtol=1e-4, atol=1e-6
    )
    assert abs(float(paired) - float(unpaired)) > 1e-4  # negative control: the batch's own noise is not the pair
    with_regression.backward()
    grads = [p.grad for p in roles.role_parameters("student") if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    for parameter in roles.role_parameters("student"):
        parameter.grad = None
    # without the pairs the term is refused in one sentence
    with pytest.raises(ValueError, match="--real_images teacher"):
        method.regression_loss(dataclasses.replace(batch, real_noise=None))


# ---------------------------------------------------------------------------------------------------------------
# the trainer: prompts only
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher_reference")
    return {
        "root": root,
        "teacher": save_tiny_native_pipeline("pixart_alpha", str(root / "teacher")),
        "prompts": write_prompts(str(root)),
    }


def config_of(workspace, output_dir, *extra):
    argv = tiny_run_argv(
        workspace,
        output_dir,
        "--real_images",
        "teacher",
        "--teacher_reference_count",
        "6",
        "--teacher_reference_steps",
        "2",
        "--max_train_steps",
        "2",
        "--critic_updates_per_student",
        "1",
        "--checkpointing_steps",
        "100",
        *extra,
    )
    config, _ = cli.resolve_args(argv)
    return config


def run_logged(config):
    logs = []

    def hook(event, trainer, **info):
        if event == "after_step":
            logs.append(dict(info["logs"]))

    trainer = Trainer(config, hooks=[hook])
    trainer.run()
    return trainer, logs


@pytest.mark.parametrize(
    "extra",
    [("--divergence", "js"), ("--method", "dmd2", "--regression_weight", "0.25")],
    ids=["fdistill_js", "dmd2_gan_regression"],
)
def test_methods_train_from_prompts_alone(workspace, tmp_path, monkeypatch, extra):
    config = config_of(workspace, tmp_path / "run", *extra)
    assert config.data.teacher_reference_dir == os.path.join(str(tmp_path / "run"), "teacher_reference")
    assert config.method.gan_weight > 0
    counter = CountingSampler(monkeypatch)
    trainer, logs = run_logged(config)
    assert counter.calls == 1  # 6 latents, one chunk of 8
    assert len(logs) == 2 and all("critic/discriminator_loss" in step for step in logs)
    assert all(torch.isfinite(torch.tensor(v)) for step in logs for v in step.values())
    if "--regression_weight" in extra:
        assert all(step["student/regression_loss"] > 0 for step in logs)
    # the discriminator's real batch is the cached set, judged under the prompts the teacher sampled from
    batch = trainer.batches(0)
    reference = trainer.real_batches.reference
    rows = [row for row, _ in trainer.real_batches.plan(0)]
    latents, noise, texts = reference.get(rows)
    assert torch.equal(batch.real, latents) and torch.equal(batch.real_noise, noise)
    expected = trainer.real_conditions.conditions_of(texts)
    assert torch.equal(batch.real_condition.embeds, expected.embeds)

    # a second run with the same settings and reference folder samples nothing
    second = config_of(
        workspace, tmp_path / "second", *extra, "--teacher_reference_dir", config.data.teacher_reference_dir
    )
    run_logged(second)
    assert counter.calls == 1


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--regression_weight", "0.25"], "--real_images teacher"),
        (["--teacher_reference_count", "10"], "applies to --real_images teacher"),
        (["--real_images", "teacher", "--teacher_reference_count", "0"], "must be >= 1"),
        (["--real_images", "teacher", "--teacher_reference_steps", "0"], "must be >= 1"),
        (["--real_images", "teacher", "--cache_latents"], "drop --cache_latents"),
        (["--real_images", "teacher", "--method", "sid"], "neither"),
        (["--real_images", "teacher", "--gan_weight", "0"], "neither"),
        (["--real_images", "teacher", "--method", "sid", "--regression_weight", "1"], "applies to the dmd2"),
        (["--real_images", "teacher", "--teacher_reference_guidance_scale", "0.5"], "below 1"),
    ],
)
def test_bad_teacher_reference_input_is_one_sentence(workspace, tmp_path, argv, message):
    with pytest.raises(ConfigError, match=message) as error:
        config_of_raw(workspace, tmp_path, *argv)
    text = str(error.value)
    assert text.endswith(".") and "\n" not in text


def config_of_raw(workspace, output_dir, *extra):
    argv = ["--teacher", workspace["teacher"], "--prompts", workspace["prompts"], "--output_dir", str(output_dir)]
    config, _ = cli.resolve_args([*argv, *TINY_FLAGS, *[str(a) for a in extra]])
    return config


def test_a_half_built_set_in_the_output_folder_does_not_block_the_same_command(workspace, tmp_path):
    """A build killed before training wrote anything else leaves only the reference folder: the same command starts
    again (and finishes the set) instead of refusing a non-empty --output_dir."""
    partial = tmp_path / "run" / "teacher_reference" / "reference-0123"
    partial.mkdir(parents=True)
    (partial / "chunk-000000.safetensors").write_bytes(b"")
    config_of(workspace, tmp_path / "run", "--divergence", "js")
    (tmp_path / "run" / "stray.txt").write_text("not this run's")
    with pytest.raises(ConfigError, match="stray.txt"):
        config_of(workspace, tmp_path / "run", "--divergence", "js")


def test_the_defaults_are_resolved_once(workspace, tmp_path):
    """Unset, the count is 1000, the steps the teacher pipeline's own default (PixArt-α: 20), the guidance scale the
    run's, the folder inside --output_dir; a resolved config resolves to itself."""
    from diffusers_onestep.distill.resolve import resolve

    resolved = config_of_raw(workspace, tmp_path / "run", "--real_images", "teacher", "--divergence", "js")
    data = resolved.config.data
    assert (data.teacher_reference_count, data.teacher_reference_steps) == (1000, 20)
    assert data.teacher_reference_guidance_scale == resolved.config.method.guidance_scale == 3.0
    assert data.teacher_reference_dir == os.path.join(str(tmp_path / "run"), "teacher_reference")
    assert resolve(resolved.config).config == resolved.config
