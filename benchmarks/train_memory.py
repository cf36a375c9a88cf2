"""Memory and step-time of one distillation step: shared-backbone LoRA layout vs three separate copies.

Runs the library's own roles and method (VSD with CFG on the teacher) on the CPU on a mid-sized SDXL-shaped UNet
(``--family sdxl``, the default), a mid-sized FLUX.1-shaped transformer (``--family flux``: double- and single-stream
blocks over packed latents, guidance embedded: the teacher is one pass at the embedded guidance, no classifier-free
doubling) or an SD3-shaped MMDiT (``--family sd3``: joint text/image blocks, QK RMS-norm, patch size 2, a 16-channel
latent, the shift-3 flow path).
Each layout runs in a fresh subprocess so that its peak resident memory (``ru_maxrss``) is its own; the reported
memory is the peak minus the process's memory right before the models are built (imports and text encoders are
the same for both layouts).

* ``memory_ratio`` = memory(shared LoRA backbone: teacher = adapters off, student and critic LoRA)
  / memory(separate copies: frozen teacher + full student + full critic, DMD2's layout). Target <= 0.45.
* ``overhead_ratio`` = step time / time spent in the network passes (teacher, critic and student forwards and the
  two backwards) for the LoRA layout. Target <= 1.15.

    python benchmarks/train_memory.py                 # prints a table; the last line is one JSON object
    python benchmarks/train_memory.py --family flux   # the FLUX.1-shaped case
    python benchmarks/train_memory.py --family sd3    # the SD3.5-shaped case
    python benchmarks/train_memory.py --method sid    # SiD: input gradients through the teacher and the critic

``--method sid`` (or ``sim``) measures the score-divergence methods, whose student step back-propagates through the
frozen teacher's and the frozen critic's passes into ``x_t``: three backward paths through the backbone per student
step instead of one. ``--gradient_checkpointing`` checkpoints every pass, those two included (each block is
recomputed under the role that ran it).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


RESULT_PREFIX = "RESULT "


def mid_sized_sdxl_components(seed: int = 0):
    """The tiny SDXL pipeline with an SDXL-shaped UNet of ~30M parameters (3 levels, cross-attention, text_time)."""
    import torch
    from diffusers import UNet2DConditionModel

    from diffusers_onestep.testing import tiny_sdxl_components

    components = tiny_sdxl_components(seed)
    torch.manual_seed(seed)
    components["unet"] = UNet2DConditionModel(
        block_out_channels=(96, 192, 384),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4, 8),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1, 2),
        projection_class_embeddings_input_dim=80,
        cross_attention_dim=64,
    ).eval()
    return components


def mid_sized_flux_components(seed: int = 0):
    """The tiny FLUX.1 pipeline (dev-like: guidance embedded, dynamic shift) with a FLUX.1-shaped transformer of ~20M
    parameters: 2 double-stream and 4 single-stream blocks, 6 heads of 64 with FLUX's rotary split (16, 24, 24)."""
    import torch
    from diffusers import FluxTransformer2DModel

    from diffusers_onestep.testing import tiny_flux_components

    components = tiny_flux_components(seed)
    torch.manual_seed(seed)
    components["transformer"] = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=2,
        num_single_layers=4,
        attention_head_dim=64,
        num_attention_heads=6,
        joint_attention_dim=24,
        pooled_projection_dim=20,
        guidance_embeds=True,
        axes_dims_rope=(16, 24, 24),
    ).eval()
    return components


def mid_sized_sd3_components(seed: int = 0):
    """The tiny SD3 pipeline with an SD3.5-shaped MMDiT of ~30M parameters: 6 joint blocks of width 384 (6 heads of
    64, SD3's head size), QK RMS-norm, patch size 2, 16 latent channels, SD3's VAE normalization and shift-3 flow."""
    import torch
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    from diffusers_onestep.testing import tiny_sd3_components

    components = tiny_sd3_components(seed)
    text = components["transformer"].config
    torch.manual_seed(seed)
    components["transformer"] = SD3Transformer2DModel(
        sample_size=32,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=6,
        attention_head_dim=64,
        num_attention_heads=6,
        joint_attention_dim=text.joint_attention_dim,
        caption_projection_dim=384,
        pooled_projection_dim=text.pooled_projection_dim,
        pos_embed_max_size=64,
        qk_norm="rms_norm",
    ).eval()
    torch.manual_seed(seed)
    components["vae"] = AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=16,
        norm_num_groups=4,
        shift_factor=0.0609,
        scaling_factor=1.5305,
    ).eval()
    return components


