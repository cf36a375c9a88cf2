"""Exit status 2 for refused input also when the run goes through accelerate launch.

``accelerate launch`` turns a training process's exit 2 into its own exit 1 and a ``CalledProcessError`` traceback
(the first test pins that, so a change in accelerate shows here). ``diffusers-onestep distill --num_processes N`` /
``--accelerate_config FILE`` checks the run in its own process first, then starts it through
``accelerate launch --quiet`` and returns the training processes' own status.
"""

import os
import subprocess
import sys

import pytest
import yaml
from training_utils import REPO, env, tiny_run_argv, write_prompts

from diffusers_onestep import cli
from diffusers_onestep.distill.checkpoint import list_checkpoints
from diffusers_onestep.testing import save_tiny_native_pipeline


REFUSAL = "The accelerate config sets mixed_precision fp16, which needs a CUDA GPU"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("launch")
    fp16_config = root / "fp16.yaml"
    with open(os.path.join(REPO, "training", "accelerate_configs", "single_gpu.yaml"), encoding="utf-8") as f:
        settings = yaml.safe_load(f)
    # an input only a launched process can see: the precision comes from the accelerate config
    fp16_config.write_text(yaml.safe_dump({**settings, "mixed_precision": "fp16"}))
    return {
        "root": root,
        "teacher": save_tiny_native_pipeline("pixart_alpha", str(root / "teacher")),
        "prompts": write_prompts(str(root)),
        "fp16_config": str(fp16_config),
    }


def run_flags(workspace, output_dir, *extra):
    return tiny_run_argv(workspace, output_dir, "--max_train_steps", "1", *extra)


def console(*argv):
    """``diffusers-onestep argv`` in a process of its own, as a user runs it."""
    code = "import sys; from diffusers_onestep.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", code, *[str(a) for a in argv]],
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=str(REPO),
    )


def test_accelerate_launch_itself_reports_a_refusal_as_status_1_with_a_traceback(workspace):
    out = workspace["root"] / "accelerate-direct"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", workspace["fp16_config"]]
    command += ["-m", "diffusers_onestep.distill", *run_flags(workspace, out)]
    result = subprocess.run(command, env=env(), capture_output=True, text=True, timeout=300, cwd=str(REPO))
    assert result.returncode == 1
    assert REFUSAL in result.stderr and "CalledProcessError" in result.stderr
    assert not out.exists()


def test_the_launching_command_returns_2_and_one_sentence_for_a_refusal_inside_the_launched_process(workspace):
    out = workspace["root"] / "launched-refusal"
    result = console("distill", *run_flags(workspace, out, "--accelerate_config", workspace["fp16_config"]))
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith(f"diffusers-onestep distill: error: {REFUSAL}")
    assert "Traceback" not in result.stderr and "CalledProcessError" not in result.stderr
    assert not out.exists()


def test_input_refused_before_launching_starts_no_process(workspace, monkeypatch, capsys):
    def no_launch(*args, **kwargs):
        raise AssertionError("accelerate launch was started for refused input")

    monkeypatch.setattr(subprocess, "run", no_launch)
    out = workspace["root"] / "never"
    with pytest.raises(SystemExit) as exit_:
        cli.main(["distill", *run_flags(workspace, out, "--num_processes", "2", "--adam_beta1", "1.5")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["diffusers-onestep distill: error: `--adam_beta1` must be in [0, 1), got 1.5."]
    assert not out.exists()


def test_the_launching_command_trains_through_accelerate_launch(workspace):
    out = workspace["root"] / "launched"
    result = console("distill", *run_flags(workspace, out, "--num_processes", "1"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert [step for step, _ in list_checkpoints(str(out))] == [1]
    assert os.path.isfile(out / "model_index.json") or os.path.isfile(out / "onestep_lora.json")


def test_the_launching_check_sees_what_the_processes_will_see_and_leaves_the_environment_as_it_was(tmp_path):
    from diffusers_onestep.distill.cli import launched_environment

    config = tmp_path / "accelerate.yaml"
    config.write_text("num_processes: 4\nmixed_precision: no\n")  # unquoted `no` is YAML's false
    before = {key: os.environ.get(key) for key in ("WORLD_SIZE", "ACCELERATE_MIXED_PRECISION")}
    with launched_environment(None, str(config)):
        assert os.environ["WORLD_SIZE"] == "4" and os.environ["ACCELERATE_MIXED_PRECISION"] == "no"
    with launched_environment(2, str(config)):  # --num_processes wins over the file
        assert os.environ["WORLD_SIZE"] == "2"
    assert {key: os.environ.get(key) for key in before} == before
