"""Crash safety: kill -9 at several points and resume to the same result, non-finite guards, interrupts, secrets."""

import contextlib
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from fault_launcher import exit_path, marker_path, pid_path
from safetensors.torch import load_file
from training_utils import (
    FAULT_LAUNCHER,
    REPO,
    SCRIPT,
    STATE_FILES,
    env,
    hub_account,
    in_process,
    kill_at,
    launch,
    launch_command,
    run_args,
    start,
    wait_for,
    write_images,
    write_prompts,
)

from diffusers_onestep.distill.checkpoint import list_checkpoints
from diffusers_onestep.distill.trainer import NonFiniteError
from diffusers_onestep.testing import save_tiny_native_pipeline


os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    return {
        "root": root,
        "teacher": save_tiny_native_pipeline("pixart_alpha", str(root / "teacher")),
        "prompts": write_prompts(str(root)),
        "images": write_images(str(root / "images"), size=8),
    }


def test_kill_9_anywhere_then_resume_gives_the_uninterrupted_result(workspace):
    reference = workspace["root"] / "reference"
    in_process(run_args(workspace, reference))

    out = workspace["root"] / "killed"
    argv = run_args(workspace, out)
    resume = run_args(workspace, out, "--resume_from_checkpoint", "latest")

    # 1. mid-step: after the student's forward of iteration 3, before its backward
    kill_at(argv, out, "loss@3")
    assert [s for s, _ in list_checkpoints(str(out))] == [2]
    # 2. mid-checkpoint-save: everything of checkpoint-4 written except its commit file
    kill_at(resume, out, "before_checkpoint_commit@4")
    assert [s for s, _ in list_checkpoints(str(out))] == [2], "a half checkpoint must not count"
    assert not (out / "checkpoint-4").exists()
    # 3. right after checkpoint-4 was renamed into place
    kill_at(resume, out, "checkpoint_written@4")
    assert [s for s, _ in list_checkpoints(str(out))] == [2, 4]
    # 4. resume and finish
    final = subprocess.run(
        [sys.executable, SCRIPT, *[str(a) for a in resume]], env=env(), capture_output=True, text=True, timeout=300
    )
    assert final.returncode == 0, final.stderr[-4000:]

    for name in STATE_FILES:
        a = load_file(str(reference / "checkpoint-6" / name))
        b = load_file(str(out / "checkpoint-6" / name))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}:{key}"
    leftovers = [n for n in os.listdir(out) if n.startswith(".checkpoint")]
    assert leftovers == [], leftovers


def test_nonfinite_loss_stops_and_names_step_and_term(workspace):
    out = workspace["root"] / "nan-stop"

    def inject(event, trainer, **info):
        if event == "loss" and info["step"] == 3 and info["role"] == "critic":
            return info["loss"] * float("nan")

    with pytest.raises(NonFiniteError) as error:
        in_process(run_args(workspace, out), hooks=[inject])
    message = str(error.value)
    assert "step 4" in message and "critic" in message and "loss" in message
    # the last good checkpoint is intact and loadable
    assert [s for s, _ in list_checkpoints(str(out))] == [2]
    assert load_file(str(out / "checkpoint-2" / "trainable.safetensors"))


def test_nonfinite_gradient_can_be_skipped_with_a_limit(workspace):
    out = workspace["root"] / "nan-skip"
    seen = []

    def inject(event, trainer, **info):
        if event == "loss" and info["role"] == "student" and info["step"] in (0, 2):
            seen.append(info["step"])
            # finite loss, non-finite gradient
            return info["loss"] + 0 * torch.sqrt(torch.tensor(-1.0, requires_grad=True))

    result = in_process(
        run_args(workspace, out, "--on_nonfinite", "skip", "--max_nonfinite_skips", "2"), hooks=[inject]
    )
    assert seen == [0, 2] and result.global_step == 6
    import json

    state = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["nonfinite_skips"] == 2

    with pytest.raises(NonFiniteError, match="limit of 1 skipped"):
        in_process(
            run_args(
                workspace, workspace["root"] / "nan-limit", "--on_nonfinite", "skip", "--max_nonfinite_skips", "1"
            ),
            hooks=[inject],
        )


