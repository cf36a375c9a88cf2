"""NASA negative prompts for one-step and guidance-distilled students (SNOOPI, Nguyen et al., arXiv 2412.02687),
in cross-attention (the paper's form) and joint attention (our extension, at the end).

Negative-Away Steer Attention is training-free and acts inside the denoiser, not on its output: in every
cross-attention layer the attention output of the negative prompt is subtracted from the positive one,

    Z_NASA = Attn(Q, K+, V+) − λ · Attn(Q, K−, V−),

with the same image queries ``Q`` and the layer's own key/value projections of the two prompts, before the layer's
output projection. Classifier-free guidance with a negative prompt cannot do this for a one-step student: its single
prediction already carries the distilled guidance, and extrapolating between two one-step predictions blends the
negative content into the image instead of removing it (the paper's motivation).

How it is wired, with public diffusers API only (``attn_processors`` / ``set_attn_processor``):

1. :func:`record_cross_attention_states` starts a denoiser forward on the negative condition with a recording wrapper
   around every processor and stops it at the first cross-attention layer, keeping the encoder states and attention
   mask that layer receives: what the blocks see after the family's own caption projection and norm (PixArt, SANA)
   and mask-to-bias conversion, so no family-specific preprocessing is repeated here. In the families that take NASA
   every cross-attention layer receives that same tensor (the UNet passes ``encoder_hidden_states`` through, the
   DiTs project the caption once before their blocks; ``tests/test_nasa.py`` checks it layer by layer), so the cost is
   the stem of the network up to its first cross-attention, not a second denoiser pass.
2. :class:`NASAAttnProcessor` wraps each existing processor: self-attention (no encoder states) passes through;
   cross-attention returns ``P − λ (N − C)``, where ``P`` and ``N`` are the wrapped processor's outputs for the
   positive and the recorded negative states and ``C`` the same processor's output at a zero attention result (the
   output projection's bias, and the residual where the layer adds one). Because the output projection is affine,
   ``P − λ (N − C) = out_proj(Z+ − λ Z−)`` exactly: λ scales the attention result, not the bias.

The paper does not state (in the parts that could be read here) a default λ or a layer subset; NASA is applied to all
cross-attention layers and ``DEFAULT_NEGATIVE_SCALE`` was measured, not taken from the paper: on the digits benchmark
(``benchmarks/nasa_digits.py``, docs/benchmarks.md "Digits: NASA negative prompts") λ = 0.1 is the largest value of
the sweep at which images prompted for another digit keep their FD within 10 % (ratio 1.09; 0.15 gave 1.20, 0.5 gave
2.98), while the share of the negated digit among "a handwritten digit" images drops from 10.0 % to 7.7 % (at λ = 1:
2.4 %, and prompt = negative = "digit k" drops k from 97 % to 10 %). Larger λ removes more and costs fidelity.

Joint attention (SD3/SD3.5's MMDiT, FLUX.1's double- and single-stream blocks) -- OUR extension, the paper defines
NASA for cross-attention only. There text and image tokens attend over one sequence and the text stream is updated
in every layer, so there are no text keys and values that stay fixed across layers to record once. Instead:

1. The negative prompt runs as a second stream of the same denoiser call: the batch is ``[positive; negative]`` with
   the same latents, time and guidance (like classifier-free guidance's unconditional branch), and only the positive
   half is returned. Cost: one doubled denoiser batch per step (the cross-attention form above costs only the stem).
2. In every joint-attention layer the positive half's image-token queries get
   ``Z_img = Attn(Q_img, K, V) − λ·Attn(Q_img, K−_txt, V−_txt)``, where ``K−_txt, V−_txt`` are the negative half's
   text-token keys and values of that same layer, after its q/k norms and rotary embedding. The positive half's
   text tokens and the whole negative half (a plain forward on the negative prompt) are left as they are.
3. Nothing of diffusers' processors is reimplemented (diffusers 0.34's ``Attention`` + ``FluxAttnProcessor2_0`` and
   0.42's ``FluxAttention`` + ``FluxAttnProcessor`` through ``dispatch_attention_fn`` alike): each processor is
   wrapped (:class:`JointNASAAttnProcessor`), and during its call a ``torch.overrides.TorchFunctionMode`` intercepts
   ``torch.nn.functional.scaled_dot_product_attention``, where ``q, k, v`` are ``[2B, H, S, D]`` with norms and
   rotary applied. An attention backend that bypasses torch's SDPA (flash-attn kernels, say) fails loudly: each
   joint layer must see exactly one intercepted call per forward, and every joint layer must be called.
4. Which layers are joint and where the text tokens sit (SD3: ``[image; text]``, its ``attn2`` image-only; FLUX.1:
   ``[text; image]``, the single-stream blocks holding the prompt's tokens as a prefix) are family facts: the
   adapters' ``joint_attention_layout``.

λ = 0 returns the plain image exactly (the pipeline then runs no doubled batch). Under ``enable_fast_path``'s
``torch.compile`` the steered forwards run eagerly (``torch.compiler.set_stance("force_eager")``, torch >= 2.6; the
pipeline refuses on older torch): Dynamo does not trace the function mode. ``DEFAULT_NEGATIVE_SCALE`` was measured on
a cross-attention student; no joint-attention benchmark has measured a λ for SD3 or FLUX.1.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Dict, Iterator, Optional, Tuple

import torch


#: λ used when a negative prompt is given without ``negative_scale``: not stated in the SNOOPI paper; measured on the
#: digits benchmark as the largest λ keeping the positive prompt's FD within 10 % (see the module docstring).
DEFAULT_NEGATIVE_SCALE = 0.1


def _zero_attention_output(attn, hidden_states: torch.Tensor) -> torch.Tensor:
    """The layer's output when the attention result ``Z`` is zero: ``out_proj(0) / rescale`` (+ the residual where the
    layer adds one), i.e. the part of a processor's output that does not scale with ``Z``."""
    projection = attn.to_out[0]
    zeros = hidden_states.new_zeros((1, 1, projection.in_features))
    constant = projection(zeros)
    if len(attn.to_out) > 1:
        constant = attn.to_out[1](constant)
    constant = constant / attn.rescale_output_factor
    if getattr(attn, "residual_connection", False):
        constant = constant + hidden_states
    return constant


