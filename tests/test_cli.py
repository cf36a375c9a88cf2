"""The `diffusers-onestep` console command, in process: every subcommand's manual, its work, and its refusals
(one sentence, nonzero exit). The installed-wheel run of the same command is tests/test_wheel.py."""

import os
import runpy
import sys

import pytest
from PIL import Image

from diffusers_onestep import cli


SUBCOMMANDS = ("distill", "demo", "generate", "presets", "push", "evaluate", "serve")


def run(capsys, *argv):
    """``(status, stdout, stderr)`` of ``diffusers-onestep argv``; argparse's exits give their status too."""
    try:
        status = cli.main(list(argv))
    except SystemExit as exit_:
        status = exit_.code
    out, err = capsys.readouterr()
    return status, out, err


def error_lines(text):
    return [line for line in text.splitlines() if ": error: " in line]


def test_help_lists_every_subcommand(capsys):
    status, out, _ = run(capsys, "--help")
    assert status == 0
    for name in SUBCOMMANDS:
        assert f"    {name} " in out
    assert "diffusers-onestep generate out" in out  # the examples


@pytest.mark.parametrize(
    "name, flags",
    [
        ("distill", ["--teacher", "--prompts", "--output_dir", "--divergence"]),
        ("demo", ["--quick", "--output_dir"]),
        (
            "generate",
            ["--steps", "--seed", "--num_images", "--height", "--width", "--negative_prompt", "--negative_scale"]
            + ["--out", "MODEL", "PROMPT"],
        ),
        ("presets", ["Markdown", "timesteps"]),
        ("push", ["--repo_id", "--private", "FOLDER", "hf auth login"]),
        ("evaluate", ["--prompts", "--reference", "--num_images", "--features", "clean-fid", "metrics.json"]),
        ("serve", ["MODEL", "--host", "--port", "--max_queue", "--max_batch", "--negative_prompt", "[serve]"]),
    ],
)
def test_each_subcommand_help_is_its_manual(capsys, name, flags):
    status, out, _ = run(capsys, name, "--help")
    assert status == 0
    for flag in flags:
        assert flag in out, f"`diffusers-onestep {name} --help` does not mention {flag}"


def test_unknown_subcommand_and_none_are_refused(capsys):
    status, _, err = run(capsys, "train")
    assert status == 2 and "invalid choice: 'train'" in err
    status, _, err = run(capsys)
    assert status == 2 and "required: SUBCOMMAND" in err


