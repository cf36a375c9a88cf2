"""End to end: `accelerate launch training/train_onestep.py` on tiny teachers of every family, as users run it."""

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from training_utils import (
    RESOLUTION,
    SCRIPT,
    TEARDOWN_LAUNCHER,
    TINY_FLAGS,
    in_process,
    launch,
    write_images,
    write_prompts,
)

from diffusers_onestep import OneStepPipeline
from diffusers_onestep.distill.checkpoint import checkpoint_problem
from diffusers_onestep.families import get_adapter_class
from diffusers_onestep.testing import native_pipeline_class, save_tiny_native_pipeline


os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    teachers = {f: save_tiny_native_pipeline(f, str(root / f"teacher-{f}")) for f in RESOLUTION}
    return {
        "root": root,
        "teachers": teachers,
        "prompts": write_prompts(str(root)),
        "images": write_images(str(root / "images")),
    }


#: the methods selected by ``--method`` (score divergences and TDM: no ``--divergence``); the others are
#: ``--divergence`` names
SCORE_METHODS = ("sid", "sim")
METHODS = SCORE_METHODS + ("tdm",)
#: TDM trains a 2-8 step student: 2 conditioning timesteps per family (SDXL records no TDM grid; PixArt's recorded one
#: has 4), step indices on the VP teachers and sigmas on the flow one
TDM_TIMESTEPS = {"sdxl": ["999", "499"], "pixart_alpha": ["899", "449"], "sana": ["1.0", "0.5"]}

#: the method x family x kind cases launched on two processes (and loaded) by the equality tests below
TWO_PROCESS_CASES = {("pixart_alpha", "sid", "lora"), ("pixart_alpha", "sim", "lora"), ("pixart_alpha", "tdm", "lora")}
#: Every method × student kind on the first three families; PixArt-Σ and SANA-Sprint share the export and method code
#: with PixArt-α and SANA, so they run the two cases that take each method and each student kind once (each case is
#: a separate `accelerate launch` of 15-30 s on two cores).
CASES = (
    [
        (family, divergence, kind)
        for family in ("sdxl", "pixart_alpha", "sana")
        for divergence in ("reverse_kl", "js")
        for kind in ("lora", "full")
    ]
    + [
        ("pixart_sigma", "js", "lora"),
        ("pixart_sigma", "reverse_kl", "full"),
        ("sana_sprint", "reverse_kl", "lora"),
        ("sana_sprint", "js", "full"),  # f-distill on an embedded-guidance teacher's trunk
        # SD 1.5: DMD2 with a LoRA student, JS f-distill with a full one (the family's GAN head on the UNet mid-block)
        ("sd", "reverse_kl", "lora"),
        ("sd", "js", "full"),
        # the score-divergence methods and TDM (below) on every family and student kind; sid, sim and tdm on PixArt
        # LoRA are launched on two processes by `test_two_processes_match_one_process_sid` / `_sim` / `_tdm`, which
        # load what they saved
    ]
    + [
        (family, method, kind)
        for family in ("sdxl", "pixart_alpha", "sana")
        for method in METHODS
        for kind in ("lora", "full")
        if (family, method, kind) not in TWO_PROCESS_CASES
    ]
)
#: one run per family on the oldest supported dependencies, each method and each student kind at least twice
OLDEST_CASES = {
    ("sdxl", "reverse_kl", "lora"),
    ("pixart_alpha", "js", "full"),
    ("sana", "js", "lora"),
    ("pixart_sigma", "reverse_kl", "full"),
    ("sana_sprint", "reverse_kl", "lora"),
}
CASES = [pytest.param(*case, marks=pytest.mark.oldest) if case in OLDEST_CASES else case for case in CASES]


#: SD 1.x's other two method x student-kind pairs: the same trainer and checks in this process, without the
#: launcher's 15-30 s start (the family's launched cases above take each method and kind once)
IN_PROCESS_CASES = [("sd", "js", "lora"), ("sd", "reverse_kl", "full")]


