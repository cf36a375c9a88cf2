"""Training data: prompts (and, for GANs/discriminators, real images), plus a text-embedding cache.

Prompt sources: a ``.txt`` file (one prompt a line), a ``.jsonl`` file, a local file or folder that ``datasets``
reads (``.json``, ``.csv``, ``.parquet``, ``imagefolder`` with ``metadata.jsonl``), or a Hub dataset name. Real
images come from a ``datasets`` image dataset (a local ``imagefolder`` or a Hub name).

Batches are a pure function of ``(seed, step)``: the order of each epoch is a seeded permutation, so resuming at
step ``k`` continues the exact data order without saving sampler state, and a global batch is split across
processes by rank.
"""

from __future__ import annotations

import io
import json
import os
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..errors import reason_of
from ..families import Condition, FamilyAdapter
from .models import Batch, RandomSource


class DataError(ValueError):
    """A data source is missing, empty or lacks a column; the message says which and how to fix it."""


def _load_dataset(source: str, split: str = "train", cache_dir: Optional[str] = None):
    import datasets

    if os.path.isdir(source):
        files = [f for f in os.listdir(source) if not f.startswith(".")]
        if not files:
            raise DataError(f"The folder {source} is empty.")
        if (
            any(f.lower().endswith((".png", ".jpg", ".jpeg", ".webp", ".bmp")) for f in files)
            or "metadata.jsonl" in files
        ):
            return _read_local(
                source, lambda: datasets.load_dataset("imagefolder", data_dir=source, split=split, cache_dir=cache_dir)
            )
        return _read_local(source, lambda: datasets.load_dataset(source, split=split, cache_dir=cache_dir))
    if os.path.isfile(source):
        extension = source.rsplit(".", 1)[-1].lower()
        builder = {"jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet", "txt": "text"}.get(extension)
        if builder is None:
            raise DataError(f"{source} is not a supported data file; use .txt, .jsonl, .json, .csv or .parquet.")
        return _read_local(
            source, lambda: datasets.load_dataset(builder, data_files=source, split=split, cache_dir=cache_dir)
        )
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(source)
    except HFValidationError:
        raise DataError(f"{source!r} is neither an existing file or folder nor a Hub dataset name.") from None
    try:
        return datasets.load_dataset(source, split=split, cache_dir=cache_dir)
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


def load_prompts(source: str, column: str = "text", cache_dir: Optional[str] = None) -> List[str]:
    """All non-empty prompts of a source, in order (``cache_dir``: where ``datasets`` caches a dataset)."""
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
    prompts = [p for p in prompts if p]
    if not prompts:
        raise DataError(f"The prompt source {source} holds no prompts.")
    return prompts


def resize_and_crop(image, resolution: int) -> torch.Tensor:
    """A PIL image resized (shorter side) and center-cropped to ``resolution``, as ``[3, H, W]`` in [-1, 1]."""
    from PIL import Image

    image = image.convert("RGB")
    scale = resolution / min(image.size)
    image = image.resize(
        (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale))), Image.BICUBIC
    )
    left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)


class RealImages(torch.utils.data.Dataset):
    """The images of a ``datasets`` dataset, each decoded, resized and cropped when read (by DataLoader workers)."""

    def __init__(self, dataset, image_column: str, resolution: int):
        self.dataset = dataset
        self.image_column = image_column
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> torch.Tensor:
        try:
            image = self.dataset[index][self.image_column]
        except Exception as error:  # a file that passed verify() but does not decode (truncated pixel data)
            raise DataError(f"Image {index} of the real images could not be decoded ({reason_of(error)}).") from None
        return resize_and_crop(image, self.resolution)