def test_python_m_distill_is_the_training_script(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["diffusers_onestep.distill", "--help"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module("diffusers_onestep.distill", run_name="__main__")
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "--teacher" in out and out.startswith("usage: python -m diffusers_onestep.distill")


def test_distill_refuses_a_missing_teacher_in_one_sentence(capsys):
    status, _, err = run(capsys, "distill", "--prompts", "prompts.txt")
    assert status == 2
    assert error_lines(err) == [err.strip()] and "`--teacher` is required" in err
    assert err.startswith("diffusers-onestep distill: error:")  # named as the user typed it


def test_demo_refuses_unknown_flags(capsys):
    status, _, err = run(capsys, "demo", "--fast")
    assert status == 2 and "unrecognized arguments: --fast" in err and "diffusers-onestep demo" in err


def test_presets_prints_the_supported_students_table(capsys):
    from diffusers_onestep.pipelines.presets import markdown_table

    status, out, _ = run(capsys, "presets")
    assert status == 0 and out.strip() == markdown_table()


# ------------------------------------------------------------------------------------------------------------------
# generate
# ------------------------------------------------------------------------------------------------------------------


def test_generate_writes_one_png_per_image_and_a_line_per_file(capsys, tmp_path, student_folder):
    folder = student_folder("pixart_alpha")
    out_dir = tmp_path / "images"
    status, out, _ = run(
        capsys,
        "generate",
        folder,
        "a photo of a cat",
        "--num_images",
        "2",
        "--seed",
        "3",
        "--height",
        "16",
        "--width",
        "24",
        "--out",
        str(out_dir),
        "--device",
        "cpu",
    )
    assert status == 0
    files = sorted(os.listdir(out_dir))
    assert files == ["seed3_000.png", "seed3_001.png"]
    assert [line for line in out.splitlines() if line.startswith("wrote ")] == [
        f"wrote {out_dir / name} (24x16)" for name in files
    ]
    assert "1 step(s)" in out  # the tiny student was saved at one conditioning timestep
    with Image.open(out_dir / files[0]) as image:
        assert image.size == (24, 16)


def test_generate_is_deterministic_in_its_seed(capsys, tmp_path, student_folder):
    folder = student_folder("pixart_alpha")
    for name in ("a", "b"):
        assert run(capsys, "generate", folder, "a cat", "--out", str(tmp_path / name), "--device", "cpu")[0] == 0
    with Image.open(tmp_path / "a" / "seed0_000.png") as a, Image.open(tmp_path / "b" / "seed0_000.png") as b:
        assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize(
    "extra, status, message",
    [
        (["--steps", "2"], 2, "This student supports 1 to 1 inference steps"),
        (["--height", "7"], 2, "`height` must be a positive multiple of 2"),
    ],
)
def test_generate_refuses_what_the_student_cannot_do(capsys, tmp_path, student_folder, extra, status, message):
    code, _, err = run(
        capsys, "generate", student_folder("pixart_alpha"), "a cat", "--out", str(tmp_path), "--device", "cpu", *extra
    )
    assert code == status, err
    (line,) = error_lines(err)  # loading progress bars aside, one error line
    assert line.startswith("diffusers-onestep generate: error: ") and message in line
    assert not any(name.endswith(".png") for name in os.listdir(tmp_path))


@pytest.mark.parametrize("family", ["pixart_alpha", "flux"])  # cross attention; joint attention (our extension)
def test_generate_negative_prompt_is_the_pipelines_nasa(capsys, tmp_path, student_folder, family):
    """--negative_prompt / --negative_scale write the image `pipe(prompt, negative_prompt=..., negative_scale=...)`
    gives; without a scale the pipeline's default λ."""
    import numpy as np
    import torch

    from diffusers_onestep import OneStepPipeline
    from diffusers_onestep.pipelines import nasa

    folder = student_folder(family)
    flags = ["--out", str(tmp_path / "steered"), "--device", "cpu", "--negative_prompt", "a red square"]
    status, out, _ = run(capsys, "generate", folder, "a cat", *flags, "--negative_scale", "0.8")
    assert status == 0 and "away from 'a red square' (NASA λ 0.8)" in out
    pipe = OneStepPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    call = {"generator": torch.Generator().manual_seed(0), "output_type": "np"}
    expected = pipe("a cat", negative_prompt="a red square", negative_scale=0.8, **call).images[0]
    with Image.open(tmp_path / "steered" / "seed0_000.png") as image:
        written = np.asarray(image)
    assert np.array_equal(written, (expected * 255).round().astype(np.uint8))
    plain = pipe("a cat", generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert not np.array_equal(written, (plain * 255).round().astype(np.uint8))  # the negative prompt acted
    status, out, _ = run(capsys, "generate", folder, "a cat", *flags[:1], str(tmp_path / "default"), *flags[2:])
    assert status == 0 and f"(NASA λ {nasa.DEFAULT_NEGATIVE_SCALE:g})" in out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--negative_scale", "-1"], "argument --negative_scale: expected a number >= 0, got '-1'"),
        (
            ["--negative_scale", "1"],
            "--negative_scale weighs the negative prompt's attention (NASA) and needs --negative_prompt; pass one or "
            "remove --negative_scale.",
        ),
        (["--num_images", "0"], "argument --num_images: expected a positive integer, got '0'"),
        (["--steps", "one"], "argument --steps: expected a positive integer, got 'one'"),
        (["--seed", "x"], "argument --seed: invalid int value: 'x'"),
    ],
)
def test_generate_refuses_bad_numbers_before_loading(capsys, extra, message):
    status, out, err = run(capsys, "generate", "no/such-model", "a cat", *extra)
    assert status == 2 and out == ""  # refused before any loading or printing
    assert error_lines(err) == [f"diffusers-onestep generate: error: {message}"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--port", "0"], "argument --port: expected a TCP port between 1 and 65535, got '0'"),
        (["--max_queue", "0"], "argument --max_queue: expected a positive integer, got '0'"),
        (["--concurrency", "x"], "argument --concurrency: expected a positive integer, got 'x'"),
    ],
)
def test_serve_refuses_bad_numbers_before_loading(capsys, extra, message):
    status, out, err = run(capsys, "serve", "no/such-model", *extra)
    assert status == 2 and out == ""
    assert error_lines(err) == [f"diffusers-onestep serve: error: {message}"]


