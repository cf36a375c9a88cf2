"""Training data: prompts (and, for GANs/discriminators, real images), plus a text-embedding cache.

Prompt sources: a ``.txt`` file (one prompt a line), a ``.jsonl`` file, a local file or folder that ``datasets``
reads (``.json``, ``.csv``, ``.parquet``, ``imagefolder`` with ``metadata.jsonl``), or a Hub dataset name. Real
images come from a ``datasets`` image dataset (a local ``imagefolder``, webdataset ``.tar`` shards or a Hub name),
read lazily: only the rows of the current batches are decoded, by ``DataLoader`` workers, or -- with
``--streaming`` -- from a stream in order. Optional caches (VAE latents, text embeddings) are built once with
``datasets.map`` into Arrow files in the frozen networks' dtype, shared by every process and reused by later runs
whose inputs have the same fingerprint.

Batches are a pure function of ``(seed, step)``: the order of each epoch is a seeded permutation, so resuming at
step ``k`` continues the exact data order without saving sampler state, and a global batch is split across
processes by rank.
"""

from __future__ import annotations

import collections
import contextlib
import glob
import hashlib
import io
import itertools
import json
import math
import os
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..errors import reason_of
from ..families import Condition, FamilyAdapter
from .models import Batch, RandomSource


class DataError(ValueError):
    """A data source is missing, empty or lacks a column; the message says which and how to fix it."""


def _tar_shards(source: str) -> Optional[List[str]]:
    """The webdataset shards of ``source``: a ``.tar`` file, or a folder holding only ``.tar`` files (sorted)."""
    if os.path.isfile(source) and source.lower().endswith(".tar"):
        return [source]
    if os.path.isdir(source):
        files = sorted(f for f in os.listdir(source) if not f.startswith("."))
        if files and all(f.lower().endswith(".tar") for f in files):
            return [os.path.join(source, f) for f in files]
    return None


#: map-style datasets opened in this process, by source, split, cache folder and the source's size and mtime: the
#: checks before loading and the trainer open the same dataset once
_OPENED: dict = {}


def _load_dataset(source: str, split: str = "train", cache_dir: Optional[str] = None, streaming: bool = False):
    if streaming or not os.path.exists(source):
        return _open_dataset(source, split, cache_dir, streaming)
    stat = os.stat(source)
    key = (os.path.abspath(source), split, cache_dir, stat.st_mtime_ns, stat.st_size)
    if key not in _OPENED:
        _OPENED.clear()  # one at a time: a dataset object is small, but there is no reason to keep old ones
        _OPENED[key] = _open_dataset(source, split, cache_dir, streaming)
    return _OPENED[key]


def _open_dataset(source: str, split: str, cache_dir: Optional[str], streaming: bool):
    import datasets

    shards = _tar_shards(source)
    if shards is not None:
        # webdataset shards, read by datasets' webdataset builder (the standard library's tarfile underneath)
        return _read_local(
            source,
            lambda: datasets.load_dataset(
                "webdataset", data_files={split: shards}, split=split, cache_dir=cache_dir, streaming=streaming
            ),
        )
    if os.path.isdir(source):
        files = [f for f in os.listdir(source) if not f.startswith(".")]
        if not files:
            raise DataError(f"The folder {source} is empty.")
        if (
            any(f.lower().endswith((".png", ".jpg", ".jpeg", ".webp", ".bmp")) for f in files)
            or "metadata.jsonl" in files
        ):
            if any(os.path.isdir(os.path.join(source, f)) for f in files):  # split or label folders
                where = {"data_dir": source}
            else:
                # a flat folder: one pattern, where data_dir makes datasets glob it with each of its ~60 split
                # patterns (a stat of every file each time: 15 s for 2,000 images here, 1 s this way)
                where = {"data_files": {split: os.path.join(glob.escape(source), "*")}}
            return _read_local(
                source,
                lambda: datasets.load_dataset(
                    "imagefolder", split=split, cache_dir=cache_dir, streaming=streaming, **where
                ),
            )
        return _read_local(
            source, lambda: datasets.load_dataset(source, split=split, cache_dir=cache_dir, streaming=streaming)
        )
    if os.path.isfile(source):
        extension = source.rsplit(".", 1)[-1].lower()
        builder = {"jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet", "txt": "text"}.get(extension)
        if builder is None:
            raise DataError(
                f"{source} is not a supported data file; use .txt, .jsonl, .json, .csv, .parquet or .tar shards."
            )
        return _read_local(
            source,
            lambda: datasets.load_dataset(
                builder, data_files=source, split=split, cache_dir=cache_dir, streaming=streaming
            ),
        )
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(source)
    except HFValidationError:
        raise DataError(f"{source!r} is neither an existing file or folder nor a Hub dataset name.") from None
    try:
        return datasets.load_dataset(source, split=split, cache_dir=cache_dir, streaming=streaming)
    except Exception as error:  # datasets raises many types for a missing/unreachable dataset
        from ..hub import offline_cache_miss, offline_mode

        unreachable = isinstance(error, ConnectionError) or "OfflineModeIsEnabled" in str(error)
        if unreachable and (offline_mode() or datasets.config.HF_HUB_OFFLINE):
            raise DataError(f"The dataset {offline_cache_miss(source, 'datasets')}") from None
        raise DataError(f"Could not load the dataset {source!r} ({reason_of(error)}).") from None


