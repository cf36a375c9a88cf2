"""Shared helpers of the training tests: tiny teachers, prompt and image data, launching the script, and the
crash-and-resume runs of the reliability tests (a run paused at a fault and killed, then resumed in-process)."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
from PIL import Image


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "training", "train_onestep.py")
#: the training command with faults injected through the trainer's hooks (``--fault event@step[:action]``)
FAULT_LAUNCHER = os.path.join(REPO, "tests", "fault_launcher.py")
#: the training command recording the DDP wrappers alive when the process group is destroyed (tests/teardown_launcher.py)
TEARDOWN_LAUNCHER = os.path.join(REPO, "tests", "teardown_launcher.py")
PROMPTS = ["a photo of a cat", "a red car on the road", "an astronaut riding a horse", "a bowl of fruit"]
#: flags that make every family's tiny run small and fast
TINY_FLAGS = [
    "--lora_rank",
    "2",
    "--max_sequence_length",
    "8",
    "--report_to",
    "none",
    "--train_batch_size",
    "2",
    "--learning_rate",
    "1e-3",
    "--guidance_scale",
    "3.0",
]
#: the state files of a checkpoint that a resumed run must reproduce bit for bit
STATE_FILES = (
    "trainable.safetensors",
    "ema.safetensors",
    "method.safetensors",
    "optimizer_student.safetensors",
    "optimizer_critic.safetensors",
)
RESOLUTION = {"sdxl": 32, "pixart_alpha": 8, "pixart_sigma": 8, "sana": 32, "sana_sprint": 32, "sd": 16}


def tiny_pixart_roles(components, max_sequence_length=16):
    """``(adapter, roles)``: a tiny PixArt-α adapter on ``components`` and its LoRA roles (rank 4) with every LoRA B
    drawn from N(0, 0.1), so that student, fake score and teacher differ (the zero B of a fresh LoRA would make
    them one network)."""
    import torch

    from diffusers_onestep.distill.config import RolesConfig
    from diffusers_onestep.distill.roles import BackboneRoles
    from diffusers_onestep.families import PixArtAlphaAdapter

    adapter = PixArtAlphaAdapter(components, max_sequence_length=max_sequence_length)
    roles = BackboneRoles(adapter, RolesConfig(lora_rank=4))
    with torch.no_grad():
        for name, parameter in roles.backbone.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.1)
    return adapter, roles


def tiny_run_argv(workspace, output_dir, *extra):
    """The flags of a run of the workspace's tiny teacher into ``output_dir``, then ``extra``."""
    return [
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


def write_prompts(folder):
    path = os.path.join(folder, "prompts.txt")
    with open(path, "w") as f:
        f.write("\n".join(PROMPTS) + "\n")
    return path


def write_images(folder, n=6, size=32):
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        array = (np.random.RandomState(i).rand(size, size, 3) * 255).astype("uint8")
        Image.fromarray(array).save(os.path.join(folder, f"{i}.png"))
    return folder


def env():
    out = dict(os.environ)
    out.update(
        {
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return out


def launch(args, num_processes=1, timeout=300, check=True, script=SCRIPT):
    """Run the training script (or another launcher ``script``) through `accelerate launch`, as users do."""
    result = subprocess.run(
        launch_command(args, num_processes, script),
        env=env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"training failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
        )
    return result


def launch_command(args, num_processes=1, script=SCRIPT):
    """The `accelerate launch` command line of :func:`launch` (gloo over CPU processes when there is no GPU)."""
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        str(num_processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--num_cpu_threads_per_process",
        "1",
    ]
    if num_processes > 1:
        command.append("--multi_gpu")
    return command + [script] + [str(a) for a in args]


# ---------------------------------------------------------------------------------------------------------------
# crash and resume
# ---------------------------------------------------------------------------------------------------------------


def run_args(workspace, output_dir, *extra):
    """A 6-step run that exercises every piece of resumable state (f-distill's bins, the discriminator head, the
    EMA, both optimizers), checkpointing every 2 steps; ``workspace`` holds ``teacher``, ``prompts`` and ``images``."""
    return tiny_run_argv(
        workspace,
        output_dir,
        "--divergence",
        "js",
        "--real_images",
        workspace["images"],
        "--critic_updates_per_student",
        "2",
        "--checkpointing_steps",
        "2",
        "--lr_scheduler",
        "constant",
        "--ema_decay",
        "0.9",
        "--max_train_steps",
        "6",
        *extra,
    )


def in_process(argv, hooks=None):
    """Parse, check and train ``argv`` in this process, as the CLI does; returns the TrainingResult."""
    from diffusers_onestep.distill import cli
    from diffusers_onestep.distill.trainer import Trainer

    config, _ = cli.resolve_args([str(a) for a in argv])
    return Trainer(config, hooks=hooks).run()


def start(argv, fault):
    """The training command in a subprocess, paused at ``fault`` (see tests/fault_launcher.py)."""
    return subprocess.Popen(
        [sys.executable, FAULT_LAUNCHER, "--fault", fault, *[str(a) for a in argv]],
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_for(path, process, timeout=120):
    deadline = time.time() + timeout
    while not os.path.exists(path):
        if process.poll() is not None:
            raise AssertionError(f"the run ended before reaching {path}:\n{process.stdout.read()[-4000:]}")
        if time.time() > deadline:
            process.kill()
            raise AssertionError(f"timed out waiting for {path}")
        time.sleep(0.05)


def kill_at(argv, output_dir, fault):
    """Start the run, wait until it pauses at ``fault`` (``event@step``), and kill -9 it there."""
    from fault_launcher import marker_path

    process = start(argv, fault)
    event, step = fault.split("@")
    wait_for(marker_path(str(output_dir), event, int(step)), process)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL


def hub_account(role="write", name="me"):
    """A stand-in for ``huggingface_hub.whoami``: the account ``name`` with a token of ``role``."""

    def whoami(token=None, **kwargs):
        return {"name": name, "orgs": [{"name": "my-org"}], "auth": {"accessToken": {"role": role}}}

    return whoami
