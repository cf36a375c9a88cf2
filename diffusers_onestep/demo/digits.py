"""Real-data text-to-image benchmark on scikit-learn's bundled digits: data, prompts, classifier and metrics.

The data are the 1,797 real 8×8 grey images of ``sklearn.datasets.load_digits`` (no download), scaled to
[-1, 1], upsampled bilinearly to the teacher's resolution and replicated to 3 channels, so that a standard RGB
pipeline and VAE see them like any other image. One fixed, stratified 80/20 split (:data:`SPLIT_SEED`) is used by
everything: the teacher and the classifier train on ``"train"`` only, and ``"heldout"`` is the FD reference.

Prompts name the digit in a few phrasings (:data:`PROMPT_TEMPLATES`); ``""`` is the unconditional prompt.

Metrics (:func:`evaluate`) read generated images through a small CNN classifier trained on the real train split at
the native 8×8 resolution (``assets/digits/classifier.safetensors`` next to this module). Images of any resolution
(a multiple of 8) are area-averaged to 8×8 and their 3 channels averaged first (:func:`to_classifier_input`), so the
classifier does not depend on the generator's resolution. The real reference goes through the same path at the same
resolution.

* ``fd``: Fréchet distance between the classifier's penultimate features (64-d) of the generated images and of the
  real held-out split (359 images) prepared at the generated images' resolution. FD is biased by sample size:
  compare only at the standard :data:`EVAL_PER_DIGIT` = 100 per digit (1,000 images). The floor a perfect
  generator reaches is :func:`reference_fd` (100 real *train* images per digit against the same held-out set).
* ``prompt_accuracy``: fraction of images the classifier labels with the digit their prompt asked for.
* ``coverage``: fraction of the 10 classes whose share of the classifier's predictions is at least half the uniform
  share (≥ 5 %); 1.0 means no digit is (nearly) missing. ``per_class`` gives per-digit accuracy (recall of the
  requested digit) and predicted share.
* ``recall``: k-NN manifold recall (Kynkäänniemi et al. 2019, k=5) in the same feature space: the fraction of real
  held-out images that lie within the k-NN radius of some generated image. Low recall means lost variety (e.g. every
  7 the same). Its twin, precision, is not reported: collapsed outputs (even uniform noise, which the classifier
  maps to one tight cluster) score high precision, so it misleads here.
"""

from __future__ import annotations

import json
import os
import re
from functools import lru_cache
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..evaluation import FeatureExtractor, frechet_distance


# ------------------------------------------------------------------------------------------------------------------
# constants
# ------------------------------------------------------------------------------------------------------------------

#: seed of the one train/held-out split everything uses
SPLIT_SEED = 0
#: fraction of the 1,797 images held out (stratified by digit): 359 held-out, 1,438 train (round(0.2 n) per digit)
HELDOUT_FRACTION = 0.2
#: native resolution of the data and of the classifier's input
NATIVE_RESOLUTION = 8
#: resolution of the bundled teacher
TEACHER_RESOLUTION = 16
#: standard evaluation size: 100 generated images per digit (1,000 in all)
EVAL_PER_DIGIT = 100
#: k of the k-NN precision/recall
KNN_K = 5

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
#: ``{n}`` is the numeral ("7"), ``{w}`` the word ("seven")
PROMPT_TEMPLATES = (
    "a handwritten digit {n}",
    "the number {w}",
    "{w}",
    "digit {n}",
    "a handwritten {w}",
)
#: every word the prompts use (the vocabulary of the teacher's T5 tokenizer)
PROMPT_WORDS = tuple(["a", "the", "handwritten", "digit", "number"] + list(DIGIT_WORDS) + [str(d) for d in range(10)])
#: the unconditional prompt (classifier-free guidance, prompt dropout)
EMPTY_PROMPT = ""

#: where the bundled teacher and classifier live: package data, so the same path in a checkout and in an installed
#: wheel (override with ``DIFFUSERS_ONESTEP_DIGITS_ASSETS``)
ASSETS_DIR = os.environ.get(
    "DIFFUSERS_ONESTEP_DIGITS_ASSETS", os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "digits")
)
TEACHER_DIR = os.path.join(ASSETS_DIR, "teacher")
CLASSIFIER_WEIGHTS = os.path.join(ASSETS_DIR, "classifier.safetensors")
CLASSIFIER_CONFIG = os.path.join(ASSETS_DIR, "classifier.json")


