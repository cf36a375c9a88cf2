"""The trainer in-process: exact resume, the critic:student update schedule, and config/CLI errors."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file
from training_utils import TINY_FLAGS, run_args, write_images, write_prompts

from diffusers_onestep.distill import cli
from diffusers_onestep.distill.checkpoint import list_checkpoints
from diffusers_onestep.distill.config import ConfigError
from diffusers_onestep.distill.resolve import resolve
from diffusers_onestep.distill.trainer import Trainer
from diffusers_onestep.testing import save_tiny_native_pipeline


os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer")
    return {
        "root": root,
        "teacher": save_tiny_native_pipeline("pixart_alpha", str(root / "teacher")),
        "sdxl": save_tiny_native_pipeline("sdxl", str(root / "teacher-sdxl")),
        "prompts": write_prompts(str(root)),
        "images": write_images(str(root / "images"), size=8),
    }


def make_config(workspace, output_dir, *extra):
    argv = [
        "--teacher",
        workspace["teacher"],
        "--prompts",
        workspace["prompts"],
        "--output_dir",
        str(output_dir),
        "--resolution",
        "8",
        *TINY_FLAGS,
        *[str(a) for a in extra],
    ]
    config, _ = cli.resolve_args(argv)
    return config


def trainable(path):
    return load_file(os.path.join(path, "trainable.safetensors"))


@pytest.mark.parametrize("student", ["lora", "full"])
def test_resume_equals_uninterrupted_run(workspace, student):
    """Stop after step 2, resume `latest`, and end exactly where an uninterrupted 5-step run ends: weights,
    optimizer moments, discriminator head, ratio normalizer, data order and RNG all resume."""

    def config(output_dir, *extra):
        # the crash-and-resume run of training_utils (f-distill, EMA, checkpoints every 2 steps) with this student
        return cli.resolve_args(run_args(workspace, output_dir, "--student", student, *extra))[0]

    full_dir = workspace["root"] / f"full-{student}"
    Trainer(config(full_dir, "--max_train_steps", "5")).run()

    split_dir = workspace["root"] / f"split-{student}"
    Trainer(config(split_dir, "--max_train_steps", "2")).run()
    assert [s for s, _ in list_checkpoints(str(split_dir))] == [2]
    resumed = config(split_dir, "--max_train_steps", "5", "--resume_from_checkpoint", "latest")
    Trainer(resumed).run()

    a, b = trainable(full_dir / "checkpoint-5"), trainable(split_dir / "checkpoint-5")
    assert a.keys() == b.keys() and any("discriminator_head" in k for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    for name in (
        "ema.safetensors",
        "method.safetensors",
        "optimizer_student.safetensors",
        "optimizer_critic.safetensors",
    ):
        x, y = load_file(str(full_dir / "checkpoint-5" / name)), load_file(str(split_dir / "checkpoint-5" / name))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name
    # and training did move the weights away from the start
    start = trainable(split_dir / "checkpoint-2")
    assert any(not torch.equal(start[k], a[k]) for k in a)


def write_shaped_images(folder):
    """Tall, wide and square PNG images (three aspect-ratio buckets) with a caption each."""
    import numpy as np
    from PIL import Image

    folder.mkdir()
    sizes = [(32, 16), (16, 32), (16, 16), (30, 16), (16, 30), (20, 20)]
    for i, (width, height) in enumerate(sizes):
        array = (np.random.RandomState(i).rand(height, width, 3) * 255).astype("uint8")
        Image.fromarray(array).save(folder / f"{i}.png")
    (folder / "metadata.jsonl").write_text(
        "\n".join(json.dumps({"file_name": f"{i}.png", "text": f"image {i}"}) for i in range(len(sizes))) + "\n"
    )
    return str(folder)


def assert_same_state(a_dir, b_dir):
    for name in ("trainable.safetensors", "optimizer_student.safetensors", "optimizer_critic.safetensors"):
        x, y = load_file(str(a_dir / name)), load_file(str(b_dir / name))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name


@pytest.mark.parametrize("data", ["cached_buckets", "streamed"])
def test_resume_with_the_data_at_scale_paths(workspace, tmp_path, data):
    """Exact resume on the other data paths: latents from the on-disk cache (built by the first run, mapped by the
    resumed one) with aspect-ratio buckets, random crops and flips and captions; and webdataset shards streamed."""
    if data == "cached_buckets":
        flags = [
            "--real_images",
            write_shaped_images(tmp_path / "shapes"),
            "--caption_column",
            "text",
            "--resolution",
            "16",
            "--cache_latents",
            "--aspect_ratio_buckets",
            "--no_center_crop",
            "--random_flip",
            "--max_train_samples",
            "5",
        ]
    else:
        from test_data import write_shards

        flags = ["--real_images", write_shards(tmp_path / "shards"), "--streaming", "--image_column", "png"]
        flags += ["--caption_column", "txt"]

    def config(output_dir, *extra):
        argv = run_args(workspace, output_dir, *flags, "--data_cache_dir", tmp_path / "cache", *extra)
        return cli.resolve_args(argv)[0]

    full = Trainer(config(tmp_path / "full", "--max_train_steps", "4"))
    full.run()
    Trainer(config(tmp_path / "split", "--max_train_steps", "2")).run()
    Trainer(config(tmp_path / "split", "--max_train_steps", "4", "--resume_from_checkpoint", "latest")).run()
    assert_same_state(tmp_path / "full" / "checkpoint-4", tmp_path / "split" / "checkpoint-4")
    caches = sorted(name.split("-")[0] for name in os.listdir(tmp_path / "cache") if name.endswith(".arrow"))
    if data == "cached_buckets":
        assert caches == ["latents", "text"]  # one file each, shared by the three runs
        sizes = {tuple(full.batches(step, 0).real.shape[-2:]) for step in range(8)}
        assert len(sizes) > 1  # batches of several buckets, each with noise of its size
        assert full.batches(0, 0).noise.shape[-2:] == full.batches(0, 0).real.shape[-2:]
    else:
        assert caches == ["text"]  # streamed captions are encoded as they come


def test_update_schedule(workspace):
    """Critic every iteration, student when step % ratio == 0 (DMD2 two time-scale rule), student first."""
    events = []

    def record(event, trainer, **info):
        if event == "optimizer_step":
            events.append((info["step"], info["role"]))

    config = make_config(
        workspace,
        workspace["root"] / "schedule",
        "--max_train_steps",
        "11",
        "--critic_updates_per_student",
        "5",
        "--checkpointing_steps",
        "100",
    )
    trainer = Trainer(config, hooks=[record])
    trainer.run()
    expected = []
    for step in range(11):
        if step % 5 == 0:
            expected.append((step, "student"))
        expected.append((step, "critic"))
    assert events == expected
    # each optimizer stepped exactly as often as the schedule says
    tensors = load_file(str(workspace["root"] / "schedule" / "checkpoint-11" / "optimizer_student.safetensors"))
    step_values = {float(v) for k, v in tensors.items() if k.endswith(".step")}
    assert step_values == {3.0}
    tensors = load_file(str(workspace["root"] / "schedule" / "checkpoint-11" / "optimizer_critic.safetensors"))
    assert {float(v) for k, v in tensors.items() if k.endswith(".step")} == {11.0}


def test_accumulated_micro_batches_run_under_no_sync_but_the_last(workspace, monkeypatch):
    """With --gradient_accumulation_steps 3, the forward and backward of every micro-batch but the last of an update
    run inside accelerate's ``no_sync`` of every prepared module, so DDP all-reduces once per update (that 2 processes
    still equal 1 with accumulation is tests/test_training_e2e.py's parity test)."""
    import contextlib

    from accelerate import Accelerator

    inside = {"depth": 0}
    original_no_sync = Accelerator.no_sync

    @contextlib.contextmanager
    def counting_no_sync(self, model):
        with original_no_sync(self, model):
            inside["depth"] += 1
            try:
                yield
            finally:
                inside["depth"] -= 1

    monkeypatch.setattr(Accelerator, "no_sync", counting_no_sync)
    seen = []

    def record(event, trainer, **info):
        if event == "loss":
            seen.append((info["step"], info["role"], inside["depth"], len(trainer.state.roles.prepared)))

    config = make_config(
        workspace,
        workspace["root"] / "accumulation",
        "--max_train_steps",
        "2",
        "--gradient_accumulation_steps",
        "3",
        "--critic_updates_per_student",
        "2",
        "--checkpointing_steps",
        "100",
    )
    Trainer(config, hooks=[record]).run()
    modules = seen[0][3]
    assert modules >= 1
    expected = []
    for step in range(2):
        for role in ("student", "critic") if step == 0 else ("critic",):
            expected += [(step, role, modules, modules), (step, role, modules, modules), (step, role, 0, modules)]
    assert seen == expected
    assert inside["depth"] == 0