@pytest.mark.parametrize("family,objective,kind", CASES)
def test_distill_save_load_run(workspace, family, objective, kind):
    _distill_save_load_run(workspace, family, objective, kind, launch)


@pytest.mark.parametrize("family,objective,kind", IN_PROCESS_CASES)
def test_distill_save_load_run_in_process(workspace, family, objective, kind):
    _distill_save_load_run(workspace, family, objective, kind, in_process)


def _distill_save_load_run(workspace, family, objective, kind, run):
    """``objective``: a ``--divergence`` name (DMD2 / f-distill) or a ``--method`` (sid, sim, tdm: a 2-step student)."""
    out = workspace["root"] / f"out-{family}-{objective}-{kind}"
    args = [
        "--teacher",
        workspace["teachers"][family],
        "--prompts",
        workspace["prompts"],
        "--output_dir",
        out,
        *(["--method", objective] if objective in METHODS else ["--divergence", objective]),
        "--student",
        kind,
        "--max_train_steps",
        "2",
        "--critic_updates_per_student",
        "1",
        "--resolution",
        RESOLUTION[family],
        *TINY_FLAGS,
    ]
    if objective == "js":
        args += ["--real_images", workspace["images"]]
    if objective == "tdm":
        args += ["--student_timesteps", *TDM_TIMESTEPS[family]]
    result = run(args)
    if run is launch:
        assert "Distilling" in result.stderr + result.stdout  # the progress bar
    _assert_saved_student_loads_and_generates(workspace, out, family, objective, kind, steps=2)


def _assert_saved_student_loads_and_generates(workspace, out, family, objective, kind, steps, timesteps=None):
    """``steps``: the training steps run (the last checkpoint's number); ``timesteps``: a few-step student's
    conditioning timesteps (TDM), sampled with the ode solver it was trained on (by default ``TDM_TIMESTEPS``)."""
    files = set(os.listdir(out))
    assert {"README.md", "samples.png", "training_config.json", f"checkpoint-{steps}"} <= files
    if kind == "lora":
        assert {"pytorch_lora_weights.safetensors", "onestep_lora.json", "scheduler"} <= files
        prefix = get_adapter_class(family).denoiser_name + "."
        with safe_open(str(out / "pytorch_lora_weights.safetensors"), "pt") as f:
            keys = list(f.keys())
            metadata = f.metadata()
        assert keys and all(k.startswith(prefix) and "lora" in k for k in keys)
        assert "lora_adapter_metadata" in metadata  # rank and alpha travel with the weights
    else:
        assert "model_index.json" in files and not (out / "pytorch_lora_weights.safetensors").exists()
    card = (out / "README.md").read_text()
    assert workspace["teachers"][family] in card and objective in card
    # the card names the student's step count: "2-step" (and the few-step tag) for TDM's students
    assert ("2-step" if objective == "tdm" else "one-step") in card
    assert ("one-step" in card) == (objective != "tdm")

    pipe = OneStepPipeline.from_pretrained(str(out))
    pipe.set_progress_bar_config(disable=True)
    assert pipe.config.family == family
    if objective == "tdm":  # K steps at the trained timesteps, each re-noised with the student's own ε̂ (DDIM eta 0)
        timesteps = [float(t) for t in (timesteps or TDM_TIMESTEPS[family])]
        assert pipe.scheduler.config.solver == "ode"
        assert pipe.scheduler.config.conditioning_timesteps == timesteps
    sampled = []
    images = pipe(
        "a photo of a cat",
        output_type="np",
        generator=torch.Generator().manual_seed(0),
        callback_on_step_end=lambda p, i, t, kwargs: sampled.append(float(p.scheduler.path_timesteps[i])) or {},
    ).images
    assert images.shape[0] == 1 and images.shape[-1] == 3 and images.std() > 0
    if objective == "tdm":
        assert sampled == timesteps  # by default every trained timestep, in order
    config = json.loads((out / "training_config.json").read_text())
    if objective in METHODS:
        assert config["method"]["method"] == objective and config["method"]["divergence"] is None
    else:
        assert config["method"]["divergence"] == objective
    assert config["roles"]["student"] == kind
    if objective == "tdm":
        assert config["method"]["student_timesteps"] == timesteps
    # the LoRA export does not depend on the method: the --method runs check it once (sid), not again for sim or tdm
    if (
        kind == "lora"
        and objective not in ("sim", "tdm")
        and hasattr(native_pipeline_class(family), "load_lora_weights")
    ):
        _assert_native_lora_loader_reads_it(family, workspace["teachers"][family], out, pipe)