# ------------------------------------------------------------------------------------------------------------------
# prompts
# ------------------------------------------------------------------------------------------------------------------


def prompts_for_digit(digit: int) -> List[str]:
    """The prompt phrasings of ``digit`` (one per :data:`PROMPT_TEMPLATES` entry)."""
    if not 0 <= int(digit) <= 9:
        raise ValueError(f"digit must be in 0..9, got {digit!r}.")
    return [t.format(n=int(digit), w=DIGIT_WORDS[int(digit)]) for t in PROMPT_TEMPLATES]


def all_prompts() -> List[Tuple[str, int]]:
    """Every (prompt, digit) pair, digit-major."""
    return [(p, d) for d in range(10) for p in prompts_for_digit(d)]


_WORD_TO_DIGIT = {w: i for i, w in enumerate(DIGIT_WORDS)}
_WORD_TO_DIGIT.update({str(i): i for i in range(10)})


def parse_digit(prompt: str) -> Optional[int]:
    """The digit a prompt asks for (numeral or English word), or ``None`` if it names none or several."""
    found = {_WORD_TO_DIGIT[tok] for tok in re.findall(r"[a-z]+|\d", prompt.lower()) if tok in _WORD_TO_DIGIT}
    return found.pop() if len(found) == 1 else None


def evaluation_prompts(per_digit: int = EVAL_PER_DIGIT) -> Tuple[List[str], List[int]]:
    """The standard evaluation requests: ``per_digit`` prompts per digit, cycling through the phrasings.

    Returns ``(prompts, digits)``, digit-major (all 0s first), of length ``10 * per_digit``.
    """
    prompts, digits = [], []
    for d in range(10):
        phrasings = prompts_for_digit(d)
        prompts += [phrasings[i % len(phrasings)] for i in range(per_digit)]
        digits += [d] * per_digit
    return prompts, digits


# ------------------------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _load_native() -> Tuple[torch.Tensor, torch.Tensor]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - scikit-learn is in the [test] and [demo] extras
        raise ImportError("The digits benchmark needs scikit-learn: pip install scikit-learn") from e
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0 * 2.0 - 1.0  # [1797, 1, 8, 8]
    labels = torch.tensor(data.target, dtype=torch.long)
    return images, labels