def open_real_images(
    source: str, image_column: str = "image", caption_column: Optional[str] = None, cache_dir: Optional[str] = None
):
    """The ``datasets`` dataset of ``--real_images``, checked to hold the image (and caption) column and some rows;
    images are not decoded."""
    dataset = _load_dataset(source, cache_dir=cache_dir)
    if image_column not in dataset.column_names:
        raise DataError(
            f"The image dataset {source} has no column {image_column!r}; its columns are "
            f"{', '.join(dataset.column_names)}; pass --image_column."
        )
    if caption_column is not None and caption_column not in dataset.column_names:
        raise DataError(
            f"The image dataset {source} has no caption column {caption_column!r}; its columns are "
            f"{', '.join(dataset.column_names)}."
        )
    if len(dataset) == 0:
        raise DataError(f"The image dataset {source} holds no images.")
    return dataset


def check_real_images(
    source: str, image_column: str = "image", caption_column: Optional[str] = None, cache_dir: Optional[str] = None
) -> int:
    """Check that every image of ``--real_images`` can be read, without decoding its pixels (PIL's ``verify``: the
    header and, for PNG, every chunk's checksum), so that a corrupt file is named before the teacher loads. Returns
    the number of images."""
    import datasets
    from PIL import Image

    dataset = open_real_images(source, image_column, caption_column, cache_dir)
    if not isinstance(dataset.features.get(image_column), datasets.Image):
        raise DataError(f"The column {image_column!r} of {source} does not hold images; pass --image_column.")
    undecoded = dataset.select_columns([image_column]).cast_column(image_column, datasets.Image(decode=False))
    row = 0
    for batch in undecoded.iter(batch_size=64):  # a batch of file paths or bytes at a time, not the whole set
        for item in batch[image_column]:
            name = item.get("path") or f"row {row}"
            try:
                opened = Image.open(io.BytesIO(item["bytes"])) if item.get("bytes") else Image.open(item["path"])
                with opened as image:
                    image.verify()
            except Exception as error:  # PIL raises UnidentifiedImageError, SyntaxError, OSError, ... for bad files
                raise DataError(f"The image {name} of {source} could not be read ({reason_of(error)}).") from None
            row += 1
    return len(dataset)


def load_real_images(
    source: str,
    resolution: int,
    image_column: str = "image",
    caption_column: Optional[str] = None,
    num_workers: int = 0,
    cache_dir: Optional[str] = None,
) -> Tuple[torch.Tensor, Optional[List[str]]]:
    """Real images resized (shorter side) and center-cropped to ``resolution``, in [-1, 1], with captions.

    The images are decoded in order by a ``DataLoader`` with ``num_workers`` worker processes
    (``--dataloader_num_workers``; 0 decodes in this process), so the result does not depend on the worker count.
    """
    dataset = open_real_images(source, image_column, caption_column, cache_dir)
    loader = torch.utils.data.DataLoader(
        RealImages(dataset, image_column, resolution), batch_size=32, shuffle=False, num_workers=num_workers
    )
    images = torch.cat(list(loader))
    captions = [str(c) for c in dataset[caption_column]] if caption_column else None
    return images, captions


