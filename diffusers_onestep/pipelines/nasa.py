"""NASA negative prompts for one-step and guidance-distilled students (SNOOPI, Nguyen et al., arXiv 2412.02687).

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

Families whose text conditioning goes through joint attention (SD3's MMDiT, FLUX.1's double/single-stream blocks)
have no cross-attention with separate text keys and values: the text tokens are queries too, so ``Attn(Q, K−, V−)``
is not defined there and those families refuse a negative prompt.
"""

from __future__ import annotations

import contextlib
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
