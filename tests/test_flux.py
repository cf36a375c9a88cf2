"""FLUX.1: parity with FluxPipeline at 1 and 4 steps (guidance-embedded dev-like and schnell-like tiny models, square
and non-square sizes, where the dynamic shift matters), the embedded guidance of a teacher, the resolution-dependent
noise path in training, and `accelerate launch` runs whose LoRA loads with FluxPipeline.load_lora_weights."""

import json
import os

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline

from diffusers_onestep import OneStepPipeline, OneStepScheduler
from diffusers_onestep.families import FluxAdapter
from diffusers_onestep.families.flux import latent_image_ids, pack_latents, unpack_latents
from diffusers_onestep.testing import native_one_step_setup, tiny_flux_components


PROMPT = "a photo of a cat"
FOUR_STEPS = [1.0, 0.75, 0.5, 0.25]  # FluxPipeline's default schedule at 4 steps: linspace(1, 1/4, 4)


def _run(pipe, seed=0, **kwargs):
    return pipe(PROMPT, generator=torch.Generator().manual_seed(seed), output_type="np", **kwargs).images


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Saved tiny FLUX.1 pipelines: ``"dev"`` (guidance embedded, dynamic shift) and ``"schnell"`` (neither)."""
    root = tmp_path_factory.mktemp("flux")
    out = {}
    for name, guidance_embeds in (("dev", True), ("schnell", False)):
        pipe = FluxPipeline(**tiny_flux_components(seed=3, guidance_embeds=guidance_embeds))
        out[name] = str(root / name)
        pipe.save_pretrained(out[name])
    return out


def _student(folder, timesteps, solver="sde"):
    pipe = OneStepPipeline.from_pretrained(folder, conditioning_timesteps=timesteps)
    if solver != "sde":
        pipe.scheduler = OneStepScheduler.from_config(dict(pipe.scheduler.config), solver=solver)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _native(folder, timesteps, height, width):
    pipe, kwargs = native_one_step_setup("flux", FluxPipeline.from_pretrained(folder), timesteps)
    kwargs.update(height=height, width=width)
    return pipe, kwargs


@pytest.mark.parametrize("variant", ["dev", "schnell"])
@pytest.mark.parametrize("size", [(32, 32), (32, 64)])
@pytest.mark.parametrize("timesteps", [[1.0], FOUR_STEPS])
def test_parity_with_flux_pipeline(folders, variant, size, timesteps):
    height, width = size
    native, kwargs = _native(folders[variant], timesteps, height, width)
    expected = _run(native, **kwargs)
    student = _student(folders[variant], timesteps, solver="ode")
    assert student.config.family == "flux"
    images = _run(student, height=height, width=width)
    assert images.shape == expected.shape == (1, height, width, 3)
    assert np.abs(images - expected).max() <= 1e-5
    assert images.std() > 1e-3


def test_the_dynamic_shift_moves_the_timesteps_with_the_resolution(folders):
    student = _student(folders["dev"], FOUR_STEPS, solver="ode")
    scheduler = student.scheduler
    assert scheduler.path.resolution_dependent and scheduler.config.conditioning_timesteps == FOUR_STEPS
    adapter = student.adapter
    shifted = {}
    for size in ((32, 32), (32, 64), (64, 64)):
        scheduler.set_timesteps(image_seq_len=adapter.image_seq_len(*size))
        shifted[size] = scheduler.path_timesteps.tolist()
        native = FluxPipeline.from_pretrained(folders["dev"]).scheduler
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        native.set_timesteps(sigmas=FOUR_STEPS, mu=calculate_shift(adapter.image_seq_len(*size)))
        np.testing.assert_allclose(shifted[size], native.sigmas[:-1].tolist(), rtol=0, atol=1e-6)
    assert shifted[(32, 32)][0] == 1.0 and shifted[(32, 32)][1] < shifted[(32, 64)][1] < shifted[(64, 64)][1]
    # schnell's schedule is fixed: the stored timesteps are the times at every size
    schnell = _student(folders["schnell"], FOUR_STEPS).scheduler
    assert not schnell.path.resolution_dependent
    schnell.set_timesteps(image_seq_len=999)
    assert schnell.path_timesteps.tolist() == FOUR_STEPS
    with pytest.raises(ValueError, match=r"pass `image_seq_len` \(or `mu`\)"):
        OneStepScheduler.from_config(dict(scheduler.config)).set_timesteps()


def test_without_the_dynamic_shift_a_non_square_image_differs(folders):
    """Negative control: the same student with the shift left out is not FluxPipeline's image."""
    height, width = 32, 64
    native, kwargs = _native(folders["dev"], FOUR_STEPS, height, width)
    expected = _run(native, **kwargs)
    student = _student(folders["dev"], FOUR_STEPS, solver="ode")
    student.scheduler = OneStepScheduler.from_config(dict(student.scheduler.config), use_dynamic_shifting=False)
    assert np.abs(_run(student, height=height, width=width) - expected).max() > 1e-3


