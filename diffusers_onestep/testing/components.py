"""Tiny, offline, random-weight components of every built-in family (sizes of diffusers' own fast tests,
e.g. ``tests/pipelines/stable_diffusion_xl/test_stable_diffusion_xl.py``).

Tokenizers are built in memory from small synthetic vocabularies, because nothing can be downloaded here: a char-level
CLIP BPE, a word-level T5 Unigram and a byte-fallback Gemma BPE. Everything is deterministic given ``seed``.
"""

from __future__ import annotations

import string
from typing import Dict, Iterable, Optional

import torch


_BASE_WORDS = (
    "a an the of on in with and photo cat dog red blue green car road astronaut riding horse bowl fruit house tree "
    "painting portrait digit handwritten number zero one two three four five six seven eight nine"
).split()


# ------------------------------------------------------------------------------------------------------------------
# tokenizers
# ------------------------------------------------------------------------------------------------------------------


def _bytes_to_unicode() -> Dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable-unicode table (Radford et al. 2019)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def _takes_in_memory_vocab(tokenizer_class) -> bool:
    """Whether ``tokenizer_class`` is built from an in-memory ``vocab`` (transformers 5, where every tokenizer is
    backed by the ``tokenizers`` library). transformers 4's classes of the same name read vocabulary files instead;
    there the same backend is assembled here and wrapped in the ``...TokenizerFast`` class."""
    import inspect

    return "vocab" in inspect.signature(tokenizer_class.__init__).parameters


def _clip_vocab():
    symbols = list(_bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab_list)}


def tiny_clip_tokenizer(model_max_length: int = 77, pad_token: str = "<|endoftext|>"):
    """A char-level CLIP BPE tokenizer: 256 byte symbols, their ``</w>`` forms and two specials (514 ids)."""
    from transformers import CLIPTokenizer

    vocab = _clip_vocab()
    specials = {"unk_token": "<|endoftext|>", "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>"}
    if _takes_in_memory_vocab(CLIPTokenizer):
        return CLIPTokenizer(
            vocab=vocab, merges=[], pad_token=pad_token, model_max_length=model_max_length, **specials
        )

    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE
    from transformers import CLIPTokenizerFast

    # the pipeline of transformers' CLIP tokenizer (lower-cased NFC text, CLIP's word regex, byte-level symbols)
    backend = Tokenizer(
        BPE(
            vocab=vocab,
            merges=[],
            continuing_subword_prefix="",
            end_of_word_suffix="</w>",
            fuse_unk=False,
            unk_token="<|endoftext|>",
        )
    )
    backend.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(
                Regex(
                    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
                ),
                behavior="removed",
                invert=True,
            ),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.RobertaProcessing(
        ("<|endoftext|>", vocab["<|endoftext|>"]),
        ("<|startoftext|>", vocab["<|startoftext|>"]),
        trim_offsets=False,
        add_prefix_space=False,
    )
    return CLIPTokenizerFast(
        tokenizer_object=backend, pad_token=pad_token, model_max_length=model_max_length, **specials
    )


def tiny_t5_tokenizer(words: Optional[Iterable[str]] = None, model_max_length: int = 512):
    """A T5 Unigram tokenizer over ``words`` plus single characters (pad=0, eos=1, unk=2)."""
    from transformers import T5Tokenizer

    words = list(dict.fromkeys(list(words or _BASE_WORDS)))
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + w, -1.0) for w in words]
    pieces += [(c, -5.0) for c in string.ascii_lowercase + string.digits + ".,'-"]
    if _takes_in_memory_vocab(T5Tokenizer):
        return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=model_max_length)

    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import Unigram
    from transformers import T5TokenizerFast

    # the pipeline of transformers' T5 tokenizer without a sentencepiece normalizer: words, "▁"-prefixed, then "</s>"
    backend = Tokenizer(Unigram(pieces, unk_id=2, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
        ]
    )
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    backend.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", 1)]
    )
    return T5TokenizerFast(tokenizer_object=backend, extra_ids=0, model_max_length=model_max_length)