def _assert_native_lora_loader_reads_it(family, teacher, out, student):
    """The family's own pipeline loads the LoRA file with `load_lora_weights`; fused, its denoiser equals the
    student's (which OneStepPipeline fused at the scale the file's metadata gives)."""
    adapter_cls = get_adapter_class(family)
    native = native_pipeline_class(family).from_pretrained(teacher, **adapter_cls.native_pipeline_kwargs)
    native.load_lora_weights(str(out), weight_name="pytorch_lora_weights.safetensors")
    assert native.get_list_adapters()[adapter_cls.denoiser_name]
    native.fuse_lora()
    native.unload_lora_weights()
    ours = getattr(student, adapter_cls.denoiser_name).state_dict()
    theirs = getattr(native, adapter_cls.denoiser_name).state_dict()
    assert ours.keys() == theirs.keys()
    base = getattr(native_pipeline_class(family).from_pretrained(teacher), adapter_cls.denoiser_name).state_dict()
    moved = [k for k in ours if not torch.equal(ours[k], base[k])]
    assert moved  # the LoRA changed the weights it targets
    for key in moved:
        torch.testing.assert_close(theirs[key], ours[key], rtol=0, atol=1e-6)


def test_two_processes_match_one_process(workspace):
    """2 processes × batch 2 (gloo) equal 1 process × batch 4, each update accumulated over 2 micro-batches: all
    randomness is drawn for the global batch, and the micro-batches that skip DDP's all-reduce (``no_sync``) are
    reduced with the last one. No DDP wrapper outlives the process group: one that did was freed at exit with the
    last reference to the gloo group, and a 2-process run hung there after writing its student (see
    ``Trainer._end_training``; before that fix each rank reported 1 live wrapper here)."""
    one, two = _two_processes_and_one(workspace, "ddp", [], single=launch, script=TEARDOWN_LAUNCHER)
    for rank in (0, 1):
        assert json.loads((two / f".teardown-{rank}.json").read_text()) == {"live_ddp_wrappers": 0}
    state = json.loads((two / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["num_processes"] == 2
    # the commit file lists both processes' RNG states (written before it), and the checkpoint resumes on two
    assert {"rng_0.safetensors", "rng_1.safetensors", "rng_1.json"} <= set(state["files"])
    assert checkpoint_problem(str(two / "checkpoint-3"), num_processes=2) is None


def test_two_processes_match_one_process_sid(workspace):
    """SiD-LSG (κ on the teacher, the fake in the generator loss and the fake's own loss) on 2 processes equals 1
    process with the same global batch: the input-gradient passes through the frozen teacher and the LoRA fake on the
    one DDP-wrapped backbone reduce like DMD2's. The 1-process reference runs in this process (the same trainer, no
    launcher start); the launched 2-process run is also sid's `accelerate launch` end-to-end case on PixArt: its
    saved LoRA student loads in OneStepPipeline and generates."""
    flags = ["--method", "sid", "--fake_guidance_scale", "2", "--fake_train_guidance_scale", "1.5"]
    _, two = _two_processes_and_one(workspace, "ddp-sid", flags, single=in_process)
    _assert_saved_student_loads_and_generates(workspace, two, "pixart_alpha", "sid", "lora", steps=3)


def test_two_processes_match_one_process_sim(workspace):
    """SIM (pseudo-Huber distance, its default c = 1) on 2 processes equals 1 process with the same global batch: the
    same input-gradient passes as SiD under SIM's distance. The launched 2-process run is also sim's PixArt LoRA
    end-to-end case: its saved student loads in OneStepPipeline and generates."""
    _, two = _two_processes_and_one(workspace, "ddp-sim", ["--method", "sim"], single=in_process)
    _assert_saved_student_loads_and_generates(workspace, two, "pixart_alpha", "sim", "lora", steps=3)


def test_two_processes_match_one_process_tdm(workspace):
    """TDM on 2 processes equals 1 process with the same global batch: the segment per sample, the random lower edge,
    the noise time and the fresh noise are drawn for the global batch and sliced, and every process rolls the
    trajectory as deep as the deepest sample of the global batch (so the student passes match). The 1-process
    reference runs in this process; the launched 2-process run is also tdm's `accelerate launch` end-to-end case on
    PixArt: its saved 2-step LoRA student loads in OneStepPipeline and samples at both timesteps.

    ``--tdm_huber_c 1``, not TDM's ``c = 1e-3``: the pseudo-Huber gradient ``d / √(d² + c²)`` has slope ``1/c`` where
    ``d = x̂_fake − x̂_cfg`` is near 0, so the float32 rounding that differs between a batch of 4 and two of 2 (~1e-7)
    moves those elements' gradients by ~1e-4 relative, and Adam with β1 = 0 (TDM's) turns a near-zero gradient whose
    sign flips into a learning-rate-sized step. Measured on this run (3 steps, lr 1e-3): ``c = 1e-3`` gives one
    LoRA student element of 1536 off by 1.2e-3 (the rest ≤ 3.4e-6; the fake ≤ 6.6e-7); ``c = 1`` gives ≤ 1.5e-7 on the
    student and ≤ 6.7e-7 on the fake, as does ``--tdm_loss mse`` (≤ 6.9e-8 / 4.4e-7) -- the draws match, the rounding
    is what ``c = 1e-3`` amplifies."""
    flags = ["--method", "tdm", "--tdm_random_mid", "--tdm_huber_c", "1.0"]
    flags += ["--student_timesteps", *TDM_TIMESTEPS["pixart_alpha"]]
    _, two = _two_processes_and_one(workspace, "ddp-tdm", flags, single=in_process)
    _assert_saved_student_loads_and_generates(workspace, two, "pixart_alpha", "tdm", "lora", steps=3)


def _two_processes_and_one(workspace, name, flags, single, script=SCRIPT):
    """3 steps, 2 critic updates per student, 2 accumulated micro-batches: global batch 4 on one process (run by
    ``single``: ``launch`` or ``in_process``) and 2 × 2 on two launched processes; every trainable tensor of the
    final checkpoints equal within 1e-5, and trained."""
    common = [
        "--teacher",
        workspace["teachers"]["pixart_alpha"],
        "--prompts",
        workspace["prompts"],
        "--max_train_steps",
        "3",
        "--critic_updates_per_student",
        "2",
        "--resolution",
        "8",
        "--gradient_accumulation_steps",
        "2",
        *TINY_FLAGS,
        *flags,
    ]
    index = common.index("--train_batch_size")
    one = workspace["root"] / f"{name}-1"
    two = workspace["root"] / f"{name}-2"
    reference = list(common)
    reference[index + 1] = "4"
    if single is launch:
        launch(reference + ["--output_dir", one], num_processes=1)
    else:
        single(reference + ["--output_dir", one])
    launch(common + ["--output_dir", two], num_processes=2, script=script)
    a = load_file(str(one / "checkpoint-3" / "trainable.safetensors"))
    b = load_file(str(two / "checkpoint-3" / "trainable.safetensors"))
    assert a.keys() == b.keys()
    moved = 0.0
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-5)
        moved = max(moved, float(a[key].abs().max()))
    assert moved > 0  # the weights did train
    return one, two
