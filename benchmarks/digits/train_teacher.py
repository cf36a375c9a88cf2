"""Train the bundled digits teacher: a tiny but genuine diffusers PixArt-α pipeline.

    python benchmarks/digits/train_teacher.py    # writes diffusers_onestep/demo/assets/digits/teacher/ (+ teacher_training.json)

Components (all trained or built here, nothing downloaded):
* tokenizer: a T5 Unigram tokenizer over the prompt vocabulary (``diffusers_onestep.testing.tiny_t5_tokenizer``);
* text_encoder: a tiny ``T5EncoderModel``, random and frozen (as a real T5 is frozen); the DiT learns to read it;
* vae: a small ``AutoencoderKL`` trained on the digits, 16×16×3 -> 8×8×4 latents, ``scaling_factor`` = 1/std of
  the training latents (unit-std latents, no shift, as the PixArt-α pipeline decodes ``latents / scaling_factor``);
  the DiT trains on the posterior means (see ``training_latents``), and the saved encoder's posterior std is set to
  ~0 so that encoding real images gives exactly those latents (``make_encoder_deterministic``);
* transformer: a small ``PixArtTransformer2DModel`` (patch 2, 8 output channels like PixArt-α's learned sigma; only
  the first 4, epsilon, are trained: the pipeline and the project's adapter discard the variance half;
  ``use_additional_conditions=False``) trained with the DDPM epsilon objective on the VAE latents; linear betas
  1e-4..0.02 over 1000 steps; 10 % prompt dropout to ``""`` for classifier-free guidance; EMA weights are saved.
  Half of the timesteps are drawn uniformly from 0..999 and half from 250..850, where the prompt decides the digit
  (``--t_mid_fraction``): with uniform t alone the conditioning was still weak after 2,500 steps (50-step accuracy
  0.69 without guidance, against 0.82 with the mixture; FD at guidance 1.5: 2.12 against 1.12);
* scheduler: ``DDIMScheduler`` with the training betas and ``timestep_spacing="trailing"`` (so 1 and 4 steps start at
  t=999; the PixArt-α pipeline's 1-step path needs a scheduler whose ``step`` returns the x0 estimate, which
  DPMSolverMultistep does not).

The T5 encoder is frozen, so the training loop encodes every prompt once and uses the cached embeddings cut to the
longest prompt: T5's relative attention and PixArt's masked cross-attention ignore padding, so this equals the
pipeline's 120-token padding (checked at start-up).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch
import torch.nn.functional as F


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from diffusers_onestep.demo import digits  # noqa: E402
from diffusers_onestep.testing import tiny_t5_tokenizer  # noqa: E402


BETA_START, BETA_END, NUM_TRAIN_TIMESTEPS = 1e-4, 0.02, 1000


# ------------------------------------------------------------------------------------------------------------------
# components
# ------------------------------------------------------------------------------------------------------------------


def build_text(seed: int, d_model: int):
    from transformers import T5Config, T5EncoderModel

    tokenizer = tiny_t5_tokenizer(digits.PROMPT_WORDS, model_max_length=120)
    config = T5Config(
        vocab_size=max(128, len(tokenizer)),
        d_model=d_model,
        d_ff=2 * d_model,
        d_kv=d_model // 4,
        num_heads=4,
        num_layers=2,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",  # as T5 v1.1, the encoder PixArt uses
    )
    torch.manual_seed(seed)
    return tokenizer, T5EncoderModel(config).eval().requires_grad_(False)


def build_vae(resolution: int):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        block_out_channels=[32, 32],
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        mid_block_add_attention=False,
        sample_size=resolution,
    )


def build_transformer(latent_size: int, width: int, heads: int, layers: int, caption_channels: int):
    from diffusers import PixArtTransformer2DModel

    from diffusers_onestep.families.pixart import PIXART_BLOCK_CONFIG

    return PixArtTransformer2DModel(
        sample_size=latent_size,
        num_layers=layers,
        attention_head_dim=width // heads,
        num_attention_heads=heads,
        caption_channels=caption_channels,
        cross_attention_dim=width,
        use_additional_conditions=False,
        **PIXART_BLOCK_CONFIG,
    )


def build_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS,
        beta_start=BETA_START,
        beta_end=BETA_END,
        beta_schedule="linear",
        prediction_type="epsilon",
        clip_sample=False,
        set_alpha_to_one=True,
        timestep_spacing="trailing",
    )


# ------------------------------------------------------------------------------------------------------------------
# stages
# ------------------------------------------------------------------------------------------------------------------


def train_vae(args, log):
    """Reconstruction (MSE) + small KL; returns the VAE with ``scaling_factor`` set to 1/std of the latents."""
    x_train, _ = digits.load_split("train", resolution=args.resolution)
    torch.manual_seed(args.seed)
    vae = build_vae(args.resolution)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.vae_lr, total_steps=args.vae_steps, pct_start=0.05)
    generator = torch.Generator().manual_seed(args.seed)
    start = time.time()
    for step in range(1, args.vae_steps + 1):
        idx = torch.randint(0, len(x_train), (args.vae_batch,), generator=generator)
        x = x_train[idx]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator)).sample
        mse = F.mse_loss(recon, x)
        kl = posterior.kl().mean() / posterior.mean[0].numel()  # per latent element
        loss = mse + args.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 200 == 0 or step == args.vae_steps:
            log(f"vae step {step}: mse {mse.item():.5f} kl/elem {kl.item():.3f} ({time.time() - start:.0f} s)")
    return vae.eval(), time.time() - start


@torch.no_grad()
def training_latents(vae, images: torch.Tensor) -> torch.Tensor:
    """The DiT's training latents (unscaled): the posterior means.

    With KL weight 1e-3 two of the four channels keep a posterior std near the prior's, so sampled latents carry
    noise the DiT cannot tell from the diffusion noise (final eps-loss 0.19 on samples against 0.046 on means,
    same run otherwise). The decoder was trained on samples, so it decodes means (the centre of its training inputs) cleanly.
    """
    return vae.encode(images).latent_dist.mean


@torch.no_grad()
def make_encoder_deterministic(vae, logvar: float = -30.0) -> None:
    """Set the posterior log-variance to ``logvar`` (std exp(-15) = 3e-7): ``latent_dist.sample()`` = the mean.

    Two of the four latent channels carry almost nothing (posterior std 1.2 in scaled units against 0.2-0.4 across
    images), so sampled encodings of real images would be far from the means the DiT was trained on; anything that
    encodes real images (``adapter.encode_images``, DMD2's GAN on real latents) must see the teacher's latents.
    Only ``quant_conv``'s log-variance rows change: the means and the decoder are untouched.
    """
    channels = vae.config.latent_channels
    vae.quant_conv.weight[channels:].zero_()
    vae.quant_conv.bias[channels:].fill_(logvar)


@torch.no_grad()
def set_scaling_factor(vae, resolution: int) -> float:
    """``scaling_factor`` = 1/std of the training latents, so the DiT sees unit-std latents (no shift)."""
    x_train, _ = digits.load_split("train", resolution=resolution)
    scaling_factor = float(1.0 / training_latents(vae, x_train).std())
    vae.register_to_config(scaling_factor=scaling_factor)
    return scaling_factor


@torch.no_grad()
def vae_report(vae, resolution: int) -> dict:
    """Reconstruction quality on the held-out split and the digits metrics of reconstructed train images."""
    x_held, _ = digits.load_split("heldout", resolution=resolution)
    recon = vae.decode(vae.encode(x_held).latent_dist.mode()).sample.clamp(-1, 1)
    x_train, y_train = digits.load_split("train", resolution=resolution)
    idx = torch.cat([torch.nonzero(y_train == d).flatten()[: digits.EVAL_PER_DIGIT] for d in range(10)])
    recon_train = vae.decode(vae.encode(x_train[idx]).latent_dist.mode()).sample.clamp(-1, 1)
    metrics = digits.evaluate(recon_train, y_train[idx], value_range="-1,1")
    z = training_latents(vae, x_train) * vae.config.scaling_factor
    return {
        "heldout_recon_mse": float(F.mse_loss(recon, x_held)),
        "heldout_recon_psnr_db": float(10 * torch.log10(4.0 / F.mse_loss(recon, x_held))),
        "recon_train_100_per_digit_fd": metrics["fd"],
        "recon_train_100_per_digit_accuracy": metrics["prompt_accuracy"],
        "scaling_factor": float(vae.config.scaling_factor),
        "scaled_latent_mean_per_channel": [round(float(v), 4) for v in z.mean((0, 2, 3))],
        "scaled_latent_std_per_channel": [round(float(v), 4) for v in z.std((0, 2, 3))],
        "scaled_latent_std": float(z.std()),
    }


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts):
    """Embeddings ``[P, L, D]`` and masks ``[P, L]`` as the PixArt-α pipeline computes them, cut to the longest prompt."""
    from diffusers import PixArtAlphaPipeline

    pipe = PixArtAlphaPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=None, transformer=None, scheduler=None
    )
    embeds, mask, _, _ = pipe.encode_prompt(
        list(prompts), do_classifier_free_guidance=False, device="cpu", clean_caption=False, max_sequence_length=120
    )
    length = int(mask.sum(1).max())
    return embeds[:, :length].contiguous(), mask[:, :length].contiguous(), (embeds, mask)


def train_transformer(args, vae, tokenizer, text_encoder, log):
    prompt_digit = digits.all_prompts()
    prompts = [digits.EMPTY_PROMPT] + [p for p, _ in prompt_digit]
    embeds, mask, (full_embeds, full_mask) = encode_prompts(tokenizer, text_encoder, prompts)
    per_digit = torch.tensor([[1 + i for i, (_, d) in enumerate(prompt_digit) if d == k] for k in range(10)])

    x_train, y_train = digits.load_split("train", resolution=args.resolution)
    z_train = training_latents(vae, x_train) * vae.config.scaling_factor

    betas = torch.linspace(BETA_START, BETA_END, NUM_TRAIN_TIMESTEPS, dtype=torch.float64)
    alphas_cumprod = torch.cumprod(1 - betas, 0).float()

    torch.manual_seed(args.seed)
    model = build_transformer(z_train.shape[-1], args.width, args.heads, args.layers, text_encoder.config.d_model)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"transformer: {n_params / 1e6:.2f}M parameters; text tokens kept {embeds.shape[1]} of 120")

    # padding check: the cut embeddings give the same prediction as the pipeline's 120-token padding
    with torch.no_grad():
        model.eval()
        probe = torch.randn(4, *z_train.shape[1:])
        kw = {
            "timestep": torch.tensor([10, 300, 600, 999]),
            "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
        }
        a = model(probe, encoder_hidden_states=embeds[:4], encoder_attention_mask=mask[:4], **kw).sample
        b = model(probe, encoder_hidden_states=full_embeds[:4], encoder_attention_mask=full_mask[:4], **kw).sample
        assert torch.allclose(a, b, atol=1e-4), f"padding changes the prediction by {(a - b).abs().max():.2e}"
        model.train()

    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.99))
    warmup = 200
    decay_from = int(args.steps * 0.8)

    def lr_at(step):
        if step < warmup:
            return (step + 1) / warmup
        if step >= decay_from:
            return max(0.1, 1 - 0.9 * (step - decay_from) / max(1, args.steps - decay_from))
        return 1.0

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    generator = torch.Generator().manual_seed(args.seed + 1)
    added = {"resolution": None, "aspect_ratio": None}
    start = time.time()
    running = None
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(x_train), (args.batch,), generator=generator)
        z0 = z_train[idx]
        # a random phrasing of the image's digit, or "" with probability p_uncond
        pick = per_digit[y_train[idx], torch.randint(0, per_digit.shape[1], (args.batch,), generator=generator)]
        pick = torch.where(torch.rand(args.batch, generator=generator) < args.p_uncond, torch.zeros_like(pick), pick)
        t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (args.batch,), generator=generator)
        if args.t_mid_fraction > 0:  # extra samples where the prompt decides the digit (see --t_mid_fraction)
            lo, hi = args.t_mid_range
            mid = torch.rand(args.batch, generator=generator) < args.t_mid_fraction
            t = torch.where(mid, torch.randint(lo, hi + 1, (args.batch,), generator=generator), t)
        noise = torch.randn(z0.shape, generator=generator)
        ac = alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = ac.sqrt() * z0 + (1 - ac).sqrt() * noise
        out = model(
            x_t,
            encoder_hidden_states=embeds[pick],
            encoder_attention_mask=mask[pick],
            timestep=t,
            added_cond_kwargs=added,
        ).sample
        loss = F.mse_loss(out[:, :4], noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 250 == 0 or step == args.steps:
            elapsed = time.time() - start
            log(
                f"dit step {step}/{args.steps}: loss {running:.4f} lr {sched.get_last_lr()[0]:.2e} "
                f"({elapsed:.0f} s, {elapsed / step:.3f} s/step)"
            )
        if args.snapshot_every and step % args.snapshot_every == 0 and step < args.steps:
            save_pipeline(os.path.join(args.snapshot_dir, f"step{step}"), tokenizer, text_encoder, vae, ema)
    return ema, time.time() - start, n_params


def save_pipeline(folder, tokenizer, text_encoder, vae, transformer):
    from diffusers import PixArtAlphaPipeline

    pipe = PixArtAlphaPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=build_scheduler()
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def folder_bytes(folder):
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(folder) for f in fs)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resolution", type=int, default=digits.TEACHER_RESOLUTION)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--text_dim", type=int, default=32, help="T5 d_model = the DiT's caption_channels")
    parser.add_argument("--vae_steps", type=int, default=1000)
    parser.add_argument("--vae_batch", type=int, default=64)
    parser.add_argument("--vae_lr", type=float, default=2e-3)
    parser.add_argument("--kl_weight", type=float, default=1e-3, help="weight of the per-element KL")
    parser.add_argument("--vae_from", default=None, help="reuse this trained VAE folder (skips VAE training)")
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--steps", type=int, default=2500)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ema", type=float, default=0.998)
    parser.add_argument("--p_uncond", type=float, default=0.1)
    parser.add_argument(
        "--t_mid_fraction",
        type=float,
        default=0.5,
        help="fraction of timesteps drawn from --t_mid_range instead of uniformly from 0..999: with "
        "linear betas on unit-std latents the digit is decided around t=300-800, where the "
        "epsilon loss is small, so the conditioning learns slowly under uniform t",
    )
    parser.add_argument("--t_mid_range", type=int, nargs=2, default=(250, 850))
    parser.add_argument("--snapshot_every", type=int, default=0)
    parser.add_argument("--snapshot_dir", default="/tmp/digits_teacher_snapshots")
    parser.add_argument("--out", default=digits.TEACHER_DIR)
    parser.add_argument("--info", default=os.path.join(digits.ASSETS_DIR, "teacher_training.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    def log(msg):
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    total_start = time.time()
    tokenizer, text_encoder = build_text(args.seed, args.text_dim)
    if args.vae_from:
        from diffusers import AutoencoderKL

        vae, vae_seconds = AutoencoderKL.from_pretrained(args.vae_from).eval(), 0.0
    else:
        vae, vae_seconds = train_vae(args, log)
    vae.requires_grad_(False)
    set_scaling_factor(vae, args.resolution)
    vae_metrics = vae_report(vae, args.resolution)
    log(f"vae: {json.dumps(vae_metrics)}")
    transformer, dit_seconds, n_params = train_transformer(args, vae, tokenizer, text_encoder, log)
    make_encoder_deterministic(vae)
    save_pipeline(args.out, tokenizer, text_encoder, vae, transformer)
    total = time.time() - total_start
    info = {
        "command": "python benchmarks/digits/train_teacher.py " + " ".join(sys.argv[1:]),
        "args": vars(args),
        "vae_train_seconds": round(vae_seconds, 1),
        "transformer_train_seconds": round(dit_seconds, 1),
        "total_seconds": round(total, 1),
        "threads": args.threads,
        "transformer_parameters": n_params,
        "vae_parameters": sum(p.numel() for p in vae.parameters()),
        "text_encoder_parameters": sum(p.numel() for p in text_encoder.parameters()),
        "folder_bytes": folder_bytes(args.out),
        "vae": vae_metrics,
        "torch": torch.__version__,
    }
    with open(args.info, "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2)
        f.write("\n")
    log(f"saved {args.out} ({info['folder_bytes'] / 1e6:.1f} MB) in {total:.0f} s")


if __name__ == "__main__":
    main()
