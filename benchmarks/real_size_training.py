"""One distillation step at the published architectures (random weights): peak memory, step time, overhead.

A step's time and memory do not depend on the weights' values, so each family's published denoiser is built from its
config with random weights (``real_size_overhead.REAL_SIZE``): SDXL base (UNet 2.57 B), PixArt-Σ XL-2-1024 (0.61 B),
SANA 1600M (1.6 B), frozen weights in bf16, 1024 px, batch 1, gradient checkpointing, text embeddings cached (the
text encoders and the VAE are freed before the step, as ``--cache_text_embeddings`` makes them unnecessary).

The step goes through the library's training code: :class:`~diffusers_onestep.distill.roles.BackboneRoles`, the
method ``build_method`` makes, the optimizers of ``trainer.build_optimizers``, accelerate's ``prepare``,
``autocast`` and ``backward``, gradient clipping, then ``end_phase`` -- the sequence of ``Trainer._update``, for one
student update and one critic update. Cases:

* ``dmd2_lora_shared``: DMD2, LoRA student and LoRA critic on one shared frozen backbone (teacher = adapters off);
* ``dmd2_separate``: DMD2's own layout, frozen teacher + full student + full critic copies;
* ``full_student_lora_critic``: a full student copy, the critic a LoRA on the frozen backbone;
* ``fdistill_lora_shared``: f-distill (JS) with its discriminator head on the teacher's features, LoRA roles,
  captioned real latents (random).

Reported per case: peak memory (CUDA: ``max_memory_allocated`` from the freed text encoders on, weights included;
CPU: peak resident memory sampled during the case minus the resident memory before its roles were built), the
median step time, and **overhead** = step time / the sum of the step's unavoidable passes, each timed alone on
inputs of the same shapes: the student's forward+backward, the teacher's CFG forward (both halves in one batch), the
critic's forward (fake score), the student's sample for the critic update, the critic's denoising forward+backward,
for f-distill the teacher's feature pass with backward to its input and the discriminator head, and the two
optimizer steps. Also the bytes of every distinct parameter (trainable and frozen) and of the optimizer states.

``--estimate`` prints, without running anything, the weight / gradient / optimizer / EMA bytes of each case at real
size, counted from the real configs built on the meta device (``accelerate.init_empty_weights``).

    python benchmarks/real_size_training.py                        # CUDA machine; real size
    python benchmarks/real_size_training.py --tiny --device cpu    # the same code on tiny components (seconds)
    python benchmarks/real_size_training.py --estimate             # byte arithmetic at real size, no GPU needed

The last line printed is one JSON object ``{"device": ..., "results": {family: {case: {...}}}}``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import threading
import time
import traceback
from typing import Callable, Dict, Tuple


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from diffusers_onestep.distill.config import MethodConfig, OptimizationConfig, RolesConfig  # noqa: E402
from diffusers_onestep.distill.methods import build_method  # noqa: E402
from diffusers_onestep.distill.methods.base import resolve_method_config  # noqa: E402
from diffusers_onestep.distill.models import Batch, RandomSource  # noqa: E402
from diffusers_onestep.distill.roles import BackboneRoles  # noqa: E402
from diffusers_onestep.distill.trainer import build_optimizers  # noqa: E402
from diffusers_onestep.families import get_adapter_class  # noqa: E402


FAMILIES = ("sdxl", "pixart_sigma", "sana")
#: case -> (student, critic, method)
CASES: Dict[str, Tuple[str, str, str]] = {
    "dmd2_lora_shared": ("lora", "lora", "dmd2"),
    "dmd2_separate": ("full", "full", "dmd2"),
    "full_student_lora_critic": ("full", "lora", "dmd2"),
    "fdistill_lora_shared": ("lora", "lora", "fdistill"),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
GIB = 2**30
#: the tiny denoisers are 32-64 channels wide: rank 4 keeps a LoRA's share of the weights near SDXL's rank 64
TINY_LORA_RANK = 4


# ----------------------------------------------------------------------------------------------------------------
# memory
# ----------------------------------------------------------------------------------------------------------------


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak memory of a block: CUDA's allocator peak, or on the CPU the resident size sampled every millisecond."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = self.base = 0
        self._stop = threading.Event()

    def __enter__(self):
        if self.device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = 0  # the weights already resident count: the 24 GB question is about everything
        else:
            self.base = self.peak = _rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, _rss_bytes())

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, _rss_bytes())

    @property
    def bytes(self) -> int:
        """The peak: CUDA's allocated bytes (weights included), or the process's peak resident size on the CPU."""
        return self.peak

    @property
    def added_bytes(self) -> int:
        """What the block added to the peak (on the CPU: over the resident size when it started)."""
        return self.peak - self.base


def distinct_parameter_bytes(roles: BackboneRoles) -> Dict[str, int]:
    """Bytes of every distinct parameter tensor of the run, split into trainable and frozen."""
    seen, trainable, frozen = set(), 0, 0
    trainable_ids = {id(p) for role in ("student", "critic") for p in roles.role_parameters(role)}
    modules = [roles.backbone, *roles.trainable_modules().values()]
    for module in modules:
        for parameter in module.parameters():
            if id(parameter) in seen:
                continue
            seen.add(id(parameter))
            size = parameter.numel() * parameter.element_size()
            if id(parameter) in trainable_ids:
                trainable += size
            else:
                frozen += size
    return {"trainable": trainable, "frozen": frozen}


def optimizer_state_bytes(optimizers) -> int:
    return sum(
        value.numel() * value.element_size()
        for optimizer in optimizers.values()
        for state in optimizer.state.values()
        for value in state.values()
        if torch.is_tensor(value)
    )


# ----------------------------------------------------------------------------------------------------------------
# building a case
# ----------------------------------------------------------------------------------------------------------------


def build_family(family: str, tiny: bool, device: torch.device, dtype: torch.dtype):
    from real_size_overhead import build_components

    return build_components(family, tiny, device, dtype)


def method_config(family: str, method: str, guidance: float) -> MethodConfig:
    defaults = get_adapter_class(family).training_defaults
    config = resolve_method_config(MethodConfig(method=method), defaults, has_real_images=method == "fdistill")
    # one student timestep: no backward simulation, so every step runs the same passes
    config.student_timesteps = config.student_timesteps[:1]
    return config


def build_case(family, case, components, args, device, dtype):
    """Roles, method and optimizers of one case on ``components`` (text encoders still present to encode)."""
    student, critic, method_name = CASES[case]
    adapter = get_adapter_class(family)(components)
    defaults = adapter.training_defaults
    rank = args.lora_rank or (TINY_LORA_RANK if args.tiny else defaults.lora_rank)
    roles = BackboneRoles(
        adapter,
        RolesConfig(
            student=student,
            critic=critic,
            lora_rank=rank,
            lora_alpha=defaults.lora_alpha,
            gradient_checkpointing=args.gradient_checkpointing,
        ).validate(),
        discriminator=method_name == "fdistill",
        dtype=dtype,
    )
    config = method_config(family, method_name, defaults.guidance_scale)
    method = build_method(config, roles, config.student_timesteps)
    optim = OptimizationConfig(
        learning_rate=defaults.learning_rate(student), critic_learning_rate=defaults.learning_rate(critic)
    ).validate()
    optimizers = build_optimizers(roles, optim)
    return adapter, roles, method, optimizers, optim


def free_text_encoders_and_vae(adapter, components) -> None:
    """Embeddings and latents are cached: the text encoders are freed and the VAE leaves the accelerator (the
    adapter reads its config for the latent scale; the trainer keeps it for validation images)."""
    adapter.drop_text_encoders()
    for name in list(components):
        if name.startswith("text_encoder"):
            components[name] = None
    components["vae"].to("cpu")
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------------------
# the step and its passes
# ----------------------------------------------------------------------------------------------------------------


def make_step(accelerator, roles, method, optimizers, optim, batch, rng):
    """One student update and one critic update, in the order and form of ``Trainer._update``."""

    def update(role):
        step_fn = method.student_step if role == "student" else method.critic_step
        with accelerator.autocast():
            loss, _ = step_fn(batch, rng)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(roles.role_parameters(role), optim.max_grad_norm)
        optimizers[role].step()
        for optimizer in optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        roles.end_phase()

    def step():
        update("student")
        update("critic")

    return step


def unavoidable_passes(accelerator, roles, method, optimizers, batch, adapter, fdistill: bool):
    """``name -> callable`` for each network pass the step must run, alone, on inputs of the step's shapes."""
    x = batch.noise
    n = x.shape[0]
    device = x.device
    cond = batch.condition
    null = roles.unconditional(cond)
    t_student = torch.full((n,), method.student_timesteps[0], device=device, dtype=torch.float64)
    path = roles.path
    t = torch.full((n,), 0.5 * (path.t_min + path.t_max), device=device, dtype=torch.float64)

    def backward_of(out):
        accelerator.backward(out.float().square().mean())

    def done():
        for optimizer in optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        roles.end_phase()

    def student_forward_backward():
        with roles.train_phase("student"):
            with accelerator.autocast():
                out = roles.student(x, t_student, cond)
        backward_of(out)
        done()

    @torch.no_grad()
    def teacher_cfg_forward():
        with accelerator.autocast():
            if roles.teacher_has_embedded_guidance:
                roles.teacher(x, t, cond, guidance=torch.full((n,), 4.5, device=device))
            else:
                roles.teacher(torch.cat([x, x]), torch.cat([t, t]), roles.concat([null, cond]))

    @torch.no_grad()
    def critic_forward():
        with accelerator.autocast():
            roles.critic(x, t, cond)

    @torch.no_grad()
    def student_sample():
        with accelerator.autocast():
            roles.student(x, t_student, cond)

    def critic_forward_backward():
        with roles.train_phase("critic"):
            with accelerator.autocast():
                out = roles.critic(x, t, cond)
        backward_of(out)
        done()

    def optimizer_steps():
        for role in ("student", "critic"):
            for parameter in roles.role_parameters(role):
                parameter.grad = torch.zeros_like(parameter)
            optimizers[role].step()
        done()

    passes: Dict[str, Callable[[], None]] = {
        "student fwd+bwd": student_forward_backward,
        "teacher CFG fwd": teacher_cfg_forward,
        "critic fwd": critic_forward,
        "student sample": student_sample,
        "critic fwd+bwd": critic_forward_backward,
        "optimizer steps": optimizer_steps,
    }
    if fdistill:
        guidance = {"guidance": torch.full((n,), 4.5, device=device)} if roles.teacher_has_embedded_guidance else {}

        def teacher_features_backward():
            # the GAN term: the teacher's pass under the prompt, differentiated w.r.t. its input, through the head
            x_in = x.detach().requires_grad_(True)
            with roles.train_phase("student"), roles.input_grad_pass("teacher"):
                with accelerator.autocast():
                    _, features = roles.teacher(x_in, t, cond, return_features=True, **guidance)
                    logits = roles.discriminator(features, t)
            accelerator.backward(logits.float().mean())
            done()

        @torch.no_grad()
        def teacher_features_fake_and_real():
            big = {k: torch.cat([v, v]) for k, v in guidance.items()}
            with accelerator.autocast():
                roles.teacher(
                    torch.cat([x, x]), torch.cat([t, t]), roles.concat([cond, cond]), return_features=True, **big
                )

        if not roles.teacher_has_embedded_guidance:
            # the graph pass above is the conditional half of the teacher's CFG; the other half runs alone

            @torch.no_grad()
            def teacher_unconditional_forward():
                with accelerator.autocast():
                    roles.teacher(x, t, null)

            del passes["teacher CFG fwd"]
            passes["teacher uncond fwd"] = teacher_unconditional_forward

        passes["teacher features fwd+bwd (GAN)"] = teacher_features_backward
        passes["teacher features fwd (fake+real)"] = teacher_features_fake_and_real
    return passes