def _read_local(source: str, load: Callable):
    """``load()`` of a local file or folder, with datasets' errors (no data files, a parse error) as one sentence."""
    try:
        return load()
    except DataError:
        raise
    except Exception as error:  # datasets raises many types (EmptyDatasetError, ArrowInvalid, DatasetGenerationError)
        detail = str(error.__cause__ or error).strip().splitlines()
        raise DataError(
            f"{source} could not be read as a dataset ({type(error).__name__}: {detail[0] if detail else ''})."
        ) from None


def _read_text_lines(path: str) -> List[str]:
    """The lines of a UTF-8 text file; any other encoding is one sentence naming the first bad byte."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise DataError(
            f"{path} is not UTF-8 text (byte 0x{data[error.start]:02x} on line {line}); save it as UTF-8."
        ) from None
    return text.splitlines()


def _prompt_text(value, where: str) -> str:
    """A prompt value as text: strings only, so that a null or a number is not trained on as "None" or "3"."""
    if not isinstance(value, str):
        shown = json.dumps(value) if isinstance(value, (int, float, bool, type(None), list, dict)) else repr(value)
        raise DataError(
            f"{where} holds {shown} where a prompt string was expected; write the prompt as text or drop it."
        )
    return value.strip()


DATA_EXTENSIONS = (".txt", ".jsonl", ".json", ".csv", ".parquet")


def check_prompt_source(source: str) -> None:
    """Cheap checks of a prompt source that need no model (run before anything is loaded)."""
    if not source:
        raise DataError("No prompt source given; pass --prompts FILE_OR_DATASET.")
    if os.path.exists(source):
        return
    if source.startswith((".", "/", "~")) or source.lower().endswith(DATA_EXTENSIONS):
        raise DataError(f"The prompt source {source} does not exist.")


def load_prompts(
    source: str, column: str = "text", cache_dir: Optional[str] = None, max_samples: Optional[int] = None
) -> List[str]:
    """All non-empty prompts of a source, in order (``cache_dir``: where ``datasets`` caches a dataset), or its first
    ``max_samples`` (``--max_train_samples``)."""
    check_prompt_source(source)
    if os.path.isfile(source) and source.lower().endswith(".txt"):
        prompts = [line.strip() for line in _read_text_lines(source)]
    elif os.path.isfile(source) and source.lower().endswith(".jsonl"):
        prompts = []
        for number, line in enumerate(_read_text_lines(source), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise DataError(f"{source} line {number} is not valid JSON.") from None
            if not isinstance(record, dict):
                raise DataError(f"{source} line {number} is not a JSON object with a {column!r} field.")
            if column not in record:
                raise DataError(
                    f"{source} line {number} has no {column!r} field (it has {', '.join(sorted(record))}); "
                    "pass --prompt_column."
                )
            prompts.append(_prompt_text(record[column], f"{source} line {number}"))
    else:
        dataset = _load_dataset(source, cache_dir=cache_dir)
        if column not in dataset.column_names:
            raise DataError(
                f"The dataset {source} has no column {column!r}; its columns are "
                f"{', '.join(dataset.column_names)}; pass --prompt_column."
            )
        prompts = [
            _prompt_text(p, f"Row {row} of column {column!r} of {source}") for row, p in enumerate(dataset[column])
        ]
    prompts = [p for p in prompts if p][:max_samples]
    if not prompts:
        raise DataError(f"The prompt source {source} holds no prompts.")
    return prompts


# ----------------------------------------------------------------------------------------------------------------
# real images: opening, checking, and fitting one image to a training size
# ----------------------------------------------------------------------------------------------------------------


def open_real_images(
    source: str,
    image_column: str = "image",
    caption_column: Optional[str] = None,
    cache_dir: Optional[str] = None,
    streaming: bool = False,
    max_samples: Optional[int] = None,
):
    """The ``datasets`` dataset of ``--real_images`` (an ``IterableDataset`` with ``streaming``), checked to hold the
    image (and caption) column and some rows, cut to its first ``max_samples`` rows; images are not decoded."""
    import datasets

    dataset = _load_dataset(source, cache_dir=cache_dir, streaming=streaming)
    columns = dataset.column_names
    if columns is not None and image_column not in columns:
        raise DataError(
            f"The image dataset {source} has no column {image_column!r}; its columns are "
            f"{', '.join(columns)}; pass --image_column."
        )
    if columns is not None and caption_column is not None and caption_column not in columns:
        raise DataError(
            f"The image dataset {source} has no caption column {caption_column!r}; its columns are "
            f"{', '.join(columns)}."
        )
    if isinstance(dataset, datasets.IterableDataset):
        return dataset.take(max_samples) if max_samples else dataset
    if len(dataset) == 0:
        raise DataError(f"The image dataset {source} holds no images.")
    if max_samples and max_samples < len(dataset):
        dataset = dataset.select(range(max_samples))
    return dataset


def check_real_images(
    source: str,
    image_column: str = "image",
    caption_column: Optional[str] = None,
    cache_dir: Optional[str] = None,
    max_samples: Optional[int] = None,
) -> int:
    """Check that every image of ``--real_images`` can be read, without decoding its pixels (PIL's ``verify``: the
    header and, for PNG, every chunk's checksum), so that a corrupt file is named before the teacher loads. Returns
    the number of images. (A streamed source is read only while training.)"""
    import datasets

    dataset = open_real_images(source, image_column, caption_column, cache_dir, max_samples=max_samples)
    if not isinstance(dataset.features.get(image_column), datasets.Image):
        raise DataError(f"The column {image_column!r} of {source} does not hold images; pass --image_column.")
    undecoded = dataset.select_columns([image_column]).cast_column(image_column, datasets.Image(decode=False))
    row = 0
    for batch in undecoded.iter(batch_size=64):  # a batch of file paths or bytes at a time, not the whole set
        for item in batch[image_column]:
            name = item.get("path") or f"row {row}"
            try:
                with _open_image(item) as image:
                    image.verify()
            except Exception as error:  # PIL raises UnidentifiedImageError, SyntaxError, OSError, ... for bad files
                raise DataError(f"The image {name} of {source} could not be read ({reason_of(error)}).") from None
            row += 1
    return len(dataset)


def _open_image(item):
    """A PIL image of an undecoded ``datasets.Image`` value (``{"bytes", "path"}``), not yet decoded."""
    from PIL import Image

    if isinstance(item, Image.Image):
        return item
    return Image.open(io.BytesIO(item["bytes"])) if item.get("bytes") else Image.open(item["path"])


def image_size_of(item) -> Tuple[int, int]:
    """``(height, width)`` of an undecoded image, from its header only."""
    with _open_image(item) as image:
        return image.height, image.width


def _row_generator(seed: int, index: int, epoch: int) -> torch.Generator:
    """The generator of one image's random crop, flip and VAE sample: a function of the run's seed, the row and the
    epoch only, so neither the batch size, the number of processes nor the worker count changes it."""
    # reduced to 63 bits: torch's manual_seed takes a signed 64-bit integer (seeds above ~8,600 would overflow it);
    # below that bound the reduction changes nothing
    return torch.Generator().manual_seed(((seed * 1_000_003 + epoch) * 2_147_483_647 + index) % 2**63)


def fit_image(
    image,
    height: int,
    width: int,
    center_crop: bool = True,
    random_flip: bool = False,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """A PIL image resized (bicubic) to cover ``height x width``, cropped to it (centered, or at an offset drawn
    from ``generator``) and, with ``random_flip``, mirrored with probability 1/2; as ``[3, H, W]`` in [-1, 1]
    (the diffusers text-to-image examples' ``--center_crop``/``--random_flip``)."""
    from PIL import Image

    image = image.convert("RGB")
    scale = max(height / image.height, width / image.width)
    image = image.resize(
        (max(width, round(image.width * scale)), max(height, round(image.height * scale))), Image.BICUBIC
    )
    spare_x, spare_y = image.width - width, image.height - height
    if center_crop:
        left, top = spare_x // 2, spare_y // 2
    else:
        left = int(torch.randint(0, spare_x + 1, (1,), generator=generator))
        top = int(torch.randint(0, spare_y + 1, (1,), generator=generator))
    image = image.crop((left, top, left + width, top + height))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
    if random_flip and float(torch.rand((), generator=generator)) < 0.5:
        pixels = pixels.flip(-1)
    return pixels


def resize_and_crop(image, resolution: int) -> torch.Tensor:
    """A PIL image resized (shorter side) and center-cropped to ``resolution``, as ``[3, H, W]`` in [-1, 1]."""
    return fit_image(image, resolution, resolution)


# ----------------------------------------------------------------------------------------------------------------
# the data order
# ----------------------------------------------------------------------------------------------------------------


def epoch_permutation(seed: int, epoch: int, size: int) -> torch.Tensor:
    return torch.randperm(size, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def batch_entries(seed: int, step: int, global_batch: int, size: int) -> List[Tuple[int, int]]:
    """``(index, epoch)`` of each sample of the global batch of ``step``: consecutive slices of seeded per-epoch
    permutations."""
    out: List[Tuple[int, int]] = []
    position = step * global_batch
    while len(out) < global_batch:
        epoch, offset = divmod(position, size)
        perm = epoch_permutation(seed, epoch, size)
        take = min(global_batch - len(out), size - offset)
        out += [(i, epoch) for i in perm[offset : offset + take].tolist()]
        position += take
    return out


def batch_indices(seed: int, step: int, global_batch: int, size: int) -> List[int]:
    """Indices of the global batch of ``step``: consecutive slices of seeded per-epoch permutations."""
    return [index for index, _ in batch_entries(seed, step, global_batch, size)]


def aspect_ratio_buckets(adapter: FamilyAdapter, resolution: int) -> List[Tuple[int, int]]:
    """The ``(height, width)`` buckets of multi-aspect-ratio training at ``resolution``: the family's own aspect-ratio
    table (:meth:`~..families.FamilyAdapter.resolution_bins`, PixArt's and SANA's) -- or, for a family whose
    pipeline has none (SDXL), PixArt's 1024 px table, whose sizes are SDXL's multi-aspect training buckets of about
    1024^2 pixels (Podell et al. 2023, arXiv 2307.01952, Sec. 2.3 and App. I) -- scaled from the table's square size
    to ``resolution`` and rounded to a multiple of the VAE factor times the patch size. Sorted, without repeats."""
    table = adapter.resolution_bins()
    if table is None:
        from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import ASPECT_RATIO_1024_BIN

        table = ASPECT_RATIO_1024_BIN
    square = float(table["1.0"][0])
    multiple = adapter.vae_scale_factor * adapter.patch_size
    buckets = set()
    for height, width in table.values():
        buckets.add(
            tuple(max(multiple, round(side * resolution / square / multiple) * multiple) for side in (height, width))
        )
    return sorted(buckets)


def nearest_bucket(buckets: Sequence[Tuple[int, int]], height: int, width: int) -> int:
    """The bucket whose aspect ratio is nearest the image's (``PixArtImageProcessor.classify_height_width_bin``)."""
    ratio = height / width
    return min(range(len(buckets)), key=lambda b: abs(buckets[b][0] / buckets[b][1] - ratio))


def bucket_batch_entries(
    seed: int, step: int, global_batch: int, members: Sequence[Sequence[int]]
) -> Tuple[int, List[Tuple[int, int]]]:
    """``(bucket, [(index, epoch), ...])`` of the global batch of ``step`` with aspect-ratio buckets (``members[b]``:
    the rows of bucket ``b``). Each epoch permutes every bucket's rows, cuts them into global batches (the last one
    filled up from the bucket's start, so every image is seen each epoch) and permutes the order of all batches: a
    pure function of the seed and the step, as :func:`batch_entries`."""
    chunks_per_bucket = [math.ceil(len(rows) / global_batch) for rows in members]
    total = sum(chunks_per_bucket)
    epoch, chunk = divmod(step, total)
    order = epoch_permutation(seed, epoch, total)[chunk].item()
    bucket = 0
    while order >= chunks_per_bucket[bucket]:
        order -= chunks_per_bucket[bucket]
        bucket += 1
    rows = members[bucket]
    perm = torch.randperm(
        len(rows), generator=torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 997 + bucket)
    )
    picks = [(order * global_batch + k) % len(rows) for k in range(global_batch)]
    return bucket, [(rows[perm[p].item()], epoch) for p in picks]


# ----------------------------------------------------------------------------------------------------------------
# on-disk caches: fingerprints and the stored dtype
# ----------------------------------------------------------------------------------------------------------------


def fingerprint(*parts) -> str:
    """A short hex digest of JSON-able ``parts``: the name of a cache that only the same inputs reuse."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]


def module_fingerprint(module) -> Optional[str]:
    """A digest of a frozen network's config and weights (name, shape, dtype and the first 64 values of every
    tensor): another checkpoint of the same architecture gives another digest, without hashing gigabytes."""
    if module is None:
        return None
    if not isinstance(module, torch.nn.Module):  # a tokenizer: its class, vocabulary and length limit
        vocabulary = module.get_vocab() if hasattr(module, "get_vocab") else None
        return fingerprint(type(module).__name__, getattr(module, "model_max_length", None), vocabulary)
    config = getattr(module, "config", None)
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode("utf-8"))
    for name, tensor in module.state_dict().items():
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        head = tensor.detach().flatten()[:64].to("cpu", torch.float32)
        digest.update(head.numpy().tobytes())
    return digest.hexdigest()[:20]


def source_fingerprint(dataset) -> Optional[List[str]]:
    """What identifies a map-style ``datasets`` dataset: its Arrow files (whose names carry ``datasets``' hash of
    the data files) and its length; ``None`` for an in-memory one."""
    files = [f["filename"] for f in getattr(dataset, "cache_files", None) or []]
    return files + [str(len(dataset))] if files else None


#: Arrow has no bfloat16: such tensors are stored as their 16 bits (int16) and viewed back
_ARROW_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "int16"}


def _to_stored(tensor: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    tensor = tensor.detach().to("cpu", dtype)
    return (tensor.view(torch.int16) if dtype == torch.bfloat16 else tensor).numpy()


#: the numpy dtype of each stored dtype (datasets' numpy format widens int16 and float16; the cast back is exact)
_NUMPY_DTYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.int16}


def _from_stored(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=_NUMPY_DTYPES[dtype]))
    return tensor.view(torch.bfloat16) if dtype == torch.bfloat16 else tensor


def _list_feature(value, length: int = -1):
    """A list column: ``datasets.List`` (datasets >= 4), ``datasets.Sequence`` before it (the oldest supported, 3.0)."""
    import datasets

    return getattr(datasets, "List", datasets.Sequence)(value, length=length)


def default_cache_root(cache_dir: Optional[str] = None) -> str:
    """Where the caches go without ``--data_cache_dir``: ``diffusers_onestep`` in ``datasets``' cache folder."""
    import datasets

    return os.path.join(cache_dir or str(datasets.config.HF_DATASETS_CACHE), "diffusers_onestep")


# ----------------------------------------------------------------------------------------------------------------
# text embeddings
# ----------------------------------------------------------------------------------------------------------------


class TextEmbeddingCache:
    """Encoded conditions of a fixed list of texts, computed once with ``datasets.map`` into an Arrow file of
    ``dtype`` (the frozen networks' precision) under ``cache_root``, named by a fingerprint of the texts, the text
    encoders and the settings: every process of the run -- and every later run with the same texts and teacher --
    reads the same file, memory-mapped, instead of holding its own float32 table in RAM.

    ``main_process_first``: the context under which the file is built (accelerate's, so one process encodes and the
    others then load its file). Conditions come back in float32, as the encoder gives them.
    """

    def __init__(
        self,
        adapter: FamilyAdapter,
        texts: Sequence[str],
        cache_root: str,
        dtype: torch.dtype = torch.float32,
        settings: Sequence = (),
        main_process_first: Callable = contextlib.nullcontext,
        device=None,
        batch_size: int = 64,
    ):
        import datasets

        unique = list(dict.fromkeys(texts))
        self._row = {text: i for i, text in enumerate(unique)}
        self.dtype = dtype
        probe = adapter.encode_prompt(unique[:1], device=device).state_dict()
        features = {"text": datasets.Value("string")}
        for name, tensor in probe.items():
            stored = _ARROW_DTYPES.get(tensor.dtype) and _ARROW_DTYPES[dtype]
            stored = stored or str(tensor.dtype).replace("torch.", "")
            shape = tuple(tensor.shape[1:])
            features[name] = (
                datasets.Array2D(shape, stored)
                if len(shape) == 2
                else _list_feature(datasets.Value(stored), length=shape[0])
            )
        self.columns = list(probe)
        self.float_columns = {k for k, v in probe.items() if v.is_floating_point()}
        encoders = {n: module_fingerprint(adapter.components.get(n)) for n in adapter.text_component_names}
        name = fingerprint("text", adapter.name, adapter.max_sequence_length, str(dtype), encoders, list(settings))
        content = fingerprint(unique)
        path = os.path.join(cache_root, f"text-embeddings-{name}-{content}.arrow")

        def encode(batch):
            condition = adapter.encode_prompt(batch["text"], device=device).state_dict()
            return {
                k: _to_stored(v, dtype) if v.is_floating_point() else v.cpu().numpy() for k, v in condition.items()
            }

        os.makedirs(cache_root, exist_ok=True)
        with main_process_first():
            table = datasets.Dataset.from_dict({"text": unique}).map(
                encode,
                batched=True,
                batch_size=batch_size,
                features=datasets.Features(features),
                cache_file_name=path,
                load_from_cache_file=True,
                # our own fingerprint: datasets would otherwise hash the function, with the text encoders it holds
                new_fingerprint=f"{name}-{content}",
                desc="Caching text embeddings",
            )
        self.path = path
        self.table = table.with_format("numpy", columns=self.columns)

    def __len__(self) -> int:
        return len(self._row)

    def get(self, texts: Sequence[str]) -> Condition:
        rows = self.table[[self._row[t] for t in texts]]
        tensors = {}
        for name in self.columns:
            if name in self.float_columns:
                tensors[name] = _from_stored(rows[name], self.dtype).float()
            else:
                tensors[name] = torch.from_numpy(np.ascontiguousarray(rows[name]))
        return Condition.from_state_dict(tensors)


class PromptSource:
    """Conditions for prompt indices (or texts): from the cache, or encoded on the fly when there is none."""

    def __init__(
        self,
        adapter: FamilyAdapter,
        prompts: Sequence[str],
        cache: Optional[TextEmbeddingCache] = None,
        device=None,
    ):
        self.adapter = adapter
        self.prompts = list(prompts)
        self.device = device
        self.cache = cache

    def __len__(self) -> int:
        return len(self.prompts)

    def conditions(self, indices: Sequence[int]) -> Condition:
        return self.conditions_of([self.prompts[i] for i in indices])

    def conditions_of(self, texts: Sequence[str]) -> Condition:
        if self.cache is not None:
            return self.cache.get(texts).to(self.device)
        return self.adapter.encode_prompt(list(texts), device=self.device)


# ----------------------------------------------------------------------------------------------------------------
# real images: lazy batches, the latent cache, streams
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class ImageSettings:
    """How real images become training pixels: the square ``resolution`` (or the ``buckets``), the crop and flip,
    and the seed of their random draws."""

    resolution: int
    center_crop: bool = True
    random_flip: bool = False
    seed: int = 0
    buckets: Optional[List[Tuple[int, int]]] = None

    def key(self) -> list:
        return [self.resolution, self.center_crop, self.random_flip, self.seed, self.buckets]


def _decoding_transform(image_column: str, source: str):
    """A ``with_transform`` function that opens the undecoded images of a batch of rows (PIL, lazily decoded), so
    that only the rows a batch reads are ever decoded, and a file that does not decode is one sentence."""

    def transform(batch):
        opened = []
        for item in batch[image_column]:
            try:
                image = _open_image(item)
                image.load()
            except Exception as error:  # a file that passed verify() but does not decode (truncated pixel data)
                name = (item.get("path") if isinstance(item, dict) else None) or "an image"
                raise DataError(f"The image {name} of {source} could not be decoded ({reason_of(error)}).") from None
            opened.append(image)
        return {**batch, image_column: opened}

    return transform


class RealImageRows:
    """The map-style real-image dataset, read row by row: images stay files (or Arrow bytes) until a batch asks for
    them, then are decoded through ``with_transform`` and fitted by :func:`fit_image`."""

    def __init__(self, dataset, source: str, image_column: str, caption_column: Optional[str], images: ImageSettings):
        import datasets

        self.source = source
        self.image_column = image_column
        self.caption_column = caption_column
        self.images = images
        columns = [image_column] + ([caption_column] if caption_column else [])
        undecoded = dataset.select_columns(columns).cast_column(image_column, datasets.Image(decode=False))
        self.undecoded = undecoded
        self.rows = undecoded.with_transform(_decoding_transform(image_column, source))
        self.members: Optional[List[List[int]]] = None
        self.bucket_of: Optional[List[int]] = None
        if images.buckets is not None:
            self.bucket_of = [
                nearest_bucket(images.buckets, *image_size_of(item))
                for batch in undecoded.select_columns([image_column]).iter(batch_size=256)
                for item in batch[image_column]
            ]
            self.members = [[] for _ in images.buckets]
            for row, bucket in enumerate(self.bucket_of):
                self.members[bucket].append(row)
            self.members = [rows for rows in self.members if rows]

    def __len__(self) -> int:
        return len(self.undecoded)

    def size_of(self, row: int) -> Tuple[int, int]:
        if self.bucket_of is None:
            return self.images.resolution, self.images.resolution
        return self.images.buckets[self.bucket_of[row]]

    def pixels(self, entries: Sequence[Tuple[int, int]]) -> Tuple[torch.Tensor, Optional[List[str]]]:
        """Pixels ``[B, 3, H, W]`` of rows ``(index, epoch)`` (all of one size), and their captions."""
        rows = self.rows[[index for index, _ in entries]]
        out = []
        for (index, epoch), image in zip(entries, rows[self.image_column]):
            generator = _row_generator(self.images.seed, index, epoch)
            height, width = self.size_of(index)
            out.append(fit_image(image, height, width, self.images.center_crop, self.images.random_flip, generator))
        captions = [str(c) for c in rows[self.caption_column]] if self.caption_column else None
        return torch.stack(out), captions


def encode_latents(adapter: FamilyAdapter, pixels: torch.Tensor, keys: Sequence[Tuple[int, int]], seed: int, device):
    """VAE latents (float32) of pixels in [-1, 1]; each image's posterior sample is drawn with its own generator
    (:func:`_row_generator`), so a latent does not depend on which batch or process encoded it."""
    generators = [_row_generator(seed, index, epoch) for index, epoch in keys]
    with torch.no_grad():
        return adapter.encode_images(pixels.to(device), generator=generators).float()


class LatentCache:
    """VAE latents of every real image, computed once with ``datasets.map`` (under ``main_process_first``) into an
    Arrow file of ``dtype`` shared by all processes and reused by later runs with the same images, VAE and settings
    (the file name is their fingerprint). The random crop and flip of each image are drawn once, when it is encoded
    (as the diffusers SDXL text-to-image example precomputes its VAE latents)."""

    def __init__(
        self,
        adapter: FamilyAdapter,
        rows: RealImageRows,
        cache_root: str,
        dtype: torch.dtype = torch.float32,
        main_process_first: Callable = contextlib.nullcontext,
        device=None,
        batch_size: int = 16,
    ):
        import datasets

        self.dtype = dtype
        self.caption_column = rows.caption_column
        source = source_fingerprint(rows.undecoded)
        if source is None:
            raise DataError(f"--cache_latents needs {rows.source} read from files (not an in-memory dataset).")
        name = fingerprint(
            "latents", source, rows.image_column, rows.images.key(), str(dtype), module_fingerprint(adapter.vae)
        )
        path = os.path.join(cache_root, f"latents-{name}.arrow")
        features = {
            "latents": _list_feature(datasets.Value(_ARROW_DTYPES[dtype])),
            "shape": _list_feature(datasets.Value("int64"), length=3),
        }
        if rows.caption_column:
            features[rows.caption_column] = rows.undecoded.features[rows.caption_column]

        def encode(batch, indices):
            # one size per call: rows of different buckets are fitted and encoded size by size
            images = rows.rows[indices][rows.image_column]
            latents: List[Optional[np.ndarray]] = [None] * len(indices)
            sizes = {}
            for k, index in enumerate(indices):
                sizes.setdefault(rows.size_of(index), []).append(k)
            for (height, width), ks in sizes.items():
                keys = [(indices[k], 0) for k in ks]
                pixels = torch.stack(
                    [
                        fit_image(
                            images[k],
                            height,
                            width,
                            rows.images.center_crop,
                            rows.images.random_flip,
                            _row_generator(rows.images.seed, indices[k], 0),
                        )
                        for k in ks
                    ]
                )
                encoded = encode_latents(adapter, pixels, keys, rows.images.seed, device)
                for k, latent in zip(ks, encoded):
                    latents[k] = _to_stored(latent, dtype)
            out = {"latents": [x.reshape(-1) for x in latents], "shape": [list(x.shape) for x in latents]}
            if rows.caption_column:
                out[rows.caption_column] = batch[rows.caption_column]
            return out

        os.makedirs(cache_root, exist_ok=True)
        with main_process_first():
            table = rows.undecoded.map(
                encode,
                batched=True,
                batch_size=batch_size,
                with_indices=True,
                remove_columns=rows.undecoded.column_names,
                features=datasets.Features(features),
                cache_file_name=path,
                load_from_cache_file=True,
                new_fingerprint=name,
                desc="Caching VAE latents",
            )
        self.path = path
        self.table = table.with_format("numpy")

    def get(self, indices: Sequence[int]) -> Tuple[torch.Tensor, Optional[List[str]]]:
        rows = self.table[list(indices)]
        latents = [
            _from_stored(flat, self.dtype).reshape(*[int(s) for s in shape]).float()
            for flat, shape in zip(rows["latents"], rows["shape"])
        ]
        captions = [str(c) for c in rows[self.caption_column]] if self.caption_column else None
        return torch.stack(latents), captions


class BatchPlan:
    """This process's ``(row, epoch)`` entries of each position of a map-style source: :func:`batch_entries`, or
    :func:`bucket_batch_entries` with aspect-ratio buckets (a small picklable object that DataLoader workers copy)."""

    def __init__(self, seed: int, global_batch: int, mine: slice, size: int, members=None):
        self.seed = seed
        self.global_batch = global_batch
        self.mine = mine
        self.size = size
        self.members = members

    def __call__(self, position: int) -> List[Tuple[int, int]]:
        if self.members is not None:
            return bucket_batch_entries(self.seed, position, self.global_batch, self.members)[1][self.mine]
        return batch_entries(self.seed, position, self.global_batch, self.size)[self.mine]


class _PositionBatches(torch.utils.data.Dataset):
    """Item ``position`` = this process's decoded real-image batch of that position (read by DataLoader workers).
    A data error comes back as a value, so that the main process raises it as one sentence."""

    def __init__(self, rows: RealImageRows, plan: BatchPlan, length: int):
        self.rows = rows
        self.plan = plan
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, position: int):
        entries = self.plan(position)
        try:
            pixels, captions = self.rows.pixels(entries)
        except DataError as error:
            return {"error": str(error)}
        return {"pixels": pixels, "captions": captions, "entries": entries}


