"""Model cards and Hub upload, tested offline at the huggingface_hub API boundary."""

import os

import pytest
from huggingface_hub import ModelCard
from huggingface_hub.utils import filter_repo_objects

from diffusers_onestep import hub
from diffusers_onestep.distill.config import TrainConfig
from diffusers_onestep.distill.methods import DMD2, FDistill


def make_config(teacher="stabilityai/stable-diffusion-xl-base-1.0", divergence="js"):
    config = TrainConfig(teacher=teacher)
    config.method.divergence = divergence
    config.data.prompts = "prompts.txt"
    return config


def test_model_card_names_teacher_method_and_how_to_run(tmp_path):
    card = hub.write_model_card(
        str(tmp_path),
        make_config(),
        family="sdxl",
        student_timesteps=[399],
        sample_grid="samples.png",
        prompts=["a cat"],
        lora=True,
        repo_id="me/student",
        method=FDistill,
    )
    loaded = ModelCard.load(str(tmp_path / "README.md"))
    assert loaded.data.base_model == "stabilityai/stable-diffusion-xl-base-1.0"
    assert loaded.data.library_name == "diffusers"
    assert {"one-step", "distillation", "f-distill", "js", "lora", "sdxl"} <= set(loaded.data.tags)
    text = loaded.text
    assert 'OneStepPipeline.from_pretrained("me/student")' in text
    assert "![samples](samples.png)" in text and "[399]" in text
    assert '"divergence": "js"' in text  # the resolved training config
    assert card.data.pipeline_tag == "text-to-image"


def test_model_card_of_a_few_step_student_says_how_many_steps(tmp_path):
    """A 2-step TDM student is not called one-step: the title, the sentence and the tags name its step count."""
    from diffusers_onestep.distill.methods import TDM

    hub.write_model_card(
        str(tmp_path), make_config(divergence=None), "pixart_alpha", [899, 449], lora=True, method=TDM
    )
    loaded = ModelCard.load(str(tmp_path / "README.md"))
    assert "# 2-step pixart_alpha student" in loaded.text
    assert "A LoRA adapter 2-step student" in loaded.text
    assert "few-step" in loaded.data.tags and "one-step" not in loaded.data.tags
    assert "one-step" not in loaded.text  # negative control of the wording: the one-step card below says it
    one = hub.write_model_card(str(tmp_path), make_config(), "pixart_alpha", [400], lora=True, method=FDistill)
    assert "# One-step pixart_alpha student" in one.text and "one-step" in one.data.tags


def test_model_card_of_a_local_teacher_has_no_base_model_but_names_it(tmp_path):
    teacher = str(tmp_path / "my-teacher")
    os.makedirs(teacher)
    hub.write_model_card(
        str(tmp_path),
        make_config(teacher=teacher, divergence="reverse_kl"),
        family="pixart_alpha",
        student_timesteps=[400],
        lora=False,
        method=DMD2,
    )
    loaded = ModelCard.load(str(tmp_path / "README.md"))
    assert loaded.data.base_model is None  # a local path is not a Hub id
    assert teacher in loaded.text and "dmd" in loaded.data.tags
    # the teacher folder has no card, so no license is invented
    assert loaded.data.license is None and "see the teacher's license" in loaded.text
    assert 'OneStepPipeline.from_pretrained("path/to/this/folder")' in loaded.text  # no repo id: not pushed


