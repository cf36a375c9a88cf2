"""Model cards and Hub upload of distilled students (through ``huggingface_hub``'s own API).

The Hub token is never an argument that gets stored: ``push_to_hub`` lets ``huggingface_hub`` read it from
``HF_TOKEN`` or the login cache, and nothing here writes it to a file, a log, a config or a card.
"""

from __future__ import annotations

import json
import os
from typing import List, Optional, Sequence

#: files and folders of an output directory that are not part of the published student
UPLOAD_IGNORE_PATTERNS = ["checkpoint-*", "checkpoint-*/**", ".*", ".*/**", "logs/**", "validation/**"]


def _is_hub_id(reference: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if os.path.exists(reference):
        return False
    try:
        validate_repo_id(reference)
        return "/" in reference
    except HFValidationError:
        return False


def _method_of(config):
    """The registered method class of a run and its method settings (resolved if the config is not)."""
    from .distill.config import resolve_method_config
    from .distill.methods import get_method_class

    settings = config.method if config.method.method else resolve_method_config(config.method)
    return get_method_class(settings.method), settings


def method_name(config) -> str:
    """The method's own name and description, as its class states them."""
    method, settings = _method_of(config)
    return f"{method.name} ({settings.divergence}): {method.description}"


def card_text(config, family: str, student_timesteps: Sequence[float], sample_grid: Optional[str],
              prompts: Sequence[str], lora: bool, repo_id: Optional[str] = None) -> str:
    teacher = config.teacher
    load_from = repo_id or "path/to/this/folder"
    guidance = ("- Guidance: distilled into the student (classifier-free guidance scale "
                f"{config.method.guidance_scale} on the teacher); the student takes no `guidance_scale`.")
    kind = "LoRA adapter" if lora else "full"
    lines = [
        f"# One-step {family} student of `{teacher}`",
        "",
        f"A {kind} one-step student distilled from **{teacher}** with diffusers-onestep using "
        f"**{method_name(config)}**.",
        "",
        "## How to run",
        "",
        "```python",
        "import torch",
        "from diffusers_onestep import OneStepPipeline",
        "",
        f'pipe = OneStepPipeline.from_pretrained("{load_from}")',
        f'image = pipe("{prompts[0] if prompts else "a photo of a cat"}").images[0]',
        "```",
        "",
        f"The scheduler config carries the student's conditioning timestep(s) {list(student_timesteps)}, so "
        "`pipe(prompt)` needs no further arguments.",
        guidance,
    ]
    if lora:
        lines += [
            f"- The LoRA (`pytorch_lora_weights.safetensors`, diffusers format) applies to `{teacher}`; "
            "`OneStepPipeline.from_pretrained` loads the base, fuses the LoRA and sets the scheduler "
            "(`onestep_lora.json` names the base).",
        ]
    if sample_grid:
        lines += ["", "## Samples", "", f"![samples]({sample_grid})", "",
                  "Prompts: " + "; ".join(f"`{p}`" for p in prompts)]
    lines += [
        "",
        "## Training",
        "",
        f"- Teacher: `{teacher}` ({family})",
        "- Method: `{0.name}`, divergence `{1.divergence}` ({0.reference})".format(*_method_of(config)),
        f"- Student: {config.roles.student}; critic: {config.roles.critic}",
        f"- Steps: {config.optim.max_train_steps}, batch {config.optim.train_batch_size}, "
        f"student lr {config.optim.learning_rate}",
        "",
        "<details><summary>Resolved training configuration</summary>",
        "",
        "```json",
        json.dumps(config.to_dict(), indent=2, sort_keys=True, default=list),
        "```",
        "",
        "</details>",
    ]
    return "\n".join(lines) + "\n"


def write_model_card(folder: str, config, family: str, student_timesteps: Sequence[float],
                     sample_grid: Optional[str] = None, prompts: Sequence[str] = (), lora: bool = False,
                     repo_id: Optional[str] = None):
    """Write ``README.md`` (a ``huggingface_hub.ModelCard``) into ``folder`` and return the card."""
    from huggingface_hub import ModelCard, ModelCardData

    tags: List[str] = ["one-step", "distillation", "diffusers-onestep", "text-to-image", "diffusers", family,
                       *_method_of(config)[0].tags, _method_of(config)[1].divergence]
    if lora:
        tags.append("lora")
    data = ModelCardData(
        library_name="diffusers",
        pipeline_tag="text-to-image",
        base_model=config.teacher if _is_hub_id(config.teacher) else None,
        tags=tags,
    )
    text = card_text(config, family, student_timesteps, sample_grid, prompts, lora, repo_id)
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n{text}")
    card.save(os.path.join(folder, "README.md"))
    return card


def push_to_hub(folder: str, repo_id: str, private: bool = False, commit_message: str = "Upload one-step student",
                token: Optional[str] = None) -> str:
    """Create (or reuse) ``repo_id`` and upload the student in ``folder``; checkpoints and logs stay local."""
    from huggingface_hub import create_repo, upload_folder

    repo = create_repo(repo_id, private=private, exist_ok=True, token=token)
    upload_folder(
        repo_id=repo.repo_id,
        folder_path=folder,
        commit_message=commit_message,
        ignore_patterns=UPLOAD_IGNORE_PATTERNS,
        token=token,
    )
    return repo.repo_id
