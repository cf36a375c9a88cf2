"""Hub access: reading configs and files of a Hub repo or a local folder, model cards, and upload of distilled
students -- all through ``huggingface_hub``'s own API, so the same code runs against the Hub, a local folder, or the
local Hub cache with ``HF_HUB_OFFLINE=1``.

The Hub token is never an argument that gets stored: ``push_to_hub`` lets ``huggingface_hub`` read it from
``HF_TOKEN`` or the login cache, and nothing here writes it to a file, a log, a config or a card.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Sequence

from .errors import reason_of


#: ``from_pretrained`` keyword arguments that say where and how to read a Hub repo
HUB_KWARGS = ("cache_dir", "revision", "token", "local_files_only", "force_download", "proxies")
#: files and folders of an output directory that are not part of the published student: checkpoints, hidden staging
#: folders, logs, validation grids and the run id stay local
UPLOAD_IGNORE_PATTERNS = [
    "checkpoint-*",
    "checkpoint-*/**",
    ".*",
    ".*/**",
    "logs/**",
    "validation/**",
    "run.json",
    # --keep_best's record names a local checkpoint folder, which stays local too
    "best_checkpoint.json",
    # an evaluation folder's generated images and resume record; its metrics.json and grid.png are published
    "evaluation/images/**",
    "evaluation/generation.json",
    "evaluation/*.partial",
]
#: the evaluation folder of a student folder (``diffusers-onestep evaluate``'s default output, ``--eval_steps``)
EVALUATION_DIR = "evaluation"


# ----------------------------------------------------------------------------------------------------------------
# reads
# ----------------------------------------------------------------------------------------------------------------


def hub_kwargs_of(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """The :data:`HUB_KWARGS` among ``kwargs``."""
    return {k: kwargs[k] for k in HUB_KWARGS if k in kwargs}


def check_repo_id(source: str) -> None:
    """Refuse strings that are neither an existing folder nor a syntactically valid Hub repo id."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(source)
    except HFValidationError:
        raise ValueError(
            f"{source!r} is neither an existing folder nor a valid Hub repo id (expected 'org/name')."
        ) from None


def read_json(source: str, filename: str, hub_kwargs: Optional[Dict[str, Any]] = None) -> Optional[Dict[str, Any]]:
    """``filename`` of a local folder or Hub repo as a dict, or ``None`` when the repo has no such file."""
    if os.path.isdir(source):
        path = os.path.join(source, filename)
        if not os.path.isfile(path):
            return None
    else:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

        check_repo_id(source)
        try:
            path = hf_hub_download(source, filename, **(hub_kwargs or {}))
        except (EntryNotFoundError, LocalEntryNotFoundError):
            return None
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as error:
            # json's own message names neither the file nor what to do about it
            raise ValueError(
                f"{filename} of {source} is not valid JSON ({error.msg} at line {error.lineno}); the file is damaged, "
                "so save or download it again."
            ) from None


def resolve_file(source: str, weight_name: Optional[str] = None, subfolder: Optional[str] = None, **hub_kwargs) -> str:
    """A local file for ``source`` (a file path, a folder + ``weight_name``, or a Hub repo + ``weight_name``)."""
    if os.path.isfile(source):
        return source
    if weight_name is None:
        raise ValueError(f"{source} is not a file; pass `weight_name` to pick the file inside it.")
    if os.path.isdir(source):
        path = os.path.join(source, subfolder or "", weight_name)
        if not os.path.isfile(path):
            raise ValueError(f"{path} does not exist.")
        return path
    from huggingface_hub import hf_hub_download

    check_repo_id(source)
    return hf_hub_download(source, weight_name, subfolder=subfolder, **hub_kwargs)


