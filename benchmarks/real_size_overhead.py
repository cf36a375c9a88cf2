"""Inference overhead of OneStepPipeline on real-size architectures (random weights) on an accelerator.

The same three ratios as ``benchmarks/inference_overhead.py`` (which defines them on tiny CPU components, where the
networks take a few milliseconds), measured here on the published architectures of each family at their native
resolution (1024 pixels; SD 1.5's 512), with random weights (nothing can be downloaded; the time of a forward does not depend on the
weights' values):

* **P1** = call time / time inside the components (tokenizers, text encoders, denoiser, VAE decode), per call.
  On a GPU each component's forward is bracketed by ``torch.cuda.synchronize()`` (``ComponentTimer(sync=...)``), so it
  counts its kernels and the pipeline's own work between them cannot hide under them: an upper bound on the
  overhead a user sees.
* **P1 floor** = the same ratio for the components called back to back with the inputs recorded from a pipeline call
  (``inference_overhead.bare_loop``).
* **P2** = OneStepPipeline call time / the family's native diffusers pipeline at one step with the equivalent
  settings (``testing.native_one_step_setup``), calls alternating, median of per-pair ratios. Peak GPU memory of one
  call of each is reported too.

Architectures (parameter counts printed by the run): SDXL base (UNet 2.57 B, CLIP ViT-L + OpenCLIP bigG text
encoders, SDXL VAE); PixArt-α XL-2-1024-MS and PixArt-Σ XL-2-1024 (transformer 0.61 B, T5-v1.1-XXL encoder 4.76 B,
SD / SDXL VAE); SANA 1600M 1024px and SANA-Sprint 1.6B (transformer 1.6 B, Gemma-2-2B decoder, DC-AE f32c32);
SD 1.5 (UNet 0.86 B, CLIP ViT-L text encoder, SD VAE; 512 px); FLUX.1-dev (transformer 11.9 B, CLIP ViT-L +
T5-v1.1-XXL, the 16-channel FLUX VAE; run at one step from sigma 1 with its embedded guidance 3.5); SD3.5-Medium and SD3.5-Large (MMDiT 2.24 B /
8.06 B, CLIP ViT-L + OpenCLIP bigG + T5-v1.1-XXL, SD3's 16-channel VAE; the cases ``sd3.5_medium`` and ``sd3.5_large``
of the ``sd3`` family). The tokenizers are
the tiny offline ones of ``diffusers_onestep.testing`` (their ids fit every vocabulary; prompts are padded to the
families' usual lengths: CLIP 77, T5 120 / 300 / 512, Gemma 300 tokens), so sequence lengths match real use.

Run (on a machine with a CUDA GPU; ``--device cpu --tiny`` runs the same code on the tiny components, for checking):

    HF_HUB_OFFLINE=1 python benchmarks/real_size_overhead.py
    HF_HUB_OFFLINE=1 python benchmarks/real_size_overhead.py --fast_path     # + batch 1/4 latency, default vs fast path
    HF_HUB_OFFLINE=1 python benchmarks/real_size_overhead.py --tiny --device cpu --dtype fp32 --fast_path \
        --compile_backend eager --calls 10

``--fast_path`` then times both pipelines at batch 1 and 4 (latency, images/s) on the default path and again after
``OneStepPipeline.enable_fast_path`` (fused QKV, channels-last, ``torch.compile`` of the denoiser and the VAE
decoder); the components are shared, so the native pipeline gets the same treatment. Warm-up calls of each shape
(compilation) are not timed.

The last line printed is one JSON object ``{"device": ..., "p1": {family: ratio}, "p1_floor": {...}, "p2": {...},
"memory_ratio": {...}, "p1_max": x, "p2_max": y}``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from typing import Callable, Dict, List


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from diffusers.utils import logging as diffusers_logging  # noqa: E402
from inference_overhead import ComponentTimer, alternating_times, bare_loop, time_call  # noqa: E402

from diffusers_onestep import OneStepPipeline  # noqa: E402
from diffusers_onestep.families import get_adapter_class  # noqa: E402
from diffusers_onestep.families.pixart import PIXART_BLOCK_CONFIG  # noqa: E402
from diffusers_onestep.pipelines.loading import scheduler_for  # noqa: E402
from diffusers_onestep.testing import (  # noqa: E402
    TINY_FAMILIES,
    TINY_PROMPTS,
    native_one_step_setup,
    native_pipeline_class,
    tiny_clip_tokenizer,
    tiny_components,
    tiny_fixture,
    tiny_gemma_tokenizer,
    tiny_t5_tokenizer,
)


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ----------------------------------------------------------------------------------------------------------------
# published architectures (configs of the Hub checkpoints, written out: nothing can be downloaded here)
# ----------------------------------------------------------------------------------------------------------------


def _sd_vae(scaling_factor: float):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[128, 256, 512, 512],
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=1024,
        scaling_factor=scaling_factor,
    )


def _clip_vit_l_config():
    """CLIP ViT-L/14's text tower (openai/clip-vit-large-patch14): SD 1.5's encoder and SDXL's first."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=768,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=1,
    )


