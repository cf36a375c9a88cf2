"""Saved students load the ways diffusers users expect: through the community-pipeline entry files in pipelines/
(``custom_pipeline=..., trust_remote_code=True``) and, for SDXL, PixArt-α/Σ and SANA, through plain
``DiffusionPipeline.from_pretrained(folder)`` with the family's own pipeline driving OneStepScheduler."""

import json
import logging
import os

import diffusers
import numpy as np
import pytest
from diffusers import DiffusionPipeline

from diffusers_onestep import OneStepPipeline, OneStepScheduler
from diffusers_onestep.pipelines.pipeline_onestep import NATIVE_INTEROP_FAMILIES
from diffusers_onestep.testing import NATIVE_CALL_KWARGS, TINY_FAMILIES, list_files

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRY_FILE = os.path.join(REPO, "pipelines", "onestep.py")

#: how the family's own pipeline reproduces the student's call (diffusers-facts §1: guidance off, one step)
NATIVE_DRIVE = {
    "sdxl": {"guidance_scale": 0.0, "num_inference_steps": 1},
    "pixart_alpha": {"guidance_scale": 1.0, "num_inference_steps": 1},
    "pixart_sigma": {"guidance_scale": 1.0, "num_inference_steps": 1},
    "sana": {"guidance_scale": 1.0, "num_inference_steps": 1, "height": 64, "width": 64},
}


def _reference(folder, run):
    pipe = OneStepPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe, run(pipe)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_custom_pipeline_entry_file(family, student_folder, run):
    folder = student_folder(family)
    reference, expected = _reference(folder, run)
    pipe = DiffusionPipeline.from_pretrained(folder, custom_pipeline=ENTRY_FILE, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe, OneStepPipeline) and isinstance(pipe.scheduler, OneStepScheduler)
    assert pipe.scheduler.config.conditioning_timesteps == reference.scheduler.config.conditioning_timesteps
    assert pipe.config.family == family  # PixArt-Σ too, from the folder's "_onestep" entry
    assert pipe.adapter.max_sequence_length == reference.adapter.max_sequence_length
    assert np.array_equal(run(pipe), expected)


def test_custom_pipeline_folder_uses_pipeline_py(student_folder, run):
    folder = student_folder("sana_sprint")
    pipe = DiffusionPipeline.from_pretrained(folder, custom_pipeline=os.path.join(REPO, "pipelines"),
                                             trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe, OneStepPipeline)
    assert np.array_equal(run(pipe), _reference(folder, run)[1])


def test_custom_pipeline_needs_trust_remote_code(student_folder):
    with pytest.raises(ValueError, match=r"trust_remote_code=True"):
        DiffusionPipeline.from_pretrained(student_folder("sana_sprint"), custom_pipeline=ENTRY_FILE)


# ---------------------------------------------------------------------------------------------------------------------
# interop: saved folders name the native pipeline class where that class can drive OneStepScheduler
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_saved_folder_layout(family, student_folder):
    folder = student_folder(family)
    with open(os.path.join(folder, "model_index.json")) as f:
        index = json.load(f)
    assert index["_class_name"] == NATIVE_INTEROP_FAMILIES.get(family, "OneStepPipeline")
    assert index["scheduler"][1] == "OneStepScheduler"
    files = list_files(folder)
    assert not any(f.endswith((".bin", ".pt", ".ckpt", ".pth")) for f in files), "safetensors only"
    assert any(f.endswith(".safetensors") for f in files)
    if family in NATIVE_INTEROP_FAMILIES:
        assert index["_onestep"]["family"] == family
        assert "family" not in index  # a plain key would make the native class warn on every load


@pytest.mark.parametrize("family", sorted(NATIVE_INTEROP_FAMILIES))
def test_plain_diffusers_loads_the_student_and_gives_the_same_image(family, student_folder, run, caplog):
    folder = student_folder(family)
    _, expected = _reference(folder, run)
    with caplog.at_level(logging.WARNING):
        native = DiffusionPipeline.from_pretrained(folder, **({"add_watermarker": False} if family == "sdxl" else {}))
    assert type(native) is getattr(diffusers, NATIVE_INTEROP_FAMILIES[family])
    assert isinstance(native.scheduler, OneStepScheduler)
    assert not [r for r in caplog.records if "not expected" in r.getMessage()]
    native.set_progress_bar_config(disable=True)
    kwargs = {**NATIVE_CALL_KWARGS[family], **NATIVE_DRIVE[family]}
    assert np.abs(run(native, **kwargs) - expected).max() <= 1e-5


def test_sana_sprint_folders_need_onestep_pipeline(student_folder):
    # SanaSprintPipeline calls SCMScheduler.set_timesteps(max_timesteps=..., intermediate_timesteps=...) and scales
    # the sample by sigma_data inside its loop, so it cannot drive OneStepScheduler; Sprint folders name
    # OneStepPipeline and plain diffusers needs the community entry file.
    folder = student_folder("sana_sprint")
    with pytest.raises(AttributeError, match=r"OneStepPipeline"):
        DiffusionPipeline.from_pretrained(folder)
    with pytest.raises(TypeError, match=r"intermediate_timesteps|max_timesteps"):
        diffusers.SanaSprintPipeline.from_pretrained(folder)(
            "a photo of a cat", num_inference_steps=1, intermediate_timesteps=None, **NATIVE_CALL_KWARGS["sana_sprint"]
        )


def test_native_class_folder_keeps_onestep_settings(tmp_path, native_folder, load_student):
    # PixArt-Σ and PixArt-α transformers are indistinguishable by config; the "_onestep" entry keeps the family and
    # the non-default settings across save/load.
    pipe = load_student(native_folder("pixart_sigma"), "pixart_sigma", max_sequence_length=200)
    pipe.save_pretrained(tmp_path / "sigma")
    reloaded = OneStepPipeline.from_pretrained(tmp_path / "sigma")
    assert reloaded.config.family == "pixart_sigma" and reloaded.config.max_sequence_length == 200
    assert reloaded.adapter.max_sequence_length == 200