class StreamedBatches:
    """This process's batches of a streamed source (``datasets`` streaming or webdataset shards), in order from a
    start position: the stream is shuffled in a seeded buffer (a new order each epoch, ``set_epoch``), every process
    reads the same global batches and decodes only its share, and positions before the start are skipped without
    decoding, so a resumed run continues with the same batches."""

    def __init__(
        self,
        stream,
        source: str,
        image_column,
        caption_column,
        images: ImageSettings,
        global_batch,
        mine,
        start: int,
        buffer_size: int = 1000,
    ):
        import datasets

        self.stream = stream.cast_column(image_column, datasets.Image(decode=False))
        self.source = source
        self.image_column = image_column
        self.caption_column = caption_column
        self.images = images
        self.global_batch = global_batch
        self.mine = mine
        self.start = start
        self.buffer_size = buffer_size

    def __iter__(self):
        shuffled = self.stream.shuffle(seed=self.images.seed, buffer_size=self.buffer_size)
        buffer: List[Tuple[dict, int, int]] = []
        position = 0
        for epoch in itertools.count():
            shuffled.set_epoch(epoch)
            seen = 0
            try:
                for number, row in enumerate(shuffled):
                    seen += 1
                    buffer.append((row, number, epoch))
                    if len(buffer) < self.global_batch:
                        continue
                    if position >= self.start:
                        yield position, self._decode(buffer[self.mine])
                    buffer, position = [], position + 1
            except KeyError as error:
                raise DataError(
                    f"The streamed images of {self.source} have no column {error}; pass "
                    "--image_column/--caption_column."
                ) from None
            if seen == 0:
                raise DataError(f"The image stream {self.source} holds no images.")

    def _decode(self, part):
        pixels, entries = [], []
        for row, number, epoch in part:
            try:
                image = _open_image(row[self.image_column])
                image.load()
            except Exception as error:
                raise DataError(
                    f"Image {number} of the stream {self.source} could not be decoded ({reason_of(error)})."
                ) from None
            pixels.append(
                fit_image(
                    image,
                    self.images.resolution,
                    self.images.resolution,
                    self.images.center_crop,
                    self.images.random_flip,
                    _row_generator(self.images.seed, number, epoch),
                )
            )
            entries.append((number, epoch))
        captions = [str(row[self.caption_column]) for row, _, _ in part] if self.caption_column else None
        return {"pixels": torch.stack(pixels), "captions": captions, "entries": entries}


