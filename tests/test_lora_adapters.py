"""Style LoRAs on a student, for every family (PixArt's transformer has no PeftAdapterMixin): load_lora_weights,
set_adapters, fuse_lora/unfuse_lora, delete_adapters, unload_lora_weights. Files are written by each family's native
``save_lora_weights`` (the diffusers layout: ``unet.``/``transformer.`` keys)."""

import os

import diffusers
import numpy as np
import pytest
import torch

from diffusers_onestep.families import get_adapter_class
from diffusers_onestep.lora import LORA_WEIGHT_NAME, fold_lora_scale, inject_lora, lora_keys, read_lora_state_dict
from diffusers_onestep.testing import (
    TINY_FAMILIES,
    native_one_step_pipeline,
    random_lora_state_dict,
    save_to_hub_cache,
)


#: the two LoRAs stacked on every student: ranks and seeds (same target modules: the family's defaults)
RANKS = {"a": 4, "b": 2}
WEIGHTS = {"a": 0.7, "b": -1.3}


def _save_lora(pipe, state, folder):
    """``save_lora_weights`` of the family's native LoRA loader (diffusers key prefixes, no metadata)."""
    adapter = pipe.adapter
    saver = getattr(diffusers, adapter.lora_pipeline_class_name).save_lora_weights
    saver(folder, **adapter.lora_save_kwargs(state))
    return folder


@pytest.fixture(scope="module")
def style_loras(tmp_path_factory, native_folder):
    """Per family: ``{"a": (folder, peft state dict), "b": ...}`` of two random LoRAs on its tiny student."""
    from diffusers_onestep import OneStepPipeline

    root = tmp_path_factory.mktemp("style-loras")
    out = {}

    def get(family):
        if family not in out:
            pipe = OneStepPipeline.from_pretrained(native_folder(family))
            targets = get_adapter_class(family).default_lora_target_modules
            out[family] = {}
            for seed, (name, rank) in enumerate(RANKS.items()):
                state = random_lora_state_dict(pipe.denoiser, targets, rank=rank, seed=10 + seed, scale=0.3)
                out[family][name] = (_save_lora(pipe, state, str(root / family / name)), state)
        return out[family]

    return get


def _concatenated_lora(states, weights):
    """One LoRA of rank r_a + r_b whose update is the weighted sum of the updates of ``states``:
    ``sum_i w_i B_i A_i = [w_a B_a, w_b B_b] [A_a; A_b]`` (lora_A stacked on the rank axis, lora_B side by side),
    every adapter at scale 1 (lora_alpha = r, as files without metadata are read)."""
    out = {}
    for key in states[0]:
        if ".lora_A." in key:
            out[key] = torch.cat([s[key] for s in states], dim=0)
        else:
            out[key] = torch.cat([w * s[key] for s, w in zip(states, weights)], dim=1)
    return out


