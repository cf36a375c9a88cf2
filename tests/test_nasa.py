"""NASA negative prompts (SNOOPI, arXiv 2412.02687) on one-step students: the processor's closed form, λ = 0, the
processors put back, the cross-attention families it applies to and the refusals (joint-attention families:
tests/test_nasa_joint.py)."""

import math

import pytest
import torch

from diffusers_onestep.pipelines import nasa


PROMPT = "a photo of a cat"
NEGATIVE = "a red square"


def _cross_attention_layer(pipe):
    """The first cross-attention module of the denoiser (``attn2``, text keys and values)."""
    for name, module in pipe.denoiser.named_modules():
        if name.endswith("attn2"):
            return module
    raise AssertionError("no attn2 module")


def _hand_attention(attn, hidden, states):
    """softmax(Q Kᵀ / √d) V per head, merged, before the output projection (no masking: SD/SDXL cross-attention)."""
    b, n, _ = hidden.shape
    heads = attn.heads
    q, k, v = attn.to_q(hidden), attn.to_k(states), attn.to_v(states)
    d = q.shape[-1] // heads

    def split(x):
        return x.view(b, -1, heads, d).transpose(1, 2)

    weights = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(d), dim=-1)
    return (weights @ split(v)).transpose(1, 2).reshape(b, n, heads * d)


@pytest.mark.parametrize("scale", [0.0, 0.7, 2.0])
def test_processor_is_the_closed_form_on_one_layer(student, scale):
    """out = out_proj(Attn(Q, K+, V+) − λ·Attn(Q, K−, V−)), computed by hand from the layer's own projections."""
    attn = _cross_attention_layer(student("sd"))
    gen = torch.Generator().manual_seed(0)
    width = attn.to_q.in_features
    context = attn.to_k.in_features
    hidden = torch.randn(2, 16, width, generator=gen)
    positive, negative = torch.randn(2, 2, 7, context, generator=gen)
    processor = nasa.NASAAttnProcessor(attn.processor, negative, None, scale)
    with torch.no_grad():
        out = processor(attn, hidden, encoder_hidden_states=positive)
        z = _hand_attention(attn, hidden, positive) - scale * _hand_attention(attn, hidden, negative)
        expected = attn.to_out[0](z)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        # negative control: subtracting after the projection would scale the bias too
        if scale:
            assert not torch.allclose(
                out, attn.processor(attn, hidden, positive) - scale * attn.processor(attn, hidden, negative), atol=1e-4
            )
        # self-attention (no encoder states) passes through untouched
        self_attn = next(m for n, m in student("sd").denoiser.named_modules() if n.endswith("attn1"))
        wrapped = nasa.NASAAttnProcessor(self_attn.processor, negative, None, scale)
        hidden = torch.randn(2, 16, self_attn.to_q.in_features, generator=gen)
        torch.testing.assert_close(wrapped(self_attn, hidden), self_attn.processor(self_attn, hidden), rtol=0, atol=0)


@pytest.mark.parametrize("family", ["sd", "sdxl", "pixart_alpha", "sana", "sana_sprint"])
def test_negative_prompt_on_cross_attention_families(student, run, family):
    pipe = student(family)
    before = dict(pipe.denoiser.attn_processors)
    plain = run(pipe, PROMPT)
    zero = run(pipe, PROMPT, negative_prompt=NEGATIVE, negative_scale=0.0)
    torch.testing.assert_close(torch.from_numpy(zero), torch.from_numpy(plain), rtol=0, atol=0)
    steered = run(pipe, PROMPT, negative_prompt=NEGATIVE, negative_scale=1.0)
    assert float(abs(steered - plain).max()) > 1e-3, "the negative prompt changed nothing"
    other = run(pipe, PROMPT, negative_prompt="a blue circle on grass", negative_scale=1.0)
    assert float(abs(steered - other).max()) > 1e-4, "the image does not depend on the negative prompt"
    assert run(pipe, PROMPT, negative_prompt=NEGATIVE).shape == plain.shape  # default λ
    after = pipe.denoiser.attn_processors
    assert set(after) == set(before) and all(after[k] is before[k] for k in before), "processors not restored"