def test_embedded_guidance(folders):
    dev = _student(folders["dev"], [1.0])
    assert dev.adapter.has_embedded_guidance and dev.transformer.config.guidance_embeds
    default = _run(dev)
    assert np.array_equal(_run(dev, guidance_scale=3.5), default)  # FluxPipeline's default scale
    assert np.abs(_run(dev, guidance_scale=1.0) - default).max() > 1e-4
    schnell = _student(folders["schnell"], [1.0])
    assert np.array_equal(_run(schnell, guidance_scale=0.0), _run(schnell))  # the schnell card's guidance_scale=0
    with pytest.raises(ValueError, match=r"takes no `guidance_scale`"):
        _run(schnell, guidance_scale=3.5)


def test_packing_and_features():
    latents = torch.randn(2, 4, 6, 10)
    tokens = pack_latents(latents)
    assert tokens.shape == (2, 15, 16) and torch.equal(unpack_latents(tokens, 6, 10), latents)
    # token k is the 2x2 patch at (row, column) = img_ids[k, 1:], channels first then the patch
    ids = latent_image_ids(6, 10)
    k = 7
    row, col = int(ids[k, 1]), int(ids[k, 2])
    assert torch.equal(tokens[0, k].view(4, 2, 2), latents[0, :, 2 * row : 2 * row + 2, 2 * col : 2 * col + 2])

    adapter = FluxAdapter(tiny_flux_components())
    assert adapter.latent_shape(1, 32, 64) == (1, 4, 16, 32) and adapter.image_seq_len(32, 64) == 128
    assert adapter.resolution_multiple == 4 and adapter.default_resolution == 32
    condition = adapter.encode_prompt([PROMPT, "a red car"])
    assert condition.embeds.shape[-1] == adapter.text_embedding_dim and condition.pooled.shape == (2, 20)
    x_t = torch.randn(2, 4, 16, 32)
    prediction, features = adapter.denoise(x_t, torch.tensor([1.0, 0.5]), condition, return_features=True)
    assert prediction.shape == x_t.shape
    assert features.shape == (2, adapter.feature_channels(), 8, 16)  # the image stream, one vector per patch


