"""Test beds of the project (tests, benchmarks, docs examples): tiny, offline, random-weight models of every family.

* :mod:`.components`: the tiny components and in-memory tokenizers of the built-in families;
* :mod:`.fixtures`: one :class:`TinyFixture` record per family (:func:`register_tiny_fixture`) and the helpers built
  on them (:func:`tiny_components`, :func:`native_one_step_pipeline`, :func:`save_tiny_native_pipeline`, ...);
* here: :func:`save_to_hub_cache`, which lays a folder out exactly as ``huggingface_hub`` caches a Hub repository,
  so that the real ``from_pretrained("<org>/<name>")`` / ``hf_hub_download`` code paths run offline
  (``HF_HUB_OFFLINE=1``) against tiny stand-ins of real checkpoints.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from typing import Dict, List, Optional, Sequence

import torch

from .components import (
    tiny_clip_tokenizer,
    tiny_flux_components,
    tiny_gemma_tokenizer,
    tiny_pixart_components,
    tiny_sana_components,
    tiny_sd3_components,
    tiny_sd_components,
    tiny_sdxl_components,
    tiny_t5_tokenizer,
)
from .fixtures import (
    TINY_FAMILIES,
    TINY_FIXTURES,
    TinyFixture,
    ddpm_timesteps_setup,
    flow_pure_noise_setup,
    flux_sigmas_setup,
    lcm_timesteps_setup,
    native_one_step_pipeline,
    native_one_step_setup,
    native_pipeline_class,
    register_tiny_fixture,
    sana_sprint_setup,
    save_tiny_native_pipeline,
    sd3_sigmas_setup,
    tiny_components,
    tiny_families,
    tiny_fixture,
    tiny_native_pipeline,
)


TINY_PROMPTS = ["a photo of a cat", "a red car on the road", "an astronaut riding a horse", "a bowl of fruit"]


# ------------------------------------------------------------------------------------------------------------------
# Hub cache layout
# ------------------------------------------------------------------------------------------------------------------


def save_to_hub_cache(source: str, repo_id: str, cache_dir: Optional[str] = None, revision: str = "main") -> str:
    """Copy ``source`` (a folder) into ``cache_dir`` exactly as ``huggingface_hub`` caches ``repo_id``.

    Files go to ``models--org--name/blobs/<sha256>`` with symlinks from ``snapshots/<commit>/<path>`` and
    ``refs/<revision>`` naming the commit, so offline ``hf_hub_download``/``snapshot_download``/``from_pretrained``
    resolve ``repo_id`` to these files. Returns the snapshot folder.
    """
    from huggingface_hub.constants import HF_HUB_CACHE

    cache_dir = cache_dir or HF_HUB_CACHE
    repo_folder = os.path.join(cache_dir, "models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
    snapshot = os.path.join(repo_folder, "snapshots", commit)
    os.makedirs(os.path.join(repo_folder, "blobs"), exist_ok=True)
    os.makedirs(os.path.join(repo_folder, "refs"), exist_ok=True)
    with open(os.path.join(repo_folder, "refs", revision), "w") as f:
        f.write(commit)
    for root, _, files in os.walk(source):
        for name in files:
            src = os.path.join(root, name)
            rel = os.path.relpath(src, source)
            with open(src, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            blob = os.path.join(repo_folder, "blobs", digest)
            if not os.path.exists(blob):
                shutil.copyfile(src, blob)
            link = os.path.join(snapshot, rel)
            os.makedirs(os.path.dirname(link), exist_ok=True)
            if os.path.lexists(link):
                os.remove(link)
            os.symlink(os.path.relpath(blob, os.path.dirname(link)), link)
    return snapshot


def random_lora_state_dict(
    model: torch.nn.Module, target_modules: Sequence[str], rank: int = 4, seed: int = 0, scale: float = 0.1
) -> Dict[str, torch.Tensor]:
    """A peft LoRA state dict with non-zero A and B for ``model`` (so that loading it visibly changes outputs)."""
    import copy

    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    clone = copy.deepcopy(model)
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(target_modules)), clone)
    generator = torch.Generator().manual_seed(seed)
    state = get_peft_model_state_dict(clone)
    return {k: torch.randn(v.shape, generator=generator) * scale for k, v in state.items()}


def list_files(folder: str) -> List[str]:
    """All files under ``folder``, relative, sorted (for layout assertions)."""
    out = []
    for root, _, files in os.walk(folder):
        out += [os.path.relpath(os.path.join(root, f), folder) for f in files]
    return sorted(out)


__all__ = [
    "TINY_FAMILIES",
    "TINY_FIXTURES",
    "TINY_PROMPTS",
    "TinyFixture",
    "ddpm_timesteps_setup",
    "flow_pure_noise_setup",
    "flux_sigmas_setup",
    "sd3_sigmas_setup",
    "lcm_timesteps_setup",
    "list_files",
    "native_one_step_pipeline",
    "native_one_step_setup",
    "native_pipeline_class",
    "random_lora_state_dict",
    "register_tiny_fixture",
    "sana_sprint_setup",
    "save_tiny_native_pipeline",
    "save_to_hub_cache",
    "tiny_clip_tokenizer",
    "tiny_components",
    "tiny_families",
    "tiny_fixture",
    "tiny_flux_components",
    "tiny_gemma_tokenizer",
    "tiny_native_pipeline",
    "tiny_pixart_components",
    "tiny_sana_components",
    "tiny_sd_components",
    "tiny_sd3_components",
    "tiny_sdxl_components",
    "tiny_t5_tokenizer",
]
