"""Evaluation of one-step students: FID / KID against a reference image set, CLIP score, speed and memory.

The library behind ``diffusers-onestep evaluate`` and ``--eval_steps`` of the training script.

**Feature extractors** (:class:`FeatureExtractor`) turn images into feature rows. Two ship:

* ``inception`` (:class:`CleanFIDInception`): clean-fid's protocol (Parmar et al. 2022, "On Aliased Resizing and
  Surprising Subtleties in GAN Evaluation", arXiv 2104.11222). Its weights are the TorchScript Inception-V3 that
  clean-fid and StyleGAN2-ADA use (``inception-2015-12-05.pt``, the 2015 TensorFlow FID network converted), loaded with
  ``torch.jit.load`` from a cache path, downloaded from :data:`INCEPTION_URL` when missing, as clean-fid does. Every
  image is read as uint8 RGB, resized to 299x299 with PIL bicubic on each channel as a float32 image (clean-fid's
  ``"clean"`` mode: no quantization after the resize, values clipped to [0, 255]), normalised ``(x - 128) / 128`` and
  passed through the network's ``layers`` (the 2048-d pool features).
* ``digits`` (:class:`diffusers_onestep.demo.digits.DigitClassifierFeatures`): the bundled digits classifier's 64-d
  penultimate layer, the feature space of the digits benchmark.

**Metrics.** :func:`frechet_distance` (FID when the features are Inception's; Heusel et al. 2017, eq. 6),
:func:`kernel_distance` (KID, Bińkowski et al. 2018: the unbiased MMD² with the cubic polynomial kernel, averaged over
random subsets as clean-fid does) and :class:`CLIPScorer` (CLIPScore of Hessel et al. 2021 as torchmetrics computes
it: ``max(100 cos(E_image, E_text), 0)``, averaged over images).

**Generation** (:func:`generate_images`) writes one PNG per image as it goes, image ``i`` from its own generator
seeded ``seed + i`` (so an image does not depend on the batch size), and re-uses what an earlier, killed run of the
same settings wrote (``generation.json`` records the settings; other settings are refused).
"""

from __future__ import annotations

import importlib
import json
import os
import time
import urllib.request
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .hub import METRICS_NAME, protocol_text, read_metrics  # noqa: F401 (part of this module's API)


#: where clean-fid downloads its Inception-V3 TorchScript weights from (``cleanfid/downloads_helper.py``)
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
INCEPTION_FILE = "inception-2015-12-05.pt"
#: clean-fid's input size of the Inception network
INCEPTION_SIZE = 299
#: clean-fid's KID settings (``kernel_distance``)
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
#: the CLIP model torchmetrics' CLIPScore defaults to
DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"
#: the files of an evaluation folder
GENERATION_NAME = "generation.json"
IMAGES_DIR = "images"
GRID_NAME = "grid.png"


class EvaluationError(ValueError):
    """An evaluation input is unusable; the message is one sentence that says how to fix it."""


