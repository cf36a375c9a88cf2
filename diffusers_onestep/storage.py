"""Crash-safe writing: every folder and file the project writes appears complete or not at all.

A folder is written to a hidden temporary sibling and renamed into place (``os.replace`` is atomic on POSIX);
files inside a folder that also holds other things (an output folder with checkpoints) are moved in one by one
with a *commit file* (``model_index.json``, ``onestep_lora.json``) moved last, so a loader never sees a half
export. A crash mid-write leaves only hidden or ``.tmp-`` names behind (:data:`LEFTOVER_NAME`), which
:func:`remove_leftovers` clears on the next successful write.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import uuid
from typing import Any, Dict, List, Optional

import torch


#: what an interrupted write leaves beside its target: a staging folder or a set-aside old folder of
#: :func:`staging_path` (``.<name>.tmp-1a2b3c4d``, ``.<name>.old-1a2b3c4d``) or a temporary file of :func:`write_json`
#: and :func:`save_tensors` (``<name>.tmp-1a2b3c4d``)
LEFTOVER_NAME = re.compile(r"\..+\.(?:tmp|old)-[0-9a-f]{8}|.+\.tmp-[0-9a-f]{8}")


def staging_path(target: str, tag: str = "tmp") -> str:
    target = os.path.abspath(target)
    return os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.{tag}-{uuid.uuid4().hex[:8]}")


def replace_directory(staging: str, target: str) -> None:
    """Move a completely written ``staging`` folder to ``target``, replacing it; never leaves a half folder.

    The old ``target`` is renamed aside first and removed only after the new one is in place, so a crash at any
    moment leaves either the old or the new complete folder at ``target`` (plus, at worst, a hidden leftover).
    """
    target = os.path.abspath(target)
    backup = None
    if os.path.lexists(target):
        backup = staging_path(target, "old")
        os.replace(target, backup)
    try:
        os.replace(staging, target)
    except BaseException:
        if backup is not None:
            os.replace(backup, target)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def remove_directory(path: str) -> None:
    """Delete a folder so that a crash midway leaves only a hidden leftover (:func:`remove_leftovers` clears it),
    never a half-deleted folder under its own name."""
    doomed = staging_path(path, "old")
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def publish_entries(staging: str, target: str, commit_file: Optional[str] = None) -> None:
    """Move every entry of ``staging`` into ``target`` (which may hold other things), ``commit_file`` last."""
    os.makedirs(target, exist_ok=True)
    names = sorted(os.listdir(staging))
    if commit_file in names:
        names.remove(commit_file)
        names.append(commit_file)
        # Withdraw the old commit file first: until the new one lands, the folder is not a loadable export.
        old_commit = os.path.join(target, commit_file)
        if os.path.exists(old_commit):
            os.remove(old_commit)
    for name in names:
        source, destination = os.path.join(staging, name), os.path.join(target, name)
        if os.path.isdir(source) and os.path.lexists(destination):
            replace_directory(source, destination)
        else:
            os.replace(source, destination)
    shutil.rmtree(staging, ignore_errors=True)


def remove_leftovers(folder: str, also: Optional[re.Pattern] = None) -> List[str]:
    """Delete what interrupted writes left in ``folder`` (names matching :data:`LEFTOVER_NAME` or ``also``); returns
    the names removed. Call it only while nothing else writes into ``folder``: a live staging folder looks the same."""
    if not os.path.isdir(folder):
        return []
    removed = []
    for name in sorted(os.listdir(folder)):
        if not (LEFTOVER_NAME.fullmatch(name) or (also is not None and also.fullmatch(name))):
            continue
        path = os.path.join(folder, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
        removed.append(name)
    return removed


def write_json(path: str, data: Any) -> None:
    """Write JSON atomically (temporary file + rename)."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True, default=_json_default)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _json_default(value):
    if isinstance(value, (set, tuple)):
        return list(value)
    if isinstance(value, torch.dtype):
        return str(value)
    return str(value)


def save_tensors(path: str, tensors: Dict[str, torch.Tensor], metadata: Optional[Dict[str, str]] = None) -> None:
    """Write a safetensors file atomically; tensors are made contiguous and moved to the CPU."""
    from safetensors.torch import save_file

    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
    os.replace(tmp, path)


def load_tensors(path: str) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)


def safetensors_problem(path: str) -> Optional[str]:
    """Why ``path`` is not a whole safetensors file (a header that does not parse, tensors that run past the end of a
    truncated file), or ``None``; reads the header only."""
    from safetensors import safe_open

    from .errors import reason_of

    try:
        with safe_open(path, framework="pt"):
            pass
    except Exception as error:  # SafetensorError, or OSError for a file that cannot be read
        return reason_of(error)
    return None
