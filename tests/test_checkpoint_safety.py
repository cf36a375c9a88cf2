"""Nothing lost, nothing half-done: a run's checkpoints among an older run's, damaged checkpoints (passed over under
`latest`, refused when named), missing RNG state, what a crash leaves behind, and restarting a run that had no
checkpoint yet.

Every resumed run is compared with one uninterrupted reference run whose checkpoints are copied, so each case costs
at most the few steps it resumes."""

import json
import os
import shutil

import pytest
import torch
from fault_launcher import exit_path, marker_path, pid_path
from safetensors.torch import load_file
from training_utils import STATE_FILES, in_process, kill_at, run_args, tiny_run_argv, write_images, write_prompts

from diffusers_onestep.distill import cli
from diffusers_onestep.distill.checkpoint import (
    CONFIG_NAME,
    RUN_NAME,
    ResumePoint,
    RunIdentity,
    checkpoint_problem,
    find_resume_point,
    list_checkpoints,
    read_run,
    read_trainer_state,
    write_run,
)
from diffusers_onestep.distill.config import ConfigError
from diffusers_onestep.testing import save_tiny_native_pipeline


os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoint-safety")
    workspace = {
        "root": root,
        "teacher": save_tiny_native_pipeline("pixart_alpha", str(root / "teacher")),
        "prompts": write_prompts(str(root)),
        "images": write_images(str(root / "images"), size=8),
        "reference": root / "reference",
    }
    # The uninterrupted 6-step run (checkpoints 2, 4 and 6) that every resumed run must reproduce.
    in_process(run_args(workspace, workspace["reference"]))
    return workspace


def copy_run(workspace, name, steps):
    """A copy of the reference run's folder (its run.json and configuration) with the checkpoints of ``steps``."""
    reference, out = workspace["reference"], workspace["root"] / name
    out.mkdir()
    for file_name in (CONFIG_NAME, RUN_NAME):
        shutil.copy(reference / file_name, out / file_name)
    for step in steps:
        shutil.copytree(reference / f"checkpoint-{step}", out / f"checkpoint-{step}")
    return out


def truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def as_format_1(checkpoint):
    """Rewrite a checkpoint's trainer_state.json as checkpoints were written before run ids (format 1)."""
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    state = {key: value for key, value in state.items() if key not in ("run_id", "files")}
    (checkpoint / "trainer_state.json").write_text(json.dumps({**state, "format": 1}))


def assert_same_state(expected_checkpoint, checkpoint):
    for name in STATE_FILES:
        expected, actual = load_file(str(expected_checkpoint / name)), load_file(str(checkpoint / name))
        assert expected.keys() == actual.keys(), name
        for key in expected:
            assert torch.equal(expected[key], actual[key]), f"{name}:{key}"