def resolve_weight_name(repo_id: str, spellings: Sequence[str], subfolder: Optional[str] = None, **hub_kwargs) -> str:
    """The one of ``spellings`` -- the names the sources give one file, the expected one first -- that the Hub repo
    ``repo_id`` has, since Hub file names are case-sensitive (Hyper-SD's card lists ``Hyper-SDXL-1step-unet``, its code
    and the repo ``Hyper-SDXL-1step-Unet``).

    A spelling already in the local cache for the revision settles it without a request
    (``huggingface_hub.try_to_load_from_cache``); otherwise the repo's file listing (``HfApi.list_repo_files``) does.
    Offline, or when the listing cannot be read, the first spelling is returned, so that its download reports what is
    missing."""
    from huggingface_hub import HfApi, try_to_load_from_cache

    spellings = list(dict.fromkeys(spellings))
    if len(spellings) == 1:
        return spellings[0]
    prefix = f"{subfolder}/" if subfolder else ""
    cache_kwargs = {k: v for k, v in hub_kwargs.items() if k in ("cache_dir", "revision") and v}
    for name in spellings:
        if isinstance(try_to_load_from_cache(repo_id, prefix + name, **cache_kwargs), str):
            return name
    if offline_mode():
        return spellings[0]
    try:
        listing = set(
            HfApi().list_repo_files(repo_id, revision=hub_kwargs.get("revision"), token=hub_kwargs.get("token"))
        )
    except (OSError, ValueError):  # huggingface_hub's HTTP and connection errors are OSErrors
        return spellings[0]
    return next((name for name in spellings if prefix + name in listing), spellings[0])


# ----------------------------------------------------------------------------------------------------------------
# model card and upload
# ----------------------------------------------------------------------------------------------------------------


def is_hub_id(reference: str) -> bool:
    """Whether ``reference`` names a Hub repo (``namespace/name``) rather than a path on this machine."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if os.path.exists(reference):
        return False
    try:
        validate_repo_id(reference)
        return "/" in reference
    except HFValidationError:
        return False


def teacher_license(teacher: str, hub_kwargs: Optional[Dict[str, Any]] = None) -> Dict[str, str]:
    """The license fields (``license``, and ``license_name`` / ``license_link`` for ``license: other``) of the
    teacher's model card front matter: ``README.md`` of a local folder or Hub repo; ``{}`` when it states none or
    cannot be read (offline, no card)."""
    import yaml
    from huggingface_hub.errors import EntryNotFoundError
    from huggingface_hub.repocard import metadata_load

    try:
        if os.path.isdir(teacher):
            path = os.path.join(teacher, "README.md")
            if not os.path.isfile(path):
                return {}
        else:
            from huggingface_hub import hf_hub_download

            check_repo_id(teacher)
            path = hf_hub_download(teacher, "README.md", **(hub_kwargs or {}))
        metadata = metadata_load(path) or {}
    except (EntryNotFoundError, OSError, ValueError, yaml.YAMLError):
        return {}
    return {key: str(metadata[key]) for key in ("license", "license_name", "license_link") if metadata.get(key)}


def license_text(teacher: str, license_fields: Dict[str, str]) -> str:
    """The card's license line: the student is a derivative of the teacher and carries its license."""
    if not license_fields.get("license"):
        return f"The student is derived from `{teacher}`: see the teacher's license, which applies to the student too."
    name = license_fields["license"]
    if name == "other" and license_fields.get("license_name"):
        name = license_fields["license_name"]
    link = f" ({license_fields['license_link']})" if license_fields.get("license_link") else ""
    return f"The student is derived from `{teacher}` and carries the teacher's license: `{name}`{link}."


def method_name(method, config) -> str:
    """A method class's own name and description, with the run's divergence."""
    return f"{method.name} ({_divergence_label(method, config)}): {method.description}"


def _divergence_label(method, config) -> str:
    """The run's f-divergence, or the divergence a score-matching method (SiD, SIM) names for itself."""
    return config.method.divergence or getattr(method, "divergence_label", None) or "none"


def steps_label(student_timesteps: Sequence[float]) -> str:
    """ "one-step" for a student with one conditioning timestep, "K-step" for a K-step one (TDM, multi-step DMD2)."""
    steps = len(student_timesteps)
    return "one-step" if steps == 1 else f"{steps}-step"