@pytest.mark.oldest
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_stack_weight_fuse_unfuse_and_unload(family, style_loras, native_folder, load_student, run, tmp_path):
    loras = style_loras(family)
    pipe = load_student(native_folder(family), family)
    denoiser_name = get_adapter_class(family).denoiser_name
    before = {k: v.clone() for k, v in pipe.denoiser.state_dict().items()}
    base = run(pipe)
    assert pipe.get_active_adapters() == [] and pipe.get_list_adapters() == {}

    # two LoRAs change the output; the one loaded last is the active one (diffusers' rule)
    pipe.load_lora_weights(loras["a"][0], adapter_name="a")
    only_a = run(pipe)
    pipe.load_lora_weights(os.path.join(loras["b"][0], LORA_WEIGHT_NAME), adapter_name="b")
    only_b = run(pipe)
    assert pipe.get_active_adapters() == ["b"]
    assert pipe.get_list_adapters() == {denoiser_name: ["a", "b"]}
    assert np.abs(only_a - base).max() > 1e-3 and np.abs(only_b - base).max() > 1e-3
    assert np.abs(only_a - only_b).max() > 1e-3

    # weight 0 is no adapter at all, bit for bit: each LoRA layer adds 0 * B A x to its base output
    pipe.set_adapters(["a", "b"], [0.0, 0.0])
    assert pipe.get_active_adapters() == ["a", "b"]
    assert np.array_equal(run(pipe), base)
    pipe.set_adapters(["a", "b"], [1.0, 0.0])
    assert np.array_equal(run(pipe), only_a)

    # stacked with weights = one LoRA of the concatenated ranks (the same weight update, summed in another order)
    pipe.set_adapters(["a", "b"], [WEIGHTS["a"], WEIGHTS["b"]])
    stacked = run(pipe)
    single = load_student(native_folder(family), family)
    concatenated = _concatenated_lora([loras["a"][1], loras["b"][1]], [WEIGHTS["a"], WEIGHTS["b"]])
    single.load_lora_weights(_save_lora(single, concatenated, str(tmp_path / "concatenated")))
    assert np.abs(stacked - run(single)).max() <= 1e-5
    assert np.abs(stacked - only_a).max() > 1e-3

    # fused: the same output; lora_scale multiplies every fused adapter's weight
    pipe.fuse_lora()
    assert all(layer.merged for name, layer in pipe.denoiser.named_modules() if hasattr(layer, "merged_adapters"))
    assert np.abs(run(pipe) - stacked).max() <= 1e-5
    pipe.unfuse_lora()
    assert np.abs(run(pipe) - stacked).max() <= 1e-5
    pipe.fuse_lora(lora_scale=0.5)
    half = load_student(native_folder(family), family)
    half.load_lora_weights(loras["a"][0], adapter_name="a")
    half.load_lora_weights(loras["b"][0], adapter_name="b")
    half.set_adapters(["a", "b"], [0.5 * WEIGHTS["a"], 0.5 * WEIGHTS["b"]])
    assert np.abs(run(pipe) - run(half)).max() <= 1e-5
    # unfusing restores the weights of the adapters as they were before fuse_lora(lora_scale=0.5)
    pipe.unfuse_lora()
    assert np.abs(run(pipe) - stacked).max() <= 1e-5

    # unloading after fuse/unfuse: the base weights and output up to the rounding of W + dW - dW
    pipe.unload_lora_weights()
    assert pipe.get_list_adapters() == {} and not any("lora" in n for n, _ in pipe.denoiser.named_modules())
    after = pipe.denoiser.state_dict()
    assert after.keys() == before.keys()
    assert max((after[k] - v).abs().max().item() for k, v in before.items()) <= 1e-6
    assert np.abs(run(pipe) - base).max() <= 1e-5

    # unloading without fusing gives the model back exactly
    before, unloaded = {k: v.clone() for k, v in after.items()}, run(pipe)
    pipe.load_lora_weights(loras["a"][0])
    assert pipe.get_active_adapters() == ["default_0"]
    pipe.unload_lora_weights()
    assert all(torch.equal(pipe.denoiser.state_dict()[k], v) for k, v in before.items())
    assert np.array_equal(run(pipe), unloaded)


@pytest.mark.parametrize("family", ["sdxl", "pixart_alpha"])
def test_disable_delete_and_fuse_then_unload_bakes_the_lora_in(family, style_loras, native_folder, load_student, run):
    loras = style_loras(family)
    pipe = load_student(native_folder(family), family)
    base = run(pipe)
    pipe.load_lora_weights(loras["a"][0], adapter_name="a")
    pipe.load_lora_weights(loras["b"][0], adapter_name="b")
    only_b = run(pipe)
    pipe.disable_lora()
    assert np.array_equal(run(pipe), base)
    pipe.enable_lora()
    assert np.array_equal(run(pipe), only_b)

    pipe.set_adapters(["a", "b"])
    pipe.delete_adapters("a")
    assert pipe.get_list_adapters() == {get_adapter_class(family).denoiser_name: ["b"]}
    assert pipe.get_active_adapters() == ["b"] and np.array_equal(run(pipe), only_b)

    pipe.fuse_lora()
    pipe.unload_lora_weights()  # fused, then unloaded: the LoRA stays in the weights, its layers are gone
    assert not any("lora" in n for n, _ in pipe.denoiser.named_modules())
    assert np.abs(run(pipe) - only_b).max() <= 1e-5


