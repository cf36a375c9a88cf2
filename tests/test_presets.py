"""Presets of public one-step checkpoints, resolved through the real Hub code path (hf_hub_download, diffusers'
from_pretrained) on tiny stand-ins laid out in a Hub cache (testing.save_to_hub_cache), offline.

Each preset is checked against its model card's recipe assembled by hand with plain diffusers: the same scheduler
timesteps and parameterization, and the same images.
"""

import os

import numpy as np
import pytest
import torch
from diffusers import (
    DDPMScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    PixArtAlphaPipeline,
    PixArtTransformer2DModel,
    SanaSprintPipeline,
    StableDiffusionXLPipeline,
    TCDScheduler,
    UNet2DConditionModel,
)
from safetensors.torch import save_file

from diffusers_onestep import OneStepPipeline
from diffusers_onestep.families import SDXLAdapter
from diffusers_onestep.pipelines import PRESETS, find_preset
from diffusers_onestep.pipelines.loading import load_state_dict_file
from diffusers_onestep.testing import (
    random_lora_state_dict,
    save_to_hub_cache,
    tiny_fixture,
    tiny_native_pipeline,
    tiny_pixart_components,
)


SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"
PIXART_BASE = "PixArt-alpha/PixArt-XL-2-1024-MS"
PROMPT = "a photo of a cat"


def _student_unet_state(base_unet_config, seed):
    torch.manual_seed(seed)
    return UNet2DConditionModel.from_config(base_unet_config).state_dict()


def _sdxl_lora_file(folder, unet, weight_name, seed):
    # peft key names throughout: diffusers' load_lora_weights (the card recipe) drops the attention weights of the
    # mixed names `convert_state_dict_to_diffusers` writes (test_lora_loading.py covers that format for our loader)
    state = random_lora_state_dict(unet, SDXLAdapter.default_lora_target_modules, rank=4, seed=seed, scale=0.2)
    StableDiffusionXLPipeline.save_lora_weights(folder, unet_lora_layers=state, weight_name=weight_name)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A Hub cache holding tiny stand-ins of every preset's repos; HF_HUB_CACHE points at it for this module."""
    import huggingface_hub.constants

    root = tmp_path_factory.mktemp("presets")
    cache = str(root / "hub")
    staging = root / "staging"

    def put(repo_id, build):
        folder = staging / repo_id.replace("/", "--")
        folder.mkdir(parents=True)
        build(str(folder))
        save_to_hub_cache(str(folder), repo_id, cache_dir=cache)

    sdxl = tiny_native_pipeline("sdxl")
    unet_config = sdxl.unet.config
    put(SDXL_BASE, lambda d: sdxl.save_pretrained(d))

    def turbo(d):  # a full pipeline repo with the card's scheduler
        pipe = tiny_native_pipeline("sdxl", seed=1)
        pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(
            pipe.scheduler.config, timestep_spacing="trailing"
        )
        pipe.save_pretrained(d)

    put("stabilityai/sdxl-turbo", turbo)
    put("XDG-XHS/distar_long_1step", lambda d: tiny_native_pipeline("sdxl", seed=2).save_pretrained(d))

    def dmd2(d):
        # legacy pickled fp16 state dicts, as the DMD2 repo ships them
        for i, name in enumerate(("dmd2_sdxl_1step_unet_fp16.bin", "dmd2_sdxl_4step_unet_fp16.bin")):
            state = {k: v.half() for k, v in _student_unet_state(unet_config, 10 + i).items()}
            torch.save(state, os.path.join(d, name))
        _sdxl_lora_file(d, sdxl.unet, "dmd2_sdxl_4step_lora_fp16.safetensors", seed=12)

    put("tianweiy/DMD2", dmd2)
    put(
        "ByteDance/SDXL-Lightning",
        lambda d: save_file(
            _student_unet_state(unet_config, 20), os.path.join(d, "sdxl_lightning_1step_unet_x0.safetensors")
        ),
    )

    def hyper(d):
        save_file(_student_unet_state(unet_config, 30), os.path.join(d, "Hyper-SDXL-1step-Unet.safetensors"))
        _sdxl_lora_file(d, sdxl.unet, "Hyper-SDXL-1step-lora.safetensors", seed=31)

    put("ByteDance/Hyper-SD", hyper)

    def nitro(d):
        for i, name in enumerate(("nitrosd-realism_unet.safetensors", "nitrosd-vibrant_unet.safetensors")):
            save_file(_student_unet_state(unet_config, 40 + i), os.path.join(d, name))

    put("ChenDY/NitroFusion", nitro)
    put(PIXART_BASE, lambda d: tiny_native_pipeline("pixart_alpha").save_pretrained(d))
    put(
        "PixArt-alpha/PixArt-Alpha-DMD-XL-2-512x512",
        lambda d: tiny_pixart_components(seed=5)["transformer"].save_pretrained(os.path.join(d, "transformer")),
    )
    for i, repo in enumerate(
        (
            "Efficient-Large-Model/Sana_Sprint_0.6B_1024px_diffusers",
            "Efficient-Large-Model/Sana_Sprint_1.6B_1024px_diffusers",
        )
    ):
        put(repo, lambda d, i=i: tiny_native_pipeline("sana_sprint", seed=6 + i).save_pretrained(d))

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_CACHE", cache)
        mp.setattr(huggingface_hub.constants, "HF_HUB_CACHE", cache)
        yield cache