def card_text(
    config,
    family: str,
    student_timesteps: Sequence[float],
    sample_grid: Optional[str],
    prompts: Sequence[str],
    lora: bool,
    repo_id: Optional[str] = None,
    *,
    method,
    license_fields: Optional[Dict[str, str]] = None,
    training_cost: Optional[Dict[str, Any]] = None,
) -> str:
    """The card's markdown for a resolved run ``config`` trained by ``method`` (the registered method class, which
    names itself: ``name``, ``description``, ``reference``, ``tags``); ``repo_id`` is the Hub repo the loading
    snippet names (the pushed repo), ``license_fields`` the teacher's (:func:`teacher_license`)."""
    teacher = config.teacher
    base_model = config.output.base_model_id or teacher
    load_from = repo_id or "path/to/this/folder"
    guidance = (
        "- Guidance: distilled into the student (classifier-free guidance scale "
        f"{config.method.guidance_scale} on the teacher); the student takes no `guidance_scale`."
    )
    kind = "LoRA adapter" if lora else "full"
    label = steps_label(student_timesteps)
    lines = [
        f"# {label.capitalize()} {family} student of `{teacher}`",
        "",
        f"A {kind} {label} student distilled from **{teacher}** with diffusers-onestep using "
        f"**{method_name(method, config)}**.",
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
            f"- The LoRA (`pytorch_lora_weights.safetensors`, diffusers format) applies to `{base_model}`; "
            "`OneStepPipeline.from_pretrained` loads the base, fuses the LoRA and sets the scheduler "
            "(`onestep_lora.json` names the base).",
        ]
    if sample_grid:
        lines += [
            "",
            "## Samples",
            "",
            f"![samples]({sample_grid})",
            "",
            "Prompts: " + "; ".join(f"`{p}`" for p in prompts),
        ]
    lines += [
        "",
        "## License",
        "",
        license_text(teacher, license_fields or {}),
        "",
        "## Training",
        "",
        f"- Teacher: `{teacher}` ({family})",
        f"- Method: `{method.name}`, divergence `{_divergence_label(method, config)}` ({method.reference})",
        f"- Student: {config.roles.student}; critic: {config.roles.critic}",
        f"- Steps: {config.optim.max_train_steps}, batch {config.optim.train_batch_size}, "
        f"student lr {config.optim.learning_rate}",
        *([training_cost_text(training_cost)] if training_cost else []),
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


# ----------------------------------------------------------------------------------------------------------------
# evaluation and training cost in the card
# ----------------------------------------------------------------------------------------------------------------

#: how each metric of a ``metrics.json`` is named in the card (and whether lower is better)
METRIC_NAMES = {
    "fid": ("FID (clean-fid)", "lower"),
    "kid": ("KID (clean-fid)", "lower"),
    "fd_digits": ("FD (digits classifier)", "lower"),
    "kd_digits": ("KD (digits classifier)", "lower"),
    "clip_score": ("CLIP score", "higher"),
    "images_per_s": ("images/s", "higher"),
    "peak_memory_gb": ("peak memory (GiB)", "lower"),
}
#: the quality metrics that go into the card's ``model-index`` (speed and memory depend on the machine)
MODEL_INDEX_METRICS = ("fid", "kid", "fd_digits", "kd_digits", "clip_score")


#: the file ``diffusers-onestep evaluate`` writes its metrics and protocol to
METRICS_NAME = "metrics.json"


def read_metrics(folder: str) -> Optional[Dict[str, Any]]:
    """The ``metrics.json`` of an evaluation folder, or ``None``."""
    path = os.path.join(folder, METRICS_NAME)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("metrics"), dict) else None