@pytest.mark.parametrize("family", ["sdxl", "pixart_alpha"])
def test_negative_prompt_embeds_give_the_image_of_the_text(student, run, family):
    """`negative_prompt_embeds` (+ its mask or pooled embedding, as `pipe.encode_prompt` returns them) steer exactly as
    the same negative prompt as text; with `num_images_per_prompt` the rows repeat with their prompt."""
    pipe = student(family)
    embeds, mask, pooled = pipe.encode_prompt([NEGATIVE, "a blue circle"])
    negative = {"negative_prompt_embeds": embeds}
    negative.update({"negative_prompt_attention_mask": mask} if mask is not None else {})
    negative.update({"negative_pooled_prompt_embeds": pooled} if pooled is not None else {})
    kwargs = {"negative_scale": 0.8, "num_images_per_prompt": 2}
    from_text = run(pipe, [PROMPT, "a dog"], negative_prompt=[NEGATIVE, "a blue circle"], **kwargs)
    from_embeds = run(pipe, [PROMPT, "a dog"], **negative, **kwargs)
    torch.testing.assert_close(torch.from_numpy(from_embeds), torch.from_numpy(from_text), rtol=0, atol=1e-6)
    # negative control: the embeds act (not silently dropped)
    assert float(abs(from_embeds - run(pipe, [PROMPT, "a dog"], num_images_per_prompt=2)).max()) > 1e-3


def test_processors_restored_after_an_exception(student, run):
    pipe = student("pixart_alpha")
    before = dict(pipe.denoiser.attn_processors)
    seen = []

    def fail(pipe_, i, t, tensors):
        seen.append(sum(isinstance(p, nasa.NASAAttnProcessor) for p in pipe_.denoiser.attn_processors.values()))
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        run(pipe, PROMPT, negative_prompt=NEGATIVE, callback_on_step_end=fail)
    assert seen and seen[0] > 0, "NASA was not installed during the call"
    after = pipe.denoiser.attn_processors
    assert all(after[k] is before[k] for k in before)