@pytest.mark.oldest
@pytest.mark.parametrize("family", ["sdxl", "sana", "sana_sprint", "flux"])  # PixArt's pipelines have no LoRA loader
@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")  # diffusers' own loader stacking "b" on "a"
def test_equals_the_native_pipeline_with_the_same_loras(family, style_loras, native_folder, load_student, run):
    loras = style_loras(family)
    native, kwargs = native_one_step_pipeline(family, native_folder(family))
    pipe = load_student(native_folder(family), family)
    for target in (native, pipe):
        # diffusers before 0.40 finds no weight_name by itself offline, even in a local folder
        named = {"weight_name": LORA_WEIGHT_NAME} if target is native else {}
        target.load_lora_weights(loras["a"][0], adapter_name="a", **named)
        target.load_lora_weights(loras["b"][0], adapter_name="b", **named)
        target.set_adapters(["a", "b"], [WEIGHTS["a"], WEIGHTS["b"]])
    assert pipe.get_active_adapters() == native.get_active_adapters() == ["a", "b"]
    assert np.abs(run(pipe) - run(native, **kwargs)).max() <= 1e-5
    native.fuse_lora(lora_scale=0.5)
    pipe.fuse_lora(lora_scale=0.5)
    assert np.abs(run(pipe) - run(native, **kwargs)).max() <= 1e-5


def test_hub_repo_id_loads_offline(style_loras, native_folder, load_student, run, hub_cache):
    folder, _ = style_loras("sana")["a"]
    save_to_hub_cache(folder, "someone/sana-style-lora")
    pipe = load_student(native_folder("sana"), "sana")
    pipe.load_lora_weights("someone/sana-style-lora", weight_name=LORA_WEIGHT_NAME, adapter_name="hub")
    local = load_student(native_folder("sana"), "sana")
    local.load_lora_weights(folder)
    assert np.array_equal(run(pipe), run(local))


def test_a_state_dict_in_peft_or_diffusers_keys_loads(style_loras, native_folder, load_student, run):
    folder, state = style_loras("pixart_alpha")["a"]
    from_file = load_student(native_folder("pixart_alpha"), "pixart_alpha")
    from_file.load_lora_weights(folder)
    for given in (state, {f"transformer.{k}": v for k, v in state.items()}):
        pipe = load_student(native_folder("pixart_alpha"), "pixart_alpha")
        pipe.load_lora_weights(given)
        assert np.array_equal(run(pipe), run(from_file))


def test_lora_students_and_style_loras_together(style_loras, native_folder, load_student, run, tmp_path):
    loras = style_loras("sana")
    # a LoRA student is fused for good and leaves no LoRA layer: style LoRAs stack on it
    pipe = load_student(native_folder("sana"), "sana")
    pipe.load_student_lora(loras["b"][0])
    student = run(pipe)
    pipe.load_lora_weights(loras["a"][0], adapter_name="style")
    assert pipe.get_list_adapters() == {"transformer": ["style"]}
    assert np.abs(run(pipe) - student).max() > 1e-3
    pipe.set_adapters("style", 0.0)
    assert np.array_equal(run(pipe), student)
    # the other way round, fusing the student would remove the style LoRA's layers: refused
    with pytest.raises(
        ValueError,
        match=r"^Load the LoRA student before any other LoRA: the transformer carries "
        r"style; call unload_lora_weights\(\) first\.$",
    ):
        pipe.load_student_lora(loras["b"][0])