def protocol_text(protocol: Dict[str, Any]) -> str:
    """The protocol of a ``metrics.json`` as sentences (printed by ``evaluate`` and written into model cards)."""
    features = protocol.get("features") or {}
    height, width = (protocol.get("resolution") or [None, None])[:2]
    steps = protocol.get("steps")
    lines = [
        f"Protocol: {protocol.get('num_images')} images at {height}x{width} from the first {protocol.get('num_images')} "
        f"captions of `{protocol.get('dataset')}` (column `{protocol.get('caption_column')}`), "
        f"{'all of the student’s' if steps is None else steps} step(s)"
        + (f" (timesteps {protocol['timesteps']})" if protocol.get("timesteps") else "")
        + f", guidance {protocol.get('guidance') if protocol.get('guidance') is not None else 'none (distilled)'}, "
        f"seed {protocol.get('seed')} ({protocol.get('seeding')}).",
        f"Reference: {protocol.get('reference_images')} images of `{protocol.get('reference')}`.",
        f"Features ({features.get('name')}): {features.get('weights')}; resize: {features.get('resize')}.",
        f"KID: kernel {protocol.get('kid', {}).get('kernel')}, {protocol.get('kid', {}).get('subsets')} subsets of "
        f"up to {protocol.get('kid', {}).get('subset_size')} images.",
    ]
    if protocol.get("clip"):
        lines.append(f"CLIP score: `{protocol['clip']['model']}`, {protocol['clip']['score']}.")
    lines.append(f"Speed and memory on {protocol.get('device')}: {protocol.get('peak_memory')}.")
    return "\n".join(lines)


def read_evaluation(folder: str) -> Optional[Dict[str, Any]]:
    """The ``evaluation/metrics.json`` of a student folder, or ``None``."""
    return read_metrics(os.path.join(folder, EVALUATION_DIR))


def eval_results(record: Dict[str, Any]):
    """The ``model-index`` entries (``huggingface_hub.EvalResult``) of an evaluation record: one per quality metric,
    each with the protocol as its dataset and metric arguments."""
    from huggingface_hub import EvalResult

    protocol = record.get("protocol") or {}
    dataset = str(protocol.get("dataset"))
    dataset_args = {
        key: protocol.get(key) for key in ("num_images", "resolution", "seed", "caption_column", "reference")
    }
    # stated even when unset (YAML drops nulls): the steps the student ran, and its guidance
    timesteps = protocol.get("timesteps")
    dataset_args["steps"] = protocol.get("steps") or (len(timesteps) if timesteps else "all of the student's")
    guidance = protocol.get("guidance")
    dataset_args["guidance"] = guidance if guidance is not None else "none (distilled into the student)"
    results = []
    for key in MODEL_INDEX_METRICS:
        value = (record.get("metrics") or {}).get(key)
        if value is None:
            continue
        metric_args = {"features": (protocol.get("features") or {}).get("name")}
        if key == "clip_score":
            metric_args = {"clip_model": (protocol.get("clip") or {}).get("model")}
        results.append(
            EvalResult(
                task_type="text-to-image",
                dataset_type=dataset if is_hub_id(dataset) else os.path.basename(os.path.normpath(dataset)),
                dataset_name=f"{os.path.basename(os.path.normpath(dataset))} ({protocol.get('num_images')} captions)",
                dataset_args=dataset_args,
                metric_type=key,
                metric_name=METRIC_NAMES[key][0],
                metric_value=round(float(value), 6),
                metric_args=metric_args,
            )
        )
    return results


def evaluation_text(record: Dict[str, Any], grid: Optional[str] = None) -> str:
    """The card's ``## Evaluation`` section: a table of the metrics and the full protocol."""
    lines = ["## Evaluation", "", "| metric | value |", "|---|---|"]
    for key, value in (record.get("metrics") or {}).items():
        if value is None:
            continue
        name, better = METRIC_NAMES.get(key, (key, ""))
        lines.append(f"| {name}{f' ({better} is better)' if better else ''} | {float(value):.4g} |")
    lines += ["", protocol_text(record.get("protocol") or {}).replace("\n", "\n\n")]
    if grid:
        lines += ["", f"![evaluation samples]({grid})"]
    return "\n".join(lines) + "\n"