def _clip_configs():
    """CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 text-tower configs, the text encoders of SDXL and SD3."""
    from transformers import CLIPTextConfig

    clip_g = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=1280,
        intermediate_size=5120,
        num_hidden_layers=32,
        num_attention_heads=20,
        max_position_embeddings=77,
        hidden_act="gelu",
        projection_dim=1280,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=1,
    )
    return _clip_vit_l_config(), clip_g


def real_sd15():
    """Modules of stable-diffusion-v1-5/stable-diffusion-v1-5 (512 px): unet (0.86 B), vae (SD VAE),
    text_encoder (CLIP ViT-L/14), PNDMScheduler (as a factory)."""
    from diffusers import PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        attention_head_dim=8,
        cross_attention_dim=768,
    )
    scheduler = lambda: PNDMScheduler(  # noqa: E731
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        steps_offset=1,
        set_alpha_to_one=False,
    )
    return {
        "unet": unet,
        "vae": _sd_vae(0.18215),
        "text_encoder": CLIPTextModel(_clip_vit_l_config()),
        "tokenizer": tiny_clip_tokenizer(),
        "scheduler": scheduler,
    }


def real_sdxl():
    """Modules of stabilityai/stable-diffusion-xl-base-1.0 (the scheduler as a factory, built outside the device
    context): unet, vae (sdxl-vae), text_encoder (CLIP ViT-L/14),
    text_encoder_2 (OpenCLIP ViT-bigG/14 with projection)."""
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    unet = UNet2DConditionModel(
        sample_size=128,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(320, 640, 1280),
        layers_per_block=2,
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    )
    clip_l, clip_g = _clip_configs()
    scheduler = lambda: EulerDiscreteScheduler(  # noqa: E731
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading"
    )
    return {
        "unet": unet,
        "vae": _sd_vae(0.13025),
        "text_encoder": CLIPTextModel(clip_l),
        "text_encoder_2": CLIPTextModelWithProjection(clip_g),
        "tokenizer": tiny_clip_tokenizer(),
        "tokenizer_2": tiny_clip_tokenizer(pad_token="!"),
        "scheduler": scheduler,
    }


def _t5_xxl():
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=32128,
        d_model=4096,
        d_kv=64,
        d_ff=10240,
        num_layers=24,
        num_heads=64,
        relative_attention_num_buckets=32,
        feed_forward_proj="gated-gelu",
        layer_norm_epsilon=1e-6,
    )
    return T5EncoderModel(config)


def real_pixart(sigma: bool):
    """PixArt-alpha/PixArt-XL-2-1024-MS (SD VAE) or PixArt-alpha/PixArt-Sigma-XL-2-1024-MS (SDXL VAE); T5-v1.1-XXL."""
    from diffusers import DDIMScheduler, PixArtTransformer2DModel

    transformer = PixArtTransformer2DModel(
        sample_size=128,
        num_layers=28,
        num_attention_heads=16,
        attention_head_dim=72,
        cross_attention_dim=1152,
        caption_channels=4096,
        use_additional_conditions=not sigma,
        interpolation_scale=2 if sigma else None,
        **PIXART_BLOCK_CONFIG,
    )
    return {
        "transformer": transformer,
        "vae": _sd_vae(0.13025 if sigma else 0.18215),
        "text_encoder": _t5_xxl(),
        "tokenizer": tiny_t5_tokenizer(),
        "scheduler": lambda: DDIMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear"),
    }