def test_checkpoints_total_limit_keeps_the_newest(workspace):
    out = workspace["root"] / "limit"
    Trainer(
        make_config(
            workspace,
            out,
            "--max_train_steps",
            "4",
            "--checkpointing_steps",
            "1",
            "--checkpoints_total_limit",
            "2",
            "--critic_updates_per_student",
            "1",
        )
    ).run()
    assert [s for s, _ in list_checkpoints(str(out))] == [3, 4]
    assert not [n for n in os.listdir(out) if n.startswith(".")]  # no staging leftovers


# ---------------------------------------------------------------------------------------------------------------
# bad input: one sentence, exit status 2, nothing loaded or written
# ---------------------------------------------------------------------------------------------------------------


def run_cli(argv):
    with pytest.raises(SystemExit) as info:
        cli.main([str(a) for a in argv])
    return info.value.code


BAD = {
    "missing teacher": ([], "--teacher"),
    "teacher folder without model_index": (["--teacher", "{root}"], "model_index.json"),
    "unknown divergence": (["--divergence", "wasserstein"], "wasserstein"),
    "lora rank 0": (["--lora_rank", "0"], "--lora_rank"),
    "resolution multiple": (["--teacher", "{sdxl}", "--resolution", "33"], "multiple of"),
    "empty prompts": (["--prompts", "{empty}"], "holds no prompts"),
    "missing prompt column": (["--prompts", "{jsonl}", "--prompt_column", "caption"], "caption"),
    "f-divergence without images": (["--divergence", "js"], "--real_images"),
    "fp16 on cpu": (["--mixed_precision", "fp16"], "fp16"),
    "bad hub id": (["--hub_model_id", "not a valid id!!"], "hub_model_id"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_input_exits_before_loading(workspace, name, capsys, tmp_path):
    argv, expected = BAD[name]
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "p.jsonl").write_text(json.dumps({"text": "a cat"}) + "\n")
    fill = {
        "root": str(workspace["root"]),
        "sdxl": workspace["sdxl"],
        "empty": str(tmp_path / "empty.txt"),
        "jsonl": str(tmp_path / "p.jsonl"),
    }
    argv = [a.format(**fill) for a in argv]
    out = tmp_path / "out"
    base = ["--prompts", workspace["prompts"], "--output_dir", str(out), "--resolution", "8"]
    if name != "missing teacher" and "--teacher" not in argv:
        base = ["--teacher", workspace["teacher"]] + base
    if "--prompts" in argv:
        i = base.index("--prompts")
        del base[i : i + 2]
    if "--resolution" in argv:
        i = base.index("--resolution")
        del base[i : i + 2]
    code = run_cli(base + argv)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2
    assert expected in err
    assert not out.exists(), "nothing may be written for bad input"


def test_non_empty_output_dir_is_refused(workspace, capsys, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    code = run_cli(["--teacher", workspace["teacher"], "--prompts", workspace["prompts"], "--output_dir", out])
    assert code == 2 and "--overwrite_output_dir" in capsys.readouterr().err
    assert os.listdir(out) == ["keep.txt"]


def test_resume_with_conflicting_config_lists_differences(workspace, capsys):
    out = workspace["root"] / "conflict"
    Trainer(make_config(workspace, out, "--max_train_steps", "1", "--critic_updates_per_student", "1")).run()
    code = run_cli(
        [
            "--teacher",
            workspace["teacher"],
            "--prompts",
            workspace["prompts"],
            "--output_dir",
            out,
            "--resolution",
            "8",
            *TINY_FLAGS,
            "--max_train_steps",
            "3",
            "--critic_updates_per_student",
            "1",
            "--resume_from_checkpoint",
            "latest",
            "--lora_rank",
            "3",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "roles.lora_rank: 2 -> 3" in err


def test_resume_path_that_is_not_a_checkpoint(workspace, capsys, tmp_path):
    code = run_cli(
        [
            "--teacher",
            workspace["teacher"],
            "--prompts",
            workspace["prompts"],
            "--output_dir",
            tmp_path / "o",
            "--resume_from_checkpoint",
            str(tmp_path),
        ]
    )
    assert code == 2 and "not a complete checkpoint" in capsys.readouterr().err


def test_config_file_values_are_overridden_by_flags(workspace, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        f"teacher: {workspace['teacher']}\nprompts: {workspace['prompts']}\nlora_rank: 7\n"
        "roles:\n  critic: full\nmethod:\n  guidance_scale: 2.5\n"
    )
    config = resolve(cli.parse_args(["--config", str(path), "--lora_rank", "3"])[0])
    assert config.roles.lora_rank == 3 and config.roles.critic == "full" and config.method.guidance_scale == 2.5
    with pytest.raises(ConfigError, match="Unknown setting"):
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps({"learning_rat": 1}))
        cli.parse_args(["--config", str(bad)])


def test_family_defaults_follow_the_papers(workspace):
    config = resolve(cli.parse_args(["--teacher", workspace["sdxl"], "--prompts", workspace["prompts"]])[0])
    assert config.family == "sdxl" and config.method.method == "dmd2" and config.method.student_timesteps == [399.0]
    assert config.method.guidance_scale == 8.0  # DMD2 SDXL real-score CFG
    assert config.optim.learning_rate == 5e-5  # DMD2 SDXL 4-step LoRA
    assert config.roles.lora_rank == 64 and config.roles.lora_alpha == 8
    assert config.method.critic_updates_per_student == 5
    argv = ["--teacher", workspace["sdxl"], "--prompts", workspace["prompts"], "--student", "full"]
    assert resolve(cli.parse_args(argv)[0]).optim.learning_rate == 5e-7


def test_help_is_a_manual(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    for flag in (
        "--teacher",
        "--divergence",
        "--student_timesteps",
        "--resume_from_checkpoint",
        "--push_to_hub",
        "examples:",
    ):
        assert flag in text


def test_multi_step_student_exports_its_timesteps(workspace):
    from diffusers_onestep import OneStepPipeline

    out = workspace["root"] / "two-step"
    Trainer(
        make_config(
            workspace,
            out,
            "--max_train_steps",
            "2",
            "--critic_updates_per_student",
            "1",
            "--student_timesteps",
            "999",
            "499",
        )
    ).run()
    pipe = OneStepPipeline.from_pretrained(str(out))
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config.conditioning_timesteps == [999, 499]
    steps = []
    pipe("a cat", output_type="latent", callback_on_step_end=lambda p, i, t, k: steps.append(int(t)) or {})
    assert steps == [999, 499]
    with pytest.raises(ValueError, match="supports 1 to 2"):
        pipe("a cat", num_inference_steps=3)


def test_a_failing_export_leaves_the_trained_weights_in_the_student(workspace, monkeypatch):
    """The export swaps the EMA into the live student; an exception inside must not leave it there."""
    from diffusers_onestep.distill import export

    def broken_sample(self, *args, **kwargs):
        raise RuntimeError("the sampler broke")

    monkeypatch.setattr(export.StudentRenderer, "sample", broken_sample)
    out = workspace["root"] / "broken-export"
    trainer = Trainer(
        make_config(
            workspace,
            out,
            "--max_train_steps",
            "2",
            "--critic_updates_per_student",
            "1",
            "--ema_decay",
            "0.5",
            "--lr_scheduler",
            "constant",
        )
    )
    with pytest.raises(RuntimeError, match="the sampler broke"):
        trainer.run()
    saved = trainable(out / "checkpoint-2")  # written after the last step, before the export
    ema = load_file(str(out / "checkpoint-2" / "ema.safetensors"))
    live = trainer.state.roles.trainable_state_dict()
    assert saved.keys() == live.keys()
    for key in saved:
        assert torch.equal(saved[key], live[key]), key
    assert any(not torch.equal(ema[k], saved[k]) for k in ema)  # the EMA differs, so the swap was undone
    assert not (out / "model_index.json").exists() and not (out / "onestep_lora.json").exists()


def test_offloaded_ema_is_the_same_average_kept_on_the_cpu(workspace):
    """--offload_ema keeps the student's EMA in CPU memory; the average is the same (CPU here, so the same device)."""
    emas = []
    for name, extra in (("ema-device", ()), ("ema-cpu", ("--offload_ema",))):
        out = workspace["root"] / name
        flags = ("--max_train_steps", "2", "--critic_updates_per_student", "1", "--ema_decay", "0.5")
        trainer = Trainer(make_config(workspace, out, *flags, "--lr_scheduler", "constant", *extra))
        trainer.run()
        assert all(v.device.type == "cpu" for v in trainer.state.ema.values())
        emas.append(load_file(str(out / "checkpoint-2" / "ema.safetensors")))
    assert emas[0].keys() == emas[1].keys()
    for key in emas[0]:
        assert torch.equal(emas[0][key], emas[1][key]), key


def test_8bit_adam_without_bitsandbytes_is_one_sentence(monkeypatch):
    import importlib.util

    from diffusers_onestep.distill.config import ConfigError, OptimizationConfig

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else find_spec(name)
    )
    with pytest.raises(ConfigError, match=r"^`--use_8bit_adam` needs bitsandbytes, which is not installed; .*\.$"):
        OptimizationConfig(use_8bit_adam=True).validate()


def test_8bit_adam_trains_and_resumes_exactly(workspace):
    """bitsandbytes' AdamW8bit (the test extra installs it; it runs on the CPU) steps both roles, and its quantized
    moments go through the checkpoint: resuming step 1 ends exactly where the uninterrupted 2-step run ends."""
    import shutil

    import bitsandbytes

    flags = ("--use_8bit_adam", "--max_train_steps", "2", "--critic_updates_per_student", "1", "--student", "full")
    flags += ("--checkpointing_steps", "1", "--lr_scheduler", "constant")
    out = workspace["root"] / "adam8bit"
    trainer = Trainer(make_config(workspace, out, *flags))
    trainer.run()
    # accelerate wraps each optimizer; its `optimizer` attribute is the one built
    optimizers = {role: getattr(o, "optimizer", o) for role, o in trainer.state.optimizers.items()}
    assert all(isinstance(o, bitsandbytes.optim.AdamW8bit) for o in optimizers.values())
    # the full student's large matrices hold 8-bit moments (bitsandbytes keeps tensors under 4096 values in 32 bits)
    states = [state for state in optimizers["student"].state.values() if "state1" in state]
    assert any(state["state1"].dtype == torch.uint8 for state in states)

    resumed = workspace["root"] / "adam8bit-resumed"
    shutil.copytree(out / "checkpoint-1", resumed / "checkpoint-1")
    shutil.copy(out / "training_config.json", resumed / "training_config.json")
    Trainer(make_config(workspace, resumed, *flags, "--resume_from_checkpoint", "latest")).run()
    expected, got = trainable(out / "checkpoint-2"), trainable(resumed / "checkpoint-2")
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    assert not torch.equal(trainable(out / "checkpoint-1")[key], expected[key])  # the second step moved them
