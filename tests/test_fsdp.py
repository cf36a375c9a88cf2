"""FSDP2 on 2 CPU processes (gloo), through accelerate's FSDP2 preparation and the real training command.

accelerate 1.15 selects FSDP only for accelerator devices; the trainer's CPU seam (``distill/sharding.py``,
``enable_fsdp_on_cpu``) hands a multi-CPU run the FSDP2 plugin accelerate dropped, so these runs go through
``accelerate launch --config_file training/accelerate_configs/fsdp.yaml`` and ``Accelerator.prepare`` exactly as a
GPU run does. Every run here uses ``--adam_epsilon 1e-4``: a few parameters have an exactly zero true gradient
(attention key biases -- softmax ignores them -- and the discriminator head's conv bias before a one-channel-per-group
GroupNorm), and AdamW with eps 1e-8 turns the float round-off of their gradients, which differs with the order of the
sums across processes, into updates of the learning rate's size; eps 1e-4 keeps those below 1e-7 and leaves every
real gradient (1e-3 and more) moving as before.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from fault_launcher import pid_path
from safetensors.torch import load_file
from training_utils import FAULT_LAUNCHER, REPO, SCRIPT, env, in_process, tiny_run_argv, write_images, write_prompts

from diffusers_onestep import OneStepPipeline
from diffusers_onestep.distill.checkpoint import checkpoint_problem, consolidated_tensors
from diffusers_onestep.testing import save_tiny_native_pipeline


FSDP_CONFIG = os.path.join(REPO, "training", "accelerate_configs", "fsdp.yaml")


def fsdp_command(script, args, num_processes=2):
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        FSDP_CONFIG,
        "--num_processes",
        str(num_processes),
        "--mixed_precision",
        "no",
        "--num_cpu_threads_per_process",
        "1",
        script,
        *[str(a) for a in args],
    ]


def launch_fsdp(args, timeout=300):
    result = subprocess.run(
        fsdp_command(SCRIPT, args), env=env(), capture_output=True, text=True, timeout=timeout, cwd=REPO
    )
    if result.returncode != 0:
        raise AssertionError(
            f"FSDP run failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
        )
    return result


def full_args(workspace, output_dir, batch_size, *extra):
    """A full student and a full critic with the GAN term (discriminator head on the critic trunk, the teacher
    trunk's pass differentiated w.r.t. its input), an EMA, 4 steps checkpointed every 2."""
    return tiny_run_argv(
        workspace,
        output_dir,
        "--student",
        "full",
        "--critic",
        "full",
        "--divergence",
        "js",
        "--real_images",
        workspace["images"],
        "--ema_decay",
        "0.9",
        "--lr_scheduler",
        "constant",
        "--critic_updates_per_student",
        "2",
        "--adam_epsilon",
        "1e-4",
        "--max_train_steps",
        "4",
        "--checkpointing_steps",
        "2",
        "--train_batch_size",
        str(batch_size),
        *extra,
    )


def assert_close_states(a, b, atol=1e-5, loose=(), loose_atol=1e-4):
    """Every tensor within ``atol``; those named in ``loose`` within ``loose_atol`` (see the parity test)."""
    assert a.keys() == b.keys()
    for key in a:
        tolerance = loose_atol if key in loose else atol
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=tolerance, msg=key)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    workspace = {
        "root": root,
        "teacher": save_tiny_native_pipeline("pixart_alpha", str(root / "teacher")),
        "prompts": write_prompts(str(root)),
        "images": write_images(str(root / "images"), size=8),
    }
    # The reference of the full-model tests: 2 FSDP processes × batch 2.
    launch_fsdp(full_args(workspace, root / "fsdp-full", 2))
    return workspace