def test_nonfinite_guard_from_the_command_line(workspace):
    out = workspace["root"] / "nan-cli"
    result = subprocess.run(
        [sys.executable, FAULT_LAUNCHER, "--fault", "loss@2:nan", *run_args(workspace, out)],
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 3
    assert "Non-finite loss" in result.stdout + result.stderr and "step 3" in result.stdout + result.stderr


def test_sigint_saves_the_current_step_and_exits_cleanly(workspace):
    out = workspace["root"] / "interrupted"
    argv = run_args(workspace, out, "--checkpointing_steps", "100")
    process = start(argv, fault="after_step@3")
    wait_for(marker_path(str(out), "after_step", 3), process)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 130, output[-3000:]
    assert "Interrupted at step 3" in output
    assert [s for s, _ in list_checkpoints(str(out))] == [3]
    # and it resumes from there
    in_process(run_args(workspace, out, "--checkpointing_steps", "100", "--resume_from_checkpoint", "latest"))
    assert [s for s, _ in list_checkpoints(str(out))] == [3, 6]


def test_a_signal_to_one_of_two_processes_stops_both_at_the_same_step_and_the_run_resumes_exactly(workspace):
    """SIGTERM reaches only process 1 (paused after step 3, as a scheduler may signal one rank): accelerate's trigger
    all-reduces it, so both processes save checkpoint-3 together and exit with 130 -- without it, process 1 would
    wait at the checkpoint's barrier while process 0 trains on, until the timeout here fails the test."""
    reference = workspace["root"] / "two-processes"
    out = workspace["root"] / "two-processes-signalled"
    argv = run_args(workspace, out, "--checkpointing_steps", "100")
    launch(run_args(workspace, reference, "--checkpointing_steps", "100"), num_processes=2)

    process = subprocess.Popen(
        launch_command(["--fault", "after_step@3:pause:1", *argv], num_processes=2, script=FAULT_LAUNCHER),
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
    )
    marker = marker_path(str(out), "after_step", 3)
    wait_for(marker, process)
    with open(marker) as f:
        os.kill(int(f.read()), signal.SIGTERM)  # process 1 only
    try:
        output, _ = process.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        # the training processes run in sessions of their own: end them by id, then the launcher
        for rank in (0, 1):
            with contextlib.suppress(OSError, ValueError), open(pid_path(str(out), rank)) as f:
                os.kill(int(f.read()), signal.SIGKILL)
        process.kill()
        output = process.communicate(timeout=60)[0]
        raise AssertionError(f"the processes did not stop together:\n{output[-4000:]}") from None
    assert "Interrupted at step 3: saved" in output, output[-4000:]  # printed by process 0, which got no signal
    assert [s for s, _ in list_checkpoints(str(out))] == [3]
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["num_processes"] == 2 and {"rng_0.safetensors", "rng_1.safetensors"} <= set(state["files"])
    for rank in (0, 1):
        assert json.loads(open(exit_path(str(out), rank)).read()) == {"status": 130, "global_step": 3}

    launch(run_args(workspace, out, "--checkpointing_steps", "100", "--resume_from_checkpoint", "latest"), 2)
    assert [s for s, _ in list_checkpoints(str(out))] == [3, 6]
    for name in STATE_FILES:
        a = load_file(str(reference / "checkpoint-6" / name))
        b = load_file(str(out / "checkpoint-6" / name))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}:{key}"


def test_the_hub_token_is_never_written(workspace, monkeypatch, capfd):
    import huggingface_hub

    token = "hf_NeverWriteMe0123456789abcdefXYZ"
    monkeypatch.setenv("HF_TOKEN", token)
    calls = []
    monkeypatch.setattr(
        huggingface_hub,
        "create_repo",
        lambda repo_id, **kw: (
            calls.append(("create", repo_id, kw)) or huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")
        ),
    )
    monkeypatch.setattr(huggingface_hub, "upload_folder", lambda **kw: calls.append(("upload", kw)))
    monkeypatch.setattr(huggingface_hub, "whoami", hub_account())
    out = workspace["root"] / "secret"
    in_process(
        run_args(
            workspace,
            out,
            "--push_to_hub",
            "--hub_model_id",
            "me/secret-student",
            "--base_model_id",
            "tiny/teacher",
            "--private",
            "--report_to",
            "tensorboard",
            "--validation_steps",
            "3",
        )
    )
    assert [c[0] for c in calls] == ["create", "upload"]
    assert calls[0][1] == "me/secret-student" and calls[0][2]["private"] is True
    # validation grids went to the folder and to tensorboard
    assert (out / "validation" / "step-000003.png").is_file()
    events = [f for _, _, fs in os.walk(out / "logs") for f in fs if f.startswith("events.out.tfevents")]
    assert events
    written = 0
    for root, _, files in os.walk(out):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                assert token.encode() not in f.read(), os.path.join(root, name)
            written += 1
    assert written > 20
    captured = capfd.readouterr()
    assert token not in captured.out + captured.err