def test_teacher_guidance_is_an_input_not_doubled_cfg():
    """FLUX.1-dev as a teacher: one transformer pass per batch at the run's guidance (no unconditional pass); the
    schnell-like teacher, without a guidance input, gets classifier-free guidance (two passes)."""
    from diffusers_onestep.distill.config import MethodConfig, RolesConfig
    from diffusers_onestep.distill.methods import build_method
    from diffusers_onestep.distill.models import RandomSource
    from diffusers_onestep.distill.roles import BackboneRoles

    for guidance_embeds, passes in ((True, 1), (False, 2)):
        adapter = FluxAdapter(tiny_flux_components(guidance_embeds=guidance_embeds))
        n = adapter.image_seq_len(32, 32)
        roles = BackboneRoles(adapter, RolesConfig(lora_rank=2), image_seq_len=n)
        assert roles.teacher_has_embedded_guidance == guidance_embeds
        # the noise path of the training resolution: FLUX.1-dev's shift at 64 tokens, schnell's shift 1
        expected_shift = adapter.noise_path.at_image_seq_len(n).shift if guidance_embeds else 1.0
        assert not roles.path.resolution_dependent and roles.path.shift == pytest.approx(expected_shift)
        method = build_method(MethodConfig(guidance_scale=3.5), roles, [1.0])
        calls = []
        handle = adapter.denoiser.register_forward_pre_hook(
            lambda module, args, kwargs: calls.append(kwargs["hidden_states"].shape[0]), with_kwargs=True
        )
        try:
            condition = adapter.encode_prompt([PROMPT, "a red car"])
            x_t = torch.randn(2, 4, 16, 16)
            method._teacher_x0(x_t, torch.tensor([0.5, 0.7]), condition, RandomSource.from_seed(0))
        finally:
            handle.remove()
        assert calls == [2 * passes]  # one call: the batch, or the batch twice (unconditional and conditional)


def test_student_timesteps_are_trained_where_the_scheduler_puts_them():
    adapter = FluxAdapter(tiny_flux_components())
    n = adapter.image_seq_len(64, 64)
    trained = adapter.noise_path.timesteps_at(FOUR_STEPS, n)
    scheduler = OneStepScheduler.from_noise_path(adapter.noise_path, FOUR_STEPS, "flow_prediction")
    scheduler.set_timesteps(image_seq_len=n)
    assert scheduler.path_timesteps.tolist() == trained and trained[0] == 1.0 and trained[1] > 0.75


# ---------------------------------------------------------------------------------------------------------------------
# training through `accelerate launch`
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, folders):
    from training_utils import write_images, write_prompts

    root = tmp_path_factory.mktemp("flux-e2e")
    return {"root": root, "prompts": write_prompts(str(root)), "images": write_images(str(root / "images"))}


#: every method x student kind; each method and each kind once through `accelerate launch` (as users run it, 15-30 s a
#: launch on two cores), the other two combinations in this process (the same trainer, without the launcher's start)
RUNS = [
    ("reverse_kl", "lora", "launch"),  # the default FLUX.1 recipe: DMD2 with a shared-backbone LoRA student
    ("js", "full", "launch"),
    ("js", "lora", "in_process"),
    ("reverse_kl", "full", "in_process"),
]


@pytest.mark.parametrize("divergence, kind, how", RUNS)
def test_distilled_with_every_method_and_student_kind(workspace, folders, divergence, kind, how):
    from training_utils import TINY_FLAGS, in_process, launch

    out = workspace["root"] / f"out-{divergence}-{kind}"
    args = [
        "--teacher",
        folders["dev"],
        "--prompts",
        workspace["prompts"],
        "--output_dir",
        out,
        "--divergence",
        divergence,
        "--student",
        kind,
        "--max_train_steps",
        "1",
        "--critic_updates_per_student",
        "1",
        "--resolution",
        "32",
        *TINY_FLAGS,
    ]
    if divergence == "js":
        args += ["--real_images", workspace["images"]]
    launch(args) if how == "launch" else in_process(args)
    config = json.loads((out / "training_config.json").read_text())
    assert config["family"] == "flux" and config["roles"]["student"] == kind
    assert config["method"]["guidance_scale"] == 3.0  # TINY_FLAGS: the teacher's embedded guidance input
    student = OneStepPipeline.from_pretrained(str(out))
    student.set_progress_bar_config(disable=True)
    assert student.config.family == "flux" and student.scheduler.path.resolution_dependent
    images = _run(student)
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()
    if kind == "lora":
        # the LoRA loads with FluxPipeline's own loader and computes the student's image there
        native = FluxPipeline.from_pretrained(folders["dev"])
        native.load_lora_weights(str(out), weight_name="pytorch_lora_weights.safetensors")
        assert native.get_list_adapters()["transformer"]
        native, kwargs = native_one_step_setup("flux", native, [1.0])
        kwargs["max_sequence_length"] = student.adapter.max_sequence_length  # the run's (TINY_FLAGS: 8 tokens)
        assert np.abs(_run(native, **kwargs) - images).max() <= 1e-5
    else:
        assert os.path.isfile(out / "transformer" / "diffusion_pytorch_model.safetensors")