def test_fsdp_full_roles_match_one_process(workspace):
    """2 FSDP processes × batch 2 equal 1 process × batch 4 (full student, full critic, discriminator, EMA): the
    weights, the EMA and the AdamW moments joined from the shards, and the exported (gathered) student."""
    root = workspace["root"]
    in_process(full_args(workspace, root / "one-full", 4))
    two, one = root / "fsdp-full" / "checkpoint-4", root / "one-full" / "checkpoint-4"
    state = json.loads((two / "trainer_state.json").read_text())
    assert state["num_shards"] == 2 and state["num_processes"] == 2
    trained = consolidated_tensors(str(two), "trainable")
    # The discriminator head's first conv bias has an exactly zero true gradient (a GroupNorm follows that removes a
    # per-channel shift on this tiny 1x1 feature map): at the first critic update its gradient is round-off, 3e-8
    # against 0.69 for the same conv's weight, and differs from the 1-process one by 2.4x its size under FSDP and
    # 1.5x under DDP. AdamW makes updates of that noise, so the bias (and its moments) is held to 1e-4 only.
    head = [name for name in trained if name.startswith("discriminator_head.")]
    critic_count = sum(name.startswith(("critic_model.", "discriminator_head.")) for name in trained)
    noise_only = {"discriminator_head.body.0.bias"}
    bias_index = critic_count - len(head) + 1  # the critic optimizer holds the critic's, then the head's parameters
    noise_moments = {f"{bias_index}.exp_avg", f"{bias_index}.exp_avg_sq"}
    for prefix in ("trainable", "ema", "optimizer_student", "optimizer_critic"):
        # sharded: each process wrote its own shard, and the commit file lists them with their sizes
        assert {f"{prefix}.shard-0.safetensors", f"{prefix}.shard-1.safetensors"} <= set(state["files"])
        assert not (two / f"{prefix}.safetensors").exists()
        loose = noise_moments if prefix == "optimizer_critic" else noise_only
        assert_close_states(
            consolidated_tensors(str(one), prefix), consolidated_tensors(str(two), prefix), loose=loose
        )
    first = load_file(str(two / "trainable.shard-0.safetensors"))
    # every parameter is split (the root module's too: it is resharded before the save), and the weights trained
    name = "student_model.proj_out.weight"
    assert first[name].shape[0] == (trained[name].shape[0] + 1) // 2
    teacher = load_file(os.path.join(workspace["teacher"], "transformer", "diffusion_pytorch_model.safetensors"))
    assert float((trained[name] - teacher["proj_out.weight"]).abs().max()) > 1e-4
    # a sharded checkpoint resumes with the same number of processes only, and says so
    assert checkpoint_problem(str(two), num_processes=2) is None
    assert "sharded over 2 processes (FSDP), this run has 1" in checkpoint_problem(str(two), num_processes=1)

    # the export gathered the full (EMA) student into the diffusers layout, equal to the 1-process export
    exported = root / "fsdp-full" / "transformer" / "diffusion_pytorch_model.safetensors"
    reference = root / "one-full" / "transformer" / "diffusion_pytorch_model.safetensors"
    assert_close_states(load_file(str(reference)), load_file(str(exported)))
    pipe = OneStepPipeline.from_pretrained(str(root / "fsdp-full"))
    pipe.set_progress_bar_config(disable=True)
    images = pipe("a photo of a cat", output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 8, 8, 3) and images.std() > 0


def test_fsdp_lora_on_sharded_backbone_matches_one_process(workspace):
    """LoRA student and critic on one sharded frozen backbone (teacher = adapters off through the same sharded
    module): 2 FSDP processes × batch 2 equal 1 process × batch 4, and the gathered LoRA export loads."""
    root = workspace["root"]
    lora = ("--max_train_steps", "3", "--critic_updates_per_student", "2", "--adam_epsilon", "1e-4")
    launch_fsdp(tiny_run_argv(workspace, root / "fsdp-lora", *lora))
    in_process(tiny_run_argv(workspace, root / "one-lora", *lora, "--train_batch_size", "4"))
    two, one = root / "fsdp-lora" / "checkpoint-3", root / "one-lora" / "checkpoint-3"
    trained = consolidated_tensors(str(two), "trainable")
    assert trained and all("lora_" in name for name in trained)
    assert_close_states(consolidated_tensors(str(one), "trainable"), trained)
    assert max(float(t.abs().max()) for n, t in trained.items() if "lora_B" in n) > 0  # B starts at 0: trained
    weights = "pytorch_lora_weights.safetensors"
    assert_close_states(load_file(str(root / "one-lora" / weights)), load_file(str(root / "fsdp-lora" / weights)))
    pipe = OneStepPipeline.from_pretrained(str(root / "fsdp-lora"))
    pipe.set_progress_bar_config(disable=True)
    images = pipe("a photo of a cat", output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 8, 8, 3) and images.std() > 0