def _ours(repo_id, run, **kwargs):
    pipe = OneStepPipeline.from_pretrained(repo_id, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe, run(pipe)


def _native_sdxl(repo_id=SDXL_BASE, unet_weights=None, scheduler_cls=LCMScheduler, **scheduler_kwargs):
    """The card recipe: StableDiffusionXLPipeline on the base (+ a UNet loaded with from_config/load_state_dict)."""
    from huggingface_hub import hf_hub_download

    kwargs = {}
    if unet_weights is not None:
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(repo_id, subfolder="unet"))
        repo, name = unet_weights
        path = hf_hub_download(repo, name)
        state = torch.load(path, weights_only=True) if name.endswith(".bin") else load_state_dict_file(path)
        unet.load_state_dict(state)
        kwargs["unet"] = unet
    pipe = StableDiffusionXLPipeline.from_pretrained(repo_id, add_watermarker=False, **kwargs)
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config, **scheduler_kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _assert_scheduler(pipe, preset):
    assert pipe.scheduler.config.conditioning_timesteps == [
        float(t) for t in preset.conditioning_timesteps
    ] or pipe.scheduler.config.conditioning_timesteps == list(preset.conditioning_timesteps)
    assert pipe.scheduler.config.prediction_type == preset.prediction_type
    assert pipe.config.family == preset.family


# ---------------------------------------------------------------------------------------------------------------------
# SDXL students run with LCMScheduler and fixed timesteps on their cards
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "repo_id, weight_name, timesteps",
    [
        ("tianweiy/DMD2", None, [399]),
        ("tianweiy/DMD2", "dmd2_sdxl_4step_unet_fp16.bin", [999, 749, 499, 249]),
        ("ByteDance/Hyper-SD", None, [800]),
        ("ChenDY/NitroFusion", None, [249]),
        ("ChenDY/NitroFusion", "nitrosd-vibrant_unet.safetensors", [499]),
    ],
)
def test_sdxl_unet_presets_equal_the_card_recipe(repo_id, weight_name, timesteps, hub, run):
    preset = find_preset(repo_id, weight_name)
    pipe, images = _ours(repo_id, run, **({"weight_name": weight_name} if weight_name else {}))
    _assert_scheduler(pipe, preset)
    assert pipe.scheduler.timesteps.tolist() == timesteps
    native = _native_sdxl(unet_weights=(repo_id, preset.weight_name))
    expected = run(native, timesteps=timesteps, guidance_scale=0.0)
    assert np.abs(images - expected).max() <= 1e-5
    # the student weights were really loaded (the base UNet gives another image)
    base = run(_native_sdxl(), timesteps=timesteps, guidance_scale=0.0)
    assert np.abs(images - base).max() > 1e-3