def tiny_gemma_tokenizer():
    """A byte-fallback Gemma BPE with BOS (SANA keeps token 0, the BOS): specials, 256 bytes and letters."""
    from transformers import GemmaTokenizer

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for c in string.ascii_lowercase + "▁":
        vocab.setdefault(c, len(vocab))
    if _takes_in_memory_vocab(GemmaTokenizer):
        return GemmaTokenizer(vocab=vocab, merges=[], add_bos_token=True)

    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from transformers import GemmaTokenizerFast

    # the pipeline of transformers' Gemma tokenizer: spaces become "▁", unknown characters fall back to bytes
    backend = Tokenizer(
        BPE(vocab=vocab, merges=[], fuse_unk=True, unk_token="<unk>", dropout=None, byte_fallback=True)
    )
    backend.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    backend.normalizer = normalizers.Replace(" ", "▁")
    # GemmaTokenizerFast writes the BOS-adding post-processor itself (add_bos_token)
    return GemmaTokenizerFast(tokenizer_object=backend, add_bos_token=True, mask_token="<mask>")


# ------------------------------------------------------------------------------------------------------------------
# components
# ------------------------------------------------------------------------------------------------------------------


def _tiny_clip_encoders(seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        bos_token_id=512,
        eos_token_id=513,
        pad_token_id=513,
        hidden_size=32,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=5,
        vocab_size=1000,
        hidden_act="gelu",
        projection_dim=32,
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(config).eval()
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(config).eval()
    return text_encoder, text_encoder_2


def tiny_sdxl_components(seed: int = 0, time_cond_proj_dim: Optional[int] = None) -> Dict[str, object]:
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(2, 4),
        layers_per_block=2,
        time_cond_proj_dim=time_cond_proj_dim,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,
        cross_attention_dim=64,
        norm_num_groups=1,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        steps_offset=1,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
    )
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        sample_size=128,
    )
    text_encoder, text_encoder_2 = _tiny_clip_encoders(seed)
    return {
        "unet": unet.eval(),
        "scheduler": scheduler,
        "vae": vae.eval(),
        "text_encoder": text_encoder,
        "tokenizer": tiny_clip_tokenizer(),
        "text_encoder_2": text_encoder_2,
        "tokenizer_2": tiny_clip_tokenizer(pad_token="!"),
        "image_encoder": None,
        "feature_extractor": None,
    }


def _tiny_t5(seed: int, words=None, d_model: int = 32):
    from transformers import T5Config, T5EncoderModel

    tokenizer = tiny_t5_tokenizer(words)
    config = T5Config(
        vocab_size=max(128, len(tokenizer)),
        d_model=d_model,
        d_ff=37,
        d_kv=8,
        num_heads=4,
        num_layers=2,
        relative_attention_num_buckets=8,
    )
    torch.manual_seed(seed)
    return T5EncoderModel(config).eval(), tokenizer


def tiny_pixart_components(seed: int = 0) -> Dict[str, object]:
    from diffusers import AutoencoderKL, DDIMScheduler, PixArtTransformer2DModel

    from ..families.pixart import PIXART_BLOCK_CONFIG

    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        sample_size=8,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=3,
        caption_channels=32,
        cross_attention_dim=24,
        **PIXART_BLOCK_CONFIG,
    )
    torch.manual_seed(seed)
    vae = AutoencoderKL()
    text_encoder, tokenizer = _tiny_t5(seed)
    return {
        "transformer": transformer.eval(),
        "vae": vae.eval(),
        "scheduler": DDIMScheduler(),
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
    }