@pytest.mark.parametrize(
    "family, kwargs, message",
    [
        ("sdxl", {"negative_scale": 1.0}, r"`negative_scale` weighs the negative prompt's attention \(NASA\)"),
        ("sdxl", {"negative_prompt": NEGATIVE, "negative_scale": -1.0}, r"`negative_scale` must be a finite number"),
        ("sdxl", {"negative_prompt": [NEGATIVE] * 2}, r"`negative_prompt` must be one string or one per prompt \(1\)"),
        ("sdxl", {"negative_prompt": 3}, r"`negative_prompt` must be a string"),
        (
            "sd",
            {"negative_prompt": NEGATIVE, "negative_prompt_embeds": torch.zeros(1, 77, 24)},
            r"Pass at most one of `negative_prompt` and `negative_prompt_embeds`, got both",
        ),
        (
            "pixart_alpha",
            {"negative_prompt_embeds": torch.zeros(1, 120, 32)},
            r"PixArt-α students need `negative_prompt_attention_mask` together with `negative_prompt_embeds`",
        ),
        (
            "sd",
            {"negative_prompt_embeds": torch.zeros(2, 77, 24)},
            r"`negative_prompt_embeds` must have one row per prompt \(1\), got batch size 2",
        ),
        (
            "sd",
            {"negative_prompt_attention_mask": torch.ones(1, 77)},
            r"`negative_prompt_attention_mask` goes with `negative_prompt_embeds`",
        ),
        (
            "flux",
            {"negative_prompt_embeds": torch.zeros(1, 8, 24)},
            r"FLUX.1 students need `negative_pooled_prompt_embeds` together with `negative_prompt_embeds`",
        ),
    ],
)
def test_refusals(student, family, kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        student(family)(PROMPT, output_type="np", **kwargs)
    text = str(info.value)
    assert text.endswith(".") and "\n" not in text


def test_a_family_naming_no_attention_refuses(student, monkeypatch):
    """A family adapter without `negative_prompt_attention` (none is registered today) takes no negative prompt."""
    pipe = student("sdxl")
    monkeypatch.setattr(type(pipe.adapter), "negative_prompt_attention", None)
    with pytest.raises(ValueError, match=r"SDXL student takes no negative prompt: .*; remove `negative_prompt`\.$"):
        pipe(PROMPT, output_type="np", negative_prompt=NEGATIVE)


class _ZeroCrossAttention:
    """Cross-attention whose attention result Z is zero (the output projection's bias only); self-attention as is."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        if encoder_hidden_states is None:
            return self.processor(attn, hidden_states, None, attention_mask, **kwargs)
        return nasa._zero_attention_output(attn, hidden_states).expand_as(hidden_states)


@pytest.mark.parametrize("family", ["sd", "pixart_alpha"])
def test_negative_equal_to_the_prompt_at_scale_one_cancels_cross_attention(student, run, family):
    """End to end: with negative = positive prompt and λ = 1, Z+ − Z− = 0 in every cross-attention layer, so the image
    is the one of a denoiser whose cross-attention contributes only its output bias. This checks that the recorded
    negative states (after PixArt's caption projection and mask bias) are exactly what each layer receives."""
    pipe = student(family)
    steered = run(pipe, PROMPT, negative_prompt=PROMPT, negative_scale=1.0, output_type="latent")
    original = dict(pipe.denoiser.attn_processors)
    pipe.denoiser.set_attn_processor({name: _ZeroCrossAttention(p) for name, p in original.items()})
    try:
        cancelled = run(pipe, PROMPT, output_type="latent")
    finally:
        pipe.denoiser.set_attn_processor(original)
    torch.testing.assert_close(steered, cancelled, rtol=1e-5, atol=1e-5)
    assert float(abs(cancelled - run(pipe, PROMPT, output_type="latent")).max()) > 1e-3  # cross-attention mattered


def test_batches_and_fused_projections(native_folder, load_student, run):
    """One negative prompt per prompt with several images each; the same image after fuse_qkv_projections."""
    pipe = load_student(native_folder("sdxl"), "sdxl")
    kwargs = {"negative_prompt": [NEGATIVE, "a blue circle"], "negative_scale": 0.8, "num_images_per_prompt": 2}
    images = run(pipe, [PROMPT, "a dog"], **kwargs)
    assert images.shape[0] == 4
    # the first prompt's images equal a call with that prompt alone (batching keeps each negative with its prompt)
    alone = run(pipe, PROMPT, negative_prompt=NEGATIVE, negative_scale=0.8, num_images_per_prompt=2)
    assert float(abs(images[:2] - alone).max()) < 1e-4
    pipe.enable_fast_path(compile=False, channels_last=False)
    torch.testing.assert_close(
        torch.from_numpy(run(pipe, [PROMPT, "a dog"], **kwargs)), torch.from_numpy(images), rtol=1e-4, atol=1e-4
    )


class _RecordAll:
    def __init__(self, processor, store):
        self.processor, self.store = processor, store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        if encoder_hidden_states is not None:
            self.store.append((encoder_hidden_states, attention_mask))
        return self.processor(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)


@pytest.mark.parametrize("family", ["sd", "sdxl", "pixart_alpha", "sana"])
def test_every_cross_attention_layer_receives_the_recorded_states(student, family):
    """NASA records the negative states at the first cross-attention layer and stops; that is exact only if every
    cross-attention layer of a full forward receives those same states and mask, checked here layer by layer."""
    pipe = student(family)
    adapter = pipe.adapter
    condition = adapter.encode_prompt([NEGATIVE])
    latents = torch.randn(adapter.latent_shape(1, 16, 16), generator=torch.Generator().manual_seed(0))
    t = torch.full((1,), 500.0, dtype=torch.float64)

    def forward():
        return adapter.denoise(latents, t, condition)

    with torch.no_grad():
        states, mask = nasa.record_cross_attention_states(pipe.denoiser, forward)
        store = []
        original = dict(pipe.denoiser.attn_processors)
        pipe.denoiser.set_attn_processor({name: _RecordAll(p, store) for name, p in original.items()})
        try:
            forward()
        finally:
            pipe.denoiser.set_attn_processor(original)
    # the tiny SANA has a single block (its transformer projects and norms the caption once, before the blocks)
    assert len(store) >= (1 if family == "sana" else 2)
    for layer_states, layer_mask in store:
        assert torch.equal(layer_states, states)
        assert (layer_mask is None and mask is None) or torch.equal(layer_mask, mask)
    assert all(pipe.denoiser.attn_processors[k] is original[k] for k in original)