class _Recorded(Exception):
    """Stops the recording forward at the first cross-attention layer (nothing after it is needed)."""

    def __init__(self, encoder_hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor]):
        super().__init__("recorded")
        self.states = (encoder_hidden_states, attention_mask)


class _RecordingProcessor:
    """Wraps a processor; the first call with encoder states ends the forward, carrying those states and the mask."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        if encoder_hidden_states is not None:
            raise _Recorded(encoder_hidden_states, attention_mask)
        return self.processor(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)


class NASAAttnProcessor:
    """Cross-attention ``out_proj(Attn(Q, K+, V+) − λ·Attn(Q, K−, V−))`` around an existing processor (SNOOPI's NASA).

    Args:
        processor: the attention processor the layer had (it computes both attention branches).
        negative_encoder_states (`torch.Tensor` of shape `[B, L−, D]`): the encoder states this layer receives for
            the negative prompt (as recorded by :func:`record_cross_attention_states`).
        negative_attention_mask (`torch.Tensor`, *optional*): the mask (or bias) this layer receives with them.
        scale (`float`): λ; 0 returns the wrapped processor's output unchanged.
    """

    def __init__(
        self,
        processor,
        negative_encoder_states: torch.Tensor,
        negative_attention_mask: Optional[torch.Tensor],
        scale: float,
    ):
        self.processor = processor
        self.negative_encoder_states = negative_encoder_states
        self.negative_attention_mask = negative_attention_mask
        self.scale = float(scale)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        positive = self.processor(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        if encoder_hidden_states is None:  # self-attention: NASA only steers cross-attention
            return positive
        negative_states = self.negative_encoder_states.to(encoder_hidden_states.dtype)
        negative_mask = self.negative_attention_mask
        if negative_states.shape[0] != hidden_states.shape[0]:
            raise ValueError(
                f"NASA got negative encoder states for {negative_states.shape[0]} images but the batch has "
                f"{hidden_states.shape[0]}."
            )
        negative = self.processor(attn, hidden_states, negative_states, negative_mask, *args, **kwargs)
        # P − λ (N − C) = out_proj(Z+ − λ Z−): the constant C (bias, residual) is kept once, not scaled.
        return positive - self.scale * (negative - _zero_attention_output(attn, hidden_states))


def record_cross_attention_states(denoiser: torch.nn.Module, run) -> Tuple[torch.Tensor, Any]:
    """``(encoder states, attention mask)`` that the first cross-attention layer of ``denoiser`` receives when
    ``run()`` (a denoiser forward on the negative condition) is called; the forward stops there. The original
    processors are back in place on return, also after an exception."""
    with _installed(denoiser, {name: _RecordingProcessor(p) for name, p in denoiser.attn_processors.items()}):
        try:
            run()
        except _Recorded as recorded:
            return recorded.states
    raise ValueError(f"{type(denoiser).__name__} has no cross-attention layer for a negative prompt to steer.")


@contextlib.contextmanager
def _installed(denoiser: torch.nn.Module, processors: Dict[str, Any]) -> Iterator[None]:
    original = dict(denoiser.attn_processors)
    denoiser.set_attn_processor(processors)
    try:
        yield
    finally:
        denoiser.set_attn_processor(original)


@contextlib.contextmanager
def negative_away_steer_attention(
    denoiser: torch.nn.Module, negative_states: Tuple[torch.Tensor, Any], scale: float
) -> Iterator[None]:
    """Within the block, every processor of ``denoiser`` is wrapped in a :class:`NASAAttnProcessor` with the
    negative ``(encoder states, attention mask)`` and λ = ``scale`` (self-attention calls pass through); the original
    processors are restored on exit, also on error."""
    processors = {
        name: NASAAttnProcessor(processor, *negative_states, scale)
        for name, processor in denoiser.attn_processors.items()
    }
    with _installed(denoiser, processors):
        yield


# ------------------------------------------------------------------------------------------------------------------
# joint attention (our extension: SD3/SD3.5 MMDiT, FLUX.1 double- and single-stream blocks)
# ------------------------------------------------------------------------------------------------------------------

_SDPA = torch.nn.functional.scaled_dot_product_attention
_SDPA_ARGUMENTS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


class _JointLayerSteering(torch.overrides.TorchFunctionMode):
    """Active only during one joint-attention processor call: every ``torch.nn.functional.scaled_dot_product_attention``
    call in it gets the positive half's image queries steered away from the negative half's text keys and values.

    ``q, k, v`` are ``[2B, H, S, D]`` there, after the layer's q/k norms and rotary embedding, ``S`` = text + image
    tokens; rows ``[:B]`` are the positive prompt, ``[B:]`` the negative one on the same latents."""

    def __init__(self, name: str, text: slice, image: slice, text_first: bool, sequence_length: int, scale: float):
        super().__init__()
        self.name, self.text, self.image, self.text_first = name, text, image, text_first
        self.sequence_length, self.scale = sequence_length, scale
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not _SDPA:
            return func(*args, **kwargs)
        self.calls += 1
        out = func(*args, **kwargs)
        bound = dict(zip(_SDPA_ARGUMENTS, args), **kwargs)
        query, key, value = bound["query"], bound["key"], bound["value"]
        if bound.get("attn_mask") is not None or bound.get("is_causal") or bound.get("dropout_p", 0.0):
            raise ValueError(
                f"NASA on joint attention supports unmasked, non-causal attention without dropout; layer {self.name} "
                "passed a mask, causal attention or dropout."
            )
        if query.ndim != 4 or query.shape[-2] != self.sequence_length or query.shape[0] % 2:
            raise RuntimeError(
                f"NASA expected layer {self.name} to attend over [2B, heads, {self.sequence_length}, head_dim], got "
                f"{tuple(query.shape)}: the layer's token layout differs from its family adapter's."
            )
        batch = query.shape[0] // 2
        negative = func(
            query[:batch, :, self.image],
            key[batch:, :, self.text],
            value[batch:, :, self.text],
            scale=bound.get("scale"),
            enable_gqa=bound.get("enable_gqa", False),
        )
        steered_image = out[:batch, :, self.image] - self.scale * negative
        positive_text = out[:batch, :, self.text]
        pieces = (positive_text, steered_image) if self.text_first else (steered_image, positive_text)
        return torch.cat([torch.cat(pieces, dim=2), out[batch:]], dim=0)


class JointNASAAttnProcessor:
    """Joint-attention NASA around an existing processor (our extension of SNOOPI's NASA to MMDiTs).

    The denoiser runs on the batch ``[positive; negative]`` (same latents, time and guidance); in this layer the
    positive half's image-token attention result becomes ``Attn(Q_img, K, V) − λ·Attn(Q_img, K−_txt, V−_txt)``, with
    ``K−_txt, V−_txt`` the negative half's text keys and values of this same layer. Everything else -- the positive
    text tokens, the whole negative half -- is the wrapped processor's own output. Nothing of the processor is
    reimplemented: its ``scaled_dot_product_attention`` call is intercepted (:class:`_JointLayerSteering`).

    Args:
        processor: the attention processor the layer had.
        name: the processor's key in ``denoiser.attn_processors`` (for messages).
        layout: where the text tokens sit (``text_first``, ``text_from_encoder_states``), from the family adapter's
            ``joint_attention_layout``; ``None``: not a joint layer (image self-attention), passed through.
        steering: the :class:`JointNegativeSteering` it reports to (λ, the prompt's token count, the call counts).
    """

    def __init__(self, processor, name: str, layout, steering: "JointNegativeSteering"):
        self.processor, self.name, self.layout, self.steering = processor, name, layout, steering
        # diffusers' `Attention.forward` passes a processor only the keyword arguments its `__call__` signature names
        # (`inspect.signature(processor.__call__)`; FLUX's `image_rotary_emb` in diffusers 0.34): advertise the wrapped
        # processor's signature. The instance attribute is what that lookup sees; calls still go through the class.
        self.__call__ = functools.wraps(processor.__call__)(functools.partial(type(self).__call__, self))

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        layout = self.layout
        if layout is None:
            return self.processor(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        if self.steering.text_length is None:
            raise RuntimeError(
                f"Joint-attention layer {self.name} was called outside NASA's steered forward; under "
                "`joint_negative_away_steer_attention` call the denoiser through the steering it yields."
            )
        if layout.text_from_encoder_states:
            if encoder_hidden_states is None:
                raise RuntimeError(
                    f"NASA expected text encoder states in joint-attention layer {self.name}, got none."
                )
            text_length = encoder_hidden_states.shape[1]
            sequence_length = hidden_states.shape[1] + text_length
        else:
            text_length = self.steering.text_length
            sequence_length = hidden_states.shape[1]
        if layout.text_first:
            text, image = slice(0, text_length), slice(text_length, sequence_length)
        else:
            text, image = (
                slice(sequence_length - text_length, sequence_length),
                slice(0, sequence_length - text_length),
            )
        mode = _JointLayerSteering(self.name, text, image, layout.text_first, sequence_length, self.steering.scale)
        with mode:
            out = self.processor(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        if mode.calls != 1:
            raise RuntimeError(
                f"NASA intercepted {mode.calls} torch scaled_dot_product_attention calls in joint-attention layer "
                f"{self.name}, expected 1 (none: its attention backend bypasses torch's SDPA, so use diffusers' "
                "native attention backend or remove the negative prompt)."
            )
        self.steering.calls[self.name] += 1
        return out


def _eager_compiler():
    """A context in which ``torch.compile``'d modules (``OneStepPipeline.enable_fast_path``) run eagerly
    (``torch.compiler.set_stance("force_eager")``, torch >= 2.6; elsewhere nothing): Dynamo does not trace the
    torch function mode that joint-attention NASA enters inside each processor (measured on torch 2.13: the compiled
    FLUX.1 forward handed the mode tensors of another shape), so steered forwards run uncompiled."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


class JointNegativeSteering:
    """NASA for joint-attention denoisers, as the context :func:`joint_negative_away_steer_attention` yields.

    Calling it (:meth:`denoise`) runs ``denoise_fn`` once on ``[positive; negative]`` and returns the positive half; ``calls``
    holds, per joint layer, how many times its attention was steered in the last call (1 each, checked)."""

    def __init__(self, denoise_fn, negative, scale: float, joint_layers):
        self.denoise_fn, self.negative, self.scale = denoise_fn, negative, float(scale)
        self.joint_layers = tuple(joint_layers)
        self.text_length = None
        self.calls: Dict[str, int] = {}

    def denoise(self, latents: torch.Tensor, t, condition, guidance: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The positive half of one denoiser forward on the batch ``[positive; negative]`` (same latents, time and
        guidance): the cost of NASA on joint attention is this doubled batch."""
        batch = latents.shape[0]
        negative = self.negative.to(device=latents.device, dtype=condition.embeds.dtype)
        if negative.embeds.shape[0] != batch or negative.embeds.shape[1:] != condition.embeds.shape[1:]:
            raise ValueError(
                f"The negative prompt's embeddings {tuple(negative.embeds.shape)} must have the shape of the "
                f"prompt's {tuple(condition.embeds.shape)} (one row per image, as many tokens): encode both with the "
                "same `max_sequence_length`."
            )
        self.calls = dict.fromkeys(self.joint_layers, 0)
        both = type(condition).cat([condition, negative])
        if guidance is not None:
            guidance = torch.cat([guidance, guidance])
        t = torch.as_tensor(t, device=latents.device)
        if t.ndim:
            t = torch.cat([t, t])
        self.text_length = condition.embeds.shape[1]  # the text prefix of single-stream layers
        try:
            with _eager_compiler():
                prediction = self.denoise_fn(torch.cat([latents, latents]), t, both, guidance)
        finally:
            self.text_length = None
        missing = [name for name, count in self.calls.items() if count != 1]
        if missing:
            raise RuntimeError(
                f"NASA steered {len(self.joint_layers) - len(missing)} of {len(self.joint_layers)} joint-attention "
                f"layers in one forward (not {missing[0]}): the denoiser did not call its attention processors as "
                "expected."
            )
        return prediction[:batch]

    __call__ = denoise


@contextlib.contextmanager
def joint_negative_away_steer_attention(
    denoiser: torch.nn.Module, layout_of, denoise_fn, negative, scale: float
) -> Iterator[JointNegativeSteering]:
    """Within the block, every processor of ``denoiser`` is wrapped in a :class:`JointNASAAttnProcessor` with the
    layout ``layout_of(name)`` (``None``: not joint, passed through) and λ = ``scale``; yields the
    :class:`JointNegativeSteering` whose ``denoise(latents, t, condition, guidance)`` replaces ``denoise_fn`` (a
    call of the denoiser with that signature) for the steered forwards. ``negative`` is the negative prompt's
    encoded condition, one row per image. The original processors are restored on exit, also on error."""
    originals = dict(denoiser.attn_processors)
    layouts = {name: layout_of(name) for name in originals}
    joint_layers = [name for name, layout in layouts.items() if layout is not None]
    if not joint_layers:
        raise ValueError(f"{type(denoiser).__name__} has no joint-attention layer for a negative prompt to steer.")
    steering = JointNegativeSteering(denoise_fn, negative, scale, joint_layers)
    processors = {
        name: JointNASAAttnProcessor(processor, name, layouts[name], steering) for name, processor in originals.items()
    }
    with _installed(denoiser, processors):
        yield steering