def timed(fn, sync, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_case(family, case, args, device, dtype) -> Dict[str, object]:
    from accelerate import Accelerator

    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    components = build_family(family, args.tiny, device, dtype)
    accelerator = Accelerator(mixed_precision="no" if dtype == torch.float32 else args.dtype, cpu=device.type == "cpu")
    with PeakMemory(device) as memory:
        adapter, roles, method, optimizers, optim = build_case(family, case, components, args, device, dtype)
        resolution = args.resolution or adapter.default_resolution
        condition = adapter.encode_prompt(["a photo of a cat"] * args.batch_size, device=device)
        shape = adapter.latent_shape(args.batch_size, resolution, resolution)
        real_latents = torch.randn(shape, device=device) if CASES[case][2] == "fdistill" else None
        free_text_encoders_and_vae(adapter, components)
        modules = roles.trainable_modules()
        prepared = accelerator.prepare(*modules.values(), optimizers["student"], optimizers["critic"])
        for name, module in zip(modules, prepared[: len(modules)]):
            roles.set_prepared(name, module)
        optimizers = {"student": prepared[len(modules)], "critic": prepared[len(modules) + 1]}
        noise = torch.randn(shape, device=device)
        batch = Batch(
            condition=condition,
            noise=noise,
            real=real_latents,
            real_condition=condition if real_latents is not None else None,
        )
        rng = RandomSource.from_seed(0, device=device)
        step = make_step(accelerator, roles, method, optimizers, optim, batch, rng)
        step()  # warm-up: allocates the optimizer states
        step_s = timed(step, sync, args.steps)
    parameter_bytes = distinct_parameter_bytes(roles)
    result: Dict[str, object] = {
        "peak_gib": memory.bytes / GIB,
        "added_gib": memory.added_bytes / GIB,
        "step_s": step_s,
        "parameter_bytes": parameter_bytes,
        "optimizer_bytes": optimizer_state_bytes(optimizers),
    }
    passes = unavoidable_passes(accelerator, roles, method, optimizers, batch, adapter, CASES[case][2] == "fdistill")
    for fn in passes.values():  # warm-up
        fn()
    pass_s = {name: timed(fn, sync, args.steps) for name, fn in passes.items()}
    result["passes_s"] = pass_s
    result["overhead"] = step_s / sum(pass_s.values())
    accelerator.free_memory()
    del roles, method, optimizers, components, adapter, step, passes, batch
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


# ----------------------------------------------------------------------------------------------------------------
# the byte arithmetic at real size
# ----------------------------------------------------------------------------------------------------------------


def estimate(families, lora_rank, dtype) -> Dict[str, Dict[str, Dict[str, float]]]:
    """Weights, gradients, AdamW states and EMA of each case at real size, from the real configs on the meta device.

    Gradients exist for one role at a time (``zero_grad(set_to_none=True)`` after each update), so their peak is the
    larger role's. Activations are not in it: they are what the GPU run measures.
    """
    from accelerate import init_empty_weights
    from real_size_overhead import REAL_SIZE

    out: Dict[str, Dict[str, Dict[str, float]]] = {}
    for family in families:
        out[family] = {}
        for case, (student, critic, method_name) in CASES.items():
            with init_empty_weights():
                components = REAL_SIZE[family]()
                components["scheduler"] = components["scheduler"]()
                for value in components.values():
                    if isinstance(value, torch.nn.Module):
                        value.to(dtype)
                adapter_cls = get_adapter_class(family)
                denoiser = components[adapter_cls.denoiser_name]
                defaults = adapter_cls.training_defaults
                roles_config = RolesConfig(
                    student=student, critic=critic, lora_rank=lora_rank or defaults.lora_rank, lora_alpha=8
                )
                backbone_parameters = sum(p.numel() for p in denoiser.parameters())
                roles = _meta_roles(adapter_cls, components, roles_config, method_name == "fdistill", dtype)
            per_role = {r: sum(p.numel() for p in roles.role_parameters(r)) for r in ("student", "critic")}
            params = distinct_parameter_bytes(roles)
            trainable = sum(per_role.values())
            row = {
                "frozen_weights_gib": params["frozen"] / GIB,
                "trainable_weights_gib": params["trainable"] / GIB,
                "grads_peak_gib": 4 * max(per_role.values()) / GIB,
                "adamw_gib": 8 * trainable / GIB,
                "adamw_8bit_gib": 2 * trainable / GIB,
                "ema_gib": 4 * per_role["student"] / GIB,
                "denoiser_parameters_b": backbone_parameters / 1e9,
            }
            row["total_gib"] = (
                row["frozen_weights_gib"] + row["trainable_weights_gib"] + row["grads_peak_gib"] + row["adamw_gib"]
            )
            out[family][case] = row
            del roles, components
            gc.collect()
    return out


def _meta_roles(adapter_cls, components, roles_config, discriminator, dtype):
    denoiser = components[adapter_cls.denoiser_name]

    class _NoText(adapter_cls):
        # BackboneRoles encodes the null prompt once at construction; nothing runs on the meta device
        def unconditional(self, batch_size, device=None):
            return None

    adapter = _NoText({**components, adapter_cls.denoiser_name: denoiser})
    return BackboneRoles(adapter, roles_config.validate(), discriminator=discriminator, dtype=dtype)


# ----------------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype", default=None, choices=sorted(DTYPES), help="frozen weights (default: bf16; fp32 with --tiny)"
    )
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--resolution", type=int, default=None, help="default: the family's native size (1024 px)")
    parser.add_argument("--steps", type=int, default=5, help="timed repeats of the step and of each pass")
    parser.add_argument("--lora_rank", type=int, default=None, help="default: the family's (SDXL 64); 4 with --tiny")
    parser.add_argument(
        "--no_gradient_checkpointing", dest="gradient_checkpointing", action="store_false", help=argparse.SUPPRESS
    )
    parser.add_argument("--tiny", action="store_true", help="tiny components (checks the script on a CPU)")
    parser.add_argument("--estimate", action="store_true", help="only the byte arithmetic at real size (meta device)")
    parser.add_argument("--json_out", default=None)
    args = parser.parse_args(argv)
    args.dtype = args.dtype or ("fp32" if args.tiny else "bf16")
    dtype = DTYPES[args.dtype]
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()

    if args.estimate:
        table = estimate(args.families, args.lora_rank, dtype)
        print(f"bytes at real size ({args.dtype} frozen weights, fp32 trainable weights, AdamW), no activations")
        header = f"{'family':<14}{'case':<26}{'frozen':>8}{'train':>8}{'grads':>8}{'adamw':>8}{'(8bit)':>8}{'ema':>8}{'total GiB':>11}"
        print(header)
        for family, cases in table.items():
            for case, r in cases.items():
                print(
                    f"{family:<14}{case:<26}{r['frozen_weights_gib']:>8.2f}{r['trainable_weights_gib']:>8.2f}"
                    f"{r['grads_peak_gib']:>8.2f}{r['adamw_gib']:>8.2f}{r['adamw_8bit_gib']:>8.2f}{r['ema_gib']:>8.2f}"
                    f"{r['total_gib']:>11.2f}"
                )
        print(json.dumps({"estimate": table}))
        return 0

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = "cpu"
    print(
        f"torch {torch.__version__}, device {device_name}, frozen weights {args.dtype}, batch {args.batch_size}, "
        f"{'tiny' if args.tiny else 'real-size'} components, gradient checkpointing "
        f"{'on' if args.gradient_checkpointing else 'off'}, median of {args.steps}",
        flush=True,
    )
    results: Dict[str, Dict[str, object]] = {}
    for family in args.families:
        results[family] = {}
        for case in args.cases:
            try:
                results[family][case] = measure_case(family, case, args, device, dtype)
            except Exception as error:  # one case's failure (e.g. out of memory) must not lose the others
                traceback.print_exc()
                results[family][case] = {"error": f"{type(error).__name__}: {error}"}
            print(family, case, json.dumps(results[family][case]), flush=True)
            if args.json_out:
                with open(args.json_out, "w") as f:
                    json.dump({"device": device_name, "dtype": args.dtype, "results": results}, f, indent=2)

    memory_name = "peak GiB" if device.type == "cuda" else "peak RSS GiB"
    header = (
        f"{'family':<14}{'case':<26}{memory_name:>13}{'step s':>10}{'passes s':>10}{'overhead':>10}{'params GiB':>12}"
    )
    print(header)
    print("-" * len(header))
    for family, cases in results.items():
        for case, r in cases.items():
            if "error" in r:
                print(f"{family:<14}{case:<26} {r['error']}")
                continue
            params = sum(r["parameter_bytes"].values()) / GIB
            print(
                f"{family:<14}{case:<26}{r['peak_gib']:>13.3f}{r['step_s']:>10.4f}{sum(r['passes_s'].values()):>10.4f}"
                f"{r['overhead']:>10.3f}{params:>12.4f}"
            )
    print(json.dumps({"device": device_name, "dtype": args.dtype, "results": results}))
    ok = all("error" not in r for cases in results.values() for r in cases.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