@pytest.mark.parametrize(
    "front_matter, data, named",
    [
        ("license: apache-2.0\n", {"license": "apache-2.0"}, "`apache-2.0`"),
        (
            "license: other\nlicense_name: nvidia-license\nlicense_link: https://example.com/LICENSE\n",
            {"license": "other", "license_name": "nvidia-license", "license_link": "https://example.com/LICENSE"},
            "`nvidia-license` (https://example.com/LICENSE)",
        ),
    ],
)
def test_model_card_carries_the_teachers_license(tmp_path, front_matter, data, named):
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "README.md").write_text(f"---\n{front_matter}---\n# The teacher\n")
    assert hub.teacher_license(str(teacher)) == data
    student = tmp_path / "student"
    student.mkdir()
    hub.write_model_card(
        str(student),
        make_config(teacher=str(teacher), divergence="reverse_kl"),
        family="pixart_alpha",
        student_timesteps=[400],
        method=DMD2,
    )
    loaded = ModelCard.load(str(student / "README.md"))
    assert {key: getattr(loaded.data, key) for key in data} == data
    assert f"carries the teacher's license: {named}." in loaded.text


def test_push_creates_the_repo_and_uploads_only_the_student(tmp_path, hub_calls):
    calls = hub_calls
    for name in (
        "README.md",
        "pytorch_lora_weights.safetensors",
        "onestep_lora.json",
        "samples.png",
        "training_config.json",
        "scheduler/scheduler_config.json",
        "checkpoint-10/trainable.safetensors",
        "logs/events.out",
        "validation/step-000010.png",
        ".checkpoint-20.tmp/trainable.safetensors",
        "run.json",
        "best_checkpoint.json",
    ):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")

    repo = hub.push_to_hub(str(tmp_path), "me/student", private=True)
    assert repo == "me/student"
    repo_id, kwargs = calls["create"]
    assert repo_id == "me/student" and kwargs["private"] is True and kwargs["exist_ok"] is True
    upload = calls["upload"]
    assert upload["repo_id"] == "me/student" and upload["folder_path"] == str(tmp_path)
    files = [os.path.relpath(os.path.join(r, f), tmp_path) for r, _, fs in os.walk(tmp_path) for f in fs]
    uploaded = set(filter_repo_objects(files, ignore_patterns=upload["ignore_patterns"]))
    assert uploaded == {
        "README.md",
        "pytorch_lora_weights.safetensors",
        "onestep_lora.json",
        "samples.png",
        "training_config.json",
        "scheduler/scheduler_config.json",
    }


def test_create_repo_first_then_upload_to_its_full_id(tmp_path, hub_calls):
    assert hub.create_repo("me/student", private=True) == "me/student"
    assert hub_calls["create"] == ("me/student", {"private": True, "exist_ok": True, "token": None})
    assert "upload" not in hub_calls  # creating uploads nothing
    hub.upload_student(str(tmp_path), "me/student")
    assert hub_calls["upload"]["repo_id"] == "me/student" and hub_calls["upload"]["folder_path"] == str(tmp_path)


@pytest.mark.parametrize("bad", ["no spaces allowed", "a/b/c", "-leading"])
def test_hub_model_id_is_validated(bad):
    config = make_config()
    config.output.hub_model_id = bad
    with pytest.raises(ValueError, match="not a valid Hub repo id"):
        config.output.validate()


# ----------------------------------------------------------------------------------------------------------------
# the evaluation in the card
# ----------------------------------------------------------------------------------------------------------------


def evaluation_record():
    """A ``metrics.json`` record as ``diffusers-onestep evaluate`` writes it."""
    return {
        "metrics": {"fid": 23.4567, "kid": 0.0123, "clip_score": 31.25, "images_per_s": 12.5, "peak_memory_gb": 7.5},
        "protocol": {
            "model": "out",
            "dataset": "org/coco-captions",
            "caption_column": "caption",
            "num_images": 5000,
            "resolution": [512, 512],
            "steps": None,
            "timesteps": [399.0],
            "guidance": None,
            "seed": 0,
            "seeding": "image i from torch.Generator().manual_seed(seed + i)",
            "reference": "coco-val2014",
            "reference_images": 40504,
            "features": {"name": "inception", "weights": "clean-fid's TorchScript Inception-V3", "resize": "clean"},
            "kid": {"kernel": "(x.y/d + 1)^3", "subsets": 100, "subset_size": 1000},
            "clip": {"model": "openai/clip-vit-large-patch14", "score": "100 cos, clipped at 0"},
            "device": "cuda",
            "peak_memory": "peak CUDA memory allocated by torch",
        },
        "grid": "grid.png",
    }


