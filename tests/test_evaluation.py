"""Evaluation: the metrics against closed forms, clean-fid's Inception protocol and CLIP score on tiny offline
stand-ins in their real layouts, resumable generation and ``diffusers-onestep evaluate``."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_onestep import cli, evaluation
from diffusers_onestep.testing.evaluation import save_tiny_clip, save_tiny_inception


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def exact_moments(rng, n, mean, cov):
    """``n`` rows whose sample mean and (unbiased) covariance are exactly ``mean`` and ``cov``."""
    d = len(mean)
    x = rng.standard_normal((n, d))
    x -= x.mean(0)
    x = x @ np.linalg.inv(np.linalg.cholesky(np.cov(x, rowvar=False))).T  # sample covariance exactly I
    return x @ np.linalg.cholesky(cov).T + mean


# ------------------------------------------------------------------------------------------------------------------
# Fréchet distance and KID against closed forms
# ------------------------------------------------------------------------------------------------------------------


def test_frechet_distance_of_identical_feature_sets_is_zero():
    features = np.random.default_rng(0).standard_normal((200, 8))
    assert evaluation.frechet_distance(features, features) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_of_a_known_gaussian_pair_is_the_analytic_value():
    rng = np.random.default_rng(1)
    # commuting covariances: |mu1 - mu2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([3.0, 1.0, 2.0])
    x, y = exact_moments(rng, 300, mu1, np.diag(a)), exact_moments(rng, 500, mu2, np.diag(b))
    analytic = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert evaluation.frechet_distance(x, y) == pytest.approx(analytic, rel=1e-9)
    # general covariances: clean-fid's formula with scipy's sqrtm
    from scipy import linalg

    m1, m2 = rng.standard_normal((4, 4)), rng.standard_normal((4, 4))
    s1, s2 = m1 @ m1.T + 0.1 * np.eye(4), m2 @ m2.T + 0.1 * np.eye(4)
    x, y = exact_moments(rng, 400, np.zeros(4), s1), exact_moments(rng, 400, np.ones(4), s2)
    expected = 4.0 + np.trace(s1) + np.trace(s2) - 2 * np.trace(linalg.sqrtm(s1 @ s2).real)
    assert evaluation.frechet_distance(x, y) == pytest.approx(expected, rel=1e-8)


def test_kid_is_the_unbiased_mmd_computed_directly():
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((12, 5)), rng.standard_normal((12, 5)) + 0.5

    def k(u, v):
        return (u @ v / 5 + 1) ** 3

    m = len(x)
    direct = sum(k(x[i], x[j]) + k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    direct -= 2 * sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m**2
    assert evaluation.mmd2_unbiased(x, y) == pytest.approx(direct, rel=1e-12)
    # one subset of every row is the whole sets, in some order: the same statistic
    assert evaluation.kernel_distance(x, y, num_subsets=1) == pytest.approx(direct, rel=1e-12)


def test_kid_is_unbiased_at_zero_and_positive_for_different_distributions():
    rng = np.random.default_rng(3)
    same = [evaluation.mmd2_unbiased(rng.standard_normal((20, 4)), rng.standard_normal((20, 4))) for _ in range(400)]
    # the unbiased estimator averages to 0 for one distribution (it goes negative), within 4 standard errors
    assert min(same) < 0 and abs(np.mean(same)) < 4 * np.std(same) / np.sqrt(len(same))
    # negative control: a shifted distribution is far from 0 in both metrics
    x, y = rng.standard_normal((200, 4)), rng.standard_normal((200, 4)) + 1.0
    assert evaluation.kernel_distance(x, y, num_subsets=10) > 20 * np.std(same)
    assert evaluation.frechet_distance(x, y) == pytest.approx(4.0, rel=0.25)


def test_the_digits_benchmark_fd_goes_through_the_same_api_and_keeps_its_numbers():
    from diffusers_onestep.demo import digits

    extractor = digits.DigitClassifierFeatures()
    images, _ = digits.load_split("heldout", resolution=16, channels=1)
    np.testing.assert_array_equal(extractor(images), digits.classify(images, value_range="-1,1")[0])
    a, b = np.random.default_rng(4).standard_normal((2, 50, 6))
    assert digits.fd(a, b) == evaluation.frechet_distance(a, b)
    # today's recorded number of the real-vs-real floor (benchmarks/digits.py), recomputed exactly
    with open(os.path.join(REPO, "benchmarks", "results", "digits", "results.json")) as f:
        recorded = json.load(f)["real_fd"]
    assert digits.reference_fd(seeds=(0,))["fd"] == recorded


# ------------------------------------------------------------------------------------------------------------------
# clean-fid's Inception protocol and CLIP score on tiny stand-ins
# ------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def feature_networks(tmp_path_factory):
    root = tmp_path_factory.mktemp("feature-networks")
    cache = str(root / "cache")
    save_tiny_inception(cache)
    return {"cache": cache, "clip": save_tiny_clip(str(root / "clip"))}


@pytest.fixture
def inception_cache(feature_networks, monkeypatch):
    monkeypatch.setenv("DIFFUSERS_ONESTEP_CACHE", feature_networks["cache"])
    return feature_networks["cache"]


def test_clean_resize_is_pil_bicubic_per_channel_in_float_without_quantization():
    image = (np.random.default_rng(5).random((20, 30, 3)) * 255).astype(np.uint8)
    resized = evaluation.clean_resize(image)
    assert resized.shape == (299, 299, 3) and resized.dtype == np.float32
    assert resized.min() >= 0 and resized.max() <= 255
    assert not np.allclose(resized, resized.round())  # not quantized back to uint8
    flat = np.full((10, 10, 3), 77, np.uint8)
    np.testing.assert_allclose(evaluation.clean_resize(flat), 77.0, atol=1e-4)
    channel = Image.fromarray(image[:, :, 1].astype(np.float32), mode="F").resize((299, 299), Image.BICUBIC)
    np.testing.assert_array_equal(resized[:, :, 1], np.asarray(channel).clip(0, 255))


def test_inception_loads_from_the_cache_as_clean_fid_and_reads_normalised_299_pixels(inception_cache):
    extractor = evaluation.CleanFIDInception()
    assert extractor.path == os.path.join(inception_cache, evaluation.INCEPTION_FILE)
    images = torch.rand(3, 3, 24, 20) * 2 - 1
    features = extractor(images)
    network = torch.jit.load(extractor.path)
    batch = torch.stack(
        [torch.from_numpy(evaluation.clean_resize(a).transpose(2, 0, 1).copy()) for a in evaluation.to_uint8(images)]
    )
    with torch.no_grad():
        expected = network.layers((batch - 128) / 128).reshape(3, -1).double().numpy()
    np.testing.assert_allclose(features, expected, rtol=1e-6)
    assert "clean" in extractor.protocol()["resize"] and evaluation.INCEPTION_URL in extractor.protocol()["weights"]


def test_missing_inception_weights_offline_is_one_sentence(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFUSERS_ONESTEP_CACHE", str(tmp_path))
    with pytest.raises(evaluation.EvaluationError, match=r"offline mode is set .*--inception_path\.$"):
        evaluation.CleanFIDInception()


def test_clip_score_is_100_cosine_clipped_at_zero(feature_networks):
    from transformers import CLIPModel

    scorer = evaluation.CLIPScorer(feature_networks["clip"])
    arrays = list(evaluation.to_uint8(torch.rand(4, 3, 40, 40) * 2 - 1))
    prompts = ["a cat", "a dog", "a red car", "two birds"]
    scores = scorer(arrays, prompts)
    model = CLIPModel.from_pretrained(feature_networks["clip"]).eval()
    with torch.no_grad():
        pixels = scorer.image_processor(images=arrays, return_tensors="pt")["pixel_values"]
        tokens = scorer.tokenizer(prompts, padding=True, return_tensors="pt")
        out = model(pixel_values=pixels, **tokens)
    cosine = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds).double().numpy()
    np.testing.assert_allclose(scores, np.maximum(100 * cosine, 0), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------------------------
# resumable generation and the console command
# ------------------------------------------------------------------------------------------------------------------


PROMPTS = ["a cat", "a dog", "a red car", "two birds", "a house", "a tree"]


def write_inputs(root):
    prompts = os.path.join(root, "captions.jsonl")
    with open(prompts, "w") as f:
        f.write("\n".join(json.dumps({"caption": p}) for p in PROMPTS) + "\n")
    reference = os.path.join(root, "reference")
    os.makedirs(reference)
    for i in range(8):
        array = (np.random.RandomState(i).rand(24, 24, 3) * 255).astype("uint8")
        Image.fromarray(array).save(os.path.join(reference, f"{i}.png"))
    return prompts, reference


def settings_for(model, prompts, **kw):
    values = {
        "model": model,
        "prompts": prompts,
        "caption_column": "caption",
        "num_images": 6,
        "height": None,
        "width": None,
        "steps": None,
        "guidance": None,
        "seed": 3,
    }
    values.update(kw)
    return evaluation.GenerationSettings(**values)


def test_a_killed_generation_continues_where_it_stopped_with_the_same_images(tmp_path, student):
    pipe = student("sdxl")
    settings = settings_for("tiny", "captions")
    whole = str(tmp_path / "whole")
    evaluation.generate_images(pipe, PROMPTS, whole, settings, batch_size=4, progress=False)

    class Killed(Exception):
        pass

    def kill_after_three(index):
        if index == 2:
            raise Killed

    resumed = str(tmp_path / "resumed")
    with pytest.raises(Killed):
        evaluation.generate_images(
            pipe, PROMPTS, resumed, settings, batch_size=4, progress=False, on_image=kill_after_three
        )
    assert sorted(os.listdir(os.path.join(resumed, "images"))) == ["000000.png", "000001.png", "000002.png"]
    made = []
    stats = evaluation.generate_images(
        pipe, PROMPTS, resumed, settings, batch_size=2, progress=False, on_image=made.append
    )
    assert made == [3, 4, 5] and (stats.reused, stats.generated) == (3, 3)
    for index in range(6):  # seeded per image: the batch size and the interruption change nothing
        with (
            Image.open(evaluation.image_path(whole, index)) as a,
            Image.open(evaluation.image_path(resumed, index)) as b,
        ):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(evaluation.EvaluationError, match=r"other settings \(seed: 3 -> 4\)"):
        evaluation.check_generation_folder(resumed, settings_for("tiny", "captions", seed=4))


def test_evaluate_writes_metrics_with_the_protocol_and_a_grid(
    capsys, tmp_path, student_folder, feature_networks, inception_cache
):
    prompts, reference = write_inputs(str(tmp_path))
    out = str(tmp_path / "eval")
    argv = [
        "evaluate",
        student_folder("sdxl"),
        "--prompts",
        prompts,
        "--caption_column",
        "caption",
        "--reference",
        reference,
        "--num_images",
        "6",
        "--batch_size",
        "4",
        "--clip_model",
        feature_networks["clip"],
        "--output_dir",
        out,
    ]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    with open(os.path.join(out, "metrics.json")) as f:
        record = json.load(f)
    metrics, protocol = record["metrics"], record["protocol"]
    assert set(metrics) == {"fid", "kid", "clip_score", "images_per_s", "peak_memory_gb"}
    assert metrics["fid"] > 0 and metrics["clip_score"] >= 0 and metrics["images_per_s"] > 0
    assert protocol["num_images"] == 6 and protocol["reference_images"] == 8 and protocol["seed"] == 0
    assert protocol["features"]["name"] == "inception" and "clean" in protocol["features"]["resize"]
    assert "Protocol: 6 images" in printed and "fid" in printed
    height, width = protocol["resolution"]
    assert Image.open(os.path.join(out, "grid.png")).size == (4 * width, 2 * height)
    # run again: every image is reused, nothing is generated, the metrics are the same
    assert cli.main(argv) == 0
    with open(os.path.join(out, "metrics.json")) as f:
        again = json.load(f)
    assert again["metrics"]["fid"] == metrics["fid"] and again["metrics"]["images_per_s"] is None
    assert again["protocol"]["timesteps"] == protocol["timesteps"] is not None
    # other settings in the same folder: refused in one sentence before any model loads
    assert cli.main(argv + ["--seed", "1"]) == 2
    assert capsys.readouterr().err.strip().endswith("or pass another --output_dir.")