def test_dmd2_four_step_lora_preset(hub, run):
    pipe, images = _ours("tianweiy/DMD2", run, weight_name="dmd2_sdxl_4step_lora_fp16.safetensors")
    _assert_scheduler(pipe, find_preset("tianweiy/DMD2", "dmd2_sdxl_4step_lora_fp16.safetensors"))
    assert not any("lora" in name for name, _ in pipe.unet.named_modules())  # fused and removed
    native = _native_sdxl()
    native.load_lora_weights("tianweiy/DMD2", weight_name="dmd2_sdxl_4step_lora_fp16.safetensors")
    native.fuse_lora(lora_scale=1.0)
    expected = run(native, timesteps=[999, 749, 499, 249], guidance_scale=0.0)
    assert np.abs(images - expected).max() <= 1e-5


def test_distar_full_pipeline_preset(hub, run):
    pipe, images = _ours("XDG-XHS/distar_long_1step", run)
    _assert_scheduler(pipe, find_preset("XDG-XHS/distar_long_1step"))
    expected = run(_native_sdxl("XDG-XHS/distar_long_1step"), timesteps=[399], guidance_scale=0.0)
    assert np.abs(images - expected).max() <= 1e-5


def _unit_noise_latents(pipe, seed=0):
    """The Euler recipe's noise rescaled so its UNet input is the unit noise OneStepPipeline feeds (the documented
    difference: trailing Euler feeds sqrt(1 - alphā_999) = 0.998 times unit noise)."""
    pipe.scheduler.set_timesteps(1)
    sigma = float(pipe.scheduler.sigmas[0])
    scale = (sigma**2 + 1) ** 0.5 / float(pipe.scheduler.init_noise_sigma)
    assert 0.99 < sigma / (sigma**2 + 1) ** 0.5 < 1  # the 0.2% the preset notes mention
    return torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(seed)) * scale


def test_sdxl_lightning_x0_preset(hub, run):
    preset = find_preset("ByteDance/SDXL-Lightning")
    pipe, images = _ours("ByteDance/SDXL-Lightning", run)
    _assert_scheduler(pipe, preset)
    assert pipe.scheduler.config.prediction_type == "sample" and pipe.scheduler.timesteps.tolist() == [999]
    native = _native_sdxl(
        unet_weights=("ByteDance/SDXL-Lightning", preset.weight_name),
        scheduler_cls=EulerDiscreteScheduler,
        timestep_spacing="trailing",
        prediction_type="sample",
    )
    expected = native(
        PROMPT, num_inference_steps=1, guidance_scale=0.0, latents=_unit_noise_latents(native), output_type="np"
    ).images
    assert np.abs(images - expected).max() <= 1e-5


def test_sdxl_turbo_preset(hub, run):
    pipe, images = _ours("stabilityai/sdxl-turbo", run)
    _assert_scheduler(pipe, find_preset("stabilityai/sdxl-turbo"))
    native = StableDiffusionXLPipeline.from_pretrained("stabilityai/sdxl-turbo", add_watermarker=False)
    assert isinstance(native.scheduler, EulerAncestralDiscreteScheduler)  # the repo's own scheduler
    expected = native(
        PROMPT, num_inference_steps=1, guidance_scale=0.0, latents=_unit_noise_latents(native), output_type="np"
    ).images
    assert np.abs(images - expected).max() <= 1e-5