def training_cost_text(cost: Optional[Dict[str, Any]]) -> Optional[str]:
    """The card's line on what training cost: wall time, device(s) and peak memory (from the run's records)."""
    if not cost:
        return None
    hours = float(cost.get("wall_seconds", 0.0)) / 3600
    memory = cost.get("peak_memory_bytes")
    shown_memory = "unknown" if memory is None else f"{memory / 2**30:.2f} GiB ({cost.get('peak_memory_kind')})"
    return (
        f"- Training cost: {hours:.2f} h wall time ({float(cost.get('wall_seconds', 0.0)):.0f} s over "
        f"{cost.get('sessions', 1)} session(s)) on {cost.get('num_processes', 1)} x {cost.get('device')}; "
        f"peak memory {shown_memory}"
    )


def _replace_section(text: str, heading: str, section: str) -> str:
    """``text`` with its markdown section ``heading`` (up to the next ``## ``) replaced by ``section``, or with
    ``section`` added before ``## License`` (at the end when there is none)."""
    lines = text.split("\n")
    start = next((i for i, line in enumerate(lines) if line.strip() == heading), None)
    if start is not None:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        return "\n".join(lines[:start] + section.rstrip("\n").split("\n") + [""] + lines[end:])
    anchor = next((i for i, line in enumerate(lines) if line.strip() == "## License"), None)
    if anchor is None:
        return text.rstrip("\n") + "\n\n" + section
    return "\n".join(lines[:anchor] + section.rstrip("\n").split("\n") + [""] + lines[anchor:])


def add_evaluation(card, record: Dict[str, Any], model_name: str, grid: Optional[str] = None):
    """``card`` (a ``huggingface_hub.ModelCard``) with the evaluation in its metadata (``model-index``) and its
    text (``## Evaluation``, replacing an older one)."""
    from huggingface_hub import ModelCard

    card.data.eval_results = eval_results(record)
    card.data.model_name = model_name
    text = _replace_section(card.text, "## Evaluation", evaluation_text(record, grid))
    return ModelCard(f"---\n{card.data.to_yaml()}\n---\n{text if text.startswith(chr(10)) else chr(10) + text}")


def card_with_evaluation(folder: str, card_text: Optional[bytes] = None, model_name: Optional[str] = None):
    """The published ``README.md`` of ``folder`` with its evaluation (``evaluation/metrics.json``) added, as bytes;
    ``None`` when the folder has no evaluation or no card. ``card_text`` replaces the folder's own card."""
    from huggingface_hub import ModelCard

    record = read_evaluation(folder)
    path = os.path.join(folder, "README.md")
    if record is None or (card_text is None and not os.path.isfile(path)):
        return None
    card = ModelCard(card_text.decode("utf-8")) if card_text is not None else ModelCard.load(path)
    grid = record.get("grid")
    grid = f"{EVALUATION_DIR}/{grid}" if grid and os.path.isfile(os.path.join(folder, EVALUATION_DIR, grid)) else None
    name = model_name or os.path.basename(os.path.abspath(folder))
    return str(add_evaluation(card, record, name, grid)).encode("utf-8")


def card_base_model(config) -> Optional[str]:
    """The card's ``base_model`` (the Hub's model tree): ``--base_model_id``, else the teacher when it is a Hub id."""
    if config.output.base_model_id:
        return config.output.base_model_id
    return config.teacher if is_hub_id(config.teacher) else None


