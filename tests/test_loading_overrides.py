"""Keyword arguments of ``OneStepPipeline.from_pretrained`` / ``from_base`` are honoured or refused for every kind of
student, and a LoRA student records (and loads) its base model by Hub id.

Kinds: a full student folder, a LoRA student folder, the three kinds of preset (full pipeline, denoiser weights on a
base, LoRA on a base; Hub ids resolved offline from tiny stand-ins in a local Hub cache), a base plus denoiser weights
(``from_base``, on a native folder and on a saved student), and a native pipeline folder run as a one-step model.
"""

import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from huggingface_hub import ModelCard

from diffusers_onestep import OneStepPipeline, OneStepScheduler
from diffusers_onestep.lora import LORA_WEIGHT_NAME
from diffusers_onestep.testing import (
    random_lora_state_dict,
    save_tiny_native_pipeline,
    save_to_hub_cache,
    tiny_native_pipeline,
)


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from training_utils import TINY_FLAGS, hub_account, write_prompts  # noqa: E402


SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"
DMD2_LORA = "dmd2_sdxl_4step_lora_fp16.safetensors"
VARIANT_SEED, OTHER_BASE_SEED = 1, 2


def _save_lora(folder, unet, weight_name, seed):
    # attention projections only: enough to change every image, and quick to inject and fuse
    state = random_lora_state_dict(unet, ["to_q", "to_v"], rank=2, seed=seed, scale=0.2)
    StableDiffusionXLPipeline.save_lora_weights(folder, unet_lora_layers=state, weight_name=weight_name)


