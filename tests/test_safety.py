"""Safe loading and crash-safe writing: no remote code unless asked, nothing half-written."""

import json
import os
import shutil

import numpy as np
import pytest
import torch

from diffusers_onestep import OneStepPipeline, storage
from diffusers_onestep.testing import save_tiny_native_pipeline


def test_custom_code_in_a_folder_is_not_run_without_trust_remote_code(tmp_path):
    folder = save_tiny_native_pipeline("pixart_alpha", str(tmp_path / "pipe"))
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    index["transformer"] = ["my_transformer", "MyTransformer"]
    (tmp_path / "pipe" / "model_index.json").write_text(json.dumps(index))
    marker = tmp_path / "code-ran"
    (tmp_path / "pipe" / "transformer" / "my_transformer.py").write_text(
        f"open({str(marker)!r}, 'w').write('x')\n"
        "from diffusers import PixArtTransformer2DModel\n"
        "class MyTransformer(PixArtTransformer2DModel):\n    pass\n"
    )
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        OneStepPipeline.from_pretrained(folder, conditioning_timesteps=[400])
    assert not marker.exists()


def test_pickle_serialization_is_refused(tmp_path):
    pipe = OneStepPipeline.from_pretrained(
        save_tiny_native_pipeline("pixart_alpha", str(tmp_path / "p")), conditioning_timesteps=[400]
    )
    with pytest.raises(ValueError, match="safetensors only"):
        pipe.save_pretrained(str(tmp_path / "out"), safe_serialization=False)
    assert not (tmp_path / "out").exists()


def test_a_crash_while_saving_keeps_the_previous_folder(tmp_path, monkeypatch):
    pipe = OneStepPipeline.from_pretrained(
        save_tiny_native_pipeline("pixart_alpha", str(tmp_path / "p")), conditioning_timesteps=[400]
    )
    target = tmp_path / "student"
    pipe.save_pretrained(str(target))
    before = sorted(os.listdir(target))

    from diffusers import ModelMixin

    def crash(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ModelMixin, "save_pretrained", crash)
    with pytest.raises(OSError):
        pipe.save_pretrained(str(target))
    assert sorted(os.listdir(target)) == before
    assert [n for n in os.listdir(tmp_path) if n.startswith(".student")] == []  # staging removed
    monkeypatch.undo()
    assert OneStepPipeline.from_pretrained(str(target)).scheduler.config.conditioning_timesteps == [400]


def test_replace_directory_restores_the_old_folder_when_the_move_fails(tmp_path, monkeypatch):
    target, staging = tmp_path / "t", tmp_path / "s"
    target.mkdir()
    (target / "old.txt").write_text("old")
    staging.mkdir()
    (staging / "new.txt").write_text("new")
    real_replace = os.replace
    calls = []

    def flaky(src, dst):
        calls.append(src)
        if len(calls) == 2:  # the move of the new folder into place
            raise OSError("interrupted")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", flaky)
    with pytest.raises(OSError):
        storage.replace_directory(str(staging), str(target))
    monkeypatch.undo()
    assert os.listdir(target) == ["old.txt"]


def test_publish_moves_the_commit_file_last(tmp_path, monkeypatch):
    """An export interrupted half-way leaves no model_index.json, so nothing loads a half student."""
    target = tmp_path / "out"
    (target / "checkpoint-2").mkdir(parents=True)
    (target / "model_index.json").write_text("{}")  # an older export
    staging = tmp_path / "staging"
    (staging / "unet").mkdir(parents=True)
    for name in ("unet/weights.safetensors", "scheduler.json", "model_index.json"):
        (staging / name).write_text(name)
    moved = []
    real_replace = os.replace

    def record(src, dst):
        moved.append(os.path.basename(dst))
        if os.path.basename(dst) == "scheduler.json":
            raise OSError("killed")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", record)
    with pytest.raises(OSError):
        storage.publish_entries(str(staging), str(target), commit_file="model_index.json")
    monkeypatch.undo()
    assert "model_index.json" not in os.listdir(target), "a half export must not be loadable"
    assert "model_index.json" not in moved  # the commit file comes after everything else
    assert (target / "checkpoint-2").is_dir()
    storage.publish_entries(str(staging), str(target), commit_file="model_index.json")
    assert (target / "model_index.json").read_text() == "model_index.json"


def test_save_tensors_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "w.safetensors")
    storage.save_tensors(path, {"a": torch.ones(2)})
    import safetensors.torch

    def crash(*args, **kwargs):
        raise OSError("killed")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError):
        storage.save_tensors(path, {"a": torch.zeros(2)})
    monkeypatch.undo()
    assert torch.equal(storage.load_tensors(path)["a"], torch.ones(2))


def test_save_pretrained_into_an_existing_folder_keeps_what_it_did_not_write(student_folder, tmp_path, run):
    run_dir = tmp_path / "run"
    shutil.copytree(student_folder("pixart_alpha"), run_dir)
    (run_dir / "notes.txt").write_text("my notes", encoding="utf-8")
    (run_dir / "checkpoints" / "checkpoint-5").mkdir(parents=True)
    (run_dir / "checkpoints" / "checkpoint-5" / "state.json").write_text("{}", encoding="utf-8")
    pipe = OneStepPipeline.from_pretrained(str(run_dir))
    pipe.set_progress_bar_config(disable=True)
    expected = run(pipe)
    pipe.save_pretrained(run_dir)  # the documented round trip into the folder it came from
    assert (run_dir / "notes.txt").read_text(encoding="utf-8") == "my notes"
    assert (run_dir / "checkpoints" / "checkpoint-5" / "state.json").exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no staging folder left behind
    reloaded = OneStepPipeline.from_pretrained(str(run_dir))
    reloaded.set_progress_bar_config(disable=True)
    assert np.array_equal(run(reloaded), expected)


def test_save_pretrained_onto_a_file_is_refused_and_the_file_kept(student, tmp_path):
    target = tmp_path / "student.safetensors"
    target.write_bytes(b"not mine to replace")
    with pytest.raises(ValueError, match=r"student.safetensors is a file; `save_pretrained` writes a folder"):
        student("pixart_alpha").save_pretrained(target)
    assert target.read_bytes() == b"not mine to replace"
    assert os.listdir(tmp_path) == ["student.safetensors"]
