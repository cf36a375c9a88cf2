"""NASA negative prompts on joint-attention students (SD3/SD3.5 MMDiT, FLUX.1 double- and single-stream blocks): our
extension of SNOOPI's cross-attention NASA (arXiv 2412.02687), see :mod:`diffusers_onestep.pipelines.nasa`.

Checked: λ = 0 is the plain image; the text/image token slices of each family (with a negative control that would
catch a swapped order); one layer of each kind by hand from its captured q/k/v; the intercept fires once in every
joint layer and fails loudly where a processor bypasses torch SDPA; text and embeddings give the same image; the
negative half never reaches the output; the compiled fast path runs NASA eagerly."""

import contextlib

import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline

from diffusers_onestep import OneStepPipeline
from diffusers_onestep.pipelines import nasa
from diffusers_onestep.testing import tiny_flux_components, tiny_sd3_components


PROMPT = "a photo of a cat"
NEGATIVE = "a red square"
SDPA = torch.nn.functional.scaled_dot_product_attention
#: the tiny students: SD3.5-like (QK norm, one MMDiT-X dual-attention block), SD3-Medium-like, FLUX.1-dev-like
#: (guidance embedded) and FLUX.1-schnell-like
VARIANTS = {
    "sd35": lambda: StableDiffusion3Pipeline(**tiny_sd3_components(seed=3)),
    "sd3": lambda: StableDiffusion3Pipeline(**tiny_sd3_components(seed=3, sd35=False)),
    "flux_dev": lambda: FluxPipeline(**tiny_flux_components(seed=3, guidance_embeds=True)),
    "flux_schnell": lambda: FluxPipeline(**tiny_flux_components(seed=3, guidance_embeds=False)),
}


@pytest.fixture(scope="module")
def students():
    pipes = {}

    def get(variant):
        if variant not in pipes:
            pipe = OneStepPipeline.from_pipe(VARIANTS[variant](), conditioning_timesteps=[1.0])
            pipe.set_progress_bar_config(disable=True)
            pipes[variant] = pipe
        return pipes[variant]

    return get


def _run(pipe, prompt=PROMPT, **kwargs):
    kwargs.setdefault("output_type", "np")
    return pipe(prompt, generator=torch.Generator().manual_seed(0), **kwargs).images


def _text_first(pipe):
    """The family fact under test, stated here independently of the adapters: FLUX.1 attends over [text; image],
    SD3's JointAttnProcessor2_0 over [image; text]."""
    return pipe.adapter.name == "flux"


def _qkv(args, kwargs):
    """q, k, v of a torch SDPA call, passed by position (diffusers 0.34) or by keyword (0.42's native backend)."""
    named = dict(zip(("query", "key", "value"), args), **kwargs)
    return named["query"], named["key"], named["value"]