def _copy_variant_files(source, target):
    """The ``*.fp16.*`` weight files of ``source``'s components into the same components of ``target``."""
    for component in os.listdir(source):
        folder = os.path.join(source, component)
        if os.path.isdir(folder):
            for name in os.listdir(folder):
                if ".fp16." in name:
                    shutil.copy(os.path.join(folder, name), os.path.join(target, component, name))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Every kind of student over one tiny SDXL, and a Hub cache (HF_HUB_CACHE for this module) holding the base and
    the preset repos. The native folder also holds an ``fp16`` variant of other weights (seed 1), so a loaded VAE
    tells which files were read."""
    import huggingface_hub.constants

    root = tmp_path_factory.mktemp("overrides")
    cache = str(root / "hub")
    native = save_tiny_native_pipeline("sdxl", str(root / "native"))
    tiny_native_pipeline("sdxl", seed=VARIANT_SEED).save_pretrained(native, variant="fp16")
    other_base = save_tiny_native_pipeline("sdxl", str(root / "other-base"), seed=OTHER_BASE_SEED)

    student = str(root / "student")
    OneStepPipeline.from_pretrained(native, conditioning_timesteps=[399]).save_pretrained(student)
    _copy_variant_files(native, student)
    unet_weights = os.path.join(student, "unet", "diffusion_pytorch_model.safetensors")

    unet = tiny_native_pipeline("sdxl").unet
    lora_student = root / "lora-student"
    _save_lora(str(lora_student), unet, LORA_WEIGHT_NAME, seed=3)
    OneStepScheduler(conditioning_timesteps=[399]).save_pretrained(str(lora_student / "scheduler"))
    lora_config = {"base_model": native, "family": "sdxl", "weight_name": LORA_WEIGHT_NAME, "lora_scale": 1.0}
    (lora_student / "onestep_lora.json").write_text(json.dumps(lora_config))

    dmd2 = root / "dmd2"
    dmd2.mkdir()
    torch.save({k: v.half() for k, v in unet.state_dict().items()}, dmd2 / "dmd2_sdxl_1step_unet_fp16.bin")
    _save_lora(str(dmd2), unet, DMD2_LORA, seed=4)
    save_to_hub_cache(native, SDXL_BASE, cache_dir=cache)
    save_to_hub_cache(native, "stabilityai/sdxl-turbo", cache_dir=cache)
    save_to_hub_cache(str(dmd2), "tianweiy/DMD2", cache_dir=cache)

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_CACHE", cache)
        mp.setattr(huggingface_hub.constants, "HF_HUB_CACHE", cache)
        yield {
            "root": root,
            "cache": cache,
            "native": native,
            "other_base": other_base,
            "student": student,
            "unet_weights": unet_weights,
            "lora_student": str(lora_student),
        }


#: kind -> (how it loads, its conditioning timesteps when none are given)
KINDS = {
    "full student folder": (lambda w, **kw: OneStepPipeline.from_pretrained(w["student"], **kw), [399]),
    "LoRA student folder": (lambda w, **kw: OneStepPipeline.from_pretrained(w["lora_student"], **kw), [399]),
    "preset: full pipeline": (lambda w, **kw: OneStepPipeline.from_pretrained("stabilityai/sdxl-turbo", **kw), [999]),
    "preset: denoiser weights": (lambda w, **kw: OneStepPipeline.from_pretrained("tianweiy/DMD2", **kw), [399]),
    "preset: LoRA": (
        lambda w, **kw: OneStepPipeline.from_pretrained("tianweiy/DMD2", weight_name=DMD2_LORA, **kw),
        [999, 749, 499, 249],
    ),
    "base + denoiser weights": (
        lambda w, **kw: OneStepPipeline.from_base(w["native"], student_weights=w["unet_weights"], **kw),
        [999],
    ),
    "saved student as the base": (
        lambda w, **kw: OneStepPipeline.from_base(w["student"], student_weights=w["unet_weights"], **kw),
        [399],
    ),
    "native pipeline folder": (lambda w, **kw: OneStepPipeline.from_pretrained(w["native"], **kw), [999]),
}
FROM_BASE_KINDS = ("base + denoiser weights", "saved student as the base")


def _load(world, kind, **overrides):
    pipe = KINDS[kind][0](world, **overrides)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _first_weight(module):
    return next(iter(module.state_dict().values()))


def _images(pipe, **kwargs):
    return pipe("a photo of a cat", generator=torch.Generator().manual_seed(0), output_type="np", **kwargs).images


# ---------------------------------------------------------------------------------------------------------------------
# the matrix: kind x override
# ---------------------------------------------------------------------------------------------------------------------


def _check_timesteps(world, kind, pipe):
    assert pipe.scheduler.config.conditioning_timesteps == [200.0]
    assert pipe.scheduler.config.prediction_type == "epsilon"  # only the timesteps changed
    # the same student as without the override: its images equal the default load's run at those timesteps
    default = _load(world, kind)
    assert default.scheduler.config.conditioning_timesteps == KINDS[kind][1]
    assert np.array_equal(_images(pipe), _images(default, timesteps=[200]))


def _check_prediction_type(world, kind, pipe):
    assert pipe.scheduler.config.prediction_type == "sample"
    assert pipe.scheduler.config.conditioning_timesteps == KINDS[kind][1]


def _check_dtype(world, kind, pipe):
    assert pipe.unet.dtype == torch.float16 and pipe.vae.dtype == torch.float16


def _check_variant(world, kind, pipe):
    variant_vae = tiny_native_pipeline("sdxl", seed=VARIANT_SEED).vae
    assert torch.equal(_first_weight(pipe.vae), _first_weight(variant_vae))


def _check_scheduler(world, kind, pipe):
    assert pipe.scheduler.config.conditioning_timesteps == [500]


def _check_family(world, kind, pipe):
    assert pipe.config.family == "sdxl"


def _check_component(world, kind, pipe):
    assert pipe.vae is world["vae"]


OVERRIDES = {
    "conditioning_timesteps": (lambda w: {"conditioning_timesteps": [200]}, _check_timesteps),
    "prediction_type": (lambda w: {"prediction_type": "sample"}, _check_prediction_type),
    "torch_dtype": (lambda w: {"torch_dtype": torch.float16}, _check_dtype),
    "variant": (lambda w: {"variant": "fp16"}, _check_variant),
    "scheduler": (lambda w: {"scheduler": OneStepScheduler(conditioning_timesteps=[500])}, _check_scheduler),
    "family": (lambda w: {"family": "sdxl"}, _check_family),
    "a component": (lambda w: {"vae": w["vae"]}, _check_component),
}


@pytest.fixture(scope="module")
def other_vae():
    return tiny_native_pipeline("sdxl", seed=OTHER_BASE_SEED).vae


@pytest.mark.parametrize("override", list(OVERRIDES))
@pytest.mark.parametrize("kind", list(KINDS))
def test_override_is_honoured(kind, override, world, other_vae):
    kwargs, check = OVERRIDES[override]
    world = {**world, "vae": other_vae}
    check(world, kind, _load(world, kind, **kwargs(world)))


@pytest.mark.parametrize("kind", list(KINDS))
def test_unknown_keyword_is_refused_before_loading(kind, world, monkeypatch):
    import diffusers

    def refuse(*args, **kwargs):
        raise AssertionError("a pipeline was loaded before the keyword was refused")

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", refuse)
    method = "from_base" if kind in FROM_BASE_KINDS else "from_pretrained"
    with pytest.raises(
        ValueError,
        match=rf"^OneStepPipeline\.{method} got the unknown keyword argument `conditioning_timestep` \(did you mean "
        r"`conditioning_timesteps`\?\)",
    ):
        _load(world, kind, conditioning_timestep=[200])


def test_every_keyword_of_diffusers_from_pretrained_is_passed_on_or_refused_by_name():
    # the accepted list is ours; diffusers' own grows with its releases (a new one would otherwise be refused as unknown)
    import inspect
    import re

    from diffusers import DiffusionPipeline

    from diffusers_onestep.pipelines.loading import DIFFUSERS_KWARGS, OTHER_PIPELINE_KWARGS

    popped = set(re.findall(r'kwargs\.pop\(\s*"(\w+)"', inspect.getsource(DiffusionPipeline.from_pretrained)))
    assert "torch_dtype" in popped and popped <= set(DIFFUSERS_KWARGS) | set(OTHER_PIPELINE_KWARGS)


# which kinds have a base model for `base_model` to replace; the others refuse it
BASE_MODEL = {
    "LoRA student folder": True,
    "preset: denoiser weights": True,
    "preset: LoRA": True,
    "full student folder": r"`base_model` replaces the base model of a LoRA student or of a preset, and .* is a full",
    "native pipeline folder": r"`base_model` replaces the base model of a LoRA student or of a preset",
    "preset: full pipeline": r"stabilityai/sdxl-turbo is a full pipeline, with no base model for `base_model`",
}


@pytest.mark.parametrize("kind", list(BASE_MODEL))  # from_base takes the base as its first argument
def test_base_model_replaces_the_base_or_is_refused(kind, world, other_vae):
    expected = BASE_MODEL[kind]
    if expected is True:
        pipe = _load(world, kind, base_model=world["other_base"])
        assert torch.equal(_first_weight(pipe.vae), _first_weight(other_vae))
    else:
        with pytest.raises(ValueError, match=expected):
            _load(world, kind, base_model=world["other_base"])


def test_the_card_timesteps_of_a_preset_stay_unless_overridden(world):
    # the override replaces the card's timesteps; the card's prediction type stays, and the LoRA is still fused
    pipe = _load(world, "preset: LoRA", conditioning_timesteps=[999, 499])
    assert pipe.scheduler.config.conditioning_timesteps == [999.0, 499.0]
    assert not any("lora" in name for name, _ in pipe.unet.named_modules())
    base = OneStepPipeline.from_pretrained(SDXL_BASE, conditioning_timesteps=[999, 499])
    base.set_progress_bar_config(disable=True)
    assert np.abs(_images(pipe) - _images(base)).max() > 1e-3  # the LoRA changed the images


# ---------------------------------------------------------------------------------------------------------------------
# a LoRA student records its base by Hub id
# ---------------------------------------------------------------------------------------------------------------------


def _lora_student_of(world, folder, base_model, base_revision=None):
    folder = world["root"] / folder
    shutil.copytree(world["lora_student"], folder)
    config = json.loads((folder / "onestep_lora.json").read_text())
    config.update(base_model=base_model, base_revision=base_revision)
    (folder / "onestep_lora.json").write_text(json.dumps(config))
    return str(folder)


def test_a_lora_student_naming_a_hub_base_loads_it_from_the_hub(world):
    student = _lora_student_of(world, "hub-base-student", SDXL_BASE, base_revision="main")
    pipe = _load(world, "LoRA student folder")  # the same LoRA on the local folder the Hub stand-in was made from
    from_hub = OneStepPipeline.from_pretrained(student)
    from_hub.set_progress_bar_config(disable=True)
    assert np.array_equal(_images(from_hub), _images(pipe))


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory):
    """A 1-step LoRA run of a local PixArt teacher with ``--base_model_id`` and ``--push_to_hub`` (the Hub calls
    recorded), the teacher then published under that id in the module's Hub cache."""
    import huggingface_hub

    from diffusers_onestep.distill import cli

    root = tmp_path_factory.mktemp("trained")
    teacher = save_tiny_native_pipeline("pixart_alpha", str(root / "teacher"))
    out = root / "out"
    calls = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(
            huggingface_hub,
            "create_repo",
            lambda repo_id, **kw: huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}"),
        )
        mp.setattr(huggingface_hub, "upload_folder", lambda **kw: calls.setdefault("upload", kw))
        mp.setattr(huggingface_hub, "whoami", hub_account())
        status = cli.main(
            ["--teacher", teacher, "--prompts", write_prompts(str(root)), "--output_dir", str(out)]
            + ["--resolution", "8", *TINY_FLAGS, "--max_train_steps", "1", "--critic_updates_per_student", "1"]
            + ["--base_model_id", "org/tiny-pixart", "--push_to_hub", "--hub_model_id", "me/tiny-student"]
        )
    assert status == 0
    save_to_hub_cache(teacher, "org/tiny-pixart", cache_dir=world["cache"])
    return {"teacher": teacher, "out": str(out), "upload": calls["upload"]}