def test_hyper_sd_lora_preset_against_tcd(hub, run):
    # One TCD step at t=999 returns x0 re-noised to t=0 with its own noise estimate; the preset returns x0 (notes).
    pipe, _ = _ours("ByteDance/Hyper-SD", run, weight_name="Hyper-SDXL-1step-lora.safetensors")
    pipe_preset = find_preset("ByteDance/Hyper-SD", "Hyper-SDXL-1step-lora.safetensors")
    assert "3% of eps" in pipe_preset.notes
    _assert_scheduler(pipe, pipe_preset)
    latents = run(pipe, output_type="latent")
    native = _native_sdxl(scheduler_cls=TCDScheduler)
    native.load_lora_weights("ByteDance/Hyper-SD", weight_name="Hyper-SDXL-1step-lora.safetensors")
    native.fuse_lora()
    tcd = run(native, num_inference_steps=1, guidance_scale=0.0, eta=1.0, output_type="latent")
    assert native.scheduler.timesteps.tolist() == [999]
    ac = native.scheduler.alphas_cumprod.double()
    noise = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0)).double()
    eps = (noise - ac[999].sqrt() * latents.double()) / (1 - ac[999]).sqrt()
    expected = ac[0].sqrt() * latents.double() + (1 - ac[0]).sqrt() * eps
    torch.testing.assert_close(tcd.double(), expected, rtol=0, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------------
# PixArt-α DMD and SANA-Sprint
# ---------------------------------------------------------------------------------------------------------------------


def test_pixart_dmd_preset(hub, run):
    repo = "PixArt-alpha/PixArt-Alpha-DMD-XL-2-512x512"
    pipe, images = _ours(repo, run)
    _assert_scheduler(pipe, find_preset(repo))
    assert pipe.scheduler.timesteps.tolist() == [400]
    # app_pixart_dmd.py: transformer from the DMD repo, text encoder and VAE from the 1024 base, DDPM timesteps=[400]
    transformer = PixArtTransformer2DModel.from_pretrained(repo, subfolder="transformer")
    native = PixArtAlphaPipeline.from_pretrained(PIXART_BASE, transformer=transformer)
    native.scheduler = DDPMScheduler.from_config(native.scheduler.config, clip_sample=False)
    native.set_progress_bar_config(disable=True)
    expected = run(native, timesteps=[400], guidance_scale=1.0, **tiny_fixture("pixart_alpha").native_call_kwargs)
    assert np.abs(images - expected).max() <= 1e-5
    base = run(
        PixArtAlphaPipeline.from_pretrained(PIXART_BASE, scheduler=native.scheduler),
        timesteps=[400],
        guidance_scale=1.0,
        **tiny_fixture("pixart_alpha").native_call_kwargs,
    )
    assert np.abs(images - base).max() > 1e-3


@pytest.mark.parametrize(
    "repo",
    [
        "Efficient-Large-Model/Sana_Sprint_0.6B_1024px_diffusers",
        "Efficient-Large-Model/Sana_Sprint_1.6B_1024px_diffusers",
    ],
)
def test_sana_sprint_presets(repo, hub, run):
    pipe, images = _ours(repo, run)
    _assert_scheduler(pipe, find_preset(repo))
    assert pipe.config.embedded_guidance_scale == 4.5
    native = SanaSprintPipeline.from_pretrained(repo)
    native.set_progress_bar_config(disable=True)
    expected = run(
        native,
        num_inference_steps=1,
        intermediate_timesteps=None,
        height=64,
        width=64,
        guidance_scale=4.5,
        **tiny_fixture("sana_sprint").native_call_kwargs,
    )
    assert np.abs(images - expected).max() <= 1e-5


# ---------------------------------------------------------------------------------------------------------------------
# variants, overrides, errors
# ---------------------------------------------------------------------------------------------------------------------


def test_every_preset_has_a_stand_in_and_loads(hub):
    for preset in PRESETS:
        pipe = OneStepPipeline.from_pretrained(preset.repo_id, weight_name=preset.weight_name or preset.subfolder)
        assert pipe.config.family == preset.family
        assert pipe.scheduler.config.conditioning_timesteps == [float(t) for t in preset.conditioning_timesteps]


def test_conditioning_timesteps_override_a_preset(hub):
    pipe = OneStepPipeline.from_pretrained("tianweiy/DMD2", conditioning_timesteps=[500])
    assert pipe.scheduler.config.conditioning_timesteps == [500.0]


def test_unknown_variant_lists_the_known_ones(hub):
    with pytest.raises(
        ValueError,
        match=r"tianweiy/DMD2 has no preset for weight_name='dmd2_sd15.bin'; known "
        r"variants: dmd2_sdxl_1step_unet_fp16.bin, dmd2_sdxl_4step_unet_fp16.bin",
    ):
        OneStepPipeline.from_pretrained("tianweiy/DMD2", weight_name="dmd2_sd15.bin")
    with pytest.raises(
        ValueError,
        match=r"`weight_name` selects a variant of a known preset, and 'org/not-cached' "
        r"is not one",
    ):
        OneStepPipeline.from_pretrained("org/not-cached", weight_name="x.safetensors")


def test_unknown_repo_and_bad_ids_are_refused(hub):
    with pytest.raises(
        ValueError,
        match=r"org/not-cached is neither a diffusers pipeline \(no model_index.json\) "
        r"nor a diffusers-onestep LoRA student",
    ):
        OneStepPipeline.from_pretrained("org/not-cached")
    with pytest.raises(ValueError, match=r"'no such/folder!' is neither an existing folder nor a valid Hub repo id"):
        OneStepPipeline.from_pretrained("no such/folder!")


class _Payload:
    """Unpickling this object would call ``open(marker, "w")``: code execution from a weights file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_payloads_in_legacy_bin_files_are_refused(hub_cache, tmp_path, native_folder):
    marker = tmp_path / "payload-ran"
    repo = tmp_path / "dmd2"
    repo.mkdir()
    torch.save(
        {"conv_in.weight": torch.zeros(1), "evil": _Payload(str(marker))}, repo / "dmd2_sdxl_1step_unet_fp16.bin"
    )
    save_to_hub_cache(str(repo), "tianweiy/DMD2")
    save_to_hub_cache(native_folder("sdxl"), SDXL_BASE)
    with pytest.raises(
        ValueError,
        match=r"dmd2_sdxl_1step_unet_fp16.bin could not be loaded safely "
        r"\(torch.load\(weights_only=True\) refused it: .*\); convert it to "
        r".safetensors",
    ) as info:
        OneStepPipeline.from_pretrained("tianweiy/DMD2")
    assert "\n" not in str(info.value)
    assert not marker.exists(), "the pickle payload ran"
    # the same file does run code under a plain torch.load: the refusal is what protects the user
    torch.load(repo / "dmd2_sdxl_1step_unet_fp16.bin", weights_only=False)
    assert marker.exists()


# ---------------------------------------------------------------------------------------------------------------------
# layering: presets are data, Hub reads live in hub.py, and no module imports one that imports it back
# ---------------------------------------------------------------------------------------------------------------------


def _package_modules():
    import ast

    import diffusers_onestep

    root = os.path.dirname(os.path.dirname(os.path.abspath(diffusers_onestep.__file__)))
    paths = {}
    for folder, _, files in os.walk(os.path.join(root, "diffusers_onestep")):
        for name in files:
            if name.endswith(".py") and name != "__main__.py":
                path = os.path.join(folder, name)
                module = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
                paths[module.removesuffix(".__init__")] = path
    graph = {}
    for module, path in paths.items():
        package = module.split(".") if path.endswith("__init__.py") else module.split(".")[:-1]
        targets = set()
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):  # top-level and function-level imports alike
            if isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                for alias in node.names:
                    targets.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in paths else target)
            elif isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
        graph[module] = {t for t in targets if t in paths and t != module}
    return graph


def test_package_has_no_import_cycle():
    graph = _package_modules()
    assert "diffusers_onestep.pipelines.loading" not in graph["diffusers_onestep.pipelines.presets"]
    visiting, done = [], set()

    def visit(module):
        if module in done:
            return
        assert module not in visiting, "import cycle: " + " -> ".join(visiting[visiting.index(module) :] + [module])
        visiting.append(module)
        for target in sorted(graph[module]):
            visit(target)
        visiting.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)


def test_every_module_imports_first():
    # each module imported on its own, as the first of the package (a fresh interpreter for our code; the heavy
    # third-party modules stay loaded so that this takes seconds)
    import subprocess
    import sys

    modules = sorted(_package_modules())
    script = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    for loaded in [m for m in sys.modules if m == 'diffusers_onestep' or m.startswith('diffusers_onestep.')]:\n"
        "        del sys.modules[loaded]\n"
        "    importlib.import_module(name)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert result.returncode == 0, result.stderr[-2000:]