@lru_cache(maxsize=1)
def split_indices() -> Tuple[np.ndarray, np.ndarray]:
    """``(train_idx, heldout_idx)`` into the 1,797 images: a fixed, stratified 80/20 split (seed :data:`SPLIT_SEED`)."""
    _, labels = _load_native()
    rng = np.random.default_rng(SPLIT_SEED)
    train, heldout = [], []
    for d in range(10):
        idx = np.flatnonzero(labels.numpy() == d)
        rng.shuffle(idx)
        n_held = int(round(len(idx) * HELDOUT_FRACTION))
        heldout.append(idx[:n_held])
        train.append(idx[n_held:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(heldout))


def to_resolution(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """Bilinear (``align_corners=False``) resize of ``[N, C, h, w]`` images to ``resolution``; identity if equal."""
    if images.shape[-1] == resolution and images.shape[-2] == resolution:
        return images
    return F.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=False)


def load_split(
    split: str = "train", resolution: int = TEACHER_RESOLUTION, channels: int = 3
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Real digits of ``split`` ("train", "heldout" or "all") as ``([N, channels, R, R] in [-1, 1], labels [N])``."""
    images, labels = _load_native()
    if split != "all":
        train, heldout = split_indices()
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train', 'heldout' or 'all', got {split!r}.")
        idx = torch.as_tensor(train if split == "train" else heldout)
        images, labels = images[idx], labels[idx]
    images = to_resolution(images, resolution).clamp(-1, 1)
    return images.expand(-1, channels, -1, -1).contiguous(), labels.clone()


def to_classifier_input(images: torch.Tensor, value_range: str = "auto") -> torch.Tensor:
    """``[N, C, H, W]`` images (H, W multiples of 8) -> ``[N, 1, 8, 8]`` in [-1, 1] by area averaging.

    ``value_range``: ``"-1,1"``, ``"0,1"`` or ``"auto"`` (``"0,1"`` when no value is negative; digit images in
    [-1, 1] always have a negative background).
    """
    if images.ndim != 4:
        raise ValueError(f"images must be [N, C, H, W], got shape {tuple(images.shape)}.")
    images = images.detach().float().cpu()
    if value_range == "auto":
        value_range = "0,1" if images.numel() and images.min() >= 0 else "-1,1"
    if value_range == "0,1":
        images = images * 2.0 - 1.0
    elif value_range != "-1,1":
        raise ValueError(f"value_range must be '-1,1', '0,1' or 'auto', got {value_range!r}.")
    h, w = images.shape[-2:]
    if h % NATIVE_RESOLUTION or w % NATIVE_RESOLUTION:
        raise ValueError(f"image size must be a multiple of {NATIVE_RESOLUTION}, got {h}x{w}.")
    images = F.adaptive_avg_pool2d(images, NATIVE_RESOLUTION)
    return images.mean(dim=1, keepdim=True).clamp(-1, 1)


# ------------------------------------------------------------------------------------------------------------------
# classifier
# ------------------------------------------------------------------------------------------------------------------


class DigitClassifier(nn.Module):
    """A small CNN on ``[N, 1, 8, 8]`` inputs in [-1, 1]; :meth:`features` is the ``feature_dim``-d penultimate layer."""

    def __init__(self, width: int = 32, feature_dim: int = 64, dropout: float = 0.3):
        super().__init__()
        self.config = {"width": width, "feature_dim": feature_dim, "dropout": dropout}
        self.conv = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 4x4
            nn.Conv2d(2 * width, 2 * width, 3, padding=1),
            nn.ReLU(),
        )
        self.fc = nn.Linear(2 * width * 16, feature_dim)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc(self.conv(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))


def save_classifier(model: DigitClassifier, weights_path: str, config_path: str, extra: Optional[dict] = None) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights_path)
    with open(config_path, "w", encoding="utf-8") as f:
        json.dump({"architecture": "DigitClassifier", **model.config, **(extra or {})}, f, indent=2)
        f.write("\n")


@lru_cache(maxsize=4)
def load_classifier(weights_path: str = CLASSIFIER_WEIGHTS, config_path: str = CLASSIFIER_CONFIG) -> DigitClassifier:
    """The bundled classifier, in eval mode (cached)."""
    from safetensors.torch import load_file

    if not os.path.isfile(weights_path):
        raise FileNotFoundError(
            f"No digit classifier at {weights_path}; train it with `python benchmarks/digits/train_classifier.py`."
        )
    with open(config_path, encoding="utf-8") as f:
        cfg = json.load(f)
    model = DigitClassifier(width=cfg["width"], feature_dim=cfg["feature_dim"], dropout=cfg["dropout"])
    model.load_state_dict(load_file(weights_path))
    return model.eval()


@torch.no_grad()
def classify(
    images: torch.Tensor,
    classifier: Optional[DigitClassifier] = None,
    value_range: str = "auto",
    batch_size: int = 1000,
) -> Tuple[np.ndarray, np.ndarray]:
    """``(features [N, D] float64, predicted digits [N])`` of images of any resolution (see :func:`to_classifier_input`)."""
    classifier = classifier or load_classifier()
    x = to_classifier_input(images, value_range)
    feats, preds = [], []
    for i in range(0, len(x), batch_size):
        f = classifier.features(x[i : i + batch_size])
        feats.append(f.double())
        preds.append(classifier.head(f).argmax(1))
    if not feats:
        return np.zeros((0, classifier.config["feature_dim"])), np.zeros((0,), dtype=np.int64)
    return torch.cat(feats).numpy(), torch.cat(preds).numpy()


# ------------------------------------------------------------------------------------------------------------------
# metrics
# ------------------------------------------------------------------------------------------------------------------


def fd(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ``[N, D]``: the project's one implementation,
    :func:`diffusers_onestep.evaluation.frechet_distance` (float64, eigen-based)."""
    return frechet_distance(features_a, features_b)


class DigitClassifierFeatures(FeatureExtractor):
    """The digits classifier as a :class:`diffusers_onestep.evaluation.FeatureExtractor` (``--features digits``):
    the 64-d penultimate layer of :class:`DigitClassifier` on images area-averaged to 8x8 grey
    (:func:`to_classifier_input`). Called on ``[N, C, H, W]`` tensors in [-1, 1] it reads them as they are (the
    digits benchmark's path, unquantized); :meth:`prepare` reads a uint8 image file's pixels."""

    name = "digits"
    metric = "fd_digits"
    batch_size = 1000

    def __init__(self, classifier: Optional["DigitClassifier"] = None):
        self.classifier = classifier

    def prepare(self, image: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0

    def features(self, batch: torch.Tensor) -> np.ndarray:
        return classify(batch, self.classifier, "-1,1")[0]

    def features_and_predictions(self, images: torch.Tensor) -> Tuple[np.ndarray, np.ndarray]:
        return classify(images, self.classifier, "-1,1")

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        return self.features(images)

    def protocol(self) -> Dict[str, object]:
        return {
            "name": self.name,
            "weights": "the bundled digits classifier (demo/assets/digits/classifier.safetensors), 64-d "
            "penultimate layer",
            "resize": "uint8 RGB -> [-1, 1], area average to 8x8, mean of the 3 channels",
        }


def knn_recall(generated: np.ndarray, real: np.ndarray, k: int = KNN_K) -> float:
    """Improved recall (Kynkäänniemi et al. 2019): fraction of ``real`` rows inside some generated row's k-NN ball."""

    def radii(x):
        d = np.sqrt(np.maximum(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1), 0))
        return np.sort(d, axis=1)[:, k]  # column 0 is the point itself

    def inside(points, centres, centre_radii):
        d = np.sqrt(np.maximum(((points[:, None, :] - centres[None, :, :]) ** 2).sum(-1), 0))
        return (d <= centre_radii[None, :]).any(1).mean()

    generated, real = np.asarray(generated, np.float64), np.asarray(real, np.float64)
    return float(inside(real, generated, radii(generated)))


@lru_cache(maxsize=8)
def _reference(resolution: int, split: str = "heldout") -> Tuple[np.ndarray, np.ndarray]:
    images, labels = load_split(split, resolution=resolution, channels=1)
    return DigitClassifierFeatures()(images), labels.numpy()


def reference_features(resolution: int = TEACHER_RESOLUTION) -> np.ndarray:
    """Classifier features of the real held-out split prepared at ``resolution`` (the FD reference)."""
    return _reference(int(resolution))[0]


def evaluate(
    images: torch.Tensor,
    requested_digits: Union[Sequence[int], torch.Tensor],
    value_range: str = "auto",
    classifier: Optional[DigitClassifier] = None,
) -> Dict[str, object]:
    """Metrics of generated digit images against the real held-out split (see the module docstring).

    Args:
        images: ``[N, C, H, W]``, in [-1, 1] or [0, 1] (``value_range``), H = W a multiple of 8. Use the standard
            :func:`evaluation_prompts` (100 per digit) so that FD values are comparable.
        requested_digits: the digit each image's prompt asked for, ``[N]``.

    Returns:
        ``{"fd", "prompt_accuracy", "coverage", "per_class", "recall", "n", "resolution"}``.
        ``per_class`` = ``{"accuracy": [10 floats, NaN where no image asked for that digit], "share": [10 floats]}``.
    """
    requested = np.asarray(torch.as_tensor(requested_digits).cpu(), dtype=np.int64).reshape(-1)
    if len(requested) != len(images):
        raise ValueError(f"got {len(images)} images but {len(requested)} requested digits.")
    resolution = int(images.shape[-1])
    if value_range == "auto":
        value_range = "0,1" if images.numel() and images.min() >= 0 else "-1,1"
    if value_range == "0,1":
        images = images.detach().float() * 2.0 - 1.0
    elif value_range != "-1,1":
        raise ValueError(f"value_range must be '-1,1', '0,1' or 'auto', got {value_range!r}.")
    extractor = DigitClassifierFeatures(classifier)
    features, preds = extractor.features_and_predictions(images)
    real = (
        reference_features(resolution)
        if classifier is None
        else extractor(load_split("heldout", resolution=resolution, channels=1)[0])
    )
    correct = preds == requested
    share = np.bincount(preds, minlength=10) / max(len(preds), 1)
    accuracy = [float(correct[requested == d].mean()) if (requested == d).any() else float("nan") for d in range(10)]
    return {
        "fd": fd(features, real),
        "prompt_accuracy": float(correct.mean()),
        "coverage": float((share >= 0.5 / 10).mean()),
        "per_class": {"accuracy": accuracy, "share": [float(s) for s in share]},
        "recall": knn_recall(features, real),
        "n": int(len(preds)),
        "resolution": resolution,
    }


def reference_fd(resolution: int = TEACHER_RESOLUTION, per_digit: int = EVAL_PER_DIGIT, seeds: Sequence[int] = (0,)):
    """Real-vs-real calibration: :func:`evaluate` on ``per_digit`` real *train* images per digit (drawn with each seed).

    This is what a generator reproducing the training data exactly would score, at the standard sample size.
    Returns the mean of each scalar metric over ``seeds`` plus ``"fd_all"`` (one FD per seed).
    """
    images, labels = load_split("train", resolution=resolution, channels=1)
    runs = []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        idx = np.concatenate(
            [rng.choice(np.flatnonzero(labels.numpy() == d), per_digit, replace=False) for d in range(10)]
        )
        runs.append(evaluate(images[idx], labels[idx], value_range="-1,1"))
    out = {k: float(np.mean([r[k] for r in runs])) for k in ("fd", "prompt_accuracy", "coverage", "recall")}
    out["fd_all"] = [r["fd"] for r in runs]
    return out


# ------------------------------------------------------------------------------------------------------------------
# generation and pictures
# ------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def generate_with_pipeline(
    pipe,
    prompts: Sequence[str],
    num_inference_steps: int = 50,
    guidance_scale: float = 1.0,
    seed: int = 0,
    batch_size: int = 500,
    resolution: Optional[int] = None,
    **kwargs,
) -> torch.Tensor:
    """Images ``[N, 3, R, R]`` in [-1, 1] from a PixArt-α pipeline (the teacher), in batches, seeded per batch."""
    resolution = resolution or int(pipe.transformer.config.sample_size) * pipe.vae_scale_factor
    out = []
    for i in range(0, len(prompts), batch_size):
        generator = torch.Generator().manual_seed(seed + i)
        images = pipe(
            list(prompts[i : i + batch_size]),
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=generator,
            height=resolution,
            width=resolution,
            use_resolution_binning=False,
            clean_caption=False,
            output_type="pt",
            **kwargs,
        ).images
        out.append(images.float().cpu() * 2.0 - 1.0)
    return torch.cat(out)


def save_grid(images: torch.Tensor, path: str, nrow: int, scale: int = 4, value_range: str = "auto") -> str:
    """Save ``[N, C, H, W]`` images as a PNG grid (row-major, ``nrow`` images per row, 1-px gaps), upscaled ``scale``×."""
    from PIL import Image

    x = images.detach().float().cpu()
    if value_range == "auto":
        value_range = "0,1" if x.min() >= 0 else "-1,1"
    if value_range == "-1,1":
        x = (x + 1) / 2
    x = x.clamp(0, 1)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    n, _, h, w = x.shape
    rows = (n + nrow - 1) // nrow
    canvas = torch.full((3, rows * (h + 1) + 1, nrow * (w + 1) + 1), 0.5)
    for i in range(n):
        r, c = divmod(i, nrow)
        canvas[:, 1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + c * (w + 1) : 1 + c * (w + 1) + w] = x[i]
    array = (canvas.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    image = Image.fromarray(array).resize((array.shape[1] * scale, array.shape[0] * scale), Image.NEAREST)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    image.save(path)
    return path