def test_training_records_the_base_model_id_and_the_student_loads_through_it(trained):
    out = trained["out"]
    assert trained["upload"]["folder_path"] == out and trained["upload"]["repo_id"] == "me/tiny-student"
    lora_config = json.loads(open(os.path.join(out, "onestep_lora.json")).read())
    assert lora_config["base_model"] == "org/tiny-pixart" and lora_config["base_revision"] is None
    card = ModelCard.load(os.path.join(out, "README.md"))
    assert card.data.base_model == "org/tiny-pixart" and "applies to `org/tiny-pixart`" in card.text
    from_hub = OneStepPipeline.from_pretrained(out)
    from_folder = OneStepPipeline.from_pretrained(out, base_model=trained["teacher"])
    for pipe in (from_hub, from_folder):
        pipe.set_progress_bar_config(disable=True)
    assert from_hub.config.family == "pixart_alpha"
    assert np.array_equal(_images(from_hub), _images(from_folder))


def test_without_a_base_model_id_a_hub_teacher_is_the_base_and_a_local_one_its_path(tmp_path):
    from diffusers_onestep.distill.config import TrainConfig
    from diffusers_onestep.distill.export import student_base

    def config(teacher, base_model_id=None):
        cfg = TrainConfig(teacher=teacher, revision="v1")
        cfg.output.base_model_id = base_model_id
        return cfg

    assert student_base(config("org/teacher")) == ("org/teacher", "v1")
    assert student_base(config(str(tmp_path))) == (str(tmp_path), "v1")  # works here, where it was trained
    assert student_base(config(str(tmp_path), "org/teacher")) == ("org/teacher", None)
    assert student_base(config("org/teacher", "org/teacher")) == ("org/teacher", "v1")
    assert student_base(config("org/teacher", "org/mirror")) == ("org/mirror", None)