class _RecordSDPA(torch.overrides.TorchFunctionMode):
    """Records (q, k, v) of every torch SDPA call, in order (NASA's own calls included: they run inside its mode)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is SDPA:
            self.calls.append(tuple(a.detach().clone() for a in _qkv(args, kwargs)))
        return func(*args, **kwargs)


def _steered_forward(pipe, latents, negative_prompt, scale, record=None):
    """One steered denoiser forward at t = 1 through :func:`nasa.joint_negative_away_steer_attention`; returns the
    prediction and the :class:`nasa.JointNegativeSteering` (its per-layer counts)."""
    adapter = pipe.adapter
    condition = adapter.encode_prompt([PROMPT] * latents.shape[0])
    negative = adapter.encode_prompt([negative_prompt] * latents.shape[0])
    t = torch.ones((), dtype=torch.float64)

    def denoise(x, t_, cond, guidance):
        return adapter.denoise(x, t_, cond, guidance=guidance)

    with (
        torch.no_grad(),
        nasa.joint_negative_away_steer_attention(
            pipe.denoiser, adapter.joint_attention_layout, denoise, negative, scale
        ) as steering,
    ):
        with record if record is not None else contextlib.nullcontext():
            prediction = steering(latents, t, condition, None)
    with torch.no_grad():
        plain = adapter.denoise(latents, t, condition)
    return prediction, plain, steering, condition.embeds.shape[1]


def _latents(pipe, seed, batch=1):
    size = pipe.adapter.default_resolution
    return torch.randn(pipe.adapter.latent_shape(batch, size, size), generator=torch.Generator().manual_seed(seed))


@pytest.mark.oldest
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_scale_zero_is_the_plain_image(students, variant):
    """λ = 0: the pipeline returns exactly the plain image; the doubled [positive; negative] forward itself, at λ = 0,
    gives the plain prediction within float rounding (the negative half does not reach the positive one)."""
    pipe = students(variant)
    plain = _run(pipe)
    zero = _run(pipe, negative_prompt=NEGATIVE, negative_scale=0.0)
    assert (zero == plain).all()
    prediction, alone, steering, _ = _steered_forward(pipe, _latents(pipe, 0), NEGATIVE, 0.0)
    torch.testing.assert_close(prediction, alone, rtol=0, atol=1e-6)
    steered, _, _, _ = _steered_forward(pipe, _latents(pipe, 0), NEGATIVE, 1.0)
    assert float((steered - alone).abs().max()) > 1e-3  # λ > 0 acts
    # the intercept fired once in every joint layer: all attentions but SD3.5's image-only `attn2`
    joint = [n for n in pipe.denoiser.attn_processors if ".attn2." not in n]
    assert sorted(steering.calls) == sorted(joint) and set(steering.calls.values()) == {1}
    n_blocks = len(pipe.denoiser.transformer_blocks) + len(getattr(pipe.denoiser, "single_transformer_blocks", []))
    assert len(joint) == n_blocks


@pytest.mark.oldest
@pytest.mark.parametrize("variant", ["sd35", "flux_dev"])
def test_text_and_image_token_slices(students, variant):
    """In the first joint layer the negative half's text keys depend on the text only: the same for other latents,
    different for another negative prompt; the image keys change with the latents (the control that catches a
    swapped [text; image] order)."""
    pipe = students(variant)

    def first_layer_keys(seed, negative_prompt):
        record = _RecordSDPA()
        _, _, _, text_length = _steered_forward(pipe, _latents(pipe, seed), negative_prompt, 0.5, record)
        _, key, _ = record.calls[0]  # the first joint layer's full attention, [2B, H, S, D]
        n = key.shape[2]
        text = slice(0, text_length) if _text_first(pipe) else slice(n - text_length, n)
        image = slice(text_length, n) if _text_first(pipe) else slice(0, n - text_length)
        return key[1:, :, text], key[1:, :, image]

    text, image = first_layer_keys(0, NEGATIVE)
    other_latents_text, other_latents_image = first_layer_keys(1, NEGATIVE)
    other_negative_text, _ = first_layer_keys(0, "a blue circle on grass")
    torch.testing.assert_close(other_latents_text, text, rtol=0, atol=0)
    assert float((other_negative_text - text).abs().max()) > 1e-4
    assert float((other_latents_image - image).abs().max()) > 1e-4


def _hand_steered(q, k, v, text, image, scale):
    """SDPA(q, k, v) with the positive half's image rows minus λ·SDPA(q_img, k−_txt, v−_txt): NASA on one layer."""
    batch = q.shape[0] // 2
    expected = SDPA(q, k, v).clone()
    expected[:batch, :, image] -= scale * SDPA(q[:batch, :, image], k[batch:, :, text], v[batch:, :, text])
    return expected.transpose(1, 2).flatten(2)  # [2B, S, H·D], as the processor merges the heads


