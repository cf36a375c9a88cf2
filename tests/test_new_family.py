"""A family defined entirely in this file -- one adapter class and its tiny fixture record, no library file touched --
is detected from saved folders, run by OneStepPipeline (with parity to its native pipeline), saved and reloaded, and
listed wherever the supported families are.

The family is a renamed PixArt-α ("Renamed PixArt"). Its folders hold a PixArtAlphaPipeline, which PixArt-α also
claims, so they carry the mark our own folders carry (``"_onestep": {"family": ...}`` in ``model_index.json``), and
the adapter claims a pipeline class of its own. :func:`register` is importable (e.g. by a launcher script that trains
the family through ``accelerate launch``): it registers the adapter and the fixture.
"""

import json
import os

import numpy as np
import pytest
import torch

from diffusers_onestep import OneStepPipeline
from diffusers_onestep.families import (
    FAMILIES,
    PixArtAlphaAdapter,
    detect_family_from_folder,
    get_adapter_class,
    register_family,
    supported_families_text,
)
from diffusers_onestep.pipelines.loading import scheduler_for
from diffusers_onestep.testing import (
    TINY_FIXTURES,
    TinyFixture,
    ddpm_timesteps_setup,
    native_one_step_pipeline,
    register_tiny_fixture,
    save_tiny_native_pipeline,
    tiny_components,
    tiny_pixart_components,
)


FAMILY = "renamed_pixart"
#: a pipeline class name only this family claims
PIPELINE_CLASS_NAME = "RenamedPixArtPipeline"


class RenamedPixArtAdapter(PixArtAlphaAdapter):
    """PixArt-α under another name: everything else is inherited."""

    name = FAMILY
    display_name = "Renamed PixArt"
    pipeline_class_names = (PIPELINE_CLASS_NAME,)
    native_pipeline_class_name = "PixArtAlphaPipeline"
    native_interop_pipeline_class_name = "PixArtAlphaPipeline"
    # no PixArt LoRA loader in diffusers; SanaPipeline's transformer-only one writes `transformer.` keys
    lora_pipeline_class_name = "SanaPipeline"


RENAMED_FIXTURE = TinyFixture(
    components=lambda seed: tiny_pixart_components(seed + 1),  # other weights than PixArt-α's tiny model
    parity_timesteps=[400],
    one_step_setup=ddpm_timesteps_setup,
    native_call_kwargs={"use_resolution_binning": False, "clean_caption": False},
    model_index_entries={"_onestep": {"family": FAMILY}},
)


def register() -> None:
    """Register the family and its tiny fixture (idempotent)."""
    register_family(RenamedPixArtAdapter)
    register_tiny_fixture(FAMILY, RENAMED_FIXTURE)


@pytest.fixture
def renamed_family():
    """The family registered for one test, and removed after it (the other tests see the built-in registry)."""
    register()
    yield FAMILY
    FAMILIES.pop(FAMILY, None)
    TINY_FIXTURES.pop(FAMILY, None)


@pytest.fixture
def teacher_folder(renamed_family, tmp_path):
    return save_tiny_native_pipeline(FAMILY, str(tmp_path / "teacher"))


def _run(pipe, seed=0, **kwargs):
    return pipe("a photo of a cat", generator=torch.Generator().manual_seed(seed), output_type="np", **kwargs).images


def test_detected_from_saved_folders(teacher_folder, tmp_path):
    assert detect_family_from_folder(teacher_folder) == FAMILY
    # a folder naming the family's own pipeline class
    with open(os.path.join(teacher_folder, "model_index.json")) as f:
        index = json.load(f)
    del index["_onestep"]
    own_class = tmp_path / "own-class"
    own_class.mkdir()
    (own_class / "model_index.json").write_text(json.dumps({**index, "_class_name": PIPELINE_CLASS_NAME}))
    assert detect_family_from_folder(str(own_class)) == FAMILY
    # without either mark it is a PixArt-α folder, as before
    (own_class / "model_index.json").write_text(json.dumps(index))
    assert detect_family_from_folder(str(own_class)) == "pixart_alpha"


