"""OneStepPipeline keeps the conventions of diffusers pipelines: ``from_pipe`` from a family's native pipeline (by the
component type hints of ``__init__``), ``callback_on_step_end`` with plain functions and ``diffusers.callbacks``
objects, model CPU offload, layerwise casting, group offloading and ``torch.compile`` of the denoiser.

What runs here is CPU-only: offloading "to the CPU" moves nothing, so these tests show that the hooks diffusers and
accelerate attach leave the images unchanged and that the pipeline finds its device and dtypes through them; moving
models to an accelerator and back is not exercised on this machine.
"""

import inspect
import typing

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

from diffusers_onestep import OneStepPipeline
from diffusers_onestep.families import get_adapter_class
from diffusers_onestep.testing import TINY_FAMILIES, tiny_components, tiny_fixture


PROMPT = "a photo of a cat"
OTHER_PROMPT = "a red car on the road"


def _timesteps_kwargs(family):
    timesteps = tiny_fixture(family).parity_timesteps
    return {"conditioning_timesteps": timesteps} if timesteps is not None else {}


# ---------------------------------------------------------------------------------------------------------------------
# from_pipe: components are matched by the type hints of __init__
# ---------------------------------------------------------------------------------------------------------------------


def test_init_type_hints_cover_every_family_and_are_real_classes():
    # diffusers 0.33 reads the raw annotations (no string annotations in pipeline_onestep.py); later releases resolve
    # them with typing.get_type_hints: both must see classes
    parameters = inspect.signature(OneStepPipeline.__init__).parameters
    assert not any(isinstance(p.annotation, str) for p in parameters.values())
    hints = typing.get_type_hints(OneStepPipeline.__init__)
    for family in TINY_FAMILIES:
        components = tiny_components(family)
        for name in ("vae", get_adapter_class(family).denoiser_name):
            allowed = typing.get_args(hints[name]) or (hints[name],)
            assert type(components[name]) in allowed, f"{family}: {type(components[name]).__name__} not in {name}"
        for name in get_adapter_class(family).text_component_names:
            allowed = typing.get_args(hints[name])
            assert isinstance(components[name], allowed), f"{family}: {name}"


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_from_pipe_of_the_native_pipeline_equals_the_student_loaded_directly(
    family, native_folder, load_student, run, monkeypatch
):
    import diffusers.pipelines.pipeline_utils as pipeline_utils

    folder = native_folder(family)
    adapter_cls = get_adapter_class(family)
    native = DiffusionPipeline.from_pretrained(folder, **adapter_cls.native_pipeline_kwargs)
    assert type(native).__name__ in adapter_cls.pipeline_class_names
    warnings = []
    monkeypatch.setattr(pipeline_utils.logger, "warning", warnings.append)
    pipe = OneStepPipeline.from_pipe(native, **_timesteps_kwargs(family))
    assert not [w for w in warnings if "not switched over" in w], warnings
    pipe.set_progress_bar_config(disable=True)
    assert pipe.config.family == family  # PixArt-Σ too: read from the native class, not guessed from the transformer
    assert pipe.denoiser is getattr(native, adapter_cls.denoiser_name) and pipe.vae is native.vae  # shared, no copy
    direct = load_student(folder, family)
    assert not [w for w in warnings if "Expected types" in w], warnings  # from_pretrained checks the same hints
    assert pipe.scheduler.config.conditioning_timesteps == direct.scheduler.config.conditioning_timesteps
    assert np.array_equal(run(pipe), run(direct))


def test_from_pipe_of_a_student_keeps_its_scheduler_and_settings(native_folder, load_student, run):
    student = load_student(native_folder("pixart_sigma"), "pixart_sigma", max_sequence_length=200)
    copy = OneStepPipeline.from_pipe(student)
    copy.set_progress_bar_config(disable=True)
    assert copy.scheduler is student.scheduler
    assert copy.config.family == "pixart_sigma" and copy.adapter.max_sequence_length == 200
    assert np.array_equal(run(copy), run(student))
    retimed = OneStepPipeline.from_pipe(student, conditioning_timesteps=[999])
    assert retimed.scheduler.config.conditioning_timesteps == [999]


