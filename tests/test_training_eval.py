"""``--eval_steps`` and ``--keep_best`` on the tiny PixArt-α teacher; the evaluation and training cost in the card."""

import json
import os

import pytest
from huggingface_hub import ModelCard
from training_utils import tiny_run_argv, write_images, write_prompts

from diffusers_onestep.distill import cli as distill_cli
from diffusers_onestep.distill.config import ConfigError
from diffusers_onestep.distill.evaluate import TrainingEvaluator
from diffusers_onestep.distill.trainer import Trainer
from diffusers_onestep.testing import save_tiny_native_pipeline
from diffusers_onestep.testing.evaluation import save_tiny_clip, save_tiny_inception


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("training-eval")
    cache = str(root / "cache")
    save_tiny_inception(cache)
    return {
        "root": root,
        "cache": cache,
        "teacher": save_tiny_native_pipeline("pixart_alpha", str(root / "teacher")),
        "prompts": write_prompts(str(root)),
        "images": write_images(str(root / "images"), size=8),
        "clip": save_tiny_clip(str(root / "clip")),
    }


def eval_argv(workspace, output_dir, *extra):
    return tiny_run_argv(
        workspace,
        output_dir,
        "--eval_steps",
        "1",
        "--eval_prompts",
        workspace["prompts"],
        "--eval_reference",
        workspace["images"],
        "--keep_best",
        "--checkpointing_steps",
        "4",
        "--checkpoints_total_limit",
        "1",
        "--lr_scheduler",
        "constant",
        *extra,
    )


def test_eval_steps_logs_keeps_the_best_checkpoint_and_resume_knows_it(workspace, tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFUSERS_ONESTEP_CACHE", workspace["cache"])
    logged = []
    import accelerate

    real_log = accelerate.Accelerator.log

    def log(self, values, step=None, log_kwargs=None):
        logged.append((step, dict(values)))
        return real_log(self, values, step=step)

    monkeypatch.setattr(accelerate.Accelerator, "log", log)
    # The real metrics of every evaluation are kept; the FID the best is chosen by is scripted, so that the best
    # (step 2) is neither the first nor the latest checkpoint, whatever the tiny student draws.
    scripted = iter([3.0, 1.0, 2.0, 4.0, 5.0, 0.5])
    real_metrics = []
    real_call = TrainingEvaluator.__call__

    def call(self, renderer, step):
        metrics = real_call(self, renderer, step)
        real_metrics.append(dict(metrics))
        return {**metrics, "fid": next(scripted)}

    monkeypatch.setattr(TrainingEvaluator, "__call__", call)
    output_dir = tmp_path / "run"
    argv = eval_argv(workspace, output_dir, "--max_train_steps", "4", "--eval_clip_model", workspace["clip"])
    config, _ = distill_cli.resolve_args(argv)
    Trainer(config).run()

    assert len(real_metrics) == 4
    assert all(set(m) == {"fid", "kid", "clip_score"} and m["fid"] > 0 for m in real_metrics)
    assert all(step_logs["eval/clip_score"] >= 0 for _, step_logs in logged if "eval/fid" in step_logs)
    assert [(step, v["eval/fid"]) for step, v in logged if "eval/fid" in v] == [(1, 3.0), (2, 1.0), (3, 2.0), (4, 4.0)]
    with open(output_dir / "best_checkpoint.json") as f:
        best = json.load(f)
    assert best == {"step": 2, "metric": "fid", "value": 1.0, "checkpoint": "checkpoint-2"}
    # --checkpoints_total_limit 1 keeps the latest and, beside it, the best
    assert sorted(p for p in os.listdir(output_dir) if p.startswith("checkpoint-")) == ["checkpoint-2", "checkpoint-4"]
    with open(output_dir / "checkpoint-4" / "trainer_state.json") as f:
        state = json.load(f)
    assert state["best"] == best and state["training_cost"]["wall_seconds"] > 0
    # the card: model-index eval results, the protocol, the training cost
    card = ModelCard.load(str(output_dir / "README.md"))
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert results["fid"] == 4.0 and "kid" in results and "clip_score" in results  # the final evaluation
    assert "## Evaluation" in card.text and "Protocol: 4 images at 8x8" in card.text
    assert "Training cost:" in card.text and "1 session(s)" in card.text

    # resume for two more steps: the checkpoint's record says which is best; a better FID at step 6 replaces it
    config, _ = distill_cli.resolve_args(
        eval_argv(workspace, output_dir, "--max_train_steps", "6", "--resume_from_checkpoint", "latest")
    )
    trainer = Trainer(config)
    trainer.run()
    assert trainer.state.best["step"] == 6 and trainer.state.training_cost["sessions"] == 2
    assert sorted(p for p in os.listdir(output_dir) if p.startswith("checkpoint-")) == ["checkpoint-6"]


def test_pruning_keeps_the_best_checkpoint_beside_the_latest(workspace, tmp_path, monkeypatch, hub_calls):
    """--checkpoints_total_limit removes older checkpoints but never the best one its record names; --push_to_hub
    uploads the card with the final evaluation."""
    from diffusers_onestep.distill.checkpoint import prune_checkpoints, read_run

    monkeypatch.setenv("DIFFUSERS_ONESTEP_CACHE", workspace["cache"])
    scripted = iter([1.0, 2.0, 3.0])
    monkeypatch.setattr(
        TrainingEvaluator, "__call__", lambda self, renderer, step: {"fid": next(scripted), "kid": 0.0}
    )
    output_dir = tmp_path / "run"
    config, _ = distill_cli.resolve_args(
        eval_argv(
            workspace,
            output_dir,
            "--max_train_steps",
            "3",
            "--checkpointing_steps",
            "1",
            "--push_to_hub",
            "--hub_model_id",
            "me/student",
            "--base_model_id",
            "org/teacher",
        )
    )
    Trainer(config).run()
    assert hub_calls["upload"]["repo_id"] == "me/student"
    card = ModelCard.load(os.path.join(hub_calls["upload"]["folder_path"], "README.md"))
    assert {r.metric_type: r.metric_value for r in card.data.eval_results} == {"fid": 3.0, "kid": 0.0}
    assert card.data.model_name == "me/student" and "## Evaluation" in card.text
    assert sorted(p for p in os.listdir(output_dir) if p.startswith("checkpoint-")) == ["checkpoint-1", "checkpoint-3"]
    # the same pruning without the best named removes it: the record is what keeps it
    prune_checkpoints(str(output_dir), 1, read_run(str(output_dir)))
    assert sorted(p for p in os.listdir(output_dir) if p.startswith("checkpoint-")) == ["checkpoint-3"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--eval_steps", "2"], "`--eval_steps` needs --eval_prompts (held-out prompts) and --eval_reference"),
        (["--keep_best"], "`--keep_best` needs --eval_steps."),
        (["--eval_steps", "0"], "`--eval_steps` must be >= 1, got 0."),
    ],
)
def test_bad_evaluation_settings_are_one_sentence(workspace, tmp_path, extra, message):
    with pytest.raises(ConfigError) as error:
        distill_cli.resolve_args(tiny_run_argv(workspace, tmp_path / "run", *extra))
    assert str(error.value).startswith(message)