def epoch_permutation(seed: int, epoch: int, size: int) -> torch.Tensor:
    return torch.randperm(size, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def batch_indices(seed: int, step: int, global_batch: int, size: int) -> List[int]:
    """Indices of the global batch of ``step``: consecutive slices of seeded per-epoch permutations."""
    out = []
    position = step * global_batch
    while len(out) < global_batch:
        epoch, offset = divmod(position, size)
        perm = epoch_permutation(seed, epoch, size)
        take = min(global_batch - len(out), size - offset)
        out += perm[offset : offset + take].tolist()
        position += take
    return out


class ConditionCache:
    """Encoded conditions of a fixed prompt list, computed once so the text encoders can be freed."""

    def __init__(self, adapter: FamilyAdapter, prompts: Sequence[str], batch_size: int = 64, device=None):
        self.prompts = list(prompts)
        unique = list(dict.fromkeys(self.prompts))
        self._row = {p: i for i, p in enumerate(unique)}
        chunks = [
            adapter.encode_prompt(unique[i : i + batch_size], device=device).to(device="cpu")
            for i in range(0, len(unique), batch_size)
        ]
        self.table = Condition.cat(chunks)

    def __len__(self) -> int:
        return len(self.prompts)

    def get(self, indices: Sequence[int]) -> Condition:
        rows = torch.tensor([self._row[self.prompts[i]] for i in indices])
        return self.table[rows]


class PromptSource:
    """Conditions for prompt indices: from the cache, or encoded on the fly when caching is off."""

    def __init__(self, adapter: FamilyAdapter, prompts: Sequence[str], cache: bool, device=None):
        self.adapter = adapter
        self.prompts = list(prompts)
        self.device = device
        self.cache = ConditionCache(adapter, self.prompts, device=device) if cache else None

    def __len__(self) -> int:
        return len(self.prompts)

    def conditions(self, indices: Sequence[int]) -> Condition:
        if self.cache is not None:
            return self.cache.get(indices).to(self.device)
        return self.adapter.encode_prompt([self.prompts[i] for i in indices], device=self.device)


def encode_real_images(
    adapter: FamilyAdapter, images: torch.Tensor, seed: int, device=None, chunk_size: int = 32
) -> torch.Tensor:
    """VAE latents (float32, on the CPU) of real images in [-1, 1], encoded in chunks with seeded sampling."""
    with torch.no_grad():
        latents = [
            adapter.encode_images(
                images[i : i + chunk_size].to(device), generator=torch.Generator().manual_seed(seed + i)
            )
            for i in range(0, len(images), chunk_size)
        ]
    return torch.cat(latents).float().cpu()


class TrainingBatches:
    """The batch of each (step, micro-batch) as a pure function of the seed and the position (so resuming needs no
    sampler state): prompt conditions, the student's noise, and -- for a discriminator -- real latents with their
    conditions. Every process takes its rank's share of the global batch.

    Args:
        prompts: conditions of the training prompts.
        noise_shape: ``noise_shape(batch_size)`` is the shape of the student's input noise.
        random_source: draws the noise (for the global batch, sliced by rank).
        seed: the run's seed (prompt order; real images use ``seed + 1``).
        batch_size: the per-process batch size.
        rank, world_size: this process and the number of processes.
        accumulation_steps: micro-batches per optimization step.
        real_latents: latents of the real images, or ``None`` without a discriminator.
        real_conditions: conditions of the real images' captions; ``None``: the images have no captions, the batch's
            ``real_condition`` is ``None`` and the method judges real and generated samples under the null prompt.
    """

    def __init__(
        self,
        prompts: PromptSource,
        noise_shape: Callable[[int], Tuple[int, ...]],
        random_source: RandomSource,
        seed: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        accumulation_steps: int = 1,
        real_latents: Optional[torch.Tensor] = None,
        real_conditions: Optional[PromptSource] = None,
        device=None,
    ):
        self.prompts = prompts
        self.noise_shape = noise_shape
        self.random_source = random_source
        self.seed = seed
        self.batch_size = batch_size
        self.world_size = world_size
        self.accumulation_steps = accumulation_steps
        self.real_latents = real_latents
        self.real_conditions = real_conditions
        self.device = device
        self._mine = slice(rank * batch_size, (rank + 1) * batch_size)

    def __call__(self, step: int, micro: int = 0) -> Batch:
        global_batch = self.batch_size * self.world_size
        position = step * self.accumulation_steps + micro
        prompt_indices = batch_indices(self.seed, position, global_batch, len(self.prompts))[self._mine]
        condition = self.prompts.conditions(prompt_indices)
        noise = self.random_source.randn(self.noise_shape(self.batch_size))
        real = real_condition = None
        if self.real_latents is not None:
            real_indices = batch_indices(self.seed + 1, position, global_batch, len(self.real_latents))[self._mine]
            real = self.real_latents[real_indices].to(self.device)
            if self.real_conditions is not None:
                real_condition = self.real_conditions.conditions(real_indices)
        return Batch(condition=condition, noise=noise, real=real, real_condition=real_condition)