def test_serve_refuses_a_model_it_cannot_load_in_one_sentence(capsys, tmp_path):
    pytest.importorskip("gradio", reason="the serve extra (gradio) is not installed")
    status, out, err = run(capsys, "serve", str(tmp_path / "no-such-folder"), "--port", "1")
    assert status == 1
    [line] = error_lines(err)
    assert line.startswith("diffusers-onestep serve: error: cannot serve ") and line.endswith(".")


def test_generate_refuses_a_model_it_cannot_load(capsys, tmp_path):
    missing = str(tmp_path / "no-such-folder")
    status, out, err = run(capsys, "generate", missing, "a cat")
    assert status == 1 and out == ""
    assert err.startswith("diffusers-onestep generate: error: cannot load") and len(err.strip().splitlines()) == 1
    status, _, err = run(capsys, "generate", str(tmp_path), "a cat")  # a folder that is no pipeline
    assert status == 1 and "cannot load" in err and len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------------------------------
# push, at the huggingface_hub API boundary (as tests/test_hub.py)
# ------------------------------------------------------------------------------------------------------------------


def saved_student(folder, card=True):
    os.makedirs(folder, exist_ok=True)
    for name in ["model_index.json"] + (["README.md"] if card else []):
        with open(os.path.join(folder, name), "w") as f:
            f.write("{}")
    return str(folder)


def test_push_uploads_the_student_with_its_card(capsys, tmp_path, hub_calls):
    folder = saved_student(tmp_path / "student")
    status, out, _ = run(capsys, "push", folder, "--repo_id", "me/student", "--private")
    assert status == 0
    repo_id, kwargs = hub_calls["create"]
    assert repo_id == "me/student" and kwargs["private"] is True and kwargs["exist_ok"] is True
    assert hub_calls["upload"]["folder_path"] == folder and hub_calls["upload"]["repo_id"] == "me/student"
    assert out.strip() == f"pushed {folder} to https://huggingface.co/me/student"


def test_push_without_a_card_says_so_and_pushes(capsys, tmp_path, hub_calls):
    folder = saved_student(tmp_path / "student", card=False)
    status, out, _ = run(capsys, "push", folder, "--repo_id", "me/student")
    assert status == 0 and "has no model card" in out
    assert hub_calls["create"][1]["private"] is False


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "is not a folder."),
        ("not_a_student", "is not a saved student: it has neither model_index.json nor onestep_lora.json"),
        ("bad_repo_id", "--repo_id 'a/b/c' is not a valid Hub repo id"),
    ],
)
def test_push_refuses_bad_input_before_any_hub_call(capsys, tmp_path, hub_calls, case, message):
    folder = {
        "missing": str(tmp_path / "nothing"),
        "not_a_student": str(tmp_path),
        "bad_repo_id": saved_student(tmp_path / "student"),
    }[case]
    repo_id = "a/b/c" if case == "bad_repo_id" else "me/student"
    status, _, err = run(capsys, "push", folder, "--repo_id", repo_id)
    assert status == 2 and error_lines(err) == [err.strip()] and message in err
    assert hub_calls == {}


def test_push_reports_a_hub_failure_in_one_sentence(capsys, tmp_path, monkeypatch):
    import huggingface_hub

    def create_repo(repo_id, **kwargs):
        raise OSError(
            "401 Client Error: Unauthorized for url: https://huggingface.co/api/repos/create\n"
            "Invalid credentials in Authorization header"
        )

    monkeypatch.setattr(huggingface_hub, "create_repo", create_repo)
    status, _, err = run(capsys, "push", saved_student(tmp_path / "s"), "--repo_id", "me/student")
    assert status == 1
    assert err.strip() == (
        "diffusers-onestep push: error: the upload to 'me/student' failed: 401 Client Error: "
        "Unauthorized for url: https://huggingface.co/api/repos/create"
    )


def test_push_requires_a_repo_id(capsys, tmp_path):
    status, _, err = run(capsys, "push", str(tmp_path))
    assert status == 2 and "the following arguments are required: --repo_id" in err