def real_sana(sprint: bool):
    """Efficient-Large-Model/Sana_1600M_1024px_diffusers or Sana_Sprint_1.6B_1024px_diffusers: transformer 1.6 B,
    DC-AE f32c32 (sana-1.0 config), Gemma-2-2B decoder."""
    from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaTransformer2DModel, SCMScheduler
    from transformers import Gemma2Config, Gemma2Model

    extra = {"qk_norm": "rms_norm_across_heads", "guidance_embeds": True} if sprint else {}
    transformer = SanaTransformer2DModel(
        in_channels=32,
        out_channels=32,
        num_attention_heads=70,
        attention_head_dim=32,
        num_layers=20,
        num_cross_attention_heads=20,
        cross_attention_head_dim=112,
        cross_attention_dim=2240,
        caption_channels=2304,
        mlp_ratio=2.5,
        attention_bias=False,
        sample_size=32,
        patch_size=1,
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        **extra,
    )
    vae = AutoencoderDC(
        in_channels=3,
        latent_channels=32,
        encoder_block_types=(
            "ResBlock",
            "ResBlock",
            "ResBlock",
            "EfficientViTBlock",
            "EfficientViTBlock",
            "EfficientViTBlock",
        ),
        decoder_block_types=(
            "ResBlock",
            "ResBlock",
            "ResBlock",
            "EfficientViTBlock",
            "EfficientViTBlock",
            "EfficientViTBlock",
        ),
        encoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
        decoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
        encoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
        decoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
        encoder_layers_per_block=(2, 2, 2, 3, 3, 3),
        decoder_layers_per_block=[3, 3, 3, 3, 3, 3],
        downsample_block_type="conv",
        upsample_block_type="interpolate",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        scaling_factor=0.41407,
    )
    gemma = Gemma2Config(
        vocab_size=256000,
        hidden_size=2304,
        intermediate_size=9216,
        num_hidden_layers=26,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=256,
        max_position_embeddings=8192,
        hidden_activation="gelu_pytorch_tanh",
        query_pre_attn_scalar=256,
        sliding_window=4096,
        final_logit_softcapping=30.0,
        attn_logit_softcapping=50.0,
    )
    scheduler = (
        (lambda: SCMScheduler(prediction_type="trigflow", sigma_data=0.5))
        if sprint
        else (lambda: FlowMatchEulerDiscreteScheduler(shift=3.0))
    )
    return {
        "transformer": transformer,
        "vae": vae,
        "text_encoder": Gemma2Model(gemma),
        "tokenizer": tiny_gemma_tokenizer(),
        "scheduler": scheduler,
    }