def write_model_card(
    folder: str,
    config,
    family: str,
    student_timesteps: Sequence[float],
    sample_grid: Optional[str] = None,
    prompts: Sequence[str] = (),
    lora: bool = False,
    repo_id: Optional[str] = None,
    *,
    method,
    training_cost: Optional[Dict[str, Any]] = None,
    evaluation: Optional[Dict[str, Any]] = None,
):
    """Write ``README.md`` (a ``huggingface_hub.ModelCard``) into ``folder`` and return the card (see
    :func:`card_text` for ``method`` and ``repo_id``), with the run's ``training_cost`` and ``evaluation`` (a
    ``metrics.json`` record, :func:`add_evaluation`) when given. The card carries the teacher's license, read from the
    teacher's own card (at ``config.revision``, through ``config.cache_dir``)."""
    from huggingface_hub import ModelCard, ModelCardData

    hub_kwargs = {key: getattr(config, key, None) for key in ("revision", "cache_dir")}
    license_fields = teacher_license(config.teacher, {k: v for k, v in hub_kwargs.items() if v})
    # "one-step" only where it is true: a K-step student (TDM, multi-step DMD2) is tagged "few-step"
    tags: List[str] = [
        "one-step" if len(student_timesteps) == 1 else "few-step",
        "distillation",
        "diffusers-onestep",
        "text-to-image",
        "diffusers",
        family,
        *method.tags,
        _divergence_label(method, config),
    ]
    if lora:
        tags.append("lora")
    data = ModelCardData(
        library_name="diffusers",
        pipeline_tag="text-to-image",
        base_model=card_base_model(config),
        tags=tags,
        **license_fields,
    )
    text = card_text(
        config,
        family,
        student_timesteps,
        sample_grid,
        prompts,
        lora,
        repo_id,
        method=method,
        license_fields=license_fields,
        training_cost=training_cost,
    )
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n{text}")
    if evaluation is not None:
        name = repo_id or os.path.basename(os.path.abspath(config.output.output_dir))
        grid = evaluation.get("grid")
        card = add_evaluation(card, evaluation, name, f"{EVALUATION_DIR}/{grid}" if grid else None)
    card.save(os.path.join(folder, "README.md"))
    return card