@pytest.mark.oldest
@pytest.mark.parametrize("variant", ["sd35", "flux_dev"])
def test_one_layer_by_hand(students, variant):
    """From the captured q/k/v of a layer, its attention result is the closed form above, checked at the input of the
    output projections (double-stream / MMDiT layer) and at the output of a FLUX single-stream attention (which has
    no projection); text rows and the negative half are the unsteered SDPA result."""
    pipe = students(variant)
    scale = 0.7
    denoiser = pipe.denoiser
    attn = denoiser.transformer_blocks[0].attn
    seen = {}
    hooks = [
        attn.to_out[0].register_forward_pre_hook(lambda m, a: seen.setdefault("image", a[0].clone())),
        attn.to_add_out.register_forward_pre_hook(lambda m, a: seen.setdefault("text", a[0].clone())),
    ]
    single = getattr(denoiser, "single_transformer_blocks", None)
    if single is not None:
        hooks.append(single[0].attn.register_forward_hook(lambda m, a, out: seen.setdefault("single", out.clone())))
    record = _RecordSDPA()
    try:
        _, _, _, text_length = _steered_forward(pipe, _latents(pipe, 0), NEGATIVE, scale, record)
    finally:
        for hook in hooks:
            hook.remove()
    full_calls = [c for c in record.calls if c[0].shape[0] == 2]  # NASA's own calls have the positive half only
    layers = [(full_calls[0], seen["image"], seen["text"])]
    if single is not None:
        layers.append((full_calls[len(denoiser.transformer_blocks)], seen["single"], None))
    for (q, k, v), image_out, text_out in layers:
        n = q.shape[2]
        text = slice(0, text_length) if _text_first(pipe) else slice(n - text_length, n)
        image = slice(text_length, n) if _text_first(pipe) else slice(0, n - text_length)
        expected = _hand_steered(q, k, v, text, image, scale)
        plain = SDPA(q, k, v).transpose(1, 2).flatten(2)
        if text_out is None:  # single-stream: the whole sequence
            image_out, text_out = image_out[:, image], image_out[:, text]
        torch.testing.assert_close(image_out, expected[:, image], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(text_out, plain[:, text], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(image_out[1:], plain[1:, image], rtol=1e-5, atol=1e-6)  # negative half untouched
        assert float((image_out[:1] - plain[:1, image]).abs().max()) > 1e-4  # the positive image rows were steered


class _ManualAttention:
    """The processor it wraps, with torch SDPA computed by hand (softmax(QKᵀ/√d)V): like an attention backend that
    does not go through torch's SDPA."""

    class _Mode(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is SDPA:
                q, k, v = _qkv(args, kwargs or {})
                weights = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
                return weights @ v
            return func(*args, **(kwargs or {}))

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, *args, **kwargs):
        with self._Mode():
            return self.processor(*args, **kwargs)


@pytest.mark.oldest
def test_a_backend_that_bypasses_sdpa_fails_loudly(students):
    pipe = students("flux_schnell")
    original = dict(pipe.denoiser.attn_processors)
    name = "single_transformer_blocks.1.attn.processor"
    pipe.denoiser.set_attn_processor({**original, name: _ManualAttention(original[name])})
    try:
        with pytest.raises(RuntimeError, match=rf"0 torch scaled_dot_product_attention calls .* layer {name}"):
            _run(pipe, negative_prompt=NEGATIVE, negative_scale=0.5)
    finally:
        pipe.denoiser.set_attn_processor(original)


@pytest.mark.oldest
@pytest.mark.parametrize("variant", ["sd35", "flux_dev"])
def test_embeds_batches_and_no_leak(students, variant):
    """`negative_prompt_embeds` (+ pooled) give the image of the text; two prompts with two images each return four
    images, the first prompt's equal to a call with it alone; the image depends on the negative prompt; the
    processors are back afterwards."""
    pipe = students(variant)
    before = dict(pipe.denoiser.attn_processors)
    embeds, _, pooled = pipe.encode_prompt([NEGATIVE, "a blue circle"])
    kwargs = {"negative_scale": 0.8, "num_images_per_prompt": 2}
    from_text = _run(pipe, [PROMPT, "a dog"], negative_prompt=[NEGATIVE, "a blue circle"], **kwargs)
    from_embeds = _run(
        pipe, [PROMPT, "a dog"], negative_prompt_embeds=embeds, negative_pooled_prompt_embeds=pooled, **kwargs
    )
    assert from_text.shape[0] == 4
    torch.testing.assert_close(torch.from_numpy(from_embeds), torch.from_numpy(from_text), rtol=0, atol=1e-6)
    alone = _run(pipe, PROMPT, negative_prompt=NEGATIVE, **kwargs)
    assert float(abs(from_text[:2] - alone).max()) < 1e-4
    plain = _run(pipe, [PROMPT, "a dog"], num_images_per_prompt=2)
    assert float(abs(from_text - plain).max()) > 1e-3  # NASA changes the image
    other = _run(pipe, [PROMPT, "a dog"], negative_prompt="a green triangle", **kwargs)
    assert float(abs(from_text - other).max()) > 1e-4  # ... depending on the negative prompt
    after = pipe.denoiser.attn_processors
    assert all(after[k] is before[k] for k in before)


@pytest.mark.parametrize("variant", ["sd3", "flux_schnell"])
def test_fused_projections_steer_alike(variant):
    """After enable_fast_path's fused q/k/v projections (diffusers' fused SD3 and FLUX processors) NASA gives the same
    image: the intercept sits on SDPA, after the projections, whichever processor computed them."""
    pipe = OneStepPipeline.from_pipe(VARIANTS[variant](), conditioning_timesteps=[1.0])
    pipe.set_progress_bar_config(disable=True)
    steer = {"negative_prompt": NEGATIVE, "negative_scale": 0.8}
    expected = _run(pipe, **steer)
    pipe.enable_fast_path(compile=False, channels_last=False)
    assert any(hasattr(m, "to_qkv") for m in pipe.denoiser.modules())
    assert float(abs(_run(pipe, **steer) - expected).max()) <= 1e-4
    assert float(abs(_run(pipe) - expected).max()) > 1e-3


def test_a_forward_outside_the_steering_is_refused(students):
    """Under the context the wrapped processors need the [positive; negative] batch the steering builds: a plain
    denoiser call there fails with its sentence instead of steering across unrelated rows."""
    pipe = students("flux_schnell")
    adapter = pipe.adapter
    condition = adapter.encode_prompt([PROMPT, PROMPT])
    with (
        torch.no_grad(),
        nasa.joint_negative_away_steer_attention(pipe.denoiser, adapter.joint_attention_layout, None, condition, 1.0),
    ):
        with pytest.raises(RuntimeError, match=r"called outside NASA's steered forward"):
            adapter.denoise(_latents(pipe, 0, batch=2), torch.ones(()), condition)


def test_negative_embeds_of_another_token_count_are_refused(students):
    pipe = students("flux_dev")
    embeds, _, pooled = pipe.encode_prompt([NEGATIVE])
    with pytest.raises(ValueError, match=r"must have the shape of the prompt's .* same `max_sequence_length`\.$"):
        _run(pipe, negative_prompt_embeds=embeds[:, :5], negative_pooled_prompt_embeds=pooled)


class CountingBackend:
    """A torch.compile backend that counts the graphs it is given and runs them as traced (public API)."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, graph_module, example_inputs):
        self.graphs += 1
        return graph_module.forward


def test_fast_path_runs_joint_nasa_eagerly(monkeypatch):
    """Dynamo does not trace NASA's torch function mode: under enable_fast_path the steered forwards run eagerly
    (torch.compiler.set_stance), the same image as without the fast path, and compile nothing; without set_stance
    (torch < 2.6) the pipeline refuses in one sentence."""
    torch.compiler.reset()
    pipe = OneStepPipeline.from_pipe(VARIANTS["flux_schnell"](), conditioning_timesteps=[1.0])
    pipe.set_progress_bar_config(disable=True)
    steer = {"negative_prompt": NEGATIVE, "negative_scale": 0.5}
    expected = _run(pipe, **steer)
    backend = CountingBackend()
    pipe.enable_fast_path(backend=backend, compile_vae=False)
    try:
        steered = _run(pipe, **steer)
        assert backend.graphs == 0, "the steered forward was compiled"
        assert float(abs(steered - expected).max()) <= 1e-4
        assert float(abs(_run(pipe) - steered).max()) > 1e-3 and backend.graphs >= 1  # plain calls compile
        monkeypatch.delattr(torch.compiler, "set_stance")
        with pytest.raises(ValueError, match=r"needs torch >= 2\.6 .* remove `negative_prompt`\.$"):
            _run(pipe, **steer)
    finally:
        torch.compiler.reset()