def real_flux():
    """black-forest-labs/FLUX.1-dev: FluxTransformer2DModel (12 B: 19 double-stream and 38 single-stream blocks, 24
    heads of 128, guidance embedded), the FLUX.1 VAE (16 latent channels, shift and scale), CLIP ViT-L/14 text encoder
    (pooled) and T5-v1.1-XXL; FlowMatchEulerDiscreteScheduler with dynamic shifting."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel

    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=19,
        num_single_layers=38,
        attention_head_dim=128,
        num_attention_heads=24,
        joint_attention_dim=4096,
        pooled_projection_dim=768,
        guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[128, 256, 512, 512],
        layers_per_block=2,
        latent_channels=16,
        norm_num_groups=32,
        sample_size=1024,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    clip = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=768,
    )
    return {
        "transformer": transformer,
        "vae": vae,
        "text_encoder": CLIPTextModel(clip),
        "tokenizer": tiny_clip_tokenizer(),
        "text_encoder_2": _t5_xxl(),
        "tokenizer_2": tiny_t5_tokenizer(),
        "scheduler": lambda: FlowMatchEulerDiscreteScheduler(
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        ),
    }


#: SD3.5 transformers as in stabilityai/stable-diffusion-3.5-{medium,large}'s transformer/config.json (not readable
#: here: the values below are those configs as public copies quote them, byte for byte in agreement): 64-wide heads,
#: 16 latent channels, patch size 2, T5-XXL context (4096), pooled CLIP-L + CLIP-G (768 + 1280), QK RMS-norm.
#: Medium (2.24 B) has MMDiT-X blocks (a second, image-only attention) in layers 0-12 and a 384-wide position grid.
SD35_TRANSFORMERS = {
    "medium": {"num_layers": 24, "num_attention_heads": 24, "pos_embed_max_size": 384, "dual_attention_layers": 13},
    "large": {"num_layers": 38, "num_attention_heads": 38, "pos_embed_max_size": 192, "dual_attention_layers": 0},
}


def real_sd35(size: str):
    """stabilityai/stable-diffusion-3.5-medium or -large (SD3.5-Large-Turbo has the same architecture): the MMDiT
    (2.24 B / 8.06 B), SD3's 16-channel VAE, CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 (both with projection),
    T5-v1.1-XXL, FlowMatchEulerDiscreteScheduler(shift=3.0)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    arch = SD35_TRANSFORMERS[size]
    transformer = SD3Transformer2DModel(
        sample_size=128,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=arch["num_layers"],
        attention_head_dim=64,
        num_attention_heads=arch["num_attention_heads"],
        joint_attention_dim=4096,
        caption_projection_dim=64 * arch["num_attention_heads"],
        pooled_projection_dim=2048,
        pos_embed_max_size=arch["pos_embed_max_size"],
        dual_attention_layers=tuple(range(arch["dual_attention_layers"])),
        qk_norm="rms_norm",
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[128, 256, 512, 512],
        layers_per_block=2,
        latent_channels=16,
        norm_num_groups=32,
        sample_size=1024,
        scaling_factor=1.5305,
        shift_factor=0.0609,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    clip_l, clip_g = _clip_configs()  # SDXL's two text towers; SD3 runs both with their projections
    return {
        "transformer": transformer,
        "vae": vae,
        "text_encoder": CLIPTextModelWithProjection(clip_l),
        "text_encoder_2": CLIPTextModelWithProjection(clip_g),
        "text_encoder_3": _t5_xxl(),
        "tokenizer": tiny_clip_tokenizer(),
        "tokenizer_2": tiny_clip_tokenizer(pad_token="!"),
        "tokenizer_3": tiny_t5_tokenizer(),
        "scheduler": lambda: FlowMatchEulerDiscreteScheduler(shift=3.0),
    }


REAL_SIZE = {
    "sdxl": real_sdxl,
    "pixart_alpha": lambda: real_pixart(sigma=False),
    "pixart_sigma": lambda: real_pixart(sigma=True),
    "sana": lambda: real_sana(sprint=False),
    "sana_sprint": lambda: real_sana(sprint=True),
    "sd": real_sd15,
    "flux": real_flux,
    "sd3.5_medium": lambda: real_sd35("medium"),
    "sd3.5_large": lambda: real_sd35("large"),
}
#: the family of each case that is not a family's own name (several published sizes of one family)
CASE_FAMILY = {"sd3.5_medium": "sd3", "sd3.5_large": "sd3"}
#: what runs by default: every tiny family, each under its published sizes where it has several
CASES = [c for f in TINY_FAMILIES for c in ([k for k, v in CASE_FAMILY.items() if v == f] or [f])]


def build_components(case: str, tiny: bool, device: torch.device, dtype: torch.dtype) -> Dict[str, object]:
    """The components of ``case`` (a family, or one published size of it: :data:`CASE_FAMILY`); ``tiny``: the
    family's tiny test components."""
    if tiny:
        components = tiny_components(CASE_FAMILY.get(case, case))
    else:
        with torch.device(device):  # parameters created (and randomly initialised) where they will run
            components = REAL_SIZE[case]()
        components["scheduler"] = components["scheduler"]()  # schedulers keep their tables on the CPU
    for name, value in components.items():
        if isinstance(value, torch.nn.Module):
            components[name] = value.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return components


def parameter_count(components: Dict[str, object]) -> Dict[str, float]:
    return {
        n: sum(p.numel() for p in m.parameters()) / 1e9
        for n, m in components.items()
        if isinstance(m, torch.nn.Module)
    }


# ----------------------------------------------------------------------------------------------------------------
# measurement
# ----------------------------------------------------------------------------------------------------------------


def measure_family(case: str, args, device: torch.device, dtype: torch.dtype) -> Dict[str, object]:
    sync: Callable[[], None] = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    start = time.perf_counter()
    components = build_components(case, args.tiny, device, dtype)
    family = CASE_FAMILY.get(case, case)
    build_s = time.perf_counter() - start
    native_components = {k: v for k, v in components.items() if k not in ("image_encoder", "feature_extractor")}
    adapter_cls = get_adapter_class(family)
    native, native_kwargs = native_one_step_setup(
        family, native_pipeline_class(family)(**native_components, **adapter_cls.native_pipeline_kwargs)
    )
    ours_components = {k: v for k, v in components.items() if k in adapter_cls.component_names()}
    student = OneStepPipeline(
        scheduler=scheduler_for(
            family, dict(components["scheduler"].config), tiny_fixture(family).parity_timesteps, None
        ),
        family=family,
        **ours_components,
    )
    student.set_progress_bar_config(disable=True)
    prompt = TINY_PROMPTS[0]

    def run_student():
        return student(prompt, generator=torch.Generator().manual_seed(0), output_type="np")

    def run_native():
        return native(prompt, generator=torch.Generator().manual_seed(0), output_type="np", **native_kwargs)

    for _ in range(args.warmup):
        run_student()
        run_native()
    adapter = student.adapter
    size = adapter.default_resolution
    run_bare = bare_loop(student, prompt, adapter.latent_shape(1, size, size))
    for _ in range(args.warmup):
        run_bare()

    timer = ComponentTimer(student, sync=sync)
    p1: List[float] = []
    floor: List[float] = []
    call_ms: List[float] = []
    component_ms: List[float] = []
    try:
        for i in range(args.calls):
            for kind in ("bare", "pipe") if i % 2 == 0 else ("pipe", "bare"):
                timer.total = timer.tokenize = timer.encode = timer.text_forwards = 0.0
                elapsed = time_call(run_bare if kind == "bare" else run_student, sync)
                inside = timer.total + timer.tokenize
                if kind == "bare":
                    floor.append(elapsed / inside)
                else:
                    p1.append(elapsed / inside)
                    call_ms.append(1e3 * elapsed)
                    component_ms.append(1e3 * inside)
    finally:
        timer.remove()

    ours, theirs = alternating_times(run_student, run_native, args.calls, sync)

    memory = {}
    if device.type == "cuda":
        for name, fn in (("ours", run_student), ("native", run_native)):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn()
            sync()
            memory[name] = (torch.cuda.max_memory_allocated() - base) / 2**20

    throughput = fast_path_throughput(student, native, native_kwargs, prompt, args, sync) if args.fast_path else None

    result = {
        "throughput": throughput,
        "params_b": {k: round(v, 3) for k, v in parameter_count(components).items()},
        "build_s": round(build_s, 1),
        "call_ms": statistics.median(call_ms),
        "components_ms": statistics.median(component_ms),
        "p1": statistics.median(p1),
        "p1_floor": statistics.median(floor),
        "ours_ms": 1e3 * statistics.median(ours),
        "native_ms": 1e3 * statistics.median(theirs),
        "p2": statistics.median([o / t for o, t in zip(ours, theirs)]),
        "peak_mib_ours": memory.get("ours"),
        "peak_mib_native": memory.get("native"),
    }
    return result


def fast_path_throughput(student, native, native_kwargs, prompt, args, sync) -> Dict[str, Dict[str, float]]:
    """Latency and images/s of both pipelines at batch 1 and 4, on the default path and then with
    ``student.enable_fast_path`` -- which changes the shared components in place, so the native pipeline gets the same
    treatment. Each shape is warmed up (that is where compilation happens) before its timed calls."""
    out: Dict[str, Dict[str, float]] = {}
    for path in ("default", "fast"):
        if path == "fast":
            student.enable_fast_path(backend=args.compile_backend, mode=args.compile_mode)
        for batch in (1, 4):
            prompts = [prompt] * batch

            def run_student():
                return student(prompts, generator=torch.Generator().manual_seed(0), output_type="np")

            def run_native():
                return native(prompts, generator=torch.Generator().manual_seed(0), output_type="np", **native_kwargs)

            for _ in range(max(args.warmup, 1)):
                run_student()
                run_native()
            ours, theirs = alternating_times(run_student, run_native, args.calls, sync)
            ours_s, native_s = statistics.median(ours), statistics.median(theirs)
            out[f"{path}_b{batch}"] = {
                "ours_ms": 1e3 * ours_s,
                "native_ms": 1e3 * native_s,
                "ours_images_s": batch / ours_s,
                "native_images_s": batch / native_s,
            }
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--families", nargs="+", default=CASES, choices=CASES, help="families, or published sizes (sd3.5_medium)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--calls", type=int, default=20, help="timed calls per measurement (at least 10)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="the tiny components instead (checks the script on a CPU)")
    parser.add_argument("--json_out", default=None, help="also write the per-family results here")
    parser.add_argument(
        "--fast_path",
        action="store_true",
        help="also time both pipelines at batch 1 and 4 before and after OneStepPipeline.enable_fast_path",
    )
    parser.add_argument("--compile_backend", default="inductor", help="torch.compile backend of the fast path")
    parser.add_argument("--compile_mode", default=None, help="torch.compile mode of the fast path (e.g. max-autotune)")
    args = parser.parse_args(argv)
    if args.calls < 10:
        parser.error("--calls must be at least 10")
    diffusers_logging.set_verbosity_error()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = "cpu"
    print(
        f"torch {torch.__version__}, device {device_name}, {args.dtype}, median of {args.calls} calls, "
        f"{'tiny' if args.tiny else 'real-size'} components",
        flush=True,
    )

    results: Dict[str, Dict[str, object]] = {}
    for family in args.families:
        try:
            results[family] = measure_family(family, args, device, dtype)
        except Exception as error:  # one family's failure must not lose the others' numbers
            results[family] = {"error": f"{type(error).__name__}: {error}"}
        gc.collect()  # the family's models went with measure_family's frame: free their memory before the next
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(family, json.dumps(results[family]), flush=True)
        if args.json_out:
            with open(args.json_out, "w") as f:
                json.dump({"device": device_name, "dtype": args.dtype, "results": results}, f, indent=2)

    header = (
        f"{'family':<14}{'params B':>10}{'call ms':>10}{'inside ms':>11}{'P1':>8}{'P1 floor':>10}"
        f"{'native ms':>11}{'ours ms':>9}{'P2':>7}{'peak MiB ours/native':>23}"
    )
    print(header)
    print("-" * len(header))
    ok = {f: r for f, r in results.items() if "error" not in r}
    for family, r in ok.items():
        memory = f"{r['peak_mib_ours']:.0f} / {r['peak_mib_native']:.0f}" if r["peak_mib_ours"] is not None else "-"
        print(
            f"{family:<14}{sum(r['params_b'].values()):>10.2f}{r['call_ms']:>10.2f}{r['components_ms']:>11.2f}"
            f"{r['p1']:>8.4f}{r['p1_floor']:>10.4f}{r['native_ms']:>11.2f}{r['ours_ms']:>9.2f}{r['p2']:>7.3f}"
            f"{memory:>23}"
        )
    for family, r in results.items():
        if "error" in r:
            print(f"{family}: {r['error']}")
    if args.fast_path:
        print(
            f"{'family':<14}{'path':<10}{'batch':>6}{'ours ms':>10}{'native ms':>11}{'ours img/s':>12}{'native img/s':>14}"
        )
        for family, r in ok.items():
            for key, row in r["throughput"].items():
                path, batch = key.split("_b")
                print(
                    f"{family:<14}{path:<10}{batch:>6}{row['ours_ms']:>10.2f}{row['native_ms']:>11.2f}"
                    f"{row['ours_images_s']:>12.2f}{row['native_images_s']:>14.2f}"
                )
    summary = {
        "device": device_name,
        "p1": {f: round(r["p1"], 4) for f, r in ok.items()},
        "p1_floor": {f: round(r["p1_floor"], 4) for f, r in ok.items()},
        "p2": {f: round(r["p2"], 4) for f, r in ok.items()},
        "memory_ratio": {
            f: round(r["peak_mib_ours"] / r["peak_mib_native"], 4) for f, r in ok.items() if r["peak_mib_ours"]
        },
    }
    if args.fast_path:
        summary["images_per_s"] = {
            f: {
                k: {"ours": round(v["ours_images_s"], 3), "native": round(v["native_images_s"], 3)}
                for k, v in r["throughput"].items()
            }
            for f, r in ok.items()
        }
    summary["p1_max"] = max(summary["p1"].values(), default=None)
    summary["p2_max"] = max(summary["p2"].values(), default=None)
    print(json.dumps(summary))
    return 0 if len(ok) == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
