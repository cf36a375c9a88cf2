"""fp16 mixed precision on the CPU: loss-scale overflows are skipped as torch's GradScaler skips them, the scaler's
state is checkpointed and resumed exactly, and a NaN loss still goes to --on_nonfinite.

accelerate makes a ``torch.amp.GradScaler`` for fp16 only on accelerators: on the CPU an ``Accelerator(
mixed_precision="fp16")`` has no scaler and no fp16 autocast (``native_amp`` is false), and the preflight refuses
fp16 without CUDA. :class:`CpuFp16Trainer` gives the CPU accelerator what accelerate gives a CUDA one -- ``native_amp``
and a ``torch.amp.GradScaler("cpu")`` -- before anything is prepared, so the trainer's own fp16 code runs unchanged:
accelerate's ``autocast`` is ``torch.autocast("cpu", float16)`` (the frozen teacher is loaded in float16), its
``backward`` scales the loss, its ``clip_grad_norm_`` unscales the gradients, and its optimizer wrapper steps through
``GradScaler.step``/``update``. The overflows below are real: fp16 activation gradients overflow under a large initial
scale. What the CPU cannot show is CUDA's fp16 kernels and the scaler accelerate builds itself (its defaults).

accelerate keeps one precision per process, so every fp16 run happens in one spawned process (``fp16_runs``), which
returns what the tests check.
"""

import json
import math
import multiprocessing
import os

import pytest
import torch
from safetensors.torch import load_file
from training_utils import STATE_FILES, run_args, write_images, write_prompts

from diffusers_onestep.testing import save_tiny_native_pipeline


os.environ.setdefault("HF_HUB_OFFLINE", "1")

#: a scale under which the tiny model's fp16 activation gradients overflow (it halves until they fit)
INIT_SCALE = 2.0**20
#: the scale doubles after this many updates without an overflow, so the 6 steps overflow, recover and grow
GROWTH_INTERVAL = 2


def cpu_fp16_trainer_class(init_scale: float, growth_interval: int):
    from diffusers_onestep.distill.trainer import Trainer

    class CpuFp16Trainer(Trainer):
        """The trainer with the fp16 machinery accelerate sets up on CUDA (see the module docstring)."""

        def _setup_accelerator(self):
            super()._setup_accelerator()
            assert self.accelerator.mixed_precision == "fp16" and self.accelerator.scaler is None
            self.accelerator.native_amp = True
            self.accelerator.scaler = torch.amp.GradScaler(
                "cpu", init_scale=init_scale, growth_interval=growth_interval
            )

    return CpuFp16Trainer


def train_fp16(argv, hooks=None, init_scale=INIT_SCALE, growth_interval=GROWTH_INTERVAL):
    """Parse and resolve ``argv`` as the CLI does, without the preflight (which refuses fp16 without CUDA), and train
    it under fp16 on the CPU; returns the trainer."""
    from diffusers_onestep.distill.cli import parse_args
    from diffusers_onestep.distill.resolve import resolve

    config, _ = parse_args([str(a) for a in argv] + ["--mixed_precision", "fp16"])
    trainer = cpu_fp16_trainer_class(init_scale, growth_interval)(resolve(config), hooks=hooks)
    trainer.run()
    return trainer


class UpdateRecorder:
    """A trainer hook that records every update: the role, the step, whether it overflowed, the loss scale before
    and after, and whether the role's parameters changed."""

    def __init__(self):
        self.updates = []
        self.logs = []
        self._open = None

    def _close(self, trainer):
        if self._open is None:
            return
        role, step, before, scale, skips = self._open
        after = [p.detach().clone() for p in trainer.state.roles.role_parameters(role)]
        self.updates.append(
            {
                "role": role,
                "step": step,
                "overflow": trainer.state.overflow_skips > skips,
                "scale_before": scale,
                "scale_after": trainer.state.grad_scaler.get_scale(),
                "unchanged": all(torch.equal(a, b) for a, b in zip(before, after)),
            }
        )
        self._open = None

    def __call__(self, event, trainer, **info):
        if event == "loss":
            self._close(trainer)
            state = trainer.state
            before = [p.detach().clone() for p in state.roles.role_parameters(info["role"])]
            self._open = (info["role"], info["step"], before, state.grad_scaler.get_scale(), state.overflow_skips)
        elif event == "after_step":
            self._close(trainer)
            self.logs.append(dict(info["logs"]))


def nan_loss_at(step):
    def hook(event, trainer, **info):
        if event == "loss" and info["step"] == step and info["role"] == "critic":
            return info["loss"] * float("nan")

    return hook


def nan_gradient_of_the_student(event, trainer, **info):
    """A finite loss whose gradient is NaN: d/dx sqrt(0 * x) = inf * 0 at 0, for the student's first parameter."""
    if event == "loss" and info["role"] == "student":
        parameter = trainer.state.roles.role_parameters("student")[0]
        return info["loss"] + torch.sqrt(parameter.sum() * 0)


