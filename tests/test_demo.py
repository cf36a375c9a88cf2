"""`make demo --quick`: the main job end to end on the bundled digits teacher, in about a minute."""

import json

import pytest


KEYS = {"teacher50_fd", "teacher1_fd", "best_student", "best_student_fd", "fd_ratio", "acc_ratio", "wall_s"}


@pytest.fixture
def demo(quick_demo):
    """The quick demo's output folder and printed output (run once per session: tests/conftest.py)."""
    return quick_demo


def test_quick_demo_writes_student_grid_and_metrics(demo):
    out, output = demo
    assert (out / "grid.png").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert KEYS <= set(metrics)
    assert metrics["fd_ratio"] == pytest.approx(metrics["best_student_fd"] / metrics["teacher50_fd"])
    # the table the demo prints
    for row in ("teacher, 20 steps", "teacher, 1 step", "student, 1 step", "FD"):
        assert row in output
    assert "Distilling" in output  # the training script's progress bar


def test_quick_demo_student_beats_its_starting_point(demo):
    """Even a dozen updates move the student well away from the teacher run at one step (FD ~10)."""
    out, _ = demo
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["best_student_fd"] < 0.8 * metrics["teacher1_fd"]
    student = metrics["runs"]["student, 1 step"]
    assert student["prompt_accuracy"] >= metrics["runs"]["teacher, 1 step"]["prompt_accuracy"]


def test_quick_demo_student_folder_loads(demo):
    import torch

    from diffusers_onestep import OneStepPipeline

    out, _ = demo
    pipe = OneStepPipeline.from_pretrained(str(out / "student"))
    pipe.set_progress_bar_config(disable=True)
    assert pipe.config.family == "pixart_alpha"
    image = pipe("a handwritten digit 3", generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (16, 16)