def test_only_a_pushed_lora_student_of_a_local_teacher_needs_a_base_model_id(tmp_path):
    from diffusers_onestep.distill.config import ConfigError, TrainConfig
    from diffusers_onestep.distill.resolve import check_published_base

    def config(teacher, student="lora", push=True, base_model_id=None):
        cfg = TrainConfig(teacher=teacher)
        cfg.roles.student, cfg.output.push_to_hub, cfg.output.base_model_id = student, push, base_model_id
        return cfg

    with pytest.raises(ConfigError, match=r"pass --base_model_id with the teacher's Hub id\.$"):
        check_published_base(config(str(tmp_path)))
    check_published_base(config(str(tmp_path), base_model_id="org/teacher"))
    check_published_base(config(str(tmp_path), push=False))  # the local path works where it was trained
    check_published_base(config(str(tmp_path), student="full"))  # a full student names no base
    check_published_base(config("org/teacher"))


def test_push_uploads_the_base_model_id_and_leaves_the_folder_as_it_is(trained, tmp_path, monkeypatch, hub_calls):
    import huggingface_hub

    from diffusers_onestep import cli

    folder = tmp_path / "local-student"
    shutil.copytree(trained["out"], folder, ignore=shutil.ignore_patterns("checkpoint-*"))
    config = json.loads((folder / "onestep_lora.json").read_text())
    config.update(base_model=trained["teacher"], base_revision=None)  # as a run without --base_model_id records it
    (folder / "onestep_lora.json").write_text(json.dumps(config))
    card = ModelCard.load(folder / "README.md")
    card.data.base_model = None
    card.save(folder / "README.md")
    before = {p: (folder / p).read_bytes() for p in ("onestep_lora.json", "README.md")}
    commits = []
    monkeypatch.setattr(huggingface_hub, "create_commit", lambda repo_id, operations, **kw: commits.append(operations))

    assert cli.main(["push", str(folder), "--repo_id", "me/student"]) == 2  # refused: the base is a local folder
    assert hub_calls == {} and commits == []
    assert cli.main(["push", str(folder), "--repo_id", "me/student", "--base_model_id", "org/tiny-pixart"]) == 0
    assert "upload" not in hub_calls and len(commits) == 1  # one commit: never weights without their config
    uploaded = {op.path_in_repo: op.path_or_fileobj for op in commits[0]}
    assert json.loads(uploaded["onestep_lora.json"])["base_model"] == "org/tiny-pixart"
    assert "base_model: org/tiny-pixart" in uploaded["README.md"].decode()
    assert any(name.endswith(".safetensors") for name in uploaded)  # the weights travel in the same commit
    assert not any(name.startswith(("checkpoint-", "logs/")) for name in uploaded)
    assert {p: (folder / p).read_bytes() for p in before} == before  # the local folder still loads as before