def refusal(argv, capsys):
    """The one-sentence error of the training command for ``argv`` (which must exit with status 2)."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main([str(a) for a in argv])
    assert exit_info.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1].split("error: ", 1)[1]


# ---------------------------------------------------------------------------------------------------------------
# 1. pruning and `latest` touch only the current run's checkpoints
# ---------------------------------------------------------------------------------------------------------------


def test_pruning_keeps_an_older_runs_checkpoints_and_prunes_the_runs_own(workspace):
    """The reported bug: --overwrite_output_dir --checkpoints_total_limit 1 over an older run's folder deleted the new
    run's checkpoints and kept the older run's checkpoint-6, because its step sorted as the newest."""
    out = copy_run(workspace, "overwritten", steps=(2, 4, 6))
    older = read_run(str(out))
    limited = ("--overwrite_output_dir", "--checkpoints_total_limit", "1", "--checkpointing_steps", "3")
    in_process(run_args(workspace, out, *limited, "--max_train_steps", "5"))

    run = read_run(str(out))
    assert run.run_id != older.run_id
    assert [step for step, _ in list_checkpoints(str(out), run)] == [5]  # its own checkpoint-3 was pruned
    assert [step for step, _ in list_checkpoints(str(out))] == [2, 4, 5, 6]
    for step in (2, 4, 6):  # the older run's are untouched
        assert read_trainer_state(str(out / f"checkpoint-{step}"))["run_id"] == older.run_id
        assert_same_state(workspace["reference"] / f"checkpoint-{step}", out / f"checkpoint-{step}")
    # `latest` resumes the run that writes the folder now, not the older run's higher step
    assert find_resume_point("latest", str(out)).path == str(out / "checkpoint-5")
    # and while the run has no checkpoint yet, it starts fresh rather than resume the older run
    replaced = copy_run(workspace, "replaced", steps=(6,))
    write_run(str(replaced), RunIdentity.new())
    assert find_resume_point("latest", str(replaced)) == ResumePoint(
        None,
        f"--resume_from_checkpoint latest: {replaced} has no checkpoint of its current run yet (its checkpoints "
        "belong to a run it replaced), so the run starts fresh.",
    )


def test_a_checkpoint_from_before_run_ids_still_resumes_exactly(workspace):
    out = copy_run(workspace, "format-1", steps=(4,))
    os.remove(out / RUN_NAME)
    as_format_1(out / "checkpoint-4")

    in_process(run_args(workspace, out, "--resume_from_checkpoint", "latest", "--checkpoints_total_limit", "1"))
    assert_same_state(workspace["reference"] / "checkpoint-6", out / "checkpoint-6")
    run = read_run(str(out))
    assert run.owns_checkpoints_without_run_id
    assert read_trainer_state(str(out / "checkpoint-6"))["run_id"] == run.run_id
    # the run that continued checkpoint-4 owns it, so its limit pruned it
    assert [step for step, _ in list_checkpoints(str(out))] == [6]


# ---------------------------------------------------------------------------------------------------------------
# 2. damaged checkpoints: `latest` passes over them, a named one is refused
# ---------------------------------------------------------------------------------------------------------------


def test_latest_passes_over_a_truncated_checkpoint_and_resumes_exactly(workspace, capsys):
    out = copy_run(workspace, "truncated", steps=(4, 6))
    truncate(out / "checkpoint-6" / "trainable.safetensors")
    capsys.readouterr()
    in_process(run_args(workspace, out, "--resume_from_checkpoint", "latest"))
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("--resume_from_checkpoint")]
    assert said == [
        f"--resume_from_checkpoint latest: {out}/checkpoint-6/trainable.safetensors is truncated, so the run resumes "
        f"from {out}/checkpoint-4."
    ]
    assert_same_state(workspace["reference"] / "checkpoint-6", out / "checkpoint-6")


def test_a_named_damaged_checkpoint_is_refused_with_the_previous_one_offered(workspace, capsys):
    out = copy_run(workspace, "named-damaged", steps=(4, 6))
    truncate(out / "checkpoint-6" / "optimizer_critic.safetensors")
    message = refusal(run_args(workspace, out, "--resume_from_checkpoint", out / "checkpoint-6"), capsys)
    assert message == (
        f"--resume_from_checkpoint {out}/checkpoint-6 cannot be resumed: {out}/checkpoint-6/optimizer_critic."
        f"safetensors is truncated; resume from {out}/checkpoint-4, the previous complete checkpoint, instead."
    )


def _drop_ema(checkpoint):
    os.remove(checkpoint / "ema.safetensors")


def _overwrite_header(checkpoint):
    with open(checkpoint / "method.safetensors", "r+b") as f:
        f.write(b"\xff" * 8)


def _as_format_1_with_cut_json(checkpoint):
    as_format_1(checkpoint)  # no recorded sizes: the parse finds the cut
    truncate(checkpoint / "rng_0.json")


DAMAGE = {
    "no commit file": (lambda c: os.remove(c / "trainer_state.json"), "trainer_state.json is missing"),
    "a JSON file cut short": (lambda c: truncate(c / "scheduler_student.json"), "scheduler_student.json is truncated"),
    "the EMA missing": (_drop_ema, "ema.safetensors is missing"),
    "a safetensors header overwritten": (_overwrite_header, "method.safetensors is not a whole safetensors file"),
    "format 1, a JSON file cut short": (_as_format_1_with_cut_json, "rng_0.json is not valid JSON"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_every_kind_of_damage_is_named(workspace, damage, tmp_path):
    """The checks read headers and JSON only; each damage names the bad file."""
    damage_fn, expected = DAMAGE[damage]
    checkpoint = tmp_path / "checkpoint-2"
    shutil.copytree(workspace["reference"] / "checkpoint-2", checkpoint)
    assert checkpoint_problem(str(checkpoint)) is None
    damage_fn(checkpoint)
    problem = checkpoint_problem(str(checkpoint))
    assert problem is not None and problem.startswith(f"{checkpoint}/{expected}"), problem


# ---------------------------------------------------------------------------------------------------------------
# 3. a checkpoint without RNG state is refused, not resumed inexactly
# ---------------------------------------------------------------------------------------------------------------


def test_a_checkpoint_without_its_rng_state_is_refused(workspace, capsys, monkeypatch):
    out = copy_run(workspace, "no-rng", steps=(4, 6))
    os.remove(out / "checkpoint-6" / "rng_0.safetensors")
    message = refusal(run_args(workspace, out, "--resume_from_checkpoint", "checkpoint-6"), capsys)
    assert message == (
        f"--resume_from_checkpoint {out}/checkpoint-6 cannot be resumed: {out}/checkpoint-6/rng_0.safetensors is "
        f"missing; resume from {out}/checkpoint-4, the previous complete checkpoint, instead."
    )
    point = find_resume_point("latest", str(out))
    assert point.path == str(out / "checkpoint-4") and "checkpoint-6/rng_0.safetensors is missing" in point.note

    # a run of more processes than the checkpoint holds RNG states for would not continue exactly either
    monkeypatch.setenv("WORLD_SIZE", "2")
    message = refusal(run_args(workspace, out, "--resume_from_checkpoint", "checkpoint-4"), capsys)
    assert (
        f"{out}/checkpoint-4/rng_1.json is missing (the checkpoint was saved by 1 process, this run has 2)" in message
    )


# ---------------------------------------------------------------------------------------------------------------
# 4. what a crash left behind goes with the next save
# ---------------------------------------------------------------------------------------------------------------


def test_what_a_crash_left_behind_is_removed_by_the_next_save(workspace):
    out = workspace["root"] / "leftovers"
    staging_folders = (".checkpoint-4.tmp", ".export.tmp-0123abcd", ".transformer.old-89abcdef")
    for name in staging_folders:
        (out / name).mkdir(parents=True)
        (out / name / "trainable.safetensors").write_text("half")
    (out / "run.json.tmp-00ff00ff").write_text("{")
    users_own = (".notes", "draft.tmp", ".checkpoint-notes")
    for name in users_own:
        (out / name).write_text("mine")

    argv = tiny_run_argv(workspace, out, "--overwrite_output_dir", "--max_train_steps", "1")
    in_process([*argv, "--critic_updates_per_student", "1"])
    names = set(os.listdir(out))
    assert not names & {*staging_folders, "run.json.tmp-00ff00ff"}, names
    assert set(users_own) <= names


# ---------------------------------------------------------------------------------------------------------------
# 5. a run killed before its first checkpoint restarts without --overwrite_output_dir
# ---------------------------------------------------------------------------------------------------------------


def test_a_run_killed_before_its_first_checkpoint_restarts(workspace):
    out = workspace["root"] / "killed-early"
    argv = tiny_run_argv(workspace, out, "--max_train_steps", "2", "--critic_updates_per_student", "1")
    kill_at(argv, out, "loss@0")
    # the fault launcher's own files (its marker, the process id and exit record), not files of the run
    for launcher_file in (marker_path(str(out), "loss", 0), pid_path(str(out), 0), exit_path(str(out), 0)):
        if os.path.exists(launcher_file):
            os.remove(launcher_file)
    assert sorted(os.listdir(out)) == [RUN_NAME, CONFIG_NAME]

    # `latest` starts fresh, and says so
    cli.resolve_args([*argv, "--resume_from_checkpoint", "latest"])
    assert find_resume_point("latest", str(out)).note == (
        f"--resume_from_checkpoint latest: {out} has no checkpoint yet, so the run starts fresh."
    )
    # other settings, or a file that is not the run's, still need --overwrite_output_dir
    other_settings = r"other settings and no checkpoint yet \(method\.critic_updates_per_student: 1 -> 2\)"
    with pytest.raises(ConfigError, match=other_settings):
        cli.resolve_args([*argv, "--critic_updates_per_student", "2"])
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"holds files that are not this run's \(notes\.txt\)"):
        cli.resolve_args([*argv, "--resume_from_checkpoint", "latest"])
    os.remove(out / "notes.txt")

    # the same command again
    in_process(argv)
    assert [step for step, _ in list_checkpoints(str(out))] == [2]
