"""LoRA students for SDXL, SANA and PixArt (no PeftAdapterMixin there: diffusers_onestep.lora uses peft's functional
API): files in the diffusers LoRA format, fused on load, equal to the unfused peft-injected model."""

import copy
import json
import os

import numpy as np
import pytest
import torch
from diffusers import SanaPipeline, StableDiffusionXLPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

from diffusers_onestep import OneStepPipeline
from diffusers_onestep.families import get_adapter_class
from diffusers_onestep.lora import LORA_WEIGHT_NAME, lora_keys
from diffusers_onestep.testing import native_one_step_pipeline, random_lora_state_dict, tiny_fixture


RANK = 4
FAMILIES = ["sdxl", "sana", "pixart_alpha", "flux"]


def _conditioning(family):
    return tiny_fixture(family).parity_timesteps


def _lora(family, denoiser, seed=0):
    targets = get_adapter_class(family).default_lora_target_modules
    return random_lora_state_dict(denoiser, targets, rank=RANK, seed=seed, scale=0.2), targets


def _save(family, state, folder, weight_name=LORA_WEIGHT_NAME):
    if family == "sdxl":
        StableDiffusionXLPipeline.save_lora_weights(folder, unet_lora_layers=state, weight_name=weight_name)
    else:  # SANA, and PixArt (no loader mixin, same "transformer." layout)
        SanaPipeline.save_lora_weights(folder, transformer_lora_layers=state, weight_name=weight_name)
    return folder


def _unfused_reference(pipe, state, targets, scale=1.0):
    """The pipeline with a deep copy of its denoiser carrying the LoRA as live (unfused) peft layers."""
    reference = copy.copy(pipe)
    denoiser = copy.deepcopy(pipe.denoiser)
    config = LoraConfig(r=RANK, lora_alpha=RANK * scale, target_modules=list(targets))
    inject_adapter_in_model(config, denoiser, adapter_name="reference")
    incompatible = set_peft_model_state_dict(denoiser, state, adapter_name="reference")
    assert not incompatible.unexpected_keys
    name = "unet" if pipe.unet is not None else "transformer"
    reference = OneStepPipeline(**{**pipe.components, name: denoiser}, family=pipe.config.family)
    reference.set_progress_bar_config(disable=True)
    return reference


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory, native_folder, load_student):
    """Per family: (folder holding the LoRA file, peft state dict, target modules)."""
    root = tmp_path_factory.mktemp("lora")
    files = {}
    for family in FAMILIES:
        base = load_student(native_folder(family), family)
        state, targets = _lora(family, base.denoiser)
        files[family] = (_save(family, state, str(root / family)), state, targets)
    return files


@pytest.mark.oldest
@pytest.mark.parametrize("family", FAMILIES)
def test_fused_lora_equals_unfused_peft_model(family, lora_files, native_folder, load_student, run):
    folder, state, targets = lora_files[family]
    assert os.path.isfile(os.path.join(folder, LORA_WEIGHT_NAME))
    prefix = "unet." if family == "sdxl" else "transformer."
    assert all(k.startswith(prefix) for k in lora_keys(os.path.join(folder, LORA_WEIGHT_NAME)))

    pipe = OneStepPipeline.from_base(native_folder(family), conditioning_timesteps=_conditioning(family), lora=folder)
    pipe.set_progress_bar_config(disable=True)
    assert not any("lora" in name for name, _ in pipe.denoiser.named_modules()), "the LoRA must be fused"
    base = load_student(native_folder(family), family)
    reference = _unfused_reference(base, state, targets)
    images = run(pipe)
    assert np.abs(images - run(reference)).max() <= 1e-5
    assert np.abs(images - run(base)).max() > 1e-3  # the LoRA changes the student


@pytest.mark.parametrize("family", FAMILIES)
def test_load_student_lora_with_scale(family, lora_files, native_folder, load_student, run):
    folder, state, targets = lora_files[family]
    pipe = load_student(native_folder(family), family)
    pipe.load_student_lora(os.path.join(folder, LORA_WEIGHT_NAME), lora_scale=0.5)
    reference = _unfused_reference(load_student(native_folder(family), family), state, targets, scale=0.5)
    assert np.abs(run(pipe) - run(reference)).max() <= 1e-5


@pytest.mark.oldest
@pytest.mark.parametrize("family", ["sdxl", "sana", "flux"])
def test_native_load_lora_weights_reads_the_same_file(family, lora_files, native_folder, load_student, run):
    folder, _, _ = lora_files[family]
    native, kwargs = native_one_step_pipeline(family, native_folder(family))
    native.load_lora_weights(folder, weight_name=LORA_WEIGHT_NAME)  # diffusers < 0.40 asks for it offline
    native.fuse_lora(lora_scale=1.0)
    pipe = load_student(native_folder(family), family)
    pipe.load_student_lora(folder)
    assert np.abs(run(pipe) - run(native, **kwargs)).max() <= 1e-5