# ---------------------------------------------------------------------------------------------------------------------
# callback_on_step_end: every returned tensor of _callback_tensor_inputs is taken back
# ---------------------------------------------------------------------------------------------------------------------

TWO_STEP_STUDENTS = [("sdxl", [999, 499]), ("pixart_sigma", [999, 499]), ("sana", [1.0, 0.5]), ("flux", [1.0, 0.5])]


@pytest.fixture(scope="module")
def two_step(native_folder, load_student):
    pipes = {}

    def get(family, timesteps):
        if family not in pipes:
            pipes[family] = load_student(native_folder(family), family, conditioning_timesteps=timesteps)
        return pipes[family]

    return get


def _embeddings(pipe, prompt):
    names = ("prompt_embeds", "prompt_attention_mask", "pooled_prompt_embeds")
    return {k: v for k, v in zip(names, pipe.encode_prompt(prompt)) if v is not None}


@pytest.mark.parametrize("family, timesteps", TWO_STEP_STUDENTS)
def test_callback_replacing_prompt_embeds_after_step_one_conditions_step_two_on_them(family, timesteps, two_step):
    pipe = two_step(family, timesteps)
    other = _embeddings(pipe, OTHER_PROMPT)
    after_step_one = {}

    def swap_prompt(p, i, t, tensors):
        if i == 0:
            after_step_one["latents"] = tensors["latents"].clone()
            return dict(other)
        return {}

    def call(**kwargs):
        kwargs.setdefault("prompt", PROMPT)
        return pipe(generator=torch.Generator().manual_seed(0), output_type="latent", **kwargs).images

    swapped = call(callback_on_step_end=swap_prompt)
    assert pipe.scheduler.config.conditioning_timesteps == timesteps
    # step two by itself: the latents step one left, denoised at the second timestep with the other prompt's embeddings
    expected = call(prompt=None, latents=after_step_one["latents"], timesteps=timesteps[1:], **other)
    assert torch.equal(swapped, expected)
    assert not torch.equal(swapped, call())  # the swap changed the output


class SwapPromptAtStep(PipelineCallback):
    """A ``diffusers.callbacks`` object: after step ``cutoff_step_index`` the condition becomes ``self.embeddings``."""

    tensor_inputs = ["prompt_embeds"]

    def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
        if step_index == self.config.cutoff_step_index:
            callback_kwargs.update(self.embeddings)
        return callback_kwargs


class RecordTensors(PipelineCallback):
    tensor_inputs = ["latents", "denoised"]

    def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
        self.seen.append((step_index, sorted(callback_kwargs)))
        return callback_kwargs


def test_pipeline_callback_objects_set_the_tensor_inputs_and_their_replacements_are_used(two_step):
    pipe = two_step("sdxl", [999, 499])
    other = _embeddings(pipe, OTHER_PROMPT)

    def call(callback):
        # the objects' tensor_inputs win over callback_on_step_end_tensor_inputs, as in diffusers' pipelines
        return pipe(
            PROMPT,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
            callback_on_step_end=callback,
            callback_on_step_end_tensor_inputs=["latents"],
        ).images

    def swap_function(p, i, t, tensors):
        return dict(other) if i == 0 else {}

    expected = call(swap_function)
    swap = SwapPromptAtStep(cutoff_step_ratio=None, cutoff_step_index=0)
    swap.embeddings = other
    assert torch.equal(call(swap), expected)

    record = RecordTensors()
    record.seen = []
    assert torch.equal(call(MultiPipelineCallbacks([record, swap])), expected)
    names = ["denoised", "latents", "prompt_embeds"]  # the union of both objects' tensor_inputs
    assert record.seen == [(0, names), (1, names)]


