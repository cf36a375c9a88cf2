"""OneStepPipeline.enable_fast_path: the same images as the default path, and no recompilation across prompts."""

import numpy as np
import pytest
import torch

from diffusers_onestep.testing import TINY_FAMILIES, TINY_PROMPTS


class CountingBackend:
    """A torch.compile backend that counts the graphs it is given and runs them as traced (public API)."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, graph_module, example_inputs):
        self.graphs += 1
        return graph_module.forward


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_fast_path_matches_the_default_path_and_compiles_once(family, native_folder, load_student, run):
    torch.compiler.reset()
    pipe = load_student(native_folder(family), family)
    expected = {prompt: run(pipe, prompt=prompt) for prompt in TINY_PROMPTS[:2]}
    backend = CountingBackend()
    assert pipe.enable_fast_path(backend=backend) is pipe
    denoiser_class = type(pipe.denoiser)
    first = run(pipe, prompt=TINY_PROMPTS[0])  # the warm-up call compiles
    compiled = backend.graphs
    assert compiled >= 1
    second = run(pipe, prompt=TINY_PROMPTS[1])
    again = run(pipe, prompt=TINY_PROMPTS[0], seed=1)
    assert backend.graphs == compiled, "a new prompt or seed of the same shape recompiled"
    assert type(pipe.denoiser) is denoiser_class  # compiled in place: the component keeps its class
    # SANA's transformer has the method, but diffusers fuses none of its layers; SD3.5's QK-normed attention is left
    # unfused (diffusers' fused SD3 processor skips the QK norm; tests/test_sd3.py fuses an SD3-Medium-shaped one)
    if not family.startswith("sana") and not pipe.denoiser.config.get("qk_norm"):
        assert any(hasattr(m, "to_qkv") for m in pipe.denoiser.modules())
    for images, prompt in ((first, TINY_PROMPTS[0]), (second, TINY_PROMPTS[1])):
        assert images.shape == expected[prompt].shape
        assert np.abs(images - expected[prompt]).max() <= 1e-4
    assert np.isfinite(again).all()


def test_nasa_negative_prompts_on_the_fast_path(native_folder, load_student, run):
    """NASA's processors (installed and removed around each call) run under the compiled denoiser: the same image as
    NASA on the default path, and each mode (with and without a negative prompt) compiles once -- a new prompt, or
    returning to NASA after a plain call, compiles nothing."""
    torch.compiler.reset()
    pipe = load_student(native_folder("pixart_alpha"), "pixart_alpha")
    nasa = {"negative_prompt": "a blue square", "negative_scale": 0.5}
    expected = run(pipe, prompt=TINY_PROMPTS[0], **nasa)
    backend = CountingBackend()
    pipe.enable_fast_path(backend=backend)
    first = run(pipe, prompt=TINY_PROMPTS[0], **nasa)
    compiled = backend.graphs
    assert compiled >= 1
    run(pipe, prompt=TINY_PROMPTS[1], **nasa)
    assert backend.graphs == compiled, "a new prompt with the same negative prompt recompiled"
    run(pipe, prompt=TINY_PROMPTS[0])
    with_plain = backend.graphs
    again = run(pipe, prompt=TINY_PROMPTS[0], **nasa)
    assert backend.graphs == with_plain, "NASA after a plain call recompiled"
    assert np.abs(first - expected).max() <= 1e-4 and np.abs(again - expected).max() <= 1e-4
    assert np.abs(first - run(pipe, prompt=TINY_PROMPTS[0])).max() > 1e-3  # the negative prompt changes the image
    # NASA's wrapped processors add guarded variants of diffusers' attention forwards; leave no cache entries behind
    # (they count toward the recompile limit of the next test that compiles the same code with fullgraph=True)
    torch.compiler.reset()
