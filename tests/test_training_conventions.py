"""The conventions of the diffusers training examples, kept by the training script: mixed precision from the
accelerate config, ``--resume_from_checkpoint latest`` before the first checkpoint, ``--allow_tf32``, ``--variant``,
``--cache_dir``, the frozen teacher loaded in its dtype, ``--dataloader_num_workers``, and ``--push_to_hub`` creating
the repo first with a card that names it and carries the teacher's license."""

import glob
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from training_utils import REPO, env, hub_account, tiny_run_argv, write_images, write_prompts

from diffusers_onestep.distill import cli
from diffusers_onestep.distill.checkpoint import list_checkpoints, resolve_resume_path
from diffusers_onestep.distill.config import ConfigError, DataConfig, TrainConfig
from diffusers_onestep.distill.resolve import resolve
from diffusers_onestep.distill.trainer import load_teacher_pipeline, trainable_denoiser_loader
from diffusers_onestep.testing import save_tiny_native_pipeline, save_to_hub_cache


ACCELERATE_CONFIGS = os.path.join(REPO, "training", "accelerate_configs")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("conventions")
    return {
        "root": root,
        "teacher": save_tiny_native_pipeline("pixart_alpha", str(root / "teacher")),
        "prompts": write_prompts(str(root)),
        "images": write_images(str(root / "images"), size=8),
    }


def one_step(workspace, output_dir, *extra):
    """The flags of a one-step run of the tiny PixArt-α teacher."""
    return tiny_run_argv(
        workspace,
        output_dir,
        "--max_train_steps",
        "1",
        "--critic_updates_per_student",
        "1",
        "--checkpointing_steps",
        "1",
        *extra,
    )


def main_status(argv):
    """The exit status of the training command (argparse's and preflight's exits included)."""
    try:
        return cli.main([str(a) for a in argv])
    except SystemExit as exit_:
        return exit_.code


@pytest.fixture
def loads(monkeypatch):
    """Every ``from_pretrained`` of a diffusers pipeline or model as ``(class name, source, kwargs)``, in order; the
    loading itself still happens."""
    import diffusers

    calls = []
    for base in (diffusers.DiffusionPipeline, diffusers.ModelMixin):
        original = base.from_pretrained.__func__

        def record(cls, source, *args, _original=original, **kwargs):
            calls.append((cls.__name__, str(source), dict(kwargs)))
            return _original(cls, source, *args, **kwargs)

        monkeypatch.setattr(base, "from_pretrained", classmethod(record))
    return calls


# ------------------------------------------------------------------------------------------------------------------
# --mixed_precision: the accelerate config's unless given
# ------------------------------------------------------------------------------------------------------------------