#: real-image batches kept by position (the micro-batches of one step, up to 16 gradient-accumulation steps)
RECENT_BATCHES = 16


class RealBatches:
    """This process's real images of each position (``step * accumulation + micro``), as latents and captions.

    Three sources, one contract (a pure function of the seed and the position; resuming at any position gives the
    batches an uninterrupted run had there):

    - ``cache``: a :class:`LatentCache`, read directly (memory-mapped; nothing is decoded while training);
    - ``rows``: a :class:`RealImageRows` read lazily by a ``DataLoader`` with ``num_workers`` workers that decode the
      next positions while the accelerator trains, then encoded by the VAE here;
    - ``stream``: a :class:`StreamedBatches`, read in order in this process.
    """

    def __init__(
        self,
        adapter: FamilyAdapter,
        seed: int,
        sample_seed: int,
        global_batch: int,
        rank: int,
        batch_size: int,
        rows: Optional[RealImageRows] = None,
        cache: Optional[LatentCache] = None,
        stream: Optional[Callable[[int], StreamedBatches]] = None,
        num_workers: int = 0,
        device=None,
    ):
        self.adapter = adapter
        self.seed = seed
        self.sample_seed = sample_seed
        self.global_batch = global_batch
        self.mine = slice(rank * batch_size, (rank + 1) * batch_size)
        self.rows = rows
        self.cache = cache
        self.stream = stream
        self.num_workers = num_workers
        self.device = device
        self.plan = BatchPlan(seed, global_batch, self.mine, len(rows), rows.members) if rows is not None else None
        self._iterator = None
        self._next_position: Optional[int] = None
        #: the batches of the latest positions: the critic and the student updates of one step read the same
        #: micro-batches (each of them all of the step's, with gradient accumulation), which must not restart the loader
        self._recent: "collections.OrderedDict[int, tuple]" = collections.OrderedDict()

    def _start(self, position: int):
        if self.stream is not None:
            self._iterator = iter(self.stream(position))
        else:
            loader = torch.utils.data.DataLoader(
                _PositionBatches(self.rows, self.plan, length=2**62),
                batch_size=None,
                sampler=itertools.count(position),
                num_workers=self.num_workers,
                prefetch_factor=2 if self.num_workers else None,
                # its own generator: creating the loader (at the start, or at a resume) draws no global random
                # number, so the global RNG state stays what the checkpoint restored
                generator=torch.Generator(),
            )
            self._iterator = ((p, item) for p, item in zip(itertools.count(position), loader))
        self._next_position = position

    def __call__(self, position: int) -> Tuple[torch.Tensor, Optional[List[str]]]:
        if position in self._recent:
            return self._recent[position]
        if self.cache is not None:
            latents, captions = self.cache.get([index for index, _ in self.plan(position)])
            result = (latents.to(self.device), captions)
        else:
            if self._iterator is None or position != self._next_position:
                self._start(position)
            got, item = next(self._iterator)
            self._next_position = got + 1
            if "error" in item:
                raise DataError(item["error"])
            latents = encode_latents(self.adapter, item["pixels"], item["entries"], self.sample_seed, self.device)
            result = (latents, item["captions"])
        self._recent[position] = result
        while len(self._recent) > RECENT_BATCHES:
            self._recent.popitem(last=False)
        return result