def _tiny_gemma(seed: int):
    from transformers import Gemma2Config, Gemma2Model

    tokenizer = tiny_gemma_tokenizer()
    config = Gemma2Config(
        head_dim=16,
        hidden_size=8,
        initializer_range=0.02,
        intermediate_size=64,
        max_position_embeddings=8192,
        model_type="gemma2",
        num_attention_heads=2,
        num_hidden_layers=1,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    return Gemma2Model(config).eval(), tokenizer


def tiny_sana_components(seed: int = 0, sprint: bool = False) -> Dict[str, object]:
    from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaTransformer2DModel, SCMScheduler

    extra = {"qk_norm": "rms_norm_across_heads", "guidance_embeds": True} if sprint else {}
    torch.manual_seed(seed)
    transformer = SanaTransformer2DModel(
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        num_attention_heads=2,
        attention_head_dim=4,
        num_cross_attention_heads=2,
        cross_attention_head_dim=4,
        cross_attention_dim=8,
        caption_channels=8,
        sample_size=32,
        **extra,
    )
    torch.manual_seed(seed)
    vae = AutoencoderDC(
        in_channels=3,
        latent_channels=4,
        attention_head_dim=2,
        encoder_block_types=("ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8),
        encoder_qkv_multiscales=((), (5,)),
        decoder_qkv_multiscales=((), (5,)),
        encoder_layers_per_block=(1, 1),
        decoder_layers_per_block=[1, 1],
        downsample_block_type="conv",
        upsample_block_type="interpolate",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        scaling_factor=0.41407,
    )
    text_encoder, tokenizer = _tiny_gemma(seed)
    scheduler = SCMScheduler() if sprint else FlowMatchEulerDiscreteScheduler(shift=7.0)
    return {
        "transformer": transformer.eval(),
        "vae": vae.eval(),
        "scheduler": scheduler,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
    }


def _tiny_two_block_vae(**config):
    """An AutoencoderKL of two blocks of widths 8 and 16 (the new families' tiny VAE), with ``config`` on top."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        **{
            "block_out_channels": (8, 16),
            "in_channels": 3,
            "out_channels": 3,
            "down_block_types": ("DownEncoderBlock2D", "DownEncoderBlock2D"),
            "up_block_types": ("UpDecoderBlock2D", "UpDecoderBlock2D"),
            "norm_num_groups": 4,
            **config,
        }
    )


def tiny_sd_components(seed: int = 0, v_prediction: bool = False) -> Dict[str, object]:
    """A tiny Stable Diffusion 1.x model (PNDMScheduler, epsilon, as stable-diffusion-v1-5 ships it) or, with
    ``v_prediction``, a 2.x-like one (DDIMScheduler predicting v, linear-projection attention with per-block head
    sizes, as stable-diffusion-2-1 ships it). Sizes differ from diffusers' own fast tests (block widths 4/8, one CLIP
    of width 32): widths 6/12, a CLIP of width 24, a 2-block VAE of widths 8/16."""
    from diffusers import DDIMScheduler, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(6, 12),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        # SD 1.x: 8 heads everywhere, conv projections; SD 2.x: head sizes per block, linear projections
        attention_head_dim=(2, 3) if v_prediction else 3,
        use_linear_projection=v_prediction,
        cross_attention_dim=24,
        norm_num_groups=3,
    )
    scheduler_config = {
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "steps_offset": 1,
        "set_alpha_to_one": False,
    }
    if v_prediction:
        scheduler = DDIMScheduler(**scheduler_config, clip_sample=False, prediction_type="v_prediction")
    else:
        scheduler = PNDMScheduler(**scheduler_config, skip_prk_steps=True)
    torch.manual_seed(seed)
    vae = _tiny_two_block_vae(
        latent_channels=4,
        sample_size=32,
    )
    config = CLIPTextConfig(
        bos_token_id=512,
        eos_token_id=513,
        pad_token_id=513 if not v_prediction else 0,
        hidden_size=24,
        intermediate_size=40,
        layer_norm_eps=1e-05,
        num_attention_heads=3,
        num_hidden_layers=3,
        vocab_size=1000,
        hidden_act="quick_gelu" if not v_prediction else "gelu",
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(config).eval()
    # SD 2.x's OpenCLIP tokenizer pads with "!" (id 0), SD 1.x's with the end-of-text token
    tokenizer = tiny_clip_tokenizer(pad_token="!" if v_prediction else "<|endoftext|>")
    return {
        "unet": unet.eval(),
        "scheduler": scheduler,
        "vae": vae.eval(),
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "image_encoder": None,
    }


def tiny_flux_components(seed: int = 0, guidance_embeds: bool = True) -> Dict[str, object]:
    """A tiny FLUX.1: FLUX.1-dev-like (guidance embedded, dynamically shifted schedule) or, with
    ``guidance_embeds=False``, FLUX.1-schnell-like (no guidance input, shift 1). Scheduler settings are the published
    repos' (``scheduler/scheduler_config.json`` of black-forest-labs/FLUX.1-dev and -schnell); the sizes are our own,
    unlike diffusers' FLUX tests (4 latent channels packed to 16, 3 heads of 8 with rotary axes (2, 2, 4), 24-wide T5,
    20-wide CLIP). The VAE's ``sample_size`` (32 px) is the default image size, as FLUX.1's VAE states 1024."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=8,
        num_attention_heads=3,
        joint_attention_dim=24,
        pooled_projection_dim=20,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(2, 2, 4),
    )
    torch.manual_seed(seed)
    vae = _tiny_two_block_vae(
        latent_channels=4,
        sample_size=32,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )
    clip_config = CLIPTextConfig(
        bos_token_id=512,
        eos_token_id=513,
        pad_token_id=513,
        hidden_size=20,
        intermediate_size=29,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=1000,
        projection_dim=20,
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(clip_config).eval()
    tokenizer_2 = tiny_t5_tokenizer()
    t5_config = T5Config(
        vocab_size=max(128, len(tokenizer_2)),
        d_model=24,
        d_ff=29,
        d_kv=8,
        num_heads=3,
        num_layers=1,
        relative_attention_num_buckets=8,
    )
    torch.manual_seed(seed + 1)
    text_encoder_2 = T5EncoderModel(t5_config).eval()
    if guidance_embeds:  # FLUX.1-dev's scheduler
        scheduler = FlowMatchEulerDiscreteScheduler(
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        )
    else:  # FLUX.1-schnell's
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    return {
        "transformer": transformer.eval(),
        "scheduler": scheduler,
        "vae": vae.eval(),
        "text_encoder": text_encoder,
        "tokenizer": tiny_clip_tokenizer(),
        "text_encoder_2": text_encoder_2,
        "tokenizer_2": tokenizer_2,
        "image_encoder": None,
        "feature_extractor": None,
    }


def tiny_sd3_components(seed: int = 0, t5: bool = True, sd35: bool = True) -> Dict[str, object]:
    """A tiny SD3.5-shaped model: an MMDiT with QK RMS-norm and one dual-attention (MMDiT-X) block as in SD3.5-Medium,
    patch size 2, a 16-channel-like latent (here 6 channels) and a shift-3 flow scheduler, CLIP-L/CLIP-G/T5 encoders of
    different widths (so the CLIP tokens are zero-padded to the T5 width, as in the real model). ``t5=False`` leaves
    out ``text_encoder_3``/``tokenizer_3``, as ``StableDiffusion3Pipeline.from_pretrained(..., text_encoder_3=None)``;
    ``sd35=False`` gives SD3-Medium's block (no QK norm, no dual attention).

    Sizes are unlike diffusers' own SD3 tests (patch size 1, 4 channels, one CLIP width, 32-wide T5).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    clip_l_width, clip_g_width, t5_width = 8, 12, 28
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=6,
        out_channels=6,
        num_layers=3,
        attention_head_dim=6,
        num_attention_heads=2,
        joint_attention_dim=t5_width,
        caption_projection_dim=12,  # = heads x head dim, as in every SD3 checkpoint
        pooled_projection_dim=clip_l_width + clip_g_width,
        pos_embed_max_size=16,
        dual_attention_layers=(0,) if sd35 else (),
        qk_norm="rms_norm" if sd35 else None,
    )
    torch.manual_seed(seed)
    vae = _tiny_two_block_vae(
        latent_channels=6,
        layers_per_block=1,
        sample_size=16,
        use_quant_conv=False,
        use_post_quant_conv=False,
        # SD3's VAE normalization (stabilityai/stable-diffusion-3-medium-diffusers vae/config.json)
        shift_factor=0.0609,
        scaling_factor=1.5305,
    )
    encoders = []
    for offset, (width, heads, layers) in enumerate(((clip_l_width, 2, 3), (clip_g_width, 3, 2))):
        config = CLIPTextConfig(
            bos_token_id=512,
            eos_token_id=513,
            pad_token_id=513,
            hidden_size=width,
            intermediate_size=2 * width,
            num_attention_heads=heads,
            num_hidden_layers=layers,
            vocab_size=1000,
            hidden_act="gelu",
            projection_dim=width,
        )
        torch.manual_seed(seed + offset)
        encoders.append(CLIPTextModelWithProjection(config).eval())
    text_encoder_3, tokenizer_3 = _tiny_t5(seed + 2, d_model=t5_width) if t5 else (None, None)
    return {
        "transformer": transformer.eval(),
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0),
        "vae": vae.eval(),
        "text_encoder": encoders[0],
        "tokenizer": tiny_clip_tokenizer(),
        "text_encoder_2": encoders[1],
        "tokenizer_2": tiny_clip_tokenizer(pad_token="!"),
        "text_encoder_3": text_encoder_3,
        "tokenizer_3": tokenizer_3,
        "image_encoder": None,
        "feature_extractor": None,
    }