@pytest.mark.parametrize(
    "action, message",
    [
        (lambda p, L, t: p.load_lora_weights(str(t / "missing")), r"No LoRA file or folder at .*missing\."),
        (lambda p, L, t: p.load_lora_weights(str(t / "missing.safetensors")), r"No LoRA file or folder at .*\."),
        (
            lambda p, L, t: p.load_lora_weights(str(t)),
            r"The folder .* has no \.safetensors LoRA file \(diffusers names it "
            r"pytorch_lora_weights\.safetensors\)\.",
        ),
        (
            lambda p, L, t: p.load_lora_weights(L["a"][0], weight_name="style.safetensors"),
            r"The folder .*/a has no LoRA file style\.safetensors\.",
        ),
        (
            lambda p, L, t: p.load_lora_weights(
                {
                    "unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(2, 4),
                    "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": torch.zeros(4, 2),
                }
            ),
            r"The LoRA file holds no weights for the SANA transformer \(it holds weights for: unet\)\.",
        ),
        (
            lambda p, L, t: (
                p.load_lora_weights(L["a"][0], adapter_name="x"),
                p.load_lora_weights(L["b"][0], adapter_name="x"),
            ),
            r"The transformer already has an adapter named 'x'; pass another `adapter_name` or call delete_adapters\('x'\) "
            r"first\.",
        ),
        (
            lambda p, L, t: p.load_lora_weights(L["a"][0], low_cpu_mem_usage=True),
            r"load_lora_weights\(\) got unexpected keyword arguments: low_cpu_mem_usage \(it takes adapter_name, weight_name, "
            r"cache_dir, force_download, proxies, local_files_only, token, revision, subfolder\)\.",
        ),
        (lambda p, L, t: p.set_adapters("style"), r"No LoRA adapter named 'style' \(none is loaded\)\."),
        (
            lambda p, L, t: (p.load_lora_weights(L["a"][0], adapter_name="a"), p.set_adapters(["a", "b"])),
            r"No LoRA adapter named 'b' \(loaded: a\)\.",
        ),
        (
            lambda p, L, t: (p.load_lora_weights(L["a"][0], adapter_name="a"), p.set_adapters(["a"], [0.5, 1.0])),
            r"Got 2 adapter weights for 1 adapters \(a\); pass one weight per adapter\.",
        ),
        (
            lambda p, L, t: (p.load_lora_weights(L["a"][0], adapter_name="a"), p.set_adapters("a", {"down": 1.0})),
            r"Per-block LoRA weights \(a dict\) are not supported; give one number per adapter in `adapter_weights`\.",
        ),
        (
            lambda p, L, t: (
                p.load_lora_weights(L["a"][0], adapter_name="a"),
                p.fuse_lora(),
                p.set_adapters("a", 0.5),
            ),
            r"Call unfuse_lora\(\) before set_adapters\(\): adapters are fused into the weights \(or unload_lora_weights\(\) "
            r"to keep them fused for good\)\.",
        ),
        (
            lambda p, L, t: (
                p.load_lora_weights(L["a"][0], adapter_name="a"),
                p.fuse_lora(),
                p.load_lora_weights(L["b"][0]),
            ),
            r"Call unfuse_lora\(\) before load_lora_weights\(\)",
        ),
        (
            lambda p, L, t: (p.load_lora_weights(L["a"][0], adapter_name="a"), p.fuse_lora(), p.delete_adapters("a")),
            r"Adapters a are fused; call unfuse_lora\(\) before deleting them\.",
        ),
    ],
    ids=[
        "missing-folder",
        "missing-file",
        "folder-without-lora",
        "wrong-weight-name",
        "other-family",
        "duplicate-name",
        "unknown-kwarg",
        "no-adapter",
        "unknown-adapter",
        "weight-count",
        "per-block-weights",
        "set-while-fused",
        "load-while-fused",
        "delete-fused",
    ],
)
def test_bad_input_is_one_sentence(action, message, style_loras, native_folder, load_student, tmp_path):
    pipe = load_student(native_folder("sana"), "sana")
    with pytest.raises((ValueError, TypeError), match=f"^{message}$" if message.endswith(r"\.") else message):
        action(pipe, style_loras("sana"), tmp_path)