def test_fsdp_kill_during_commit_then_exact_resume(workspace):
    """Every process killed -9 while the step-4 checkpoint is staged (all shards written, no commit file): nothing
    of it is visible, and resuming the step-2 checkpoint under FSDP reproduces the uninterrupted run bit for bit."""
    root = workspace["root"]
    out = root / "fsdp-crash"
    command = fsdp_command(FAULT_LAUNCHER, ["--fault", "before_checkpoint_commit@4", *full_args(workspace, out, 2)])
    process = subprocess.Popen(
        command, env=env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    marker = out / ".fault-before_checkpoint_commit-4"
    deadline = time.time() + 240
    while not marker.exists():
        assert process.poll() is None, process.stderr.read()[-4000:]
        assert time.time() < deadline, "the run never reached the fault"
        time.sleep(0.1)
    # both ranks by their process ids (torchrun starts them in sessions of their own, which the launcher's process
    # group does not reach), then the launcher
    for rank in (0, 1):
        with open(pid_path(str(out), rank)) as f:
            rank_pid = int(f.read())
        with contextlib.suppress(ProcessLookupError):
            os.kill(rank_pid, signal.SIGKILL)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    assert not (out / "checkpoint-4").exists() and (out / "checkpoint-2" / "trainer_state.json").exists()

    launch_fsdp(full_args(workspace, out, 2, "--resume_from_checkpoint", "latest"))
    reference = root / "fsdp-full" / "checkpoint-4"
    names = sorted(n for n in os.listdir(reference) if n.endswith(".safetensors"))
    assert any(".shard-1." in n for n in names)
    for name in names:
        a, b = load_file(str(reference / name)), load_file(str(out / "checkpoint-4" / name))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
    assert not [n for n in os.listdir(out) if n.startswith(".checkpoint-")]  # the crash's staging folder is gone


def test_fsdp_refusals_are_one_sentence(monkeypatch):
    """What the trainer does not run under FSDP is refused before any model loads, in one sentence."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from diffusers_onestep.distill import sharding
    from diffusers_onestep.distill.config import ConfigError, TrainConfig

    def refusal(accelerator, eval_steps=None, **optim):
        config = TrainConfig(teacher="t")
        config.output.eval_steps = eval_steps
        for key, value in optim.items():
            setattr(config.optim, key, value)
        with pytest.raises(ConfigError) as error:
            sharding.check_fsdp_support(accelerator, config)
        message = str(error.value)
        assert message.endswith(".") and "\n" not in message and message.count(". ") == 0
        return message

    fsdp2 = SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=True)
    fsdp1 = SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=False)
    assert "fsdp_version: 2" in refusal(fsdp1)
    assert "bf16" in refusal(fsdp2, mixed_precision="fp16")
    assert "--use_8bit_adam" in refusal(fsdp2, use_8bit_adam=True)
    assert "--eval_steps" in refusal(fsdp2, eval_steps=10)  # the main process alone cannot run a sharded student
    sharding.check_fsdp_support(fsdp2, TrainConfig(teacher="t"))  # the supported case passes
    # the CPU seam leaves a run alone unless FSDP was asked for
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert not sharding.enable_fsdp_on_cpu(SimpleNamespace(distributed_type=DistributedType.MULTI_CPU))