def fp16_runs(workspace):
    """Every fp16 run, in this (spawned) process; returns plain data for the tests."""
    from diffusers_onestep.distill.trainer import NonFiniteError

    torch.set_num_threads(1)
    root = workspace["root"]
    out = {}

    reference = os.path.join(root, "reference")
    recorder = UpdateRecorder()
    trainer = train_fp16(run_args(workspace, reference), hooks=[recorder])
    out["updates"], out["logs"] = recorder.updates, recorder.logs
    out["overflow_skips"] = trainer.state.overflow_skips

    # the same run stopped after step 4 (max_train_steps may change on resume), then resumed to step 6
    resumed = os.path.join(root, "resumed")
    first = train_fp16(run_args(workspace, resumed, "--max_train_steps", "4"))
    out["scaler_at_stop"] = first.state.grad_scaler.state_dict()
    second = train_fp16(run_args(workspace, resumed, "--max_train_steps", "6", "--resume_from_checkpoint", "latest"))
    out["overflow_skips_resumed"] = second.state.overflow_skips

    for name, hook, extra in (
        ("nan_loss_stop", nan_loss_at(1), ()),
        ("nan_loss_skip", nan_loss_at(1), ("--on_nonfinite", "skip")),
        ("nan_gradient", nan_gradient_of_the_student, ()),
    ):
        recorder = UpdateRecorder()
        folder = os.path.join(root, name)
        try:
            trainer = train_fp16(
                run_args(workspace, folder, *extra), hooks=[hook, recorder], init_scale=4.0, growth_interval=1000
            )
            out[name] = {
                "nonfinite_skips": trainer.state.nonfinite_skips,
                "overflow_skips": trainer.state.overflow_skips,
            }
        except NonFiniteError as error:
            out[name] = {"error": str(error)}
        out[name]["updates"] = recorder.updates
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp16")
    workspace = {
        "root": str(root),
        "teacher": save_tiny_native_pipeline("pixart_alpha", str(root / "teacher")),
        "prompts": write_prompts(str(root)),
        "images": write_images(str(root / "images"), size=8),
    }
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        results = pool.apply(fp16_runs, (workspace,))
    return {"root": root, **results}


def test_an_overflow_skips_the_update_halves_the_scale_and_counts(runs):
    updates = runs["updates"]
    assert len(updates) == 9  # 6 critic updates, a student update every second step
    overflows = [u for u in updates if u["overflow"]]
    assert overflows and len(overflows) < len(updates), updates
    for update in updates:
        if update["overflow"]:
            assert update["unchanged"], update  # GradScaler.step skipped the optimizer
            assert update["scale_after"] == update["scale_before"] / 2, update
        else:
            assert not update["unchanged"], update
            assert update["scale_after"] in (update["scale_before"], 2 * update["scale_before"]), update
    assert any(u["scale_after"] == 2 * u["scale_before"] for u in updates), [
        (u["role"], u["overflow"], u["scale_before"], u["scale_after"]) for u in updates
    ]
    assert runs["overflow_skips"] == len(overflows)
    # counted in the logs and in the checkpoint
    assert runs["logs"][-1]["fp16/overflow_skips"] == len(overflows)
    assert runs["logs"][-1]["fp16/loss_scale"] == updates[-1]["scale_after"]
    assert all(math.isfinite(v) for logs in runs["logs"] for v in logs.values())
    state = json.loads((runs["root"] / "reference" / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["overflow_skips"] == len(overflows) and state["nonfinite_skips"] == 0


def test_the_scaler_state_is_checkpointed_as_json_and_resumes_exactly(runs):
    reference, resumed = runs["root"] / "reference", runs["root"] / "resumed"
    saved = json.loads((resumed / "checkpoint-4" / "grad_scaler.json").read_text())
    assert saved == runs["scaler_at_stop"]
    assert saved["scale"] != INIT_SCALE  # the resumed run depends on it
    assert saved == json.loads((reference / "checkpoint-4" / "grad_scaler.json").read_text())
    state = json.loads((resumed / "checkpoint-4" / "trainer_state.json").read_text())
    assert "grad_scaler.json" in state["files"]
    # the resumed run ends where the uninterrupted one does, bit for bit
    assert runs["overflow_skips_resumed"] == runs["overflow_skips"]
    assert json.loads((reference / "checkpoint-6" / "grad_scaler.json").read_text()) == json.loads(
        (resumed / "checkpoint-6" / "grad_scaler.json").read_text()
    )
    for name in STATE_FILES:
        a_tensors = load_file(str(reference / "checkpoint-6" / name))
        b_tensors = load_file(str(resumed / "checkpoint-6" / name))
        assert a_tensors.keys() == b_tensors.keys()
        for key in a_tensors:
            assert torch.equal(a_tensors[key], b_tensors[key]), f"{name}:{key}"


def test_a_nan_loss_under_fp16_still_goes_to_on_nonfinite(runs):
    stopped = runs["nan_loss_stop"]
    assert "Non-finite loss" in stopped["error"] and "step 2" in stopped["error"]
    skipped = runs["nan_loss_skip"]
    assert skipped.get("nonfinite_skips") == 1 and skipped["overflow_skips"] == 0, skipped


def test_nan_gradients_that_persist_down_to_loss_scale_1_go_to_on_nonfinite(runs):
    """A finite loss with NaN gradients looks like an overflow to GradScaler; the scale halves from 4 to 2 to 1, and
    at 1 (no scaling) the gradient is non-finite on its own: --on_nonfinite stop ends the run there."""
    result = runs["nan_gradient"]
    student = [u for u in result["updates"] if u["role"] == "student"]
    assert [(u["overflow"], u["scale_before"], u["scale_after"]) for u in student[:2]] == [
        (True, 4.0, 2.0),
        (True, 2.0, 1.0),
    ]
    assert all(u["unchanged"] for u in student)
    assert "Non-finite gradient norm in the student update at step 5" in result["error"], result