def test_one_step_pipeline_runs_saves_and_reloads_it(teacher_folder, tmp_path):
    pipe = OneStepPipeline.from_pretrained(teacher_folder, conditioning_timesteps=[400])
    pipe.set_progress_bar_config(disable=True)
    assert pipe.config.family == FAMILY and type(pipe.adapter) is RenamedPixArtAdapter
    images = _run(pipe)
    size = pipe.transformer.config.sample_size * pipe.adapter.vae_scale_factor  # the denoiser's native size
    assert images.shape == (1, size, size, 3) and images.std() > 1e-3
    assert _run(pipe, num_images_per_prompt=2, height=2 * size, width=2 * size).shape == (2, 2 * size, 2 * size, 3)
    # parity with the family's own pipeline run the way its fixture says
    native, kwargs = native_one_step_pipeline(FAMILY, teacher_folder)
    assert np.abs(_run(native, **kwargs) - images).max() <= 1e-5

    # built directly from components
    components = tiny_components(FAMILY)
    scheduler = scheduler_for(FAMILY, dict(components["scheduler"].config), [400], None)
    direct = OneStepPipeline(
        **{n: components[n] for n in RenamedPixArtAdapter.component_names()}, scheduler=scheduler, family=FAMILY
    )
    direct.set_progress_bar_config(disable=True)
    assert np.abs(_run(direct) - images).max() <= 1e-6

    # save_pretrained -> from_pretrained keeps the family (the folder names the native class it shares)
    student = tmp_path / "student"
    pipe.save_pretrained(student)
    with open(student / "model_index.json") as f:
        index = json.load(f)
    assert index["_class_name"] == "PixArtAlphaPipeline" and index["_onestep"]["family"] == FAMILY
    assert detect_family_from_folder(str(student)) == FAMILY
    reloaded = OneStepPipeline.from_pretrained(student)
    reloaded.set_progress_bar_config(disable=True)
    assert reloaded.config.family == FAMILY
    assert reloaded.scheduler.config.conditioning_timesteps == [400]
    assert np.array_equal(_run(reloaded), images)


def test_listed_among_the_supported_families(renamed_family):
    text = supported_families_text()
    # registered last, after every built-in family
    assert text.endswith(" and Renamed PixArt (renamed_pixart)")
    assert all(f"{cls.display_name} ({name})" in text for name, cls in FAMILIES.items())
    with pytest.raises(ValueError, match=r"Renamed PixArt \(renamed_pixart\)"):
        get_adapter_class("no_such_family")


def test_registration_is_checked():
    class Nameless(PixArtAlphaAdapter):
        name = ""

    with pytest.raises(ValueError, match=r"Nameless must set `name`"):
        register_family(Nameless)

    class Impostor(PixArtAlphaAdapter):
        display_name = "Impostor"

    with pytest.raises(ValueError, match=r"'pixart_alpha' is already registered by PixArtAlphaAdapter"):
        register_family(Impostor)
    with pytest.raises(ValueError, match=r"Unknown family 'no_such_family'"):
        register_tiny_fixture("no_such_family", RENAMED_FIXTURE)
    assert FAMILY not in FAMILIES and FAMILY not in TINY_FIXTURES


LAUNCHER = """\
import sys
sys.path.insert(0, {tests!r})
import test_new_family
test_new_family.register()  # the family exists only in the test file
from diffusers_onestep.distill.cli import main
sys.exit(main())
"""


def test_listed_by_the_training_cli(renamed_family):
    from diffusers_onestep.distill import cli

    text = cli.build_parser().format_help()
    family_help = text.split("\n  --family FAMILY", 1)[1].split("\n  --revision", 1)[0]
    assert FAMILY in " ".join(family_help.split())


def test_trained_for_two_steps_through_accelerate_launch(teacher_folder, tmp_path):
    from training_utils import TINY_FLAGS, launch, write_prompts

    script = tmp_path / "train_renamed.py"
    script.write_text(LAUNCHER.format(tests=os.path.dirname(os.path.abspath(__file__))))
    out = tmp_path / "out"
    launch(
        [
            "--teacher",
            teacher_folder,
            "--prompts",
            write_prompts(str(tmp_path)),
            "--output_dir",
            out,
            "--resolution",
            "8",
            "--max_train_steps",
            "2",
            "--critic_updates_per_student",
            "1",
            *TINY_FLAGS,
        ],
        script=str(script),
    )
    with open(out / "training_config.json") as f:
        assert json.load(f)["family"] == FAMILY  # detected from the folder, not passed
    with open(out / "onestep_lora.json") as f:
        assert json.load(f)["family"] == FAMILY
    pipe = OneStepPipeline.from_pretrained(str(out))
    assert pipe.config.family == FAMILY
    images = _run(pipe)
    assert images.shape == (1, 8, 8, 3) and np.isfinite(images).all()  # the tiny teacher's native size