# ------------------------------------------------------------------------------------------------------------------
# metrics on feature sets
# ------------------------------------------------------------------------------------------------------------------


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    vals, vecs = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ``[N, D]`` (Heusel et al. 2017, eq. 6).

    ``|mu_a - mu_b|^2 + tr(C_a) + tr(C_b) - 2 tr((C_a^1/2 C_b C_a^1/2)^1/2)``, in float64, with the unbiased
    covariances (``np.cov``) as clean-fid. The last trace equals ``tr((C_a C_b)^1/2)`` (clean-fid's ``sqrtm``) but is
    computed from symmetric PSD matrices only, so it needs no complex ``sqrtm``, and eigenvalues that round-off makes
    slightly negative are clipped to 0.
    """
    a = np.asarray(features_a, dtype=np.float64)
    b = np.asarray(features_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets must be [N, D] with equal D, got {a.shape} and {b.shape}.")
    if len(a) < 2 or len(b) < 2:
        raise ValueError("each feature set needs at least 2 rows.")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root_a = _sqrt_psd(cov_a)
    middle = root_a @ cov_b @ root_a
    cross = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    value = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2.0 * cross)
    return max(value, 0.0)


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """KID's kernel ``k(x, y) = (x.y / d + 1)^3`` (Bińkowski et al. 2018, sec. 3), ``d`` the feature dimension."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """The unbiased estimator of MMD² (Gretton et al. 2012, eq. 3) with :func:`polynomial_kernel`, for equal sizes
    ``m``: ``sum_{i!=j} k(x_i,x_j)/(m(m-1)) + sum_{i!=j} k(y_i,y_j)/(m(m-1)) - 2 sum_{i,j} k(x_i,y_j)/m^2``."""
    m = len(x)
    k_xx, k_yy, k_xy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2.0 * k_xy.sum() / m**2)


def kernel_distance(
    features_a: np.ndarray,
    features_b: np.ndarray,
    num_subsets: int = KID_SUBSETS,
    max_subset_size: int = KID_SUBSET_SIZE,
    seed: int = 0,
) -> float:
    """KID: :func:`mmd2_unbiased` averaged over ``num_subsets`` random subsets of ``m = min(N_a, N_b,
    max_subset_size)`` rows of each set, drawn without replacement (clean-fid's ``kernel_distance``; its subsets come
    from NumPy's global generator, these from ``numpy.random.default_rng(seed)``)."""
    a = np.asarray(features_a, dtype=np.float64)
    b = np.asarray(features_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets must be [N, D] with equal D, got {a.shape} and {b.shape}.")
    m = min(len(a), len(b), max_subset_size)
    if m < 2:
        raise ValueError("each feature set needs at least 2 rows.")
    rng = np.random.default_rng(seed)
    total = 0.0
    for _ in range(num_subsets):
        x = b[rng.choice(len(b), m, replace=False)]
        y = a[rng.choice(len(a), m, replace=False)]
        total += mmd2_unbiased(x, y)
    return total / num_subsets


# ------------------------------------------------------------------------------------------------------------------
# feature extractors
# ------------------------------------------------------------------------------------------------------------------


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``[N, 3, H, W]`` images in [-1, 1] as ``[N, H, W, 3]`` uint8, as a PNG of them holds them."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1.0) * 127.5).round()
    return x.permute(0, 2, 3, 1).to(torch.uint8).numpy()


class FeatureExtractor:
    """Images to feature rows. Subclasses set :attr:`name`, :attr:`metric` (the name of the Fréchet distance in
    this feature space: ``fid`` for Inception) and implement :meth:`prepare` (one uint8 ``[H, W, 3]`` image to the
    network's input, ``[C, h, w]``) and :meth:`features` (a batch of prepared images to ``[N, D]`` float64)."""

    name: str = ""
    metric: str = "fd"
    batch_size: int = 64

    def prepare(self, image: np.ndarray) -> torch.Tensor:
        raise NotImplementedError

    def features(self, batch: torch.Tensor) -> np.ndarray:
        raise NotImplementedError

    def protocol(self) -> Dict[str, Any]:
        """What the features are, stated in ``metrics.json`` and the model card."""
        return {"name": self.name}

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        """Features of ``[N, 3, H, W]`` images in [-1, 1] (quantized to uint8 first, as image files hold them)."""
        return self.features_of_arrays(to_uint8(images))

    def features_of_arrays(self, arrays: Iterable[np.ndarray], progress: Optional[Callable] = None) -> np.ndarray:
        """Features of uint8 ``[H, W, 3]`` images (of any sizes), prepared one by one and run in batches."""
        rows, batch = [], []
        for array in arrays:
            batch.append(self.prepare(array))
            if len(batch) == self.batch_size:
                rows.append(self.features(torch.stack(batch)))
                if progress is not None:
                    progress(len(batch))
                batch = []
        if batch:
            rows.append(self.features(torch.stack(batch)))
            if progress is not None:
                progress(len(batch))
        if not rows:
            raise EvaluationError("There are no images to compute features of.")
        return np.concatenate(rows).astype(np.float64)


def clean_resize(image: np.ndarray, size: int = INCEPTION_SIZE) -> np.ndarray:
    """clean-fid's ``"clean"`` resize of a uint8 ``[H, W, 3]`` image to ``[size, size, 3]`` float32: each channel as a
    PIL float image (mode ``F``), bicubic, clipped to [0, 255], not quantized (``cleanfid/resize.py``)."""
    from PIL import Image

    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an [H, W, 3] image, got shape {image.shape}.")
    channels = []
    for c in range(3):
        channel = Image.fromarray(image[:, :, c].astype(np.float32), mode="F")
        channel = channel.resize((size, size), resample=Image.BICUBIC)
        channels.append(np.asarray(channel).clip(0, 255).reshape(size, size, 1))
    return np.concatenate(channels, axis=2).astype(np.float32)


def inception_cache_dir() -> str:
    """Where the Inception weights are looked for and downloaded: ``$DIFFUSERS_ONESTEP_CACHE`` or
    ``~/.cache/diffusers-onestep`` (``$XDG_CACHE_HOME`` honoured)."""
    if os.environ.get("DIFFUSERS_ONESTEP_CACHE"):
        return os.environ["DIFFUSERS_ONESTEP_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "diffusers-onestep")


def inception_path(path: Optional[str] = None, download: bool = True) -> str:
    """The local file of clean-fid's Inception weights: ``path`` (a file, or a folder holding
    ``inception-2015-12-05.pt``), else the cache (:func:`inception_cache_dir`); a missing file in the cache is
    downloaded from :data:`INCEPTION_URL` unless ``download`` is false or ``HF_HUB_OFFLINE`` is set."""
    if path is not None:
        file = os.path.join(path, INCEPTION_FILE) if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise EvaluationError(f"The Inception weights {file} do not exist; pass clean-fid's {INCEPTION_FILE}.")
        return file
    folder = inception_cache_dir()
    file = os.path.join(folder, INCEPTION_FILE)
    if os.path.isfile(file):
        return file
    from .hub import offline_mode

    if not download or offline_mode():
        raise EvaluationError(
            f"clean-fid's Inception weights are not at {file} and offline mode is set (HF_HUB_OFFLINE), so they "
            f"cannot be downloaded; put {INCEPTION_URL} there or pass --inception_path."
        )
    os.makedirs(folder, exist_ok=True)
    partial = file + ".partial"
    with urllib.request.urlopen(INCEPTION_URL) as response, open(partial, "wb") as f:
        f.write(response.read())
    os.replace(partial, file)
    return file


class CleanFIDInception(FeatureExtractor):
    """clean-fid's Inception-V3 features (see the module docstring); ``path`` as :func:`inception_path`."""

    name = "inception"
    metric = "fid"

    def __init__(self, path: Optional[str] = None, device: Any = "cpu", batch_size: int = 32):
        self.path = inception_path(path)
        self.device = torch.device(device)
        self.batch_size = batch_size
        try:
            # clean-fid's InceptionV3W: the TorchScript module, whose ``layers`` map a normalised 299x299 batch to the
            # pool features
            self.network = torch.jit.load(self.path, map_location=self.device).eval()
            self.layers = self.network.layers
        except (RuntimeError, AttributeError) as error:
            raise EvaluationError(
                f"{self.path} is not clean-fid's TorchScript Inception network ({type(error).__name__}); delete it "
                "so it is downloaded again."
            ) from None

    def prepare(self, image: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(clean_resize(image).transpose(2, 0, 1).copy())

    @torch.no_grad()
    def features(self, batch: torch.Tensor) -> np.ndarray:
        x = (batch.to(self.device, torch.float32) - 128.0) / 128.0
        return self.layers.forward(x).reshape(len(batch), -1).double().cpu().numpy()

    def protocol(self) -> Dict[str, Any]:
        return {
            "name": self.name,
            "weights": f"clean-fid's TorchScript Inception-V3 ({INCEPTION_FILE}, {INCEPTION_URL})",
            "resize": f"clean-fid 'clean': uint8 RGB -> PIL bicubic per channel in float32 to {INCEPTION_SIZE}x"
            f"{INCEPTION_SIZE}, clipped to [0, 255], not quantized",
            "normalisation": "(x - 128) / 128",
        }


#: feature extractors besides clean-fid's Inception, by name: ``module:class`` of a :class:`FeatureExtractor` built
#: without arguments (named, not imported: the digits demo's module imports this one for its Fréchet distance)
OTHER_FEATURE_EXTRACTORS = {"digits": "diffusers_onestep.demo.digits:DigitClassifierFeatures"}
FEATURE_EXTRACTORS = ("inception", *OTHER_FEATURE_EXTRACTORS)


def feature_extractor(name: str, device: Any = "cpu", inception_path: Optional[str] = None) -> FeatureExtractor:
    """The feature extractor named ``name``: ``inception`` (clean-fid) or ``digits`` (the bundled classifier)."""
    if name == "inception":
        return CleanFIDInception(inception_path, device=device)
    if name in OTHER_FEATURE_EXTRACTORS:
        module_name, class_name = OTHER_FEATURE_EXTRACTORS[name].split(":")
        return getattr(importlib.import_module(module_name), class_name)()
    raise EvaluationError(f"Unknown feature extractor {name!r}; use one of {', '.join(FEATURE_EXTRACTORS)}.")


# ------------------------------------------------------------------------------------------------------------------
# CLIP score
# ------------------------------------------------------------------------------------------------------------------


class CLIPScorer:
    """CLIPScore (Hessel et al. 2021) as torchmetrics' ``CLIPScore``: ``max(100 cos(E_image, E_text), 0)`` per image,
    with a CLIP model loaded through transformers (``CLIPModel``, its tokenizer and ``CLIPImageProcessor``) from a Hub
    id or a folder; prompts longer than the text encoder's length are truncated."""

    def __init__(self, model: str = DEFAULT_CLIP_MODEL, device: Any = "cpu", cache_dir: Optional[str] = None):
        from transformers import AutoTokenizer, CLIPModel

        try:  # transformers 5: the PIL/NumPy processor, the same computation without torchvision
            from transformers import CLIPImageProcessorPil as CLIPImageProcessor
        except ImportError:  # transformers 4
            from transformers import CLIPImageProcessor

        self.model_name = model
        self.device = torch.device(device)
        try:
            self.model = CLIPModel.from_pretrained(model, cache_dir=cache_dir).to(self.device).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(model, cache_dir=cache_dir)
            self.image_processor = CLIPImageProcessor.from_pretrained(model, cache_dir=cache_dir)
        except (OSError, ValueError) as error:
            from .errors import reason_of

            raise EvaluationError(f"The CLIP model {model!r} could not be loaded ({reason_of(error)}).") from None

    @torch.no_grad()
    def __call__(self, images: Sequence[np.ndarray], prompts: Sequence[str]) -> np.ndarray:
        """Per-image scores of uint8 ``[H, W, 3]`` images against their prompts."""
        pixels = self.image_processor(images=list(images), return_tensors="pt")["pixel_values"].to(self.device)
        text = self.tokenizer(
            list(prompts),
            padding=True,
            truncation=True,
            max_length=self.model.config.text_config.max_position_embeddings,
            return_tensors="pt",
        ).to(self.device)
        image_embeds = self.model.get_image_features(pixel_values=pixels)
        text_embeds = self.model.get_text_features(**text)
        image_embeds = getattr(image_embeds, "pooler_output", image_embeds)
        text_embeds = getattr(text_embeds, "pooler_output", text_embeds)
        image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
        text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
        return (100.0 * (image_embeds * text_embeds).sum(-1)).clamp(min=0).double().cpu().numpy()

    def protocol(self) -> Dict[str, Any]:
        return {"model": self.model_name, "score": "mean over images of max(100 cos(image, text), 0) (torchmetrics)"}


# ------------------------------------------------------------------------------------------------------------------
# captions and reference images
# ------------------------------------------------------------------------------------------------------------------


def load_captions(source: str, column: str = "text", num: Optional[int] = None, cache_dir=None) -> List[str]:
    """The first ``num`` non-empty captions of a ``datasets`` source (a Hub dataset id such as a COCO captions set, a
    local folder or a .txt / .jsonl / .json / .csv / .parquet file), in order."""
    from .distill.data import DataError, load_prompts

    try:
        captions = load_prompts(source, column, cache_dir=cache_dir)
    except DataError as error:
        raise EvaluationError(str(error).replace("--prompt_column", "--caption_column")) from None
    if num is not None:
        if len(captions) < num:
            raise EvaluationError(
                f"The caption source {source} holds {len(captions)} captions, fewer than --num_images {num}; lower "
                "--num_images or give more captions."
            )
        captions = captions[:num]
    return captions


def reference_arrays(
    source: str, column: str = "image", num: Optional[int] = None, cache_dir=None
) -> Iterator[np.ndarray]:
    """The first ``num`` images of a ``datasets`` source (an image folder or a Hub dataset) as uint8 RGB arrays at
    their own size (clean-fid resizes each image itself)."""
    from .distill.data import DataError, open_real_images

    try:
        dataset = open_real_images(source, column, cache_dir=cache_dir)
    except DataError as error:
        raise EvaluationError(str(error).replace("--image_column", "--reference_column")) from None
    count = len(dataset) if num is None else min(num, len(dataset))
    for index in range(count):
        yield np.asarray(dataset[index][column].convert("RGB"), dtype=np.uint8)


def count_reference_images(source: str, column: str = "image", cache_dir=None) -> int:
    from .distill.data import DataError, open_real_images

    try:
        return len(open_real_images(source, column, cache_dir=cache_dir))
    except DataError as error:
        raise EvaluationError(str(error).replace("--image_column", "--reference_column")) from None


# ------------------------------------------------------------------------------------------------------------------
# resumable generation
# ------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationSettings:
    """What decides the generated images; an evaluation folder holds images of one setting only."""

    model: str
    prompts: str
    caption_column: str
    num_images: int
    height: Optional[int]
    width: Optional[int]
    steps: Optional[int]
    guidance: Optional[float]
    seed: int

    def differences(self, saved: Dict[str, Any]) -> List[str]:
        mine = asdict(self)
        return [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in mine.items() if saved.get(k) != v]


def image_path(folder: str, index: int) -> str:
    return os.path.join(folder, IMAGES_DIR, f"{index:06d}.png")


def check_generation_folder(folder: str, settings: GenerationSettings) -> int:
    """How many of the images are already in ``folder`` (the first missing index), after checking that they were
    generated with ``settings``; refuses a folder of other settings. Runs before any model loads."""
    record = os.path.join(folder, GENERATION_NAME)
    if not os.path.isfile(record):
        return 0
    try:
        with open(record, encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, ValueError):
        raise EvaluationError(f"{record} is not valid JSON; delete it, or pass another --output_dir.") from None
    differences = settings.differences(saved)
    if differences:
        raise EvaluationError(
            f"--output_dir {folder} holds images generated with other settings ({'; '.join(differences)}); resume "
            "with the same settings, or pass another --output_dir."
        )
    done = 0
    while done < settings.num_images and os.path.isfile(image_path(folder, done)):
        done += 1
    return done


def save_png_atomically(image, path: str) -> None:
    """A PNG written under a temporary name and renamed: a killed run leaves whole images only."""
    partial = path + ".partial"
    image.save(partial, format="PNG")
    os.replace(partial, path)


@dataclass
class GenerationStats:
    generated: int
    reused: int
    seconds: float
    peak_memory_bytes: Optional[int]
    peak_memory_kind: str

    @property
    def images_per_s(self) -> Optional[float]:
        return self.generated / self.seconds if self.generated and self.seconds > 0 else None


def peak_memory(device: torch.device) -> Tuple[int, str]:
    """``(bytes, kind)``: the accelerator's peak allocated memory, or the process's peak resident memory on a CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "peak CUDA memory allocated by torch"
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024), "peak resident memory of the process (CPU)"


def generate_images(
    pipe,
    prompts: Sequence[str],
    folder: str,
    settings: GenerationSettings,
    batch_size: int = 8,
    progress: bool = True,
    on_image: Optional[Callable[[int], None]] = None,
) -> GenerationStats:
    """Generate ``prompts[i]`` into ``folder/images/<i>.png`` with a generator seeded ``settings.seed + i``, skipping
    the images an earlier run of the same ``settings`` wrote (:func:`check_generation_folder`). ``on_image(i)`` is
    called after each image is saved."""
    from tqdm.auto import tqdm

    start = check_generation_folder(folder, settings)
    os.makedirs(os.path.join(folder, IMAGES_DIR), exist_ok=True)
    from .storage import write_json

    write_json(os.path.join(folder, GENERATION_NAME), asdict(settings))
    device = pipe.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    kwargs: Dict[str, Any] = {"num_inference_steps": settings.steps, "height": settings.height}
    kwargs["width"] = settings.width
    if settings.guidance is not None:
        kwargs["guidance_scale"] = settings.guidance
    bar = tqdm(total=settings.num_images, initial=start, desc="Generating", unit="image", disable=not progress)
    seconds = 0.0
    try:
        for first in range(start, settings.num_images, batch_size):
            indices = list(range(first, min(first + batch_size, settings.num_images)))
            began = time.perf_counter()
            images = pipe(
                [prompts[i] for i in indices],
                generator=[torch.Generator().manual_seed(settings.seed + i) for i in indices],
                **kwargs,
            ).images
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds += time.perf_counter() - began
            for index, image in zip(indices, images):
                save_png_atomically(image, image_path(folder, index))
                bar.update(1)
                if on_image is not None:
                    on_image(index)
    finally:
        bar.close()
    memory, kind = peak_memory(device)
    return GenerationStats(settings.num_images - start, start, seconds, memory, kind)


def generated_arrays(folder: str, num: int) -> Iterator[np.ndarray]:
    from PIL import Image

    for index in range(num):
        with Image.open(image_path(folder, index)) as image:
            yield np.asarray(image.convert("RGB"), dtype=np.uint8)


def save_grid(arrays: Sequence[np.ndarray], path: str, columns: int = 4) -> str:
    """A PNG grid of equally sized uint8 images, row-major."""
    from PIL import Image

    arrays = list(arrays)
    h, w = arrays[0].shape[:2]
    rows = (len(arrays) + columns - 1) // columns
    grid = Image.new("RGB", (columns * w, rows * h))
    for index, array in enumerate(arrays):
        grid.paste(Image.fromarray(array), ((index % columns) * w, (index // columns) * h))
    grid.save(path)
    return path


# ------------------------------------------------------------------------------------------------------------------
# the whole evaluation
# ------------------------------------------------------------------------------------------------------------------


def feature_metrics(
    extractor: FeatureExtractor, generated: np.ndarray, reference: np.ndarray, kid_seed: int = 0
) -> Dict[str, float]:
    """``{<metric>: Fréchet distance, <k-metric>: KID}`` of two feature sets in ``extractor``'s space (``fid``/``kid``
    for Inception, ``fd_digits``/``kd_digits`` for the digits classifier)."""
    fd_name = extractor.metric
    kd_name = "kid" if fd_name == "fid" else fd_name.replace("fd", "kd", 1)
    return {
        fd_name: frechet_distance(generated, reference),
        kd_name: kernel_distance(generated, reference, seed=kid_seed),
    }


def evaluate_folder(
    folder: str,
    prompts: Sequence[str],
    extractor: FeatureExtractor,
    reference: np.ndarray,
    clip: Optional[CLIPScorer] = None,
    progress: bool = True,
    batch_size: int = 32,
) -> Dict[str, float]:
    """Metrics of the ``len(prompts)`` images in ``folder/images`` against ``reference`` features."""
    from tqdm.auto import tqdm

    num = len(prompts)
    with tqdm(total=num, desc="Features (generated)", unit="image", disable=not progress) as bar:
        generated = extractor.features_of_arrays(generated_arrays(folder, num), progress=bar.update)
    metrics = feature_metrics(extractor, generated, reference)
    if clip is not None:
        scores = []
        arrays = generated_arrays(folder, num)
        with tqdm(total=num, desc="CLIP score", unit="image", disable=not progress) as bar:
            for first in range(0, num, batch_size):
                batch = [next(arrays) for _ in range(min(batch_size, num - first))]
                scores.append(clip(batch, prompts[first : first + len(batch)]))
                bar.update(len(batch))
        metrics["clip_score"] = float(np.concatenate(scores).mean())
    return metrics


def reference_features(
    extractor: FeatureExtractor, source: str, column: str = "image", num: Optional[int] = None, progress=True
) -> np.ndarray:
    from tqdm.auto import tqdm

    total = count_reference_images(source, column)
    total = total if num is None else min(num, total)
    with tqdm(total=total, desc="Features (reference)", unit="image", disable=not progress) as bar:
        return extractor.features_of_arrays(reference_arrays(source, column, num), progress=bar.update)