def test_a_bf16_accelerate_config_yields_bf16(workspace):
    """`accelerate launch --config_file` with the shipped bf16 config, no --mixed_precision: the run is bf16."""
    config_file = os.path.join(ACCELERATE_CONFIGS, "single_gpu.yaml")
    with open(config_file, encoding="utf-8") as f:
        assert yaml.safe_load(f)["mixed_precision"] == "bf16"
    out = workspace["root"] / "bf16-launch"
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        config_file,
        "--num_cpu_threads_per_process",
        "1",
        "-m",
        "diffusers_onestep.distill",
        *one_step(workspace, out),
    ]
    result = subprocess.run(command, env=env(), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (
        "mixed_precision bf16 (from the accelerate config, through accelerate launch): the frozen teacher runs in "
        "bfloat16, trainable weights in float32."
    ) in result.stdout.splitlines()
    with open(out / "training_config.json", encoding="utf-8") as f:
        assert json.load(f)["optim"]["mixed_precision"] == "bf16"
    assert [step for step, _ in list_checkpoints(str(out))] == [1]


def test_an_explicit_mixed_precision_wins_and_dry_run_says_where_it_came_from(
    workspace, tmp_path, capsys, monkeypatch
):
    # what `accelerate launch` sets from its config file (or `accelerate config`) for the Accelerator to read
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    cases = [
        ([], "bf16", "from the accelerate config, through accelerate launch"),
        (["--mixed_precision", "no"], "no", "from --mixed_precision"),
    ]
    for extra, expected, source in cases:
        assert main_status(one_step(workspace, tmp_path / "never", "--dry_run", *extra)) == 0
        out, err = capsys.readouterr()
        assert json.loads(out)["optim"]["mixed_precision"] == expected
        assert f"mixed_precision {expected} ({source})" in err
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    assert main_status(one_step(workspace, tmp_path / "never", "--dry_run")) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["optim"]["mixed_precision"] == "no" and "mixed_precision no (the default" in err
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize(
    "name", sorted(os.path.basename(p) for p in glob.glob(os.path.join(ACCELERATE_CONFIGS, "*.yaml")))
)
def test_every_shipped_accelerate_config_sets_a_precision_the_script_takes(workspace, monkeypatch, name):
    with open(os.path.join(ACCELERATE_CONFIGS, name), encoding="utf-8") as f:
        value = yaml.safe_load(f)["mixed_precision"]
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", str(value))
    config = TrainConfig(teacher=workspace["teacher"], data=DataConfig(prompts=workspace["prompts"]))
    resolved = resolve(config)
    assert resolved.optim.mixed_precision == value and resolved.mixed_precision_source == "accelerate"


def test_a_precision_of_the_accelerate_config_the_script_does_not_take_is_one_sentence(
    workspace, tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp8")
    assert main_status(one_step(workspace, tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(
        "error: The accelerate config sets mixed_precision fp8, which this script does not support; "
        "pass --mixed_precision no, fp16 or bf16."
    )
    assert len(err.splitlines()) == 1 and not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------------------------
# --resume_from_checkpoint
# ------------------------------------------------------------------------------------------------------------------


def test_resume_latest_without_a_checkpoint_starts_fresh_and_says_so(workspace, capsys):
    out = workspace["root"] / "fresh"
    (out / "logs").mkdir(parents=True)  # a run that stopped before its first checkpoint
    (out / "logs" / "events.out").write_text("x")
    assert main_status(one_step(workspace, out, "--resume_from_checkpoint", "latest")) == 0
    said = [line for line in capsys.readouterr().out.splitlines() if "checkpoint" in line and "fresh" in line]
    assert said == [f"--resume_from_checkpoint latest: {out} has no checkpoint yet, so the run starts fresh."]
    assert [step for step, _ in list_checkpoints(str(out))] == [1]
    # a checkpoint may also be named inside --output_dir, as in the diffusers examples
    assert resolve_resume_path("checkpoint-1", str(out)) == str(out / "checkpoint-1")


def test_a_named_checkpoint_that_does_not_exist_is_one_sentence(workspace, tmp_path, capsys):
    missing = tmp_path / "run" / "checkpoint-7"
    assert main_status(one_step(workspace, tmp_path / "run", "--resume_from_checkpoint", missing)) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(
        f"error: --resume_from_checkpoint {missing} does not exist; pass 'latest' or a checkpoint-N "
        "folder written by this script."
    )
    assert len(err.splitlines()) == 1 and not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------------------------
# loading: --variant, --cache_dir, the frozen dtype
# ------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def variant_teacher(workspace):
    """The tiny teacher saved as the ``fp16`` variant only (``diffusion_pytorch_model.fp16.safetensors``, ...)."""
    from diffusers import DiffusionPipeline

    folder = workspace["root"] / "teacher-fp16"
    DiffusionPipeline.from_pretrained(workspace["teacher"]).save_pretrained(str(folder), variant="fp16")
    assert (folder / "transformer" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    assert not (folder / "transformer" / "diffusion_pytorch_model.safetensors").exists()
    return str(folder)


def test_variant_and_cache_dir_reach_every_loader(variant_teacher, tmp_path, loads):
    cache = str(tmp_path / "cache")
    config = TrainConfig(teacher=variant_teacher, variant="fp16", cache_dir=cache)
    pipe = load_teacher_pipeline(config, "transformer")
    trainable_denoiser_loader(config, type(pipe.transformer), "transformer")()
    ours = [(name, kwargs) for name, source, kwargs in loads if source == variant_teacher]
    assert [name for name, _ in ours] == ["PixArtTransformer2DModel", "DiffusionPipeline", "PixArtTransformer2DModel"]
    for _, kwargs in ours:
        assert kwargs["variant"] == "fp16" and kwargs["cache_dir"] == cache
    assert ours[1][1]["transformer"] is pipe.transformer  # the pipeline takes the denoiser loaded above
    with pytest.raises(ConfigError, match="no file named"):  # the folder has nothing but the variant
        load_teacher_pipeline(TrainConfig(teacher=variant_teacher), "transformer")


@pytest.fixture
def tf32_off():
    """Both TF32 switches off for the test, and back as they were after it."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_a_variant_only_teacher_trains_with_variant_and_allow_tf32_sets_the_torch_flags(
    workspace, variant_teacher, tf32_off
):
    out = workspace["root"] / "variant-run"
    argv = one_step(workspace, out, "--variant", "fp16", "--allow_tf32")
    argv[argv.index("--teacher") + 1] = variant_teacher
    assert main_status(argv) == 0
    assert [step for step, _ in list_checkpoints(str(out))] == [1]
    assert torch.backends.cuda.matmul.allow_tf32 is True and torch.backends.cudnn.allow_tf32 is True
    with open(out / "training_config.json", encoding="utf-8") as f:
        saved = json.load(f)
    assert saved["variant"] == "fp16" and saved["optim"]["allow_tf32"] is True


def test_the_frozen_teacher_loads_in_its_dtype_and_full_roles_start_from_the_float32_teacher(workspace, loads):
    config = TrainConfig(teacher=workspace["teacher"])
    pipe = load_teacher_pipeline(config, "transformer", torch.bfloat16)
    (denoiser_call,) = [
        kwargs
        for name, source, kwargs in loads
        if source == workspace["teacher"] and kwargs.get("subfolder") == "transformer"
    ]
    assert denoiser_call["torch_dtype"] is torch.bfloat16
    assert {p.dtype for p in pipe.transformer.parameters()} == {torch.bfloat16}
    # the VAE and the text encoder load as before (float32): they are shared with an exported full student
    assert pipe.vae.dtype == torch.float32 and pipe.text_encoder.dtype == torch.float32
    reference = load_teacher_pipeline(config, "transformer").transformer.state_dict()
    copy = trainable_denoiser_loader(config, type(pipe.transformer), "transformer")().state_dict()
    assert copy.keys() == reference.keys()
    assert all(copy[k].dtype == torch.float32 and torch.equal(copy[k], reference[k]) for k in reference)


# ------------------------------------------------------------------------------------------------------------------
# --dataloader_num_workers
# ------------------------------------------------------------------------------------------------------------------


def test_dataloader_num_workers_decodes_real_images_and_trains_a_step(workspace):
    # (that a worker decodes the same batches as the main process: tests/test_data.py)
    out = workspace["root"] / "workers"
    assert (
        main_status(
            one_step(
                workspace,
                out,
                "--divergence",
                "js",
                "--real_images",
                workspace["images"],
                "--dataloader_num_workers",
                "1",
            )
        )
        == 0
    )
    assert [step for step, _ in list_checkpoints(str(out))] == [1]


# ------------------------------------------------------------------------------------------------------------------
# --push_to_hub
# ------------------------------------------------------------------------------------------------------------------


def test_push_to_hub_creates_the_repo_before_any_loading_and_the_card_names_it(
    workspace, tmp_path, hub_calls, loads, monkeypatch
):
    import huggingface_hub
    from huggingface_hub import ModelCard

    # the teacher as a Hub repo with a licensed card, in a cache only --cache_dir names
    licensed = tmp_path / "licensed-teacher"
    shutil.copytree(workspace["teacher"], licensed)
    (licensed / "README.md").write_text("---\nlicense: openrail++\n---\n# A tiny teacher\n")
    cache = tmp_path / "cache"
    save_to_hub_cache(str(licensed), "tiny-org/pixart-teacher", cache_dir=str(cache))
    with pytest.raises(ConfigError, match="not in the local Hugging Face cache"):  # not in the default cache
        resolve(TrainConfig(teacher="tiny-org/pixart-teacher", data=DataConfig(prompts=workspace["prompts"])))

    recorded_create = huggingface_hub.create_repo

    def create_repo(repo_id, **kwargs):
        loads.append(("create_repo", repo_id, kwargs))
        return recorded_create(repo_id, **kwargs)

    monkeypatch.setattr(huggingface_hub, "create_repo", create_repo)
    out = tmp_path / "pushed"
    argv = one_step(workspace, out, "--cache_dir", cache, "--push_to_hub", "--hub_model_id", "me/tiny-student")
    argv[argv.index("--teacher") + 1] = "tiny-org/pixart-teacher"
    assert main_status(argv) == 0

    assert loads[0][:2] == ("create_repo", "me/tiny-student") and len(loads) > 1  # before every from_pretrained
    assert hub_calls["create"][1]["exist_ok"] is True and hub_calls["create"][1]["private"] is False
    assert hub_calls["upload"]["repo_id"] == "me/tiny-student" and hub_calls["upload"]["folder_path"] == str(out)
    assert all(
        kwargs.get("cache_dir") == str(cache) for name, source, kwargs in loads if source == "tiny-org/pixart-teacher"
    )
    card = ModelCard.load(str(out / "README.md"))
    assert 'OneStepPipeline.from_pretrained("me/tiny-student")' in card.text
    assert "path/to/this/folder" not in card.text
    assert card.data.license == "openrail++"  # read from the teacher's card, through --cache_dir
    assert "carries the teacher's license: `openrail++`" in card.text


def test_a_bad_hub_token_fails_before_anything_loads(workspace, tmp_path, capsys, loads, monkeypatch):
    import huggingface_hub

    def whoami(token=None, **kwargs):
        raise OSError(
            "401 Client Error: Unauthorized for url: https://huggingface.co/api/whoami-v2\n"
            "Invalid credentials in Authorization header"
        )

    monkeypatch.setattr(huggingface_hub, "whoami", whoami)
    out = tmp_path / "never"
    # a pushed LoRA student of the local tiny teacher names its base by Hub id
    argv = one_step(workspace, out, "--push_to_hub", "--hub_model_id", "me/student", "--base_model_id", "tiny/teacher")
    assert main_status(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        "train_onestep.py: error: --push_to_hub could not check the Hub token (401 Client Error: Unauthorized for "
        "url: https://huggingface.co/api/whoami-v2); check HF_TOKEN or `hf auth login`."
    )
    assert loads == [] and not out.exists()


def test_a_repo_that_cannot_be_created_fails_before_anything_loads(workspace, tmp_path, capsys, loads, monkeypatch):
    import huggingface_hub

    def create_repo(repo_id, **kwargs):
        raise OSError("403 Client Error: Forbidden for url: https://huggingface.co/api/repos/create\nYou cannot")

    monkeypatch.setattr(huggingface_hub, "whoami", hub_account())
    monkeypatch.setattr(huggingface_hub, "create_repo", create_repo)
    out = tmp_path / "never"
    argv = one_step(workspace, out, "--push_to_hub", "--hub_model_id", "me/student", "--base_model_id", "tiny/teacher")
    assert main_status(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        "train_onestep.py: error: --push_to_hub could not create the Hub repo 'me/student' (403 Client "
        "Error: Forbidden for url: https://huggingface.co/api/repos/create); check HF_TOKEN or "
        "`hf auth login` and --hub_model_id."
    )
    assert loads == [] and not out.exists()


# ------------------------------------------------------------------------------------------------------------------
# the manual: docs/training.md and --help
# ------------------------------------------------------------------------------------------------------------------

TRAINING_DOC = os.path.join(REPO, "docs", "training.md")
#: how a training command line starts, up to its first flag
LAUNCHERS = ("diffusers-onestep distill", "accelerate launch", "python -m diffusers_onestep.distill")


def training_commands(text):
    """The training command lines of a text (backslash continuations joined), as ``(launcher, flags after it)``."""
    import shlex

    joined = text.replace("\\\n", " ")
    commands = []
    for line in joined.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line.startswith(LAUNCHERS) or "accelerate config" in line:
            continue
        tokens = [t for t in shlex.split(line) if t != "..."]
        for end in ("distill", "diffusers_onestep.distill", "training/train_onestep.py"):
            if end in tokens:
                commands.append((line.split()[0], tokens[tokens.index(end) + 1 :]))
                break
    return commands


def test_every_training_command_of_the_docs_and_of_help_parses():
    with open(TRAINING_DOC, encoding="utf-8") as f:
        doc = f.read()
    for text, least in ((doc, 6), (cli.EPILOG, 6)):
        commands = training_commands(text)
        assert len(commands) >= least
        for launcher, flags in commands:
            # only the console command launches processes itself (--num_processes, --accelerate_config)
            cli.build_parser(launcher=launcher == "diffusers-onestep").parse_args(flags)  # exits on an unknown flag


def test_the_docs_and_help_name_the_installed_commands_and_hf_auth_login():
    with open(TRAINING_DOC, encoding="utf-8") as f:
        doc = f.read()
    for spelling in (
        "diffusers-onestep distill",
        "accelerate launch -m diffusers_onestep.distill",
        "training/train_onestep.py",
    ):
        assert spelling in doc
    assert "hf auth login" in doc and "huggingface-cli" not in doc
    help_text = cli.build_parser().format_help()
    assert (
        "diffusers-onestep distill --" in help_text and "accelerate launch -m diffusers_onestep.distill" in help_text
    )
