"""One resolver and a CLI generated from the config dataclasses: every field is a flag and a --config key, a run's
training_config.json starts an identical run, --dry_run resolves without loading weights, and the Python API trains
what the CLI trains."""

import dataclasses
import json
import os
import re

import pytest
from safetensors.torch import load_file
from training_utils import tiny_run_argv as base_argv
from training_utils import write_images, write_prompts

from diffusers_onestep.distill import cli
from diffusers_onestep.distill.config import SECTIONS, ConfigError, DataConfig, MethodConfig, TrainConfig
from diffusers_onestep.distill.resolve import resolve
from diffusers_onestep.testing import save_tiny_native_pipeline


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("resolver")
    return {
        "root": root,
        "teacher": save_tiny_native_pipeline("pixart_alpha", str(root / "teacher")),
        "prompts": write_prompts(str(root)),
    }


def test_every_field_is_a_flag_of_the_generated_parser():
    parser_flags = {a for action in cli.build_parser()._actions for a in action.option_strings}
    for section, f, _ in cli.config_fields():
        assert f"--{cli.flag_of(f)}" in parser_flags, (section, f.name)
    # the settings the hand-written field map had lost
    for flag in (
        "critic_time_range",
        "dm_weight",
        "diffusion_gan_time_range",
        "ratio_clip",
        "logit_clamp",
        "ratio_bins",
        "no_backward_simulation",
        "dataloader_num_workers",
        "method",
        "dry_run",
    ):
        assert f"--{flag}" in parser_flags, flag


def test_flags_set_the_fields_they_name(workspace, tmp_path):
    config, _ = cli.parse_args(
        base_argv(
            workspace,
            tmp_path,
            "--critic_time_range",
            "0.1",
            "0.9",
            "--dm_weight",
            "2",
            "--ratio_clip",
            "0.2",
            "10",
            "--logit_clamp",
            "5",
            "--ratio_bins",
            "4",
            "--no_backward_simulation",
            "--dataloader_num_workers",
            "2",
            "--diffusion_gan_time_range",
            "0",
            "0.5",
            "--no_cache_text_embeddings",
        )
    )
    method = config.method
    assert method.critic_time_range == (0.1, 0.9) and method.dm_weight == 2.0 and method.ratio_clip == (0.2, 10.0)
    assert method.logit_clamp == 5.0 and method.ratio_bins == 4 and method.backward_simulation is False
    assert method.diffusion_gan_time_range == (0.0, 0.5)
    assert config.data.dataloader_num_workers == 2 and config.data.cache_text_embeddings is False
    assert config.method.guidance_scale == 3.0 and config.method.gan_weight is None  # unset: resolved later


def test_the_nested_layout_of_every_field_is_accepted_as_a_config_file(tmp_path):
    complete = TrainConfig(teacher="t", data=DataConfig(prompts="p.txt"), method=MethodConfig(ratio_bins=3))
    path = tmp_path / "all.json"
    path.write_text(json.dumps(complete.to_dict(), default=list))
    config, _ = cli.parse_args(["--config", str(path)])
    assert config.to_dict() == complete.to_dict()
    path.write_text(json.dumps({"method": {"ratio_clip": [1, 2], "nonsense": 1}}))
    with pytest.raises(ConfigError, match="Unknown setting method.nonsense"):
        cli.parse_args(["--config", str(path)])


def test_dry_run_prints_the_resolved_config_without_loading_weights(workspace, tmp_path, capsys, monkeypatch):
    import diffusers

    def refuse(*args, **kwargs):
        raise AssertionError("--dry_run loaded weights")

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", refuse)
    out = tmp_path / "never-written"
    assert cli.main(base_argv(workspace, out, "--dry_run")) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["family"] == "pixart_alpha" and printed["method"]["method"] == "dmd2"
    assert printed["method"]["student_timesteps"] == [400.0] and printed["roles"]["lora_alpha"] == 64.0
    assert printed["roles"]["lora_target_modules"] == ["to_k", "to_q", "to_v", "to_out.0"]
    assert printed["max_sequence_length"] == 8 and printed["data"]["resolution"] == 8
    assert not out.exists()
    # every value the file holds is one the resolver filled: nothing is left for a later stage to default
    sections = [printed[name] for name in SECTIONS]
    left = [
        k
        for section in sections
        for k, v in section.items()
        if v is None
        and k
        in (
            "method",
            "divergence",
            "student_timesteps",
            "guidance_scale",
            "gan_weight",
            "discriminator_weight",
            "discriminator_trunk",
            "critic_updates_per_student",
            "lora_rank",
            "lora_alpha",
            "lora_target_modules",
            "critic_lora_rank",
            "learning_rate",
            "critic_learning_rate",
            "resolution",
        )
    ]
    assert left == []


def test_the_python_api_resolves_like_the_cli(workspace, tmp_path):
    images = write_images(str(tmp_path / "images"), n=2, size=8)
    from_cli, _ = cli.resolve_args(base_argv(workspace, tmp_path / "a", "--divergence", "js", "--real_images", images))
    by_hand = TrainConfig(teacher=workspace["teacher"], max_sequence_length=8)
    by_hand.method = dataclasses.replace(by_hand.method, divergence="js", guidance_scale=3.0)
    by_hand.roles.lora_rank = 2
    by_hand.optim = dataclasses.replace(by_hand.optim, learning_rate=1e-3, train_batch_size=2)
    by_hand.data = dataclasses.replace(by_hand.data, prompts=workspace["prompts"], resolution=8, real_images=images)
    by_hand.output = dataclasses.replace(by_hand.output, output_dir=str(tmp_path / "a"), report_to="none")
    assert resolve(by_hand).config == from_cli.config
    assert from_cli.config.method.gan_weight == 5e-3  # one f-distill GAN default, the family's
    assert resolve(from_cli.config).config == from_cli.config  # a resolved config resolves to itself


def test_a_finished_runs_training_config_starts_an_identical_run(workspace, tmp_path):
    first = tmp_path / "first"
    argv = base_argv(
        workspace,
        first,
        "--max_train_steps",
        "2",
        "--critic_updates_per_student",
        "1",
        "--checkpointing_steps",
        "2",
        "--validation_steps",
        "100",
    )
    assert cli.main(argv) == 0
    second = tmp_path / "second"
    assert cli.main(["--config", str(first / "training_config.json"), "--output_dir", str(second)]) == 0
    with open(first / "training_config.json") as f:
        a = json.load(f)
    with open(second / "training_config.json") as f:
        b = json.load(f)
    output_a, output_b = a.pop("output"), b.pop("output")
    assert output_a.pop("output_dir") != output_b.pop("output_dir")
    assert output_a == output_b and a == b
    weights_a = load_file(os.path.join(first, "checkpoint-2", "trainable.safetensors"))
    weights_b = load_file(os.path.join(second, "checkpoint-2", "trainable.safetensors"))
    assert weights_a.keys() == weights_b.keys()
    assert all(bool((weights_a[k] == weights_b[k]).all()) for k in weights_a)


def test_help_states_every_registered_familys_defaults():
    from diffusers_onestep.families import FAMILIES

    text = " ".join(cli.build_parser().format_help().split())
    assert "SDXL 399" in text and "SANA-Sprint 1.5708" in text  # student timesteps, from the adapters
    assert re.search(r"SDXL(, [^;]+)? 5e-05 LoRA / 5e-07 full", text)  # families sharing a value are grouped
    for cls in FAMILIES.values():
        assert cls.display_name in cli.family_defaults_text("student_timesteps")