def test_mixed_key_names_of_convert_state_dict_to_diffusers_load_completely(
    tmp_path, native_folder, load_student, run
):
    # The LCM-LoRA SDXL example saves `convert_state_dict_to_diffusers(peft state)`: attention layers as
    # `to_q.lora.down`, all other layers as `conv1.lora_A`. Every weight must be loaded.
    base = load_student(native_folder("sdxl"), "sdxl")
    state, targets = _lora("sdxl", base.denoiser, seed=3)
    mixed = convert_state_dict_to_diffusers(state)
    assert any(".lora.down." in k for k in mixed) and any(".lora_A." in k for k in mixed)
    folder = _save("sdxl", mixed, str(tmp_path / "mixed"))
    pipe = load_student(native_folder("sdxl"), "sdxl")
    pipe.load_student_lora(folder)
    reference = _unfused_reference(base, state, targets)
    images = run(pipe)
    assert np.abs(images - run(reference)).max() <= 1e-5
    # diffusers 0.42.1's own loader converts only when the FIRST key is not in peft form and so drops every
    # attention weight of such a file (what OneStepPipeline avoids):
    native, kwargs = native_one_step_pipeline("sdxl", native_folder("sdxl"))
    with pytest.warns(RuntimeWarning, match="additional target modules"):
        native.load_lora_weights(folder)
    native.fuse_lora()
    assert np.abs(images - run(native, **kwargs)).max() > 1e-3


@pytest.mark.oldest
def test_lora_student_folder_round_trip(tmp_path, lora_files, native_folder, load_student, run):
    # The layout the trainer exports for LoRA students: LoRA file + scheduler/ + onestep_lora.json naming the base.
    folder, _, _ = lora_files["sana"]
    student = tmp_path / "sana-lora-student"
    student.mkdir()
    os.link(os.path.join(folder, LORA_WEIGHT_NAME), student / LORA_WEIGHT_NAME)
    base = load_student(native_folder("sana"), "sana")
    base.scheduler.save_pretrained(student / "scheduler")
    (student / "onestep_lora.json").write_text(
        json.dumps(
            {
                "base_model": native_folder("sana"),
                "family": "sana",
                "weight_name": LORA_WEIGHT_NAME,
                "lora_scale": 1.0,
            }
        )
    )
    pipe = OneStepPipeline.from_pretrained(str(student))
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config.conditioning_timesteps == [1.0]
    expected = OneStepPipeline.from_base(native_folder("sana"), conditioning_timesteps=[1.0], lora=folder)
    expected.set_progress_bar_config(disable=True)
    assert np.array_equal(run(pipe), run(expected))


def test_lora_for_another_model_is_refused(lora_files, native_folder, load_student):
    pipe = load_student(native_folder("sana"), "sana")
    with pytest.raises(
        ValueError,
        match=r"The LoRA file holds no weights for the SANA transformer \(it holds "
        r"weights for: unet\)\.$",
    ):
        pipe.load_student_lora(lora_files["sdxl"][0])
    # same component name, other architecture: PixArt's attention layers are wider than this SANA transformer's
    state, _ = _lora("pixart_alpha", load_student(native_folder("pixart_alpha"), "pixart_alpha").denoiser)
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    with pytest.raises(
        ValueError,
        match=r"The LoRA's weights do not fit the SanaTransformer2DModel \(size mismatch "
        r"at transformer_blocks.0.attn1.to_\w+.*\); it was made for a different "
        r"model\.$",
    ):
        pipe.load_student_lora({f"transformer.{k}": v for k, v in state.items()})
    after = pipe.transformer.state_dict()
    assert after.keys() == before.keys(), "a failed load must not leave LoRA layers behind"
    assert all(torch.equal(after[k], v) for k, v in before.items())
    # layers that do not exist at all
    with pytest.raises(
        ValueError,
        match=r"The LoRA targets layers the SanaTransformer2DModel does not have \(e.g. "
        r"'down_blocks.0.conv'\); it was made for a different model\.$",
    ):
        pipe.load_student_lora(
            {
                "transformer.down_blocks.0.conv.lora_A.weight": torch.zeros(4, 8),
                "transformer.down_blocks.0.conv.lora_B.weight": torch.zeros(8, 4),
            }
        )


def test_metadata_of_a_newer_peft_loads_where_its_new_options_are_unset():
    """A newer peft writes every LoraConfig field into the file's metadata (peft 0.19: ``kasa_config: None``), which an
    older LoraConfig refuses as an unexpected keyword; unset, such options are dropped, and a set one is refused."""
    from diffusers_onestep.lora import inject_lora, lora_metadata

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5))
    config = LoraConfig(r=2, lora_alpha=2, target_modules=["0"])
    state = {"0.lora_A.weight": torch.randn(2, 6), "0.lora_B.weight": torch.randn(5, 2)}
    metadata = {**lora_metadata(config), "an_option_of_a_later_peft": None}
    inject_lora(model, dict(state), "newer", metadata=metadata)
    x = torch.randn(3, 6)
    expected = (
        x @ model[0].base_layer.weight.T
        + model[0].base_layer.bias
        + x @ state["0.lora_A.weight"].T @ state["0.lora_B.weight"].T
    )
    assert torch.allclose(model(x), expected, atol=1e-6)
    with pytest.raises(ValueError, match=r"^The LoRA uses an_option_of_a_later_peft, which peft .* does not have"):
        inject_lora(
            torch.nn.Sequential(torch.nn.Linear(6, 5)),
            dict(state),
            "x",
            metadata={**metadata, "an_option_of_a_later_peft": 3},
        )