def test_saved_students_reload_and_keep_their_schedule(folders, tmp_path):
    """A FLUX.1 student folder names OneStepPipeline (FluxPipeline cannot drive OneStepScheduler) and reloads to the
    same images; the serving engines' block is written where its timesteps hold at every size (one step, sigma 1)."""
    for timesteps, has_block in (([1.0], True), (FOUR_STEPS, False)):
        student = _student(folders["dev"], timesteps, solver="ode")
        folder = tmp_path / f"student-{len(timesteps)}"
        student.save_pretrained(folder)
        index = json.loads((folder / "model_index.json").read_text())
        assert index["_class_name"] == "OneStepPipeline" and index["family"] == "flux"
        assert ("dmd2_config" in index) == has_block
        if has_block:
            assert (
                index["dmd2_config"]["denoising_timesteps"] == [1000] and index["dmd2_config"]["guidance_scale"] == 3.5
            )
        reloaded = OneStepPipeline.from_pretrained(str(folder))
        reloaded.set_progress_bar_config(disable=True)
        assert reloaded.scheduler.config.conditioning_timesteps == timesteps
        assert np.array_equal(_run(reloaded, height=32, width=64), _run(student, height=32, width=64))


def test_lora_files_with_alpha_entries_load_as_flux_pipeline_loads_them(folders, tmp_path):
    """FLUX LoRAs saved with `.alpha` entries (alpha != rank): FluxLoraLoaderMixin returns them only when asked; the
    student's fused LoRA equals FluxPipeline's own load_lora_weights + fuse_lora."""
    from safetensors.torch import save_file

    from diffusers_onestep.testing import random_lora_state_dict

    native = FluxPipeline.from_pretrained(folders["dev"])
    state = random_lora_state_dict(native.transformer, FluxAdapter.default_lora_target_modules, rank=4, scale=0.3)
    tensors = {f"transformer.{k}": v for k, v in state.items()}
    tensors.update({k.replace(".lora_A.weight", ".alpha"): torch.tensor(1.0) for k in tensors if ".lora_A." in k})
    path = str(tmp_path / "alpha_lora.safetensors")
    save_file(tensors, path)

    native.load_lora_weights(str(tmp_path), weight_name="alpha_lora.safetensors")
    native.fuse_lora(lora_scale=0.5)
    native, kwargs = native_one_step_setup("flux", native, [1.0])
    student = _student(folders["dev"], [1.0])
    plain = _run(student)
    student.load_student_lora(path, lora_scale=0.5)
    images = _run(student)
    assert np.abs(images - _run(native, **kwargs)).max() <= 1e-5
    assert np.abs(images - plain).max() > 1e-3


def test_aspect_ratio_buckets_are_refused_for_a_resolution_dependent_schedule(workspace, folders):
    """FLUX.1-dev's noise schedule shifts with the image size: the run's noise levels and the student's conditioning
    are set for the square resolution, so multi-aspect buckets would train other sizes on the wrong schedule."""
    from training_utils import TINY_FLAGS, in_process

    from diffusers_onestep.distill.config import ConfigError

    out = workspace["root"] / "out-buckets"
    args = ["--teacher", folders["dev"], "--prompts", workspace["prompts"], "--output_dir", out, "--divergence", "js"]
    args += ["--real_images", workspace["images"], "--aspect_ratio_buckets", "--max_train_steps", "1", *TINY_FLAGS]
    with pytest.raises(ConfigError, match=r"^--aspect_ratio_buckets is not supported for FLUX\.1 teachers, .*\.$"):
        in_process(args)
    assert not (out / "training_config.json").exists()
