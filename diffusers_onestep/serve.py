"""``diffusers-onestep serve``: a live "type and see" web page for a one-step student (Gradio).

    diffusers-onestep serve demo-output/student                  # http://127.0.0.1:7860
    diffusers-onestep serve tianweiy/DMD2 --host 0.0.0.0 --port 8000

The page regenerates as the prompt is typed: each edit of the prompt, the negative prompt and its scale (NASA,
through cross- or joint attention), seed, steps, size or number of variations is a request, and Gradio's ``trigger_mode="always_last"`` debounces them (while one image is being made, every further
edit collapses into one pending request for the latest text, so a fast typist never queues stale prompts). Requests
of all visitors share one queue: at most ``concurrency_limit`` generate at once (one model, one device) and at most
``max_queue`` wait; a request past that is refused by Gradio with "queue is full" instead of piling up. Bad input
(an empty prompt, a size the student cannot take, more steps than it was trained at) is answered with its sentence
in the page's status line, and the server goes on.

The generation itself (:class:`LiveGenerator`) is plain Python, usable and tested without Gradio.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import List, Optional, Tuple

from .errors import reason_of


#: shown instead of an image when the prompt box is empty
EMPTY_PROMPT_MESSAGE = "Type a prompt to see an image."
#: students are distilled for one to four steps; the steps slider offers that range
MAX_STEPS = 4
#: images smaller than this (the digits student's are 16 pixels) are enlarged for the page, nearest neighbour
MIN_DISPLAY_SIZE = 256


@dataclass
class ServeSettings:
    """How the page serves one student."""

    #: requests generating at once; one model on one device gains nothing from more
    concurrency_limit: int = 1
    #: requests waiting in the queue; a request past that is refused ("queue is full")
    max_queue: int = 16
    #: the most variations (images of one prompt from one seed) a request may ask for
    max_batch: int = 4
    #: visitors whose session state Gradio keeps: it builds the page's configuration for each (about 10 KB of Python
    #: objects measured with tracemalloc) and every call of the HTTP API is a new session, so Gradio's default of 10000
    #: holds some 100 MB under steady API traffic. The page keeps no per-visitor state, so dropping the oldest loses
    #: nothing.
    max_sessions: int = 64
    #: the page's initial prompt
    default_prompt: str = ""
    #: the page's initial negative prompt (NASA; empty: none)
    default_negative_prompt: str = ""
    #: the page's initial NASA λ (None: the pipeline's default, ``nasa.DEFAULT_NEGATIVE_SCALE``)
    default_negative_scale: Optional[float] = None


@dataclass
class Generation:
    """One answered request: the images (enlarged for the page if small) and the status line."""

    images: list
    status: str
    #: generation wall time per image in seconds (None when the request was refused)
    seconds_per_image: Optional[float] = None


class LiveGenerator:
    """Generates for the page with one loaded :class:`~diffusers_onestep.OneStepPipeline`, refusing bad input with
    one sentence instead of raising (the sentence is shown in the page)."""

    def __init__(self, pipe, settings: Optional[ServeSettings] = None):
        self.pipe = pipe
        self.settings = settings or ServeSettings()
        #: the student's own timesteps (all of them run by default)
        self.trained_steps = len(pipe.scheduler.select_timesteps(None))
        self.native_resolution = pipe.adapter.default_resolution
        self.resolution_multiple = pipe.adapter.resolution_multiple
        #: whether the student takes a negative prompt (NASA: every family's adapter names its attention for it)
        self.takes_negative_prompt = bool(pipe.adapter.negative_prompt_attention)

    @property
    def default_steps(self) -> int:
        return min(self.trained_steps, MAX_STEPS)

    def generate(
        self,
        prompt: Optional[str],
        seed: float = 0,
        steps: float = 1,
        height: Optional[float] = None,
        width: Optional[float] = None,
        num_images: float = 1,
        negative_prompt: Optional[str] = None,
        negative_scale: Optional[float] = None,
    ) -> Generation:
        """``num_images`` variations of ``prompt`` from ``seed`` at ``steps`` of the student's timesteps, steered away
        from ``negative_prompt`` by NASA with λ = ``negative_scale`` (None: the pipeline's default) when one is given.

        Numbers arrive from the page as floats (or None from an emptied box); each is checked before the model runs.
        An empty negative prompt is none (its scale is then ignored).
        """
        import torch

        if prompt is None or not prompt.strip():
            return Generation([], EMPTY_PROMPT_MESSAGE)
        try:
            seed = _whole_number("seed", seed, minimum=0)
            steps = _whole_number("steps", steps, minimum=1)
            num_images = _whole_number("variations", num_images, minimum=1)
            height = self.native_resolution if height is None else _whole_number("height", height, minimum=1)
            width = self.native_resolution if width is None else _whole_number("width", width, minimum=1)
        except ValueError as error:
            return Generation([], _sentence(error))
        if num_images > self.settings.max_batch:
            return Generation([], f"At most {self.settings.max_batch} variations per request, got {num_images}.")
        negative = {}
        if negative_prompt is not None and negative_prompt.strip():
            negative["negative_prompt"] = negative_prompt
            if negative_scale is not None:
                negative["negative_scale"] = negative_scale
        generator = torch.Generator().manual_seed(seed)
        device = self.pipe.device
        try:
            _synchronize(device)
            start = time.perf_counter()
            images = self.pipe(
                prompt,
                num_inference_steps=steps,
                height=height,
                width=width,
                num_images_per_prompt=num_images,
                generator=generator,
                **negative,
            ).images
            # CUDA runs asynchronously: the clock stops when the images exist, not when the kernels were queued
            _synchronize(device)
            elapsed = time.perf_counter() - start
        except ValueError as error:  # the pipeline's input checks: one actionable sentence each
            return Generation([], _sentence(error))
        per_image = elapsed / num_images
        status = (
            f"{per_image * 1000:.1f} ms per image ({num_images} image{'s' if num_images > 1 else ''} in "
            f"{elapsed * 1000:.1f} ms; {steps} step{'s' if steps > 1 else ''}, {width}x{height}, seed {seed}, "
            f"on {device})"
        )
        return Generation([_for_display(image) for image in images], status, per_image)


def _whole_number(name: str, value, minimum: int) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if isinstance(value, bool) or not number.is_integer() or number < minimum:
        raise ValueError(f"The {name} must be a whole number of at least {minimum}, got {value!r}.")
    return int(number)


def _sentence(error: BaseException) -> str:
    """``error``'s first sentence, with its full stop (the page shows it as the status line)."""
    return reason_of(error) + "."


def _synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _for_display(image):
    """Small images enlarged by an integer factor, nearest neighbour (a browser would blur a 16-pixel digit)."""
    from PIL import Image

    factor = -(-MIN_DISPLAY_SIZE // min(image.size))
    if factor <= 1:
        return image
    return image.resize((image.width * factor, image.height * factor), Image.NEAREST)


def build_app(generator: LiveGenerator, title: str = "diffusers-onestep"):
    """The Gradio page of ``generator``: prompt, seed, steps, size, variations, the images and the status line.

    Every control is a trigger of the one generation event (``api_name="generate"``, so ``gradio_client`` and the
    HTTP API call it too), with ``trigger_mode="always_last"`` as the debounce (see the module docstring).
    """
    import gradio as gr

    settings = generator.settings
    multiple = generator.resolution_multiple

    from .pipelines.nasa import DEFAULT_NEGATIVE_SCALE

    def run(
        prompt, seed, steps, height, width, num_images, negative_prompt="", negative_scale=None
    ) -> Tuple[List, str]:
        result = generator.generate(prompt, seed, steps, height, width, num_images, negative_prompt, negative_scale)
        return result.images, result.status

    # delete_cache: every image a request makes is a file in Gradio's cache; a long-running page drops those older
    # than an hour (checked every ten minutes) instead of filling the disk
    with gr.Blocks(title=title, delete_cache=(600, 3600)) as app:
        gr.Markdown(
            f"### {title}\nA one-step student: the images follow the prompt as you type. It was trained at "
            f"{generator.trained_steps} step(s); its native size is {generator.native_resolution} pixels, and sizes "
            f"must be multiples of {multiple}."
        )
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox(
                    label="Prompt", value=settings.default_prompt, placeholder="Type a prompt", elem_id="prompt"
                )
                with gr.Row():
                    seed = gr.Number(label="Seed", value=0, precision=0, minimum=0, elem_id="seed")
                    steps = gr.Slider(
                        label="Steps", minimum=1, maximum=MAX_STEPS, step=1, value=generator.default_steps
                    )
                num_images = gr.Slider(
                    label="Variations", minimum=1, maximum=settings.max_batch, step=1, value=1, elem_id="variations"
                )
                # NASA: students whose adapter names no attention for it take no negative prompt (boxes hidden)
                with gr.Row(visible=generator.takes_negative_prompt):
                    negative_prompt = gr.Textbox(
                        label="Negative prompt",
                        value=settings.default_negative_prompt,
                        placeholder="What to steer away from (optional)",
                        elem_id="negative_prompt",
                    )
                    negative_scale = gr.Slider(
                        label="Negative scale (NASA λ)",
                        minimum=0,
                        maximum=2,
                        step=0.05,
                        value=(
                            DEFAULT_NEGATIVE_SCALE
                            if settings.default_negative_scale is None
                            else settings.default_negative_scale
                        ),
                        elem_id="negative_scale",
                    )
                with gr.Row():
                    native = generator.native_resolution
                    height = gr.Number(label="Height", value=native, precision=0, step=multiple, elem_id="height")
                    width = gr.Number(label="Width", value=native, precision=0, step=multiple, elem_id="width")
            with gr.Column():
                status = gr.Textbox(label="Latency", interactive=False, elem_id="status")
                gallery = gr.Gallery(
                    label="Images",
                    columns=2,
                    height=520,
                    object_fit="contain",
                    allow_preview=False,
                    format="png",
                    elem_id="images",
                )
        # the HTTP API takes the values in this order (the negative prompt's last: "" for none, and its λ)
        controls = [prompt, seed, steps, height, width, num_images, negative_prompt, negative_scale]
        gr.on(
            triggers=[control.change for control in controls] + [prompt.submit, negative_prompt.submit],
            fn=run,
            inputs=controls,
            outputs=[gallery, status],
            api_name="generate",
            trigger_mode="always_last",
            concurrency_limit=settings.concurrency_limit,
            show_progress="hidden",
        )
        # the page opens with the initial prompt's images (or the "type a prompt" line)
        app.load(fn=run, inputs=controls, outputs=[gallery, status], show_progress="hidden")
    app.queue(max_size=settings.max_queue, default_concurrency_limit=settings.concurrency_limit)
    return app


def load_generator(
    model: str, device: Optional[str] = None, settings: Optional[ServeSettings] = None, dtype: Optional[str] = None
):
    """Load ``model`` (anything ``OneStepPipeline.from_pretrained`` accepts) onto ``device`` for the page, in ``dtype``
    (``"bfloat16"``, ...; the saved dtype by default)."""
    import torch

    from . import OneStepPipeline

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = OneStepPipeline.from_pretrained(model, **({"torch_dtype": getattr(torch, dtype)} if dtype else {}))
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return LiveGenerator(pipe, settings)


def serve(
    model: str,
    host: str = "127.0.0.1",
    port: int = 7860,
    device: Optional[str] = None,
    settings: Optional[ServeSettings] = None,
    block: bool = True,
    dtype: Optional[str] = None,
):
    """Load ``model`` and serve its page on ``host:port``; returns the Gradio app (``block=False``: at once)."""
    settings = settings or ServeSettings()
    generator = load_generator(model, device, settings, dtype)
    app = build_app(generator, title=f"diffusers-onestep: {model}")
    app.launch(
        server_name=host,
        server_port=port,
        prevent_thread_lock=not block,
        show_error=True,
        state_session_capacity=settings.max_sessions,
    )
    return app