class TrainingBatches:
    """The batch of each (step, micro-batch) as a pure function of the seed and the position (so resuming needs no
    sampler state): prompt conditions, the student's noise, and -- for a discriminator -- real latents with their
    conditions. Every process takes its rank's share of the global batch.

    Args:
        prompts: conditions of the training prompts.
        noise_shape: ``noise_shape(batch_size, height, width)`` is the shape of the student's input noise.
        random_source: draws the noise (for the global batch, sliced by rank).
        seed: the run's seed (prompt order; real images use ``seed + 1``).
        batch_size: the per-process batch size.
        resolution: the square training size (real batches of aspect-ratio buckets set their own).
        rank, world_size: this process and the number of processes.
        accumulation_steps: micro-batches per optimization step.
        real: the real images (:class:`RealBatches`), the teacher's reference set
            (:class:`~.teacher_reference.TeacherReferenceBatches`, which also gives each latent's starting noise),
            or ``None`` without a discriminator.
        real_conditions: conditions of the real images' captions; ``None``: the images have no captions, the batch's
            ``real_condition`` is ``None`` and the method judges real and generated samples under the null prompt.
    """

    def __init__(
        self,
        prompts: PromptSource,
        noise_shape: Callable[..., Tuple[int, ...]],
        random_source: RandomSource,
        seed: int,
        batch_size: int,
        resolution: int,
        rank: int = 0,
        world_size: int = 1,
        accumulation_steps: int = 1,
        real: Optional[RealBatches] = None,
        real_conditions: Optional[PromptSource] = None,
        device=None,
    ):
        self.prompts = prompts
        self.noise_shape = noise_shape
        self.random_source = random_source
        self.seed = seed
        self.batch_size = batch_size
        self.resolution = resolution
        self.world_size = world_size
        self.accumulation_steps = accumulation_steps
        self.real = real
        self.real_conditions = real_conditions
        self.device = device
        self._mine = slice(rank * batch_size, (rank + 1) * batch_size)

    def __call__(self, step: int, micro: int = 0) -> Batch:
        global_batch = self.batch_size * self.world_size
        position = step * self.accumulation_steps + micro
        prompt_indices = batch_indices(self.seed, position, global_batch, len(self.prompts))[self._mine]
        condition = self.prompts.conditions(prompt_indices)
        real = real_condition = real_noise = None
        height = width = self.resolution
        if self.real is not None:
            # a teacher reference set also gives the noise each latent was sampled from (the regression pairs)
            real, captions, *paired = self.real(position)
            real = real.to(self.device)
            real_noise = paired[0].to(self.device) if paired else None
            # the generated batch takes the real batch's size (its aspect-ratio bucket): the discriminator sees both
            height, width = self.real.adapter.image_size_of(real)
            if self.real_conditions is not None and captions is not None:
                real_condition = self.real_conditions.conditions_of(captions)
        noise = self.random_source.randn(self.noise_shape(self.batch_size, height, width))
        return Batch(condition=condition, noise=noise, real=real, real_condition=real_condition, real_noise=real_noise)