#: per family: the components, the teacher's guidance (SDXL: DMD2's CFG 8; FLUX.1-dev: its embedded 3.5; SD3: CFG 4.5), the
#: student's conditioning time (DMD2's 399; FLUX, SD3: pure noise) and the text tokens kept (None: the family's; FLUX: 32
#: text tokens to the 256 image tokens of 64x64 images, FLUX.1's proportion of 512 to 4096 at 1024 px)
FAMILY_CASES = {
    "sdxl": (mid_sized_sdxl_components, 8.0, 399, None),
    "flux": (mid_sized_flux_components, 3.5, 1.0, 32),
    "sd3": (mid_sized_sd3_components, 4.5, 1.0, None),  # SD3Adapter.training_defaults: sigma 1, CFG 4.5
}


def run_layout(
    layout: str,
    steps: int,
    batch_size: int,
    resolution: int,
    lora_rank: int,
    family: str = "sdxl",
    method_name: str = "dmd2",
    gradient_checkpointing: bool = False,
) -> dict:
    """One layout in this process: build, run ``steps`` student+critic updates, report memory and timings."""
    import torch

    from diffusers_onestep.distill.config import MethodConfig, RolesConfig
    from diffusers_onestep.distill.methods import build_method
    from diffusers_onestep.distill.models import Batch, RandomSource
    from diffusers_onestep.distill.roles import BackboneRoles
    from diffusers_onestep.families import get_adapter_class

    torch.set_num_threads(1)
    build, guidance_scale, student_time, max_sequence_length = FAMILY_CASES[family]
    components = build()
    adapter = get_adapter_class(family)(components, max_sequence_length=max_sequence_length)
    condition = adapter.encode_prompt(["a photo of a cat", "a red car"][:batch_size] * (batch_size // 2 or 1))
    condition = condition[:batch_size]
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux

    kind = "lora" if layout == "lora" else "full"
    image_seq_len = adapter.image_seq_len(resolution, resolution)
    roles = BackboneRoles(
        adapter,
        RolesConfig(
            student=kind,
            critic=kind,
            lora_rank=lora_rank,
            lora_alpha=8,
            gradient_checkpointing=gradient_checkpointing,
        ),
        image_seq_len=image_seq_len,
    )
    # TDM trains a K-step student: a 2-step grid from the case's first time to the middle of the path.
    # (integer steps on a discrete VP path: 399 -> 199; sigma 1.0 -> 0.5 on a flow path).
    middle = student_time / 2 if student_time <= 1 else student_time // 2
    timesteps = [student_time] if method_name != "tdm" else [float(student_time), float(middle)]
    method_config = MethodConfig(method=method_name, guidance_scale=guidance_scale)
    if method_name == "tdm":
        method_config.student_timesteps = timesteps
    method = build_method(method_config.validate(), roles, timesteps)
    optimizers = {role: torch.optim.AdamW(roles.role_parameters(role), lr=1e-5) for role in ("student", "critic")}

    # Time every network pass by wrapping the roles' single entry point.
    pass_time = {"teacher": 0.0, "critic": 0.0, "student": 0.0}
    original_run = roles._run

    def timed_run(role, *args, **kwargs):
        start = time.perf_counter()
        out = original_run(role, *args, **kwargs)
        pass_time[role] += time.perf_counter() - start
        return out

    roles._run = timed_run
    params = sum(p.numel() for n, p in roles.backbone.named_parameters() if "lora_" not in n)
    trainable = sum(p.numel() for role in ("student", "critic") for p in roles.role_parameters(role))
    totals = {"step": 0.0, "backward": {"student": 0.0, "critic": 0.0}}
    rng = RandomSource.from_seed(0)
    noise_generator = torch.Generator().manual_seed(0)
    shape = adapter.latent_shape(batch_size, resolution, resolution)
    for step in range(steps + 1):  # step 0 warms up and is not timed
        if step == 1:
            for key in pass_time:
                pass_time[key] = 0.0
            totals = {"step": 0.0, "backward": {"student": 0.0, "critic": 0.0}}
        started = time.perf_counter()
        batch = Batch(condition=condition, noise=torch.randn(shape, generator=noise_generator))
        for role in ("student", "critic"):
            step_fn = method.student_step if role == "student" else method.critic_step
            loss, _ = step_fn(batch, rng)
            t0 = time.perf_counter()
            loss.backward()
            totals["backward"][role] += time.perf_counter() - t0
            optimizers[role].step()
            for optimizer in optimizers.values():
                optimizer.zero_grad(set_to_none=True)
            roles.end_phase()
        totals["step"] += time.perf_counter() - started
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    network = sum(pass_time.values()) + sum(totals["backward"].values())
    return {
        "layout": layout,
        "unet_parameters_m": params / 1e6,
        "trainable_parameters_m": trainable / 1e6,
        "memory_mib": (rss_peak - rss_before) / 1024,
        "step_s": totals["step"] / steps,
        "teacher_s": pass_time["teacher"] / steps,
        "critic_s": (pass_time["critic"] + totals["backward"]["critic"]) / steps,
        "student_s": (pass_time["student"] + totals["backward"]["student"]) / steps,
        "other_s": (totals["step"] - network) / steps,
        "overhead_ratio": totals["step"] / network,
    }


def main():
    from diffusers_onestep.families import get_adapter_class

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per layout (after one warm-up step)")
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument(
        "--lora_rank",
        type=int,
        default=16,
        help="LoRA rank of student and critic. SDXL's default r=64 on 320-1280 channels is ~1/5 of the "
        "narrowest width; r=16 keeps that proportion on this UNet's 96-384 channels.",
    )
    parser.add_argument("--family", choices=sorted(FAMILY_CASES), default="sdxl", help="the backbone's shape")
    parser.add_argument(
        "--method",
        choices=("dmd2", "sid", "sim", "tdm"),
        default="dmd2",
        help="the distillation method of the step (tdm: a 2-step student, its no-grad rollout included)",
    )
    parser.add_argument(
        "--gradient_checkpointing",
        action="store_true",
        help="recompute activations in backward (every role, the frozen input-gradient passes included)",
    )
    parser.add_argument("--layout", choices=("lora", "separate"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.layout:
        result = run_layout(
            args.layout,
            args.steps,
            args.batch_size,
            args.resolution,
            args.lora_rank,
            args.family,
            args.method,
            args.gradient_checkpointing,
        )
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        return

    results = {}
    for layout in ("lora", "separate"):
        command = [
            sys.executable,
            os.path.abspath(__file__),
            "--layout",
            layout,
            "--steps",
            str(args.steps),
            "--batch_size",
            str(args.batch_size),
            "--resolution",
            str(args.resolution),
            "--lora_rank",
            str(args.lora_rank),
            "--family",
            args.family,
            "--method",
            args.method,
        ] + (["--gradient_checkpointing"] if args.gradient_checkpointing else [])
        env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
        out = subprocess.run(command, capture_output=True, text=True, env=env, check=True).stdout
        results[layout] = json.loads(
            next(line for line in out.splitlines() if line.startswith(RESULT_PREFIX))[len(RESULT_PREFIX) :]
        )

    lora, separate = results["lora"], results["separate"]
    print(
        f"{'UNet' if args.family == 'sdxl' else 'Transformer'}: {lora['unet_parameters_m']:.1f}M parameters "
        f"({get_adapter_class(args.family).display_name}-shaped), LoRA rank {args.lora_rank} "
        f"({lora['trainable_parameters_m']:.1f}M trainable in both adapters), batch {args.batch_size}, "
        f"{args.resolution}x{args.resolution} images, {args.steps} timed steps, 1 thread, CPU, method {args.method}"
        f"{', gradient checkpointing' if args.gradient_checkpointing else ''}"
    )
    print(
        f"{'layout':<34}{'memory MiB':>11}{'step s':>9}{'teacher':>9}{'critic':>9}{'student':>9}{'other':>9}"
        f"{'overhead':>10}"
    )
    names = {"lora": "shared backbone + 2 LoRA (ours)", "separate": "3 separate copies (DMD2)"}
    for layout, r in results.items():
        print(
            f"{names[layout]:<34}{r['memory_mib']:>11.0f}{r['step_s']:>9.2f}{r['teacher_s']:>9.2f}"
            f"{r['critic_s']:>9.2f}{r['student_s']:>9.2f}{r['other_s']:>9.2f}{r['overhead_ratio']:>10.3f}"
        )
    memory_ratio = lora["memory_mib"] / separate["memory_mib"]
    print(
        f"memory ratio (LoRA / separate) = {memory_ratio:.3f} (target <= 0.45); "
        f"overhead ratio (LoRA layout) = {lora['overhead_ratio']:.3f} (target <= 1.15)"
    )
    summary = {"memory_ratio": round(memory_ratio, 4), "overhead_ratio": round(lora["overhead_ratio"], 4)}
    summary.update(
        method=args.method,
        lora_memory_mib=round(lora["memory_mib"]),
        separate_memory_mib=round(separate["memory_mib"]),
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
