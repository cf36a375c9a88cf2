"""A reference set sampled by the teacher itself: ``--real_images teacher`` (prompts only, no image dataset).

The teacher's own multi-step sampler (its native pipeline and scheduler, through
:meth:`~diffusers_onestep.families.FamilyAdapter.sample_with_pipeline`) turns seeded noise ``z_i`` and training
prompt ``c_i`` into a latent ``y_i``; the discriminators that need real data (DMD2's GAN, f-distill's density ratio)
then judge ``y_i`` under ``c_i`` as they judge a real image under its caption, and DMD's regression loss (Yin et al.
2024, arXiv 2311.18828, §3.3) pulls ``G(z_i)`` toward ``y_i`` -- which is why ``z_i`` is stored with each latent.

The set lives on disk in a folder named by a fingerprint of everything that determines it (the teacher and its
weights, the prompts, the count, steps, guidance, seed, size and precision): the same settings reuse it, another
setting builds another. It is written in chunks of :data:`CHUNK_ROWS` rows, each a safetensors file renamed into
place when whole, so a build that is killed continues with the first missing chunk, and since every row is a pure
function of its index (its noise, its prompt and its scheduler randomness are seeded per row) the resumed set equals
an uninterrupted one. With several processes the missing chunks are split across them and the set is read by all.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..families import FamilyAdapter
from ..storage import save_tensors, write_json
from .data import BatchPlan, batch_indices, fingerprint


#: rows of one chunk file: the unit of resumption and the batch of one teacher pipeline call
CHUNK_ROWS = 8
#: the file that names a set's settings (written before its first chunk)
SETTINGS_NAME = "reference.json"
#: the format of the files; a change builds new sets
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ReferenceSettings:
    """What determines a teacher reference set (and so names its folder)."""

    teacher: str
    revision: Optional[str]
    variant: Optional[str]
    #: digest of the teacher's denoiser (config and weights, :func:`~.data.module_fingerprint`) and scheduler config
    teacher_fingerprint: Optional[str]
    #: digest of the prompts, in order
    prompts_fingerprint: str
    num_prompts: int
    count: int
    steps: int
    guidance_scale: float
    seed: int
    height: int
    width: int
    #: the stored dtype (the frozen networks' precision, in which the teacher also ran)
    dtype: str
    max_sequence_length: Optional[int]
    chunk_rows: int = CHUNK_ROWS
    format_version: int = FORMAT_VERSION

    @property
    def name(self) -> str:
        return "reference-" + fingerprint(asdict(self))

    @property
    def num_chunks(self) -> int:
        return -(-self.count // self.chunk_rows)

    def chunk_rows_of(self, chunk: int) -> range:
        return range(chunk * self.chunk_rows, min((chunk + 1) * self.chunk_rows, self.count))


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def row_noise(seed: int, row: int, shape: Sequence[int]) -> torch.Tensor:
    """The standard normal noise ``z`` of row ``row`` (shape ``[C, H, W]``): a function of the seed and the row only,
    so neither the chunking nor the process that samples it changes it."""
    generator = torch.Generator().manual_seed(((seed * 1_000_003 + 0x5EED) * 2_147_483_647 + row) % 2**63)
    return torch.randn(tuple(shape), generator=generator)


def row_generator(seed: int, row: int) -> torch.Generator:
    """The generator of row ``row``'s scheduler randomness (stochastic samplers; deterministic ones draw nothing)."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + 0x5C4ED) * 2_147_483_647 + row) % 2**63)


def row_prompts(seed: int, count: int, num_prompts: int) -> List[int]:
    """The prompt index of each row: consecutive seeded permutations of the prompts (each prompt once before any
    repeats), the data order's own rule (:func:`~.data.batch_indices`)."""
    return batch_indices(seed, 0, count, num_prompts)


def chunk_path(folder: str, chunk: int) -> str:
    return os.path.join(folder, f"chunk-{chunk:06d}.safetensors")


def missing_chunks(folder: str, settings: ReferenceSettings) -> List[int]:
    return [k for k in range(settings.num_chunks) if not os.path.isfile(chunk_path(folder, k))]


