"""SD3 as a teacher, end to end: `accelerate launch training/train_onestep.py` with DMD2 (reverse KL) and f-distill
(JS), LoRA and full students, on a tiny SD3.5-shaped teacher with T5 and one saved without it. A LoRA student's file
loads with ``StableDiffusion3Pipeline.load_lora_weights`` and gives the student's image."""

import json
import os

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from safetensors import safe_open
from training_utils import TINY_FLAGS, launch, write_images, write_prompts

from diffusers_onestep import OneStepPipeline
from diffusers_onestep.families import SD3Adapter
from diffusers_onestep.testing import tiny_components


FAMILY = "sd3"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3-e2e")
    teachers = {}
    for name, t5 in (("t5", True), ("no-t5", False)):
        components = tiny_components(FAMILY)
        if not t5:
            components.update(text_encoder_3=None, tokenizer_3=None)
        teachers[name] = str(root / f"teacher-{name}")
        StableDiffusion3Pipeline(**components).save_pretrained(teachers[name], safe_serialization=True)
    return {
        "root": root,
        "teachers": teachers,
        "prompts": write_prompts(str(root)),
        "images": write_images(str(root / "images"), size=8),
    }


#: DMD2 and f-distill (JS) each with a LoRA and a full student, each once with T5 and once without
CASES = [
    # one run on the oldest supported dependencies too, as every family has (SD3's LoRA loader on diffusers 0.34)
    pytest.param("reverse_kl", "lora", "t5", marks=pytest.mark.oldest),
    ("js", "full", "t5"),
    ("reverse_kl", "full", "no-t5"),
    ("js", "lora", "no-t5"),
]


def _run(pipe, **kwargs):
    return pipe("a photo of a cat", output_type="np", generator=torch.Generator().manual_seed(0), **kwargs).images


@pytest.mark.parametrize("divergence,kind,teacher", CASES)
def test_distill_sd3(workspace, divergence, kind, teacher):
    out = workspace["root"] / f"out-{divergence}-{kind}-{teacher}"
    teacher_folder = workspace["teachers"][teacher]
    args = [
        "--teacher",
        teacher_folder,
        "--prompts",
        workspace["prompts"],
        "--output_dir",
        out,
        "--divergence",
        divergence,
        "--student",
        kind,
        "--max_train_steps",
        "1",
        "--critic_updates_per_student",
        "1",
        "--resolution",
        "8",
        *TINY_FLAGS,
    ]
    if divergence == "js":
        args += ["--real_images", workspace["images"]]
    launch(args)

    config = json.loads((out / "training_config.json").read_text())
    assert config["family"] == FAMILY and config["roles"]["student"] == kind
    # the family's defaults where the run sets nothing: the shared-backbone LoRA critic, SD3's attention targets
    assert config["roles"]["critic"] == "lora"
    assert config["roles"]["lora_target_modules"] == list(SD3Adapter.default_lora_target_modules)
    assert config["method"]["student_timesteps"] == [1.0]

    pipe = OneStepPipeline.from_pretrained(str(out))
    pipe.set_progress_bar_config(disable=True)
    assert pipe.config.family == FAMILY and (pipe.text_encoder_3 is None) == (teacher == "no-t5")
    assert pipe.scheduler.path.shift == 3.0 and pipe.scheduler.config.prediction_type == "flow_prediction"
    images = _run(pipe, height=8, width=8)
    assert images.shape == (1, 8, 8, 3) and np.isfinite(images).all() and images.std() > 0

    if kind == "lora":
        with safe_open(str(out / "pytorch_lora_weights.safetensors"), "pt") as f:
            keys = list(f.keys())
        assert keys and all(k.startswith("transformer.") and "lora" in k for k in keys)
        # SD3's own loader reads the file: fused into the teacher, one Euler step from sigma 1 at guidance 0 is the
        # student's image
        no_t5 = {"text_encoder_3": None, "tokenizer_3": None} if teacher == "no-t5" else {}
        native = StableDiffusion3Pipeline.from_pretrained(teacher_folder, **no_t5)
        native.set_progress_bar_config(disable=True)
        before = _run(native, num_inference_steps=1, guidance_scale=0.0, height=8, width=8)
        native.load_lora_weights(str(out), weight_name="pytorch_lora_weights.safetensors")
        native.fuse_lora()
        after = _run(native, num_inference_steps=1, guidance_scale=0.0, height=8, width=8)
        assert isinstance(native.scheduler, FlowMatchEulerDiscreteScheduler)
        assert np.abs(after - images).max() <= 1e-5
        assert np.abs(after - before).max() > 1e-4  # the LoRA changed the teacher
    else:
        assert not os.path.exists(out / "pytorch_lora_weights.safetensors")
