"""Saved students load the ways diffusers users expect: through the community-pipeline entry files in pipelines/
(``custom_pipeline=..., trust_remote_code=True``) and, for SDXL, PixArt-α/Σ and SANA, through plain
``DiffusionPipeline.from_pretrained(folder)`` with the family's own pipeline driving OneStepScheduler."""

import json
import logging
import os
import re

import diffusers
import numpy as np
import pytest
from diffusers import DiffusionPipeline

from diffusers_onestep import OneStepPipeline, OneStepScheduler
from diffusers_onestep.families import FAMILIES, get_adapter_class
from diffusers_onestep.testing import TINY_FAMILIES, list_files, tiny_fixture


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRY_FILE = os.path.join(REPO, "pipelines", "onestep.py")
INFERENCE_DOC = os.path.join(REPO, "docs", "inference.md")
#: the families whose own pipeline can drive OneStepScheduler (the adapters' native_interop_pipeline_class_name)
INTEROP_FAMILIES = [f for f in TINY_FAMILIES if get_adapter_class(f).native_interop_pipeline_class_name]


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
    pipe = DiffusionPipeline.from_pretrained(
        folder, custom_pipeline=os.path.join(REPO, "pipelines"), trust_remote_code=True
    )
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
    adapter_cls = get_adapter_class(family)
    assert index["_class_name"] == (adapter_cls.native_interop_pipeline_class_name or "OneStepPipeline")
    assert index["scheduler"][1] == "OneStepScheduler"
    files = list_files(folder)
    assert not any(f.endswith((".bin", ".pt", ".ckpt", ".pth")) for f in files), "safetensors only"
    assert any(f.endswith(".safetensors") for f in files)
    if adapter_cls.native_interop_pipeline_class_name:
        assert index["_onestep"]["family"] == family
        assert "family" not in index  # a plain key would make the native class warn on every load


@pytest.mark.parametrize("family", INTEROP_FAMILIES)
def test_plain_diffusers_loads_the_student_and_gives_the_same_image(family, student_folder, run, caplog):
    folder = student_folder(family)
    reference, expected = _reference(folder, run)
    adapter_cls = get_adapter_class(family)
    with caplog.at_level(logging.WARNING):
        native = DiffusionPipeline.from_pretrained(folder, **adapter_cls.native_pipeline_kwargs)
    assert type(native) is getattr(diffusers, adapter_cls.native_interop_pipeline_class_name)
    assert isinstance(native.scheduler, OneStepScheduler)
    # the only key the native class does not take is the serving engines' block of flow students, which it ignores
    unexpected = [r.getMessage() for r in caplog.records if "not expected" in r.getMessage()]
    assert not [m for m in unexpected if not m.split(":", 1)[0].endswith("{'dmd2_config'")]
    native.set_progress_bar_config(disable=True)
    size = reference.adapter.default_resolution
    kwargs = {
        **tiny_fixture(family).native_call_kwargs,
        **adapter_cls.native_interop_call_kwargs,
        "height": size,
        "width": size,
    }
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
            "a photo of a cat",
            num_inference_steps=1,
            intermediate_timesteps=None,
            **tiny_fixture("sana_sprint").native_call_kwargs,
        )


def test_native_class_folder_keeps_onestep_settings(tmp_path, native_folder, load_student):
    # PixArt-Σ and PixArt-α transformers are indistinguishable by config; the "_onestep" entry keeps the family and
    # the non-default settings across save/load.
    pipe = load_student(native_folder("pixart_sigma"), "pixart_sigma", max_sequence_length=200)
    pipe.save_pretrained(tmp_path / "sigma")
    reloaded = OneStepPipeline.from_pretrained(tmp_path / "sigma")
    assert reloaded.config.family == "pixart_sigma" and reloaded.config.max_sequence_length == 200
    assert reloaded.adapter.max_sequence_length == 200


def interop_markdown_table() -> str:
    """The plain-diffusers table of docs/inference.md, generated from the registered family adapters."""
    rows = ["| family | class written in `model_index.json` | call it with |", "|---|---|---|"]
    for adapter_cls in FAMILIES.values():
        native = adapter_cls.native_interop_pipeline_class_name
        if native is None:
            call = "-- (use `OneStepPipeline` or the community pipeline)"
        else:
            call = ", ".join(f"{k}={v!r}" for k, v in adapter_cls.native_interop_call_kwargs.items())
            call = f"`{call}`"
            if adapter_cls.native_pipeline_kwargs:
                built = ", ".join(f"{k}={v!r}" for k, v in adapter_cls.native_pipeline_kwargs.items())
                call += f" (`{built}` for identical pixels)"
        rows.append(f"| {adapter_cls.display_name} | `{native or 'OneStepPipeline'}` | {call} |")
    return "\n".join(rows)


def test_docs_interop_table_is_generated_from_the_adapters():
    with open(INFERENCE_DOC, encoding="utf-8") as f:
        text = f.read()
    match = re.search(r"<!-- interop-table:start -->\n(.*?)\n<!-- interop-table:end -->", text, flags=re.S)
    assert match, "docs/inference.md lost its interop-table markers"
    assert match.group(1) == interop_markdown_table(), "docs/inference.md's plain-diffusers table is stale"
