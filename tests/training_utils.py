"""Shared helpers of the training tests: tiny teachers, prompt and image data, and launching the script."""

import os
import subprocess
import sys

import numpy as np
from PIL import Image


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "training", "train_onestep.py")
#: the training command with faults injected through the trainer's hooks (``--fault event@step[:action]``)
FAULT_LAUNCHER = os.path.join(REPO, "tests", "fault_launcher.py")
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
RESOLUTION = {"sdxl": 32, "pixart_alpha": 8, "pixart_sigma": 8, "sana": 32, "sana_sprint": 32}


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
    command += [script] + [str(a) for a in args]
    result = subprocess.run(command, env=env(), capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if check and result.returncode != 0:
        raise AssertionError(
            f"training failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
        )
    return result
