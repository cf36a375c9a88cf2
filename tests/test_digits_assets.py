"""The bundled digits benchmark: teacher folder, classifier and metrics (fast: about 5 s)."""

import json
import os

import numpy as np
import pytest
import torch


pytest.importorskip("sklearn")

from diffusers_onestep.demo import digits  # noqa: E402


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".msgpack", ".h5")


@pytest.fixture(scope="module")
def teacher():
    from diffusers import PixArtAlphaPipeline

    pipe = PixArtAlphaPipeline.from_pretrained(digits.TEACHER_DIR)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_teacher_folder_is_small_pixart_alpha_with_safetensors_only():
    from diffusers_onestep.families import detect_family_from_folder

    assert detect_family_from_folder(digits.TEACHER_DIR) == "pixart_alpha"
    files = [os.path.join(root, f) for root, _, fs in os.walk(digits.TEACHER_DIR) for f in fs]
    assert sum(os.path.getsize(f) for f in files) <= 20 * 1024 * 1024
    weights = [f for f in files if f.endswith(WEIGHT_SUFFIXES)]
    assert weights and all(f.endswith(".safetensors") for f in weights), weights
    with open(os.path.join(digits.TEACHER_DIR, "model_index.json")) as f:
        assert json.load(f)["_class_name"] == "PixArtAlphaPipeline"


@pytest.mark.oldest
def test_teacher_loads_and_generates(teacher):
    assert type(teacher).__name__ == "PixArtAlphaPipeline"
    assert teacher.transformer.config.use_additional_conditions is False
    images = digits.generate_with_pipeline(teacher, ["seven", "digit 3"], num_inference_steps=2, guidance_scale=2.0)
    assert images.shape == (2, 3, digits.TEACHER_RESOLUTION, digits.TEACHER_RESOLUTION)
    assert images.min() >= -1 and images.max() <= 1


def test_teacher_encoder_gives_unit_std_training_latents(teacher):
    x, _ = digits.load_split("train", resolution=digits.TEACHER_RESOLUTION)
    with torch.no_grad():
        posterior = teacher.vae.encode(x).latent_dist
    assert float(posterior.std.max()) < 1e-5  # deterministic: sampled = the means the DiT trained on
    z = posterior.sample(torch.Generator().manual_seed(0)) * teacher.vae.config.scaling_factor
    assert abs(float(z.std()) - 1.0) < 0.02 and abs(float(z.mean())) < 0.1


def test_prompts_are_in_the_teacher_vocabulary(teacher):
    unk = teacher.tokenizer.unk_token_id
    for prompt, digit in digits.all_prompts():
        assert digits.parse_digit(prompt) == digit
        assert unk not in teacher.tokenizer(prompt).input_ids, prompt
    assert digits.parse_digit("") is None
    assert digits.parse_digit("3 or seven") is None


def test_split_is_fixed_and_disjoint():
    train, heldout = digits.split_indices()
    assert len(train) + len(heldout) == 1797 and not set(train) & set(heldout)
    assert len(heldout) == 359
    x, y = digits.load_split("heldout", resolution=16)
    assert x.shape == (359, 3, 16, 16) and x.min() >= -1 and x.max() <= 1
    assert torch.equal(
        digits.to_classifier_input(digits.load_split("train", resolution=8)[0]),
        digits.load_split("train", resolution=8, channels=1)[0],
    )


def test_classifier_heldout_accuracy():
    x, y = digits.load_split("heldout", resolution=8, channels=1)
    _, preds = digits.classify(x, value_range="-1,1")
    assert (preds == y.numpy()).mean() >= 0.97
    x16, _ = digits.load_split("heldout", resolution=16)
    _, preds16 = digits.classify(x16, value_range="-1,1")
    assert (preds16 == y.numpy()).mean() >= 0.97


def test_fd_is_zero_on_itself_and_symmetric():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 8)) @ rng.normal(size=(8, 8))
    b = rng.normal(loc=0.5, size=(200, 8))
    assert digits.fd(a, a) == pytest.approx(0.0, abs=1e-6)
    assert digits.fd(a, b) == pytest.approx(digits.fd(b, a), rel=1e-6)
    # closed form for diagonal Gaussians: |mu|^2 + sum (s_a - s_b)^2
    c = rng.normal(size=(200000, 2)) * [1.0, 2.0]
    d = rng.normal(size=(200000, 2)) * [3.0, 2.0] + [1.0, 0.0]
    assert digits.fd(c, d) == pytest.approx(1.0 + 4.0, rel=0.02)


def test_evaluate_returns_documented_keys_and_ranks_real_above_noise():
    x, y = digits.load_split("train", resolution=16)
    idx = torch.cat([torch.nonzero(y == d).flatten()[:20] for d in range(10)])
    real = digits.evaluate(x[idx], y[idx])
    assert set(real) >= {"fd", "prompt_accuracy", "coverage", "per_class", "recall", "n", "resolution"}
    assert len(real["per_class"]["accuracy"]) == 10 and len(real["per_class"]["share"]) == 10
    assert real["prompt_accuracy"] >= 0.97 and real["coverage"] == 1.0
    noise = digits.evaluate(torch.rand(len(idx), 3, 16, 16), y[idx])  # [0, 1] range, detected
    assert noise["fd"] > 10 * real["fd"]
    assert noise["prompt_accuracy"] < 0.5
