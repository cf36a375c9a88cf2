"""The library uses only the public API of diffusers, transformers, peft and accelerate, so that it works across the
tested diffusers range instead of one pinned release.

A grep over ``diffusers_onestep/**/*.py`` for private attribute names of those libraries that this code base once
read or overrode, or that the same kind of glue tends to reach for, plus a check that ``OneStepPipeline`` overrides
no private member of ``DiffusionPipeline``. The one documented exception is ``self._execution_device``: the property
every diffusers pipeline reads to find the device its models run on under ``enable_model_cpu_offload`` (no public
API gives it), read in one place, ``OneStepPipeline._compute_device``, and only under CPU offloading.
"""

import os
import re

from diffusers import DiffusionPipeline

from diffusers_onestep import OneStepPipeline


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "diffusers_onestep")

#: private names of diffusers, accelerate, peft and transformers the library must not touch
PRIVATE_NAMES = (
    # diffusers: hooks, offloading and pipeline internals
    "_diffusers_hook",
    "_all_hooks",
    "_progress_bar_config",
    "_reset_stateful_cache",
    "_offload_device",
    "_offload_gpu_id",
    "_exclude_from_cpu_offload",
    "_get_group_onload_device",
    "_is_group_offload_enabled",
    "_maybe_raise_error_if_group_offload_active",
    "_get_signature_keys",
    "_get_signature_types",
    "_internal_dict",
    "_get_init_keys",
    "_fetch_class_library_tuple",
    "_get_pipeline_class",
    "_resolve_custom_pipeline_and_cls",
    "_is_valid_type",
    "_optionally_disable_offloading",
    "_func_optionally_disable_offloading",
    # diffusers: LoRA loading internals
    "_create_lora_config",
    "_lora_loadable_modules",
    "_best_guess_weight_name",
    "_fetch_state_dict",
    "_maybe_expand_lora_state_dict",
    "_pack_dict_with_prefix",
    "_convert_non_diffusers_lora_to_diffusers",
    # accelerate
    "_hf_hook",
    "_old_forward",
    # peft and the peft integrations of diffusers and transformers
    "_hf_peft_config_loaded",
    "_get_submodules",
    "_mark_only_adapters_as_trainable",
    "_prepare_adapter_config",
    "_active_adapter",
    "_disable_adapters",
    # transformers and diffusers models
    "_keep_in_fp32_modules",
    "_no_split_modules",
    "_tied_weights_keys",
    "_attn_implementation",
    "_set_gradient_checkpointing",
    "_gradient_checkpointing_func",
)
#: the one exception: where the library reads ``self._execution_device`` (file, and how often)
EXECUTION_DEVICE_READS = {os.path.join("pipelines", "pipeline_onestep.py"): 1}
#: class attributes diffusers asks pipelines to set (its documented protocol, not internals)
PIPELINE_PROTOCOL = {
    "_optional_components",
    "_callback_tensor_inputs",
    "_exclude_from_cpu_offload",
    "_load_connected_pipes",
}


def _library_files():
    for root, _dirs, files in os.walk(PACKAGE):
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(root, name)
                yield os.path.relpath(path, PACKAGE), path


def _code_lines(path):
    """The lines of a file without comments and docstring-only lines (which may name what the code avoids)."""
    in_docstring = False
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            stripped = line.strip()
            quotes = stripped.count('"""') + stripped.count("'''")
            if in_docstring or stripped.startswith(('"""', "'''", 'r"""')):
                if quotes % 2 == 1:
                    in_docstring = not in_docstring
                continue
            yield number, line.split("#", 1)[0]


def test_no_private_attribute_of_diffusers_transformers_peft_or_accelerate_in_the_library():
    pattern = re.compile(r"[.'\"](" + "|".join(map(re.escape, PRIVATE_NAMES)) + r")\b")
    hits = []
    for relative, path in _library_files():
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):  # comments and docstrings too: nothing should name them
                hits += [f"diffusers_onestep/{relative}:{number}: {m.group(1)}" for m in pattern.finditer(line)]
    assert not hits, "private attributes read or written:\n" + "\n".join(hits)


def test_execution_device_is_read_in_one_place_only_and_never_through_the_class():
    reads = {}
    for relative, path in _library_files():
        for _number, line in _code_lines(path):
            assert "_execution_device.fget" not in line and "DiffusionPipeline._execution_device" not in line, relative
            assert not re.search(r"def _execution_device\b", line), f"{relative} overrides _execution_device"
            count = len(re.findall(r"\bself\._execution_device\b", line))
            if count:
                reads[relative] = reads.get(relative, 0) + count
    assert reads == EXECUTION_DEVICE_READS


def test_onestep_pipeline_overrides_no_private_member_of_diffusion_pipeline():
    own_private = {name for name in vars(OneStepPipeline) if name.startswith("_") and not name.startswith("__")}
    overridden = {name for name in own_private if hasattr(DiffusionPipeline, name)} - PIPELINE_PROTOCOL
    assert not overridden
    # nor the config bookkeeping diffusers' loaders rely on
    assert "register_to_config" not in vars(OneStepPipeline)