def test_files_keep_the_diffusers_layout(style_loras):
    for family in TINY_FAMILIES:
        prefix = get_adapter_class(family).denoiser_name + "."
        keys = lora_keys(os.path.join(style_loras(family)["a"][0], LORA_WEIGHT_NAME))
        assert keys and all(k.startswith(prefix) and ".lora_" in k for k in keys)


# ----------------------------------------------------------------------------------------------------------------
# the paths for diffusers releases without LoRA metadata (0.33)
# ----------------------------------------------------------------------------------------------------------------


def test_reading_without_metadata_support_gives_the_same_weights(style_loras, student, monkeypatch):
    import diffusers_onestep.lora as lora_module

    for family in ("sdxl", "sana"):
        adapter = student(family).adapter
        folder, _ = style_loras(family)["a"]
        with_metadata = read_lora_state_dict(adapter, folder)
        monkeypatch.setattr(lora_module, "lora_metadata_supported", lambda adapter: False)
        without = read_lora_state_dict(adapter, folder)
        monkeypatch.undo()
        assert without[2] is None and without[0].keys() == with_metadata[0].keys()
        assert all(torch.equal(without[0][k], v) for k, v in with_metadata[0].items())


def test_fold_lora_scale_keeps_the_update_for_readers_without_metadata(student, monkeypatch):
    import copy

    from peft import LoraConfig

    from diffusers_onestep.lora import lora_metadata

    denoiser = student("sana").denoiser
    state = random_lora_state_dict(denoiser, ["to_q", "to_k"], rank=4, seed=3, scale=0.3)
    config = lora_metadata(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k"]))
    with_alpha, folded = copy.deepcopy(denoiser), copy.deepcopy(denoiser)
    inject_lora(with_alpha, state, "x", metadata=config)
    inject_lora(folded, fold_lora_scale(state, config), "x")  # read as a file without metadata: alpha = r
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    text = torch.randn(1, 5, 8, generator=torch.Generator().manual_seed(1))
    call = {"encoder_hidden_states": text, "timestep": torch.tensor([500.0]), "return_dict": False}
    assert torch.allclose(with_alpha(x, **call)[0], folded(x, **call)[0], atol=1e-6)
    # the family adapters fold on save where diffusers cannot store the metadata
    import diffusers_onestep.lora as lora_module

    adapter = student("sana").adapter
    assert adapter.lora_save_kwargs(state, config)["transformer_lora_adapter_metadata"] == config
    monkeypatch.setattr(lora_module, "lora_metadata_supported", lambda adapter: False)
    kwargs = adapter.lora_save_kwargs(state, config)
    assert set(kwargs) == {"transformer_lora_layers"}
    assert all(
        torch.equal(kwargs["transformer_lora_layers"][k], v * (2.0 if ".lora_B." in k else 1.0))
        for k, v in state.items()
    )
    with pytest.raises(ValueError, match="per-layer ranks or alphas, rsLoRA or DoRA"):
        fold_lora_scale(state, {**config, "rank_pattern": {"to_q": 2}})


def test_saving_with_style_loras_loaded_is_refused_until_they_are_baked_in(
    style_loras, native_folder, load_student, run, tmp_path
):
    pipe = load_student(native_folder("sdxl"), "sdxl")
    pipe.load_lora_weights(style_loras("sdxl")["a"][0], adapter_name="a")
    with pytest.raises(ValueError, match=r"Style LoRAs \['a'\] are loaded: call `pipe.fuse_lora\(\)`"):
        pipe.save_pretrained(tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    styled = run(pipe)
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    pipe.save_pretrained(tmp_path / "baked")
    reloaded = load_student(str(tmp_path / "baked"), "sdxl")
    assert np.abs(run(reloaded) - styled).max() <= 1e-5