def test_push_puts_the_evaluation_into_the_cards_model_index_and_text(tmp_path, monkeypatch, hub_calls):
    import huggingface_hub

    from diffusers_onestep import cli
    from diffusers_onestep.storage import write_json

    folder = tmp_path / "student"
    folder.mkdir()
    (folder / "model_index.json").write_text("{}")
    cost = {"wall_seconds": 7200.0, "sessions": 2, "device": "NVIDIA H100", "num_processes": 1}
    cost.update(peak_memory_bytes=30 * 2**30, peak_memory_kind="peak CUDA memory allocated by torch")
    hub.write_model_card(str(folder), make_config(), "sdxl", [399], lora=False, method=DMD2, training_cost=cost)
    original_card = (folder / "README.md").read_text()
    os.makedirs(folder / "evaluation" / "images")
    write_json(str(folder / "evaluation" / "metrics.json"), evaluation_record())
    (folder / "evaluation" / "grid.png").write_bytes(b"png")
    (folder / "evaluation" / "images" / "000000.png").write_bytes(b"png")
    commits = {}

    def create_commit(repo_id, operations, **kwargs):
        commits[repo_id] = {op.path_in_repo: op.path_or_fileobj for op in operations}

    monkeypatch.setattr(huggingface_hub, "create_commit", create_commit)
    assert cli.main(["push", str(folder), "--repo_id", "me/student"]) == 0
    uploaded = commits["me/student"]
    # the generated images stay local; the metrics and their grid are published
    assert "evaluation/metrics.json" in uploaded and "evaluation/grid.png" in uploaded
    assert not any(name.startswith("evaluation/images") for name in uploaded)
    card = ModelCard(uploaded["README.md"].decode("utf-8"))
    results = {r.metric_type: r for r in card.data.eval_results}
    assert set(results) == {"fid", "kid", "clip_score"}  # speed and memory depend on the machine: text only
    fid = results["fid"]
    assert fid.metric_value == 23.4567 and fid.task_type == "text-to-image" and fid.dataset_type == "org/coco-captions"
    assert fid.dataset_args == {
        "num_images": 5000,
        "resolution": [512, 512],
        "steps": 1,
        "guidance": "none (distilled into the student)",
        "seed": 0,
        "caption_column": "caption",
        "reference": "coco-val2014",
    }
    assert results["clip_score"].metric_args == {"clip_model": "openai/clip-vit-large-patch14"}
    assert card.data.model_name == "me/student"
    text = card.text
    assert "## Evaluation" in text and "| FID (clean-fid) (lower is better) | 23.46 |" in text
    assert "Protocol: 5000 images at 512x512 from the first 5000 captions of `org/coco-captions`" in text
    assert "seed 0 (image i from torch.Generator().manual_seed(seed + i))" in text
    assert "Reference: 40504 images of `coco-val2014`." in text
    assert (
        "Training cost: 2.00 h wall time (7200 s over 2 session(s)) on 1 x NVIDIA H100; peak memory 30.00 GiB" in text
    )
    assert text.index("## Evaluation") < text.index("## License")
    # the folder's own card is left as it was; a second push replaces the section instead of adding another
    assert (folder / "README.md").read_text() == original_card
    again = hub.add_evaluation(card, evaluation_record(), "me/student")
    assert again.text.count("## Evaluation") == 1


def test_a_folder_without_an_evaluation_is_pushed_with_its_card_as_it_is(tmp_path):
    folder = tmp_path / "student"
    folder.mkdir()
    (folder / "README.md").write_text("---\nlicense: mit\n---\n\n# card\n")
    assert hub.card_with_evaluation(str(folder)) is None
