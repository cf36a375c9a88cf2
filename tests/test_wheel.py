"""The built wheel, installed with its dependencies into a fresh venv, runs `diffusers-onestep` outside the checkout.

One slow test (``-m "not slow"`` skips it): it builds the wheel from the packaging files, installs ``torch==2.13.0``
plus the wheel (with the ``demo`` extra) from pip's configured indexes -- the ones ``make test`` installs from -- and,
from an empty directory with no path into the checkout, runs ``--help``, ``presets``, ``generate`` on a tiny saved
student and ``demo --quick``. Wall times of each stage are printed (``pytest -s``).
"""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
from PIL import Image
from training_utils import REPO


#: what a wheel is built from (the build writes build/ and *.egg-info next to them, so it runs on a copy)
PACKAGING_INPUTS = ("pyproject.toml", "README.md", "diffusers_onestep")


def run_timed(timings, name, command, timeout, **kwargs):
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kwargs)
    timings[name] = time.perf_counter() - started
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{name} failed ({result.returncode}):\n{output[-4000:]}"
    return result


def outside_env():
    """The caller's environment without anything that points Python into the checkout, and offline for the Hub."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(
        {
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


@pytest.mark.slow
def test_wheel_installs_in_a_fresh_venv_and_the_command_runs_from_an_empty_directory(tmp_path, student_folder):
    from diffusers_onestep import __version__
    from diffusers_onestep.pipelines.presets import markdown_table

    timings = {}
    env = outside_env()
    source = tmp_path / "source"
    source.mkdir()
    for name in PACKAGING_INPUTS:
        path = os.path.join(REPO, name)
        if os.path.isdir(path):
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, source / name)

    # 1. the wheel
    dist = tmp_path / "dist"
    run_timed(
        timings,
        "wheel build",
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(source)],
        timeout=600,
        env=env,
    )
    (wheel,) = os.listdir(dist)
    assert wheel == f"diffusers_onestep-{__version__}-py3-none-any.whl"

    # 2. a fresh venv with the wheel's dependencies; torch pinned in the same command as the Makefile does
    venv = tmp_path / "venv"
    run_timed(timings, "venv create", [sys.executable, "-m", "venv", str(venv)], timeout=120, env=env)
    python = str(venv / "bin" / "python")
    run_timed(
        timings,
        "venv install",
        [python, "-m", "pip", "install", "-q", "torch==2.13.0", f"{dist / wheel}[demo]"],
        timeout=1200,
        env=env,
    )
    command = str(venv / "bin" / "diffusers-onestep")
    assert os.path.isfile(command), "the wheel installed no diffusers-onestep console command"

    empty = tmp_path / "empty"
    empty.mkdir()
    cwd = {"cwd": str(empty), "env": env}

    # the package imported is the installed one, with its py.typed and bundled teacher
    located = run_timed(
        timings,
        "import check",
        [
            python,
            "-c",
            (
                "import os, diffusers_onestep as p; from diffusers_onestep.demo import digits; "
                "print(p.__file__); print(os.path.isfile(os.path.join(os.path.dirname(p.__file__), 'py.typed'))); "
                "print(os.path.isfile(os.path.join(digits.TEACHER_DIR, 'model_index.json')))"
            ),
        ],
        timeout=300,
        **cwd,
    )
    package_file, typed, teacher = located.stdout.split()[-3:]
    assert package_file.startswith(str(venv)) and typed == "True" and teacher == "True"

    # 3. the console command from the empty directory
    help_text = run_timed(timings, "--help", [command, "--help"], timeout=300, **cwd).stdout
    for name in ("distill", "generate", "demo", "presets", "push"):
        assert f"    {name} " in help_text

    presets = run_timed(timings, "presets", [command, "presets"], timeout=300, **cwd).stdout
    assert presets.strip() == markdown_table()

    student = student_folder("pixart_alpha")
    generated = run_timed(
        timings,
        "generate",
        [command, "generate", student, "a photo of a cat", "--num_images", "2", "--out", "images", "--device", "cpu"],
        timeout=300,
        **cwd,
    )
    assert sorted(os.listdir(empty / "images")) == ["seed0_000.png", "seed0_001.png"]
    assert generated.stdout.count("wrote images/") == 2
    with Image.open(empty / "images" / "seed0_000.png") as image:
        assert image.size == (8, 8)  # the tiny PixArt student's native resolution

    demo = run_timed(timings, "demo --quick", [command, "demo", "--quick"], timeout=900, **cwd)
    metrics = json.loads((empty / "demo-output" / "metrics.json").read_text())
    assert (empty / "demo-output" / "grid.png").is_file()
    assert metrics["best_student_fd"] < metrics["teacher1_fd"]  # a dozen updates already beat the 1-step teacher
    assert "student, 1 step" in demo.stdout and "Distilling" in demo.stdout + demo.stderr

    print("\nwheel test wall times: " + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in timings.items()))