class TeacherReferenceSet:
    """A complete reference set on disk: ``latents``, ``noise`` and ``prompt_index`` per row, read chunk by chunk
    (memory-mapped; nothing is held in RAM)."""

    def __init__(self, folder: str, settings: ReferenceSettings, prompts: Sequence[str]):
        self.folder = folder
        self.settings = settings
        self.prompts = list(prompts)
        self.dtype = _DTYPES[settings.dtype]

    def __len__(self) -> int:
        return self.settings.count

    def get(self, rows: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor, List[str]]:
        """``(latents, noise, prompts)`` of ``rows``: float32 tensors ``[B, C, H, W]`` (the stored values, exactly)
        and each row's prompt."""
        from safetensors import safe_open

        latents, noise, prompts = [], [], []
        by_chunk: Dict[int, List[Tuple[int, int]]] = {}
        for position, row in enumerate(rows):
            by_chunk.setdefault(row // self.settings.chunk_rows, []).append((position, row % self.settings.chunk_rows))
        out: Dict[int, Tuple[torch.Tensor, torch.Tensor, int]] = {}
        for chunk, members in by_chunk.items():
            with safe_open(chunk_path(self.folder, chunk), framework="pt") as f:
                chunk_latents, chunk_noise = f.get_slice("latents"), f.get_slice("noise")
                chunk_prompts = f.get_slice("prompt_index")
                for position, offset in members:
                    out[position] = (
                        chunk_latents[offset : offset + 1],
                        chunk_noise[offset : offset + 1],
                        int(chunk_prompts[offset : offset + 1][0]),
                    )
        for position in range(len(rows)):
            latent, z, prompt = out[position]
            latents.append(latent)
            noise.append(z)
            prompts.append(self.prompts[prompt])
        return torch.cat(latents).float(), torch.cat(noise).float(), prompts


def build_teacher_reference(
    adapter: FamilyAdapter,
    pipeline,
    prompts: Sequence[str],
    settings: ReferenceSettings,
    root: str,
    encode: Optional[Callable[[List[str]], Any]] = None,
    device=None,
    accelerator=None,
    autocast: Optional[Callable[[], Any]] = None,
    progress: bool = True,
) -> TeacherReferenceSet:
    """Build (or finish, or reuse) the reference set of ``settings`` under ``root`` and open it.

    Args:
        adapter: the teacher's family adapter; ``pipeline``: the teacher's native pipeline over the same components.
        prompts: the training prompts (``settings`` holds their fingerprint).
        encode: ``encode(texts) -> Condition``; default ``adapter.encode_prompt``.
        accelerator: with several processes, the missing chunks are split across them (the main process lists them
            and broadcasts the list) and every process waits for the others before the set is opened; ``None``: this
            process builds everything.
        autocast: a context factory the pipeline runs under (the trainer's ``accelerator.autocast``).
    """
    import contextlib

    from tqdm.auto import tqdm

    folder = os.path.join(root, settings.name)
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    is_main = rank == 0
    if is_main:
        os.makedirs(folder, exist_ok=True)
        if not os.path.isfile(os.path.join(folder, SETTINGS_NAME)):
            write_json(os.path.join(folder, SETTINGS_NAME), {**asdict(settings), "prompts": list(prompts)})
    missing = missing_chunks(folder, settings) if is_main else None
    if world > 1:
        from accelerate.utils import broadcast_object_list

        accelerator.wait_for_everyone()
        holder = [missing]
        broadcast_object_list(holder)
        missing = holder[0]
    mine = missing[rank::world]
    if mine:
        encode = encode or (lambda texts: adapter.encode_prompt(texts, device=device))
        dtype = _DTYPES[settings.dtype]
        prompt_of_row = row_prompts(settings.seed, settings.count, len(prompts))
        shape = adapter.latent_shape(1, settings.height, settings.width)[1:]
        done_rows = settings.count - sum(len(settings.chunk_rows_of(k)) for k in missing)
        bar = tqdm(
            total=settings.count,
            initial=done_rows,
            desc="Teacher reference set" + (f" (process {rank + 1} of {world})" if world > 1 else ""),
            unit="latent",
            disable=not (progress and is_main),
            dynamic_ncols=True,
        )
        try:
            for chunk in mine:
                rows = list(settings.chunk_rows_of(chunk))
                # the noise the teacher starts from is stored in the frozen dtype: the student's regression input
                # is then exactly the teacher's starting point
                noise = torch.stack([row_noise(settings.seed, row, shape) for row in rows]).to(dtype)
                prompt_index = [prompt_of_row[row] for row in rows]
                condition = encode([prompts[i] for i in prompt_index])
                with autocast() if autocast is not None else contextlib.nullcontext():
                    latents = adapter.sample_with_pipeline(
                        pipeline,
                        noise.float().to(device),
                        condition,
                        settings.steps,
                        settings.guidance_scale,
                        generator=[row_generator(settings.seed, row) for row in rows],
                    )
                save_tensors(
                    chunk_path(folder, chunk),
                    {
                        "latents": latents.detach().to(dtype),
                        "noise": noise,
                        "prompt_index": torch.tensor(prompt_index, dtype=torch.int64),
                    },
                    metadata={"reference": settings.name, "first_row": str(rows[0])},
                )
                bar.update(len(rows))
        finally:
            bar.close()
    if world > 1:
        accelerator.wait_for_everyone()
    left = missing_chunks(folder, settings)
    if left:
        raise RuntimeError(
            f"The teacher reference set in {folder} still lacks {len(left)} chunk(s) after its build (another process "
            "failed?); run the same command again to finish it."
        )
    return TeacherReferenceSet(folder, settings, prompts)


class TeacherReferenceBatches:
    """This process's reference rows of each position, as :class:`~.data.RealBatches` gives real latents:
    ``(latents, prompts, noise)``, a pure function of the seed and the position (seeded per-epoch permutations of
    the rows, split across processes by rank)."""

    def __init__(
        self,
        adapter: FamilyAdapter,
        reference: TeacherReferenceSet,
        seed: int,
        global_batch: int,
        rank: int,
        batch_size: int,
        device=None,
    ):
        self.adapter = adapter
        self.reference = reference
        self.device = device
        self.plan = BatchPlan(seed, global_batch, slice(rank * batch_size, (rank + 1) * batch_size), len(reference))

    def __call__(self, position: int) -> Tuple[torch.Tensor, List[str], torch.Tensor]:
        latents, noise, prompts = self.reference.get([row for row, _ in self.plan(position)])
        return latents.to(self.device), prompts, noise.to(self.device)