def offline_mode() -> bool:
    """Whether ``HF_HUB_OFFLINE`` is set (as ``huggingface_hub`` reads it when imported)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def uncached_while_offline(repo_id: str, filename: str, **hub_kwargs) -> bool:
    """Whether ``filename`` of the Hub repo ``repo_id`` is missing from the local cache while the Hub is offline: then
    "the repo has no such file" cannot be told from "it was never downloaded"."""
    from huggingface_hub import try_to_load_from_cache

    if not offline_mode():
        return False
    kwargs = {k: v for k, v in hub_kwargs.items() if k in ("cache_dir", "revision") and v}
    return not isinstance(try_to_load_from_cache(repo_id, filename, **kwargs), str)


def offline_cache_miss(repo_id: str, cache: str = "Hugging Face") -> str:
    """The sentence for a repo that offline mode keeps from being downloaded (to follow the flag that named it)."""
    return (
        f"{repo_id} is not in the local {cache} cache and offline mode is set (HF_HUB_OFFLINE), so it cannot be "
        "downloaded; unset it once to download it, or pass a local folder."
    )


def check_push_access(repo_id: str, token: Optional[str] = None) -> None:
    """Refuse, in one sentence, a push that cannot work: offline, no token, a token the Hub refuses, a read-only
    token, or a namespace the account cannot write to. Reads only (``whoami``); the repo is created later."""
    import huggingface_hub
    from huggingface_hub.errors import LocalTokenNotFoundError, OfflineModeIsEnabled

    try:
        account = huggingface_hub.whoami(token=token)
    except OfflineModeIsEnabled:
        raise ValueError(
            "--push_to_hub needs the network, but HF_HUB_OFFLINE is set; unset it, or train without --push_to_hub "
            "and push later with `diffusers-onestep push`."
        ) from None
    except LocalTokenNotFoundError:
        raise ValueError("--push_to_hub needs a Hub token; run `hf auth login` or set HF_TOKEN.") from None
    except (OSError, ValueError) as error:  # huggingface_hub's HTTP and connection errors are OSErrors
        raise ValueError(
            f"--push_to_hub could not check the Hub token ({reason_of(error)}); check HF_TOKEN or `hf auth login`."
        ) from None
    role = ((account.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        raise ValueError(
            f"--push_to_hub needs a Hub token with write access, and this token of {account.get('name')!r} is read-only."
        )
    namespace = repo_id.split("/")[0] if "/" in repo_id else None
    writable = [account.get("name")] + [org.get("name") for org in account.get("orgs") or []]
    if namespace is not None and account.get("name") and namespace not in writable:
        raise ValueError(
            f"--hub_model_id {repo_id} is in the namespace {namespace!r}, which the Hub account "
            f"{account.get('name')!r} cannot write to (it can write to {', '.join(map(repr, writable))})."
        )


def create_repo(repo_id: str, private: bool = False, token: Optional[str] = None) -> str:
    """Create ``repo_id`` on the Hub, or reuse it, and return its full id (``namespace/name``). The training script
    calls this first, so a bad token or a taken name fails before anything loads."""
    import huggingface_hub

    return huggingface_hub.create_repo(repo_id, private=private, exist_ok=True, token=token).repo_id


def upload_student(
    folder: str,
    repo_id: str,
    commit_message: str = "Upload one-step student",
    token: Optional[str] = None,
    replacements: Optional[Dict[str, bytes]] = None,
) -> str:
    """Upload the student in ``folder`` to the existing ``repo_id``; checkpoints and logs stay local.

    ``replacements`` (``{path in the folder: content}``) are uploaded instead of the folder's own files, in the same
    single commit (the repo never holds the weights without their config) -- the folder itself is left as it is
    (:func:`files_naming_base_model`)."""
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    if not replacements:
        huggingface_hub.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            commit_message=commit_message,
            ignore_patterns=UPLOAD_IGNORE_PATTERNS,
            token=token,
        )
        return repo_id
    files = sorted(
        os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
        for root, _, names in os.walk(folder)
        for name in names
    )
    kept = filter_repo_objects(files, ignore_patterns=UPLOAD_IGNORE_PATTERNS + sorted(replacements))
    operations = [
        huggingface_hub.CommitOperationAdd(path_in_repo=name, path_or_fileobj=os.path.join(folder, name))
        for name in kept
    ] + [
        huggingface_hub.CommitOperationAdd(path_in_repo=name, path_or_fileobj=content)
        for name, content in sorted(replacements.items())
    ]
    huggingface_hub.create_commit(repo_id, operations, commit_message=commit_message, token=token)
    return repo_id


def push_to_hub(
    folder: str,
    repo_id: str,
    private: bool = False,
    commit_message: str = "Upload one-step student",
    token: Optional[str] = None,
    replacements: Optional[Dict[str, bytes]] = None,
) -> str:
    """Create (or reuse) ``repo_id`` and upload the student in ``folder`` (with ``replacements``, see
    :func:`upload_student`); checkpoints and logs stay local."""
    repo_id = create_repo(repo_id, private=private, token=token)
    return upload_student(folder, repo_id, commit_message=commit_message, token=token, replacements=replacements)


def files_naming_base_model(folder: str, lora_config_name: str, base_model_id: str) -> Dict[str, bytes]:
    """The published contents of a LoRA student folder's config and card with ``base_model_id`` as the base model:
    ``lora_config_name`` (``onestep_lora.json``) names it, unpinned (the revision of a local teacher means nothing on
    the Hub), and the card's ``base_model`` metadata points to it."""
    from huggingface_hub import ModelCard

    with open(os.path.join(folder, lora_config_name), encoding="utf-8") as f:
        lora_config = json.load(f)
    lora_config.update(base_model=base_model_id, base_revision=None)
    files = {lora_config_name: (json.dumps(lora_config, indent=2, sort_keys=True) + "\n").encode("utf-8")}
    card_path = os.path.join(folder, "README.md")
    if os.path.isfile(card_path):
        card = ModelCard.load(card_path)
        card.data.base_model = base_model_id
        files["README.md"] = str(card).encode("utf-8")
    return files