def test_callback_replacing_latents_and_denoised(two_step):
    pipe = two_step("pixart_sigma", [999, 499])

    def call(callback, names):
        return pipe(
            PROMPT,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
            callback_on_step_end=callback,
            callback_on_step_end_tensor_inputs=names,
        ).images

    def zero_latents_after_step_one(p, i, t, tensors):
        return {"latents": torch.zeros_like(tensors["latents"])} if i == 0 else {}

    zeros = torch.zeros(pipe.adapter.latent_shape(1, *(2 * [pipe.adapter.default_resolution])))
    expected = pipe(PROMPT, latents=zeros, timesteps=[499], output_type="latent").images
    assert torch.equal(call(zero_latents_after_step_one, ["latents"]), expected)

    def halve_final(p, i, t, tensors):
        return {"denoised": tensors["denoised"] / 2} if i == 1 else {}

    assert torch.equal(call(halve_final, ["denoised"]), call(None, ["latents"]) / 2)


# ---------------------------------------------------------------------------------------------------------------------
# offloading, casting hooks and torch.compile (CPU: the hooks run, nothing moves between devices)
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_enable_model_cpu_offload(family, native_folder, load_student, run):
    pipe = load_student(native_folder(family), family)
    expected = run(pipe)
    pipe.enable_model_cpu_offload(device="cpu")
    for _ in range(2):  # the hooks are reset after each call (maybe_free_model_hooks) and attached again
        assert np.abs(run(pipe) - expected).max() <= 1e-6
    pipe.remove_all_hooks()
    assert np.abs(run(pipe) - expected).max() <= 1e-6


def test_the_execution_device_is_asked_of_diffusers_only_under_cpu_offload(
    native_folder, load_student, run, monkeypatch
):
    # Without offloading the denoiser's public `device` answers (diffusers' answer too); under the pipeline's offload
    # methods the models rest on the CPU between calls and only diffusers' execution device knows where they run.
    pipe = load_student(native_folder("sana"), "sana")
    execution_device = DiffusionPipeline._execution_device
    assert pipe.denoiser.device == execution_device.fget(pipe) == pipe.device
    asked = []
    monkeypatch.setattr(
        DiffusionPipeline,
        "_execution_device",
        property(lambda self: asked.append(self) or execution_device.fget(self)),
    )
    expected = run(pipe)
    assert asked == []
    pipe.enable_model_cpu_offload(device="cpu")
    assert np.abs(run(pipe) - expected).max() <= 1e-6 and asked == [pipe]
    pipe.remove_all_hooks()
    run(pipe)
    assert asked == [pipe]


def test_group_offloading_of_the_denoiser(native_folder, load_student, run):
    pipe = load_student(native_folder("sana"), "sana")
    expected = run(pipe)
    cpu = torch.device("cpu")
    pipe.transformer.enable_group_offload(onload_device=cpu, offload_device=cpu, offload_type="leaf_level")
    assert np.abs(run(pipe) - expected).max() <= 1e-6


def test_layerwise_casting_runs_in_the_compute_dtype(native_folder, load_student, run):
    pipe = load_student(native_folder("pixart_sigma"), "pixart_sigma")
    reference = run(pipe)
    pipe.transformer.enable_layerwise_casting(storage_dtype=torch.bfloat16, compute_dtype=torch.float32)
    assert {p.dtype for p in pipe.transformer.parameters()} == {torch.bfloat16, torch.float32}  # norms etc. stay fp32
    assert pipe.transformer.dtype == torch.float32  # what the pipeline casts the denoiser's inputs to
    images = run(pipe)
    assert images.shape == reference.shape and np.abs(images - reference).max() < 0.05


@pytest.mark.parametrize("family, backend", [(f, "eager") for f in TINY_FAMILIES] + [("pixart_alpha", "aot_eager")])
def test_torch_compile_of_the_denoiser_gives_the_same_image(family, backend, native_folder, load_student, run):
    # Graphs other tests compiled for the same diffusers code objects count toward dynamo's recompile limit (8).
    torch.compiler.reset()
    pipe = load_student(native_folder(family), family)
    expected = run(pipe)
    name = get_adapter_class(family).denoiser_name
    # fullgraph=True: the denoiser traces without a graph break for the inputs the adapter gives it
    setattr(pipe, name, torch.compile(getattr(pipe, name), backend=backend, fullgraph=True))
    assert isinstance(pipe.denoiser, torch.nn.Module) and pipe.denoiser is getattr(pipe, name)
    for _ in range(2):
        assert np.array_equal(run(pipe), expected)
