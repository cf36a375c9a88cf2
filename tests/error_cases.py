"""The bad-input matrix: every refused input of the pipeline, loading, the scheduler and the training CLI.

Each case returns the message it was refused with. `tests/test_error_matrix.py` checks that every message is one
actionable sentence, that the CLI exits with status 2 before any model is loaded and writes nothing, and that
`docs/errors.md` lists each message verbatim. Regenerate the doc with:

    python tests/error_cases.py
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import sys
from dataclasses import dataclass
from typing import Callable, List

import torch


HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)


@dataclass
class Case:
    area: str
    name: str
    run: Callable  # (context) -> message
    cli: bool = False


def expect(error_type, fn):
    try:
        fn()
    except error_type as error:
        return str(error)
    raise AssertionError("no error was raised")


# ---------------------------------------------------------------------------------------------------------------
# pipeline
# ---------------------------------------------------------------------------------------------------------------


def _call(ctx, **kwargs):
    pipe = ctx["pipe"]
    kwargs.setdefault("prompt", "a cat")
    kwargs.setdefault("output_type", "latent")
    return lambda: pipe(**kwargs)


def _flux_call(**kwargs):
    """A call of a tiny FLUX.1 student (the NASA cases of joint-attention families)."""
    from diffusers import FluxPipeline

    from diffusers_onestep import OneStepPipeline
    from diffusers_onestep.testing import tiny_flux_components

    pipe = OneStepPipeline.from_pipe(FluxPipeline(**tiny_flux_components()), conditioning_timesteps=[1.0])
    pipe.set_progress_bar_config(disable=True)
    return lambda: pipe(prompt="a cat", output_type="latent", **kwargs)


def pipeline_cases() -> List[Case]:
    def embeds(ctx, batch=1):
        return torch.zeros(batch, 77, 64)

    def pooled(ctx, batch=1):
        return torch.zeros(batch, 32)

    cases = [
        ("height not a multiple of the VAE × patch factor", lambda c: _call(c, height=33)),
        ("width not positive", lambda c: _call(c, width=-64)),
        ("zero inference steps", lambda c: _call(c, num_inference_steps=0)),
        ("more steps than the student was trained at", lambda c: _call(c, num_inference_steps=2)),
        (
            "both prompt and prompt_embeds",
            lambda c: _call(c, prompt_embeds=embeds(c), pooled_prompt_embeds=torch.zeros(1, 32)),
        ),
        ("neither prompt nor prompt_embeds", lambda c: _call(c, prompt=None)),
        ("prompt of the wrong type", lambda c: _call(c, prompt=3)),
        (
            "prompt_embeds without pooled_prompt_embeds (SDXL)",
            lambda c: _call(c, prompt=None, prompt_embeds=embeds(c)),
        ),
        (
            "pooled embeddings of another batch size",
            lambda c: _call(c, prompt=None, prompt_embeds=embeds(c, 2), pooled_prompt_embeds=torch.zeros(1, 32)),
        ),
        ("one generator per image expected", lambda c: _call(c, generator=[torch.Generator()] * 3)),
        ("latents of the wrong shape", lambda c: _call(c, latents=torch.zeros(1, 4, 8, 8))),
        ("unknown output_type", lambda c: _call(c, output_type="jpeg")),
        ("negative_scale without negative_prompt (NASA)", lambda c: _call(c, negative_scale=2.0)),
        (
            "both negative_prompt and negative_prompt_embeds",
            lambda c: _call(c, negative_prompt="blurry", negative_prompt_embeds=embeds(c)),
        ),
        (
            "negative_prompt_embeds of another token count than the prompt's (NASA on FLUX.1 / SD3)",
            lambda c: _flux_call(
                negative_prompt_embeds=torch.zeros(1, 5, 24), negative_pooled_prompt_embeds=torch.zeros(1, 20)
            ),
        ),
        ("guidance_scale > 1 on a guidance-distilled student", lambda c: _call(c, guidance_scale=5.0)),
        ("unknown callback tensor input", lambda c: _call(c, callback_on_step_end_tensor_inputs=["noise_pred"])),
        ("custom timesteps out of range", lambda c: _call(c, timesteps=[1200])),
        ("generator given as a seed (an int)", lambda c: _call(c, generator=0)),
        ("timesteps given as a number instead of a list", lambda c: _call(c, timesteps=399)),
        (
            "prompt_embeds of another width than the denoiser takes",
            lambda c: _call(c, prompt=None, prompt_embeds=torch.zeros(1, 77, 32), pooled_prompt_embeds=pooled(c)),
        ),
        (
            "prompt_embeds without the token dimension",
            lambda c: _call(c, prompt=None, prompt_embeds=torch.zeros(1, 64), pooled_prompt_embeds=pooled(c)),
        ),
        (
            "pooled_prompt_embeds of another width than the denoiser takes (SDXL)",
            lambda c: _call(c, prompt=None, prompt_embeds=embeds(c), pooled_prompt_embeds=torch.zeros(1, 16)),
        ),
        (
            "prompt_embeds that is not a tensor",
            lambda c: _call(c, prompt=None, prompt_embeds=[[0.0] * 64], pooled_prompt_embeds=pooled(c)),
        ),
        (
            "prompt_attention_mask of another length than prompt_embeds",
            lambda c: _call(
                c,
                prompt=None,
                prompt_embeds=embeds(c),
                pooled_prompt_embeds=pooled(c),
                prompt_attention_mask=torch.ones(1, 50),
            ),
        ),
        ("latents that are not a tensor", lambda c: _call(c, latents=[[0.0]])),
        ("guidance_scale that is not a number", lambda c: _call(c, guidance_scale="low")),
        ("callback_on_step_end that is not callable", lambda c: _call(c, callback_on_step_end="print")),
        (
            "callback_on_step_end_tensor_inputs given as one string",
            lambda c: _call(c, callback_on_step_end=lambda *a: {}, callback_on_step_end_tensor_inputs="latents"),
        ),
        (
            "callback_on_step_end returning a tensor instead of a dict",
            lambda c: _call(c, callback_on_step_end=lambda p, i, t, tensors: tensors["latents"]),
        ),
        (
            "callback_on_step_end returning a tensor the pipeline does not read",
            lambda c: _call(c, callback_on_step_end=lambda p, i, t, tensors: {"noise_pred": tensors["latents"]}),
        ),
        (
            "callback_on_step_end returning latents of another shape",
            lambda c: _call(c, callback_on_step_end=lambda p, i, t, tensors: {"latents": tensors["latents"][0]}),
        ),
    ]
    return [
        Case("OneStepPipeline.__call__", name, (lambda make: lambda c: expect(ValueError, make(c)))(make))
        for name, make in cases
    ]


def loading_cases() -> List[Case]:
    from diffusers_onestep import OneStepPipeline, OneStepScheduler
    from diffusers_onestep.pipelines.loading import load_state_dict_file

    def not_a_pipeline(c):
        return expect(ValueError, lambda: OneStepPipeline.from_pretrained(c["empty_dir"]))

    def bad_repo_id(c):
        return expect(ValueError, lambda: OneStepPipeline.from_pretrained("not a repo id!!"))

    def uncached_offline(c):
        return expect(ValueError, lambda: OneStepPipeline.from_pretrained("someone/uncached-student"))

    def unsupported(c):
        return expect(ValueError, lambda: OneStepPipeline.from_pretrained(c["inpaint_dir"]))

    def pickle_payload(c):
        return expect(ValueError, lambda: load_state_dict_file(c["evil_bin"]))

    def wrong_scheduler(c):
        from diffusers import EulerDiscreteScheduler

        components = dict(c["components"])
        return expect(
            ValueError,
            lambda: OneStepPipeline(
                vae=components["vae"],
                unet=components["unet"],
                scheduler=EulerDiscreteScheduler(),
                text_encoder=components["text_encoder"],
                tokenizer=components["tokenizer"],
            ),
        )

    def unknown_preset_variant(c):
        return expect(ValueError, lambda: OneStepPipeline.from_pretrained("tianweiy/DMD2", weight_name="nope.bin"))

    def pickle_format(c):
        return expect(ValueError, lambda: load_state_dict_file(c["weights_pkl"]))

    def foreign_lora(c):
        from diffusers_onestep.testing import random_lora_state_dict, tiny_components

        pixart = tiny_components("pixart_alpha")["transformer"]
        state = {f"unet.{k}": v for k, v in random_lora_state_dict(pixart, ["to_q"], rank=2).items()}
        return expect(ValueError, lambda: c["pipe"].load_student_lora(state))

    def load(source_key, **kwargs):
        return lambda c: expect(ValueError, lambda: OneStepPipeline.from_pretrained(c[source_key], **kwargs))

    def from_base(**kwargs):
        return lambda c: expect(ValueError, lambda: OneStepPipeline.from_base(c["sdxl_dir"], **kwargs))

    def preset(repo_id, **kwargs):
        return lambda c: expect(ValueError, lambda: OneStepPipeline.from_pretrained(repo_id, **kwargs))

    def scheduler_and_timesteps(c):
        scheduler = OneStepScheduler(conditioning_timesteps=[399])
        return expect(
            ValueError,
            lambda: OneStepPipeline.from_pretrained(c["sdxl_dir"], scheduler=scheduler, conditioning_timesteps=[200]),
        )

    def unet_and_student_weights(c):
        return expect(
            ValueError,
            lambda: OneStepPipeline.from_base(
                c["sdxl_dir"], student_weights=c["evil_bin"], unet=c["components"]["unet"]
            ),
        )

    return [
        Case("loading", "a LoRA made for another model", foreign_lora),
        Case("loading", "folder that is not a pipeline or LoRA student", not_a_pipeline),
        Case("loading", "string that is neither a folder nor a Hub id", bad_repo_id),
        Case("loading", "Hub id not in the cache while offline", uncached_offline),
        Case("loading", "pipeline of an unsupported family", unsupported),
        Case("loading", "legacy .bin holding a pickle payload", pickle_payload),
        Case("loading", "weights in an unknown (pickle) format", pickle_format),
        Case("loading", "a scheduler that is not a OneStepScheduler", wrong_scheduler),
        Case("loading", "unknown variant of a preset", unknown_preset_variant),
        Case("loading", "conditioning_timesteps given as a number", load("sdxl_dir", conditioning_timesteps=399)),
        Case("loading", "misspelt keyword argument", load("sdxl_dir", conditioning_timestep=[399])),
        Case("loading", "keyword argument that loads another pipeline class", load("sdxl_dir", custom_pipeline="x")),
        Case("loading", "a scheduler together with conditioning_timesteps", scheduler_and_timesteps),
        Case("loading", "base_model for a full pipeline", load("sdxl_dir", base_model="org/base")),
        Case(
            "loading",
            "embedded_guidance_scale for a student without embedded guidance",
            load("sdxl_dir", embedded_guidance_scale=4.5),
        ),
        Case("loading", "family that is not the preset's", preset("tianweiy/DMD2", family="sana")),
        Case("loading", "base_model for a full-pipeline preset", preset("stabilityai/sdxl-turbo", base_model="x/y")),
        Case("loading", "component folder without its weights file", load("missing_weights_dir")),
        Case("loading", "damaged safetensors file", load("damaged_weights_dir")),
        Case("loading", "model_index.json that is not valid JSON", load("bad_index_dir")),
        Case("loading", "LoRA student whose local base folder is gone", load("gone_base_lora")),
        Case(
            "loading", "from_base with weight_name but no student_weights", from_base(weight_name="unet.safetensors")
        ),
        Case("loading", "from_base with student_weights and a unet", unet_and_student_weights),
    ]


def scheduler_cases() -> List[Case]:
    from diffusers_onestep import OneStepScheduler

    def ctor(**kw):
        return lambda c: expect(ValueError, lambda: OneStepScheduler(**kw))

    def step_first(c):
        return expect(ValueError, lambda: OneStepScheduler().step(torch.zeros(1), 999, torch.zeros(1)))

    def too_many(c):
        scheduler = OneStepScheduler(conditioning_timesteps=[999, 499])
        return expect(ValueError, lambda: scheduler.set_timesteps(3))

    return [
        Case("OneStepScheduler", "conditioning timesteps not decreasing", ctor(conditioning_timesteps=[249, 999])),
        Case(
            "OneStepScheduler",
            "more than sixteen conditioning timesteps",
            ctor(conditioning_timesteps=list(range(999, 150, -50))),
        ),
        Case("OneStepScheduler", "fractional timestep on a VP path", ctor(conditioning_timesteps=[399.5])),
        Case("OneStepScheduler", "timestep outside the path", ctor(conditioning_timesteps=[1000])),
        Case("OneStepScheduler", "flow timestep above 1", ctor(noise_path="flow", conditioning_timesteps=[2.0])),
        Case("OneStepScheduler", "unknown prediction_type", ctor(prediction_type="noise")),
        Case(
            "OneStepScheduler",
            "epsilon student starting where the path has no signal",
            ctor(noise_path="flow", conditioning_timesteps=[1.0], prediction_type="epsilon"),
        ),
        Case("OneStepScheduler", "unknown noise_path", ctor(noise_path="edm")),
        Case("OneStepScheduler", "step() before set_timesteps()", step_first),
        Case("OneStepScheduler", "more steps than stored timesteps", too_many),
    ]


# ---------------------------------------------------------------------------------------------------------------
# training CLI
# ---------------------------------------------------------------------------------------------------------------


def cli_case(name, args_fn, patches=(), env=None, launcher=False):
    """A refused command line: ``patches`` are ``(object, attribute, value)`` set for the call (the Hub account
    ``whoami`` answers, a missing package), ``env`` variables set for it; ``launcher`` runs it as
    ``diffusers-onestep distill`` (with ``--num_processes``)."""

    def run(c):
        import contextlib
        import io

        from diffusers_onestep.distill import cli

        argv = [str(a) for a in args_fn(c)]
        stderr = io.StringIO()
        saved = [(target, attribute, getattr(target, attribute)) for target, attribute, _ in patches]
        saved_env = {key: os.environ.get(key) for key in env or {}}
        try:
            for target, attribute, value in patches:
                setattr(target, attribute, value)
            os.environ.update(env or {})
            with contextlib.redirect_stderr(stderr):
                try:
                    status = cli.main(argv, launcher=launcher)
                except SystemExit as exit_:
                    c["last_exit_code"] = exit_.code
                else:
                    c["last_exit_code"] = status
                    if status != 2:
                        raise AssertionError(f"the CLI did not refuse the input (status {status})")
        finally:
            for target, attribute, value in saved:
                setattr(target, attribute, value)
            for key, value in saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        lines = [line for line in stderr.getvalue().strip().splitlines() if line]
        return lines[-1].split("error: ", 1)[1]

    return Case("training CLI", name, run, cli=True)


def previous_run_flags() -> dict:
    """The settings of :func:`make_previous_run` beside teacher, prompts, output folder and resolution (the tiny
    run's flags of tests/training_utils, one step, one critic update per student update)."""
    from training_utils import TINY_FLAGS

    return {
        **dict(zip(TINY_FLAGS[::2], TINY_FLAGS[1::2])),
        "--max_train_steps": "1",
        "--critic_updates_per_student": "1",
    }


def no_token(token=None, **kwargs):
    from huggingface_hub.errors import LocalTokenNotFoundError

    raise LocalTokenNotFoundError("Token is required to call the /whoami-v2 endpoint, but no token found.")


def cli_cases() -> List[Case]:
    from training_utils import hub_account

    def base(c, **over):
        args = {"--teacher": c["pixart_dir"], "--prompts": c["prompts"], "--output_dir": c["out"], "--resolution": "8"}
        args.update(over)
        out = []
        for key, value in args.items():
            if value is None:
                continue
            out += [key] + (value if isinstance(value, list) else [value])
        return out

    return [
        cli_case("no --teacher", lambda c: base(c, **{"--teacher": None})),
        cli_case("teacher folder without model_index.json", lambda c: base(c, **{"--teacher": c["empty_dir"]})),
        cli_case("teacher of an unsupported family", lambda c: base(c, **{"--teacher": c["inpaint_dir"]})),
        cli_case("--family that does not match the teacher", lambda c: base(c, **{"--family": "sdxl"})),
        cli_case("unknown --family", lambda c: base(c, **{"--family": "hunyuan_dit"})),
        cli_case("unknown --divergence", lambda c: base(c, **{"--divergence": "wasserstein"})),
        cli_case(
            "a method flag that does not apply (--sid_alpha with dmd2)", lambda c: base(c, **{"--sid_alpha": "1"})
        ),
        cli_case(
            "--divergence with a score-matching method", lambda c: base(c, **{"--method": "sid", "--divergence": "js"})
        ),
        cli_case("--gan_weight with sid", lambda c: base(c, **{"--method": "sid", "--gan_weight": "0.01"})),
        cli_case(
            "--method tdm with one student timestep",
            lambda c: base(c, **{"--method": "tdm", "--student_timesteps": "399"}),
        ),
        cli_case(
            "--method tdm on a family that records no TDM timesteps (SDXL)",
            lambda c: base(c, **{"--teacher": c["sdxl_dir"], "--resolution": "32", "--method": "tdm"}),
        ),
        cli_case(
            "a tdm-only flag with another method (--tdm_huber_c with dmd2)",
            lambda c: base(c, **{"--tdm_huber_c": "0.01"}),
        ),
        cli_case(
            "more than 8 --student_timesteps",
            lambda c: base(c, **{"--student_timesteps": [str(999 - 100 * i) for i in range(9)]}),
        ),
        cli_case("unknown --method", lambda c: base(c, **{"--method": "consistency_model"})),
        cli_case("--divergence with sim", lambda c: base(c, **{"--method": "sim", "--divergence": "reverse_kl"})),
        cli_case("--sim_distance with sid", lambda c: base(c, **{"--method": "sid", "--sim_distance": "squared"})),
        cli_case("--sid_alpha with sim", lambda c: base(c, **{"--method": "sim", "--sid_alpha": "1"})),
        cli_case(
            "--fake_guidance_scale with f-distill",
            lambda c: base(c, **{"--method": "fdistill", "--fake_guidance_scale": "2"}),
        ),
        cli_case("--fake_train_guidance_scale with dmd2", lambda c: base(c, **{"--fake_train_guidance_scale": "2"})),
        cli_case(
            "--guidance_range with sid", lambda c: base(c, **{"--method": "sid", "--guidance_range": ["1", "3"]})
        ),
        cli_case("--lora_rank 0 with a LoRA student", lambda c: base(c, **{"--lora_rank": "0"})),
        cli_case("--student that is not lora or full", lambda c: base(c, **{"--student": "half"})),
        cli_case(
            "--resolution not a multiple of the latent factor",
            lambda c: base(c, **{"--teacher": c["sdxl_dir"], "--resolution": "33"}),
        ),
        cli_case("prompt file that does not exist", lambda c: base(c, **{"--prompts": "missing.txt"})),
        cli_case("prompt file without prompts", lambda c: base(c, **{"--prompts": c["empty_prompts"]})),
        cli_case(
            "prompt column missing", lambda c: base(c, **{"--prompts": c["jsonl"], "--prompt_column": "caption"})
        ),
        cli_case("f-divergence without --real_images", lambda c: base(c, **{"--divergence": "js"})),
        cli_case(
            "--real_images that does not exist",
            lambda c: base(c, **{"--divergence": "js", "--real_images": "./no/such/images"}),
        ),
        cli_case(
            "non-empty --output_dir without --overwrite_output_dir",
            lambda c: base(c, **{"--output_dir": c["busy_dir"]}),
        ),
        cli_case(
            "--resume_from_checkpoint that is not a checkpoint",
            lambda c: base(c, **{"--resume_from_checkpoint": c["empty_dir"]}),
        ),
        cli_case(
            "--resume_from_checkpoint that does not exist",
            lambda c: base(c, **{"--resume_from_checkpoint": os.path.join(c["root"], "no-run", "checkpoint-7")}),
        ),
        cli_case(
            "resume with a configuration that conflicts with the checkpoint's",
            lambda c: base(
                c,
                **{
                    "--output_dir": c["run_dir"],
                    "--resume_from_checkpoint": "latest",
                    **previous_run_flags(),
                    "--lora_rank": "3",
                    "--max_train_steps": "3",
                },
            ),
        ),
        cli_case(
            "the same command again over a run that has checkpoints",
            lambda c: base(c, **{"--output_dir": c["run_dir"]}),
        ),
        cli_case(
            "other settings over a run stopped before its first checkpoint",
            lambda c: base(c, **{"--output_dir": c["unstarted_dir"], **previous_run_flags(), "--lora_rank": "3"}),
        ),
        cli_case(
            "--resume_from_checkpoint of a checkpoint with a truncated file",
            lambda c: base(c, **{"--resume_from_checkpoint": c["damaged_truncated"]}),
        ),
        cli_case(
            "--resume_from_checkpoint of a checkpoint without its RNG state",
            lambda c: base(c, **{"--resume_from_checkpoint": c["damaged_no_rng"]}),
        ),
        cli_case(
            "--resume_from_checkpoint of an incomplete checkpoint (no trainer_state.json)",
            lambda c: base(c, **{"--resume_from_checkpoint": c["damaged_incomplete"]}),
        ),
        cli_case(
            "--resume_from_checkpoint latest when every checkpoint of the run is damaged",
            lambda c: base(
                c,
                **{"--output_dir": c["all_damaged_dir"], "--resume_from_checkpoint": "latest", **previous_run_flags()},
            ),
        ),
        cli_case("--hub_model_id that is not a repo id", lambda c: base(c, **{"--hub_model_id": "my model!"})),
        cli_case("--mixed_precision fp16 without a GPU", lambda c: base(c, **{"--mixed_precision": "fp16"})),
        cli_case("--config file that does not exist", lambda c: base(c, **{"--config": "nope.yaml"})),
        cli_case("--config with an unknown setting", lambda c: base(c, **{"--config": c["bad_config"]})),
        cli_case("--guidance_range with low > high", lambda c: base(c, **{"--guidance_range": ["5", "2"]})),
        cli_case("--no_critic_guidance without --guidance_range", lambda c: base(c, **{"--no_critic_guidance": []})),
        cli_case("--max_train_steps 0", lambda c: base(c, **{"--max_train_steps": "0"})),
        cli_case("--guidance_scale inf", lambda c: base(c, **{"--guidance_scale": "inf"})),
        cli_case("--config with a fractional step count", lambda c: base(c, **{"--config": c["fractional_config"]})),
        cli_case("--config with a string for a switch", lambda c: base(c, **{"--config": c["string_switch_config"]})),
        # numeric ranges that only failed inside torch, numpy or the tokenizer, after the teacher loaded
        cli_case("--adam_beta1 of 1 or more", lambda c: base(c, **{"--adam_beta1": "1.5"})),
        cli_case("negative --adam_beta2", lambda c: base(c, **{"--adam_beta2": "-0.1"})),
        cli_case("--adam_epsilon 0", lambda c: base(c, **{"--adam_epsilon": "0"})),
        cli_case("negative --adam_weight_decay", lambda c: base(c, **{"--adam_weight_decay": "-0.01"})),
        cli_case("negative --seed", lambda c: base(c, **{"--seed": "-1"})),
        cli_case("--seed above 2**32 - 1", lambda c: base(c, **{"--seed": str(2**32)})),
        cli_case("negative --max_sequence_length", lambda c: base(c, **{"--max_sequence_length": "-5"})),
        cli_case("negative --lr_warmup_steps", lambda c: base(c, **{"--lr_warmup_steps": "-1"})),
        cli_case("negative --max_nonfinite_skips", lambda c: base(c, **{"--max_nonfinite_skips": "-1"})),
        cli_case("negative --dm_weight", lambda c: base(c, **{"--dm_weight": "-1"})),
        cli_case("--logit_clamp 0", lambda c: base(c, **{"--logit_clamp": "0"})),
        cli_case("negative --discriminator_weight", lambda c: base(c, **{"--discriminator_weight": "-1"})),
        cli_case(
            "--config with an empty validation prompt", lambda c: base(c, **{"--config": c["empty_validation_config"]})
        ),
        cli_case("empty --tracker_project_name", lambda c: base(c, **{"--tracker_project_name": ""})),
        # what the export would refuse, checked against the teacher's noise path before training
        cli_case(
            "fractional --student_timesteps on a VP teacher (SDXL)",
            lambda c: base(c, **{"--teacher": c["sdxl_dir"], "--resolution": "32", "--student_timesteps": "399.5"}),
        ),
        cli_case(
            "--student_timesteps outside the teacher's path", lambda c: base(c, **{"--student_timesteps": "1000"})
        ),
        cli_case(
            "--lora_target_modules naming no module of the denoiser",
            lambda c: base(c, **{"--lora_target_modules": "to_q,to_qkv"}),
        ),
        cli_case(
            "--report_to wandb without wandb installed",
            lambda c: base(c, **{"--report_to": "wandb"}),
            patches=[(_accelerate_utils(), "is_wandb_available", lambda: False)],
        ),
        # prompt and image sources
        cli_case("prompt file that is not UTF-8", lambda c: base(c, **{"--prompts": c["latin1_prompts"]})),
        cli_case("prompt folder that is empty", lambda c: base(c, **{"--prompts": c["empty_dir"]})),
        cli_case("jsonl prompt that is null", lambda c: base(c, **{"--prompts": c["null_prompts"]})),
        cli_case("jsonl prompt that is a number", lambda c: base(c, **{"--prompts": c["number_prompts"]})),
        cli_case("jsonl line that is not an object", lambda c: base(c, **{"--prompts": c["string_line_prompts"]})),
        cli_case(
            "prompt dataset on the Hub, not cached, offline",
            lambda c: base(c, **{"--prompts": "someone/uncached-prompts"}),
        ),
        cli_case(
            "real image that does not decode",
            lambda c: base(c, **{"--divergence": "js", "--real_images": c["corrupt_images"]}),
        ),
        cli_case(
            "real image folder that is empty",
            lambda c: base(c, **{"--divergence": "js", "--real_images": c["empty_dir"]}),
        ),
        cli_case(
            "image dataset on the Hub, not cached, offline",
            lambda c: base(c, **{"--divergence": "js", "--real_images": "someone/uncached-images"}),
        ),
        cli_case("--streaming without --real_images", lambda c: base(c, **{"--streaming": []})),
        cli_case(
            "--cache_latents of a streamed source",
            lambda c: base(
                c, **{"--divergence": "js", "--real_images": c["empty_dir"], "--streaming": [], "--cache_latents": []}
            ),
        ),
        cli_case(
            "--aspect_ratio_buckets of a streamed source",
            lambda c: base(
                c,
                **{
                    "--divergence": "js",
                    "--real_images": c["empty_dir"],
                    "--streaming": [],
                    "--aspect_ratio_buckets": [],
                },
            ),
        ),
        cli_case("--max_train_samples 0", lambda c: base(c, **{"--max_train_samples": "0"})),
        # prompts only: the teacher's reference set and DMD's regression loss
        cli_case(
            "--regression_weight without --real_images teacher",
            lambda c: base(c, **{"--regression_weight": "0.25"}),
        ),
        cli_case(
            "a teacher-reference flag without --real_images teacher",
            lambda c: base(c, **{"--teacher_reference_count": "100"}),
        ),
        cli_case(
            "--teacher_reference_count 0",
            lambda c: base(c, **{"--real_images": "teacher", "--teacher_reference_count": "0"}),
        ),
        cli_case(
            "--teacher_reference_steps 0",
            lambda c: base(c, **{"--real_images": "teacher", "--teacher_reference_steps": "0"}),
        ),
        cli_case(
            "--teacher_reference_guidance_scale below 1 for a CFG teacher",
            lambda c: base(c, **{"--real_images": "teacher", "--teacher_reference_guidance_scale": "0.5"}),
        ),
        cli_case(
            "--real_images teacher with --cache_latents",
            lambda c: base(c, **{"--real_images": "teacher", "--cache_latents": []}),
        ),
        cli_case(
            "--real_images teacher with --caption_column",
            lambda c: base(c, **{"--real_images": "teacher", "--caption_column": "text"}),
        ),
        cli_case(
            "--real_images teacher in a run with no discriminator and no regression",
            lambda c: base(c, **{"--real_images": "teacher", "--gan_weight": "0"}),
        ),
        cli_case(
            "--regression_weight with a method it does not apply to (sid)",
            lambda c: base(c, **{"--real_images": "teacher", "--method": "sid", "--regression_weight": "1"}),
        ),
        # the teacher
        cli_case("Hub teacher not cached, offline", lambda c: base(c, **{"--teacher": "someone/uncached-teacher"})),
        cli_case("a saved one-step student as --teacher", lambda c: base(c, **{"--teacher": c["student_dir"]})),
        cli_case("a LoRA student folder as --teacher", lambda c: base(c, **{"--teacher": c["lora_student_dir"]})),
        cli_case("teacher missing a component folder", lambda c: base(c, **{"--teacher": c["teacher_no_vae"]})),
        cli_case("teacher with a truncated weights file", lambda c: base(c, **{"--teacher": c["teacher_truncated"]})),
        cli_case("teacher with a config that is not JSON", lambda c: base(c, **{"--teacher": c["teacher_bad_json"]})),
        cli_case("variant-only teacher without --variant", lambda c: base(c, **{"--teacher": c["teacher_fp16_only"]})),
        cli_case(
            "mixed precision fp16 from the accelerate config, without a GPU",
            lambda c: base(c),
            env={"ACCELERATE_MIXED_PRECISION": "fp16"},
        ),
        # pushing: checked with the Hub (whoami) before anything loads
        cli_case(
            "--push_to_hub while offline",
            lambda c: base(c, **{"--push_to_hub": [], "--hub_model_id": "me/student"}),
            env={"HF_TOKEN": "hf_notarealtoken"},
        ),
        cli_case(
            "--push_to_hub without a Hub token",
            lambda c: base(c, **{"--push_to_hub": []}),
            patches=[(_huggingface_hub(), "whoami", no_token)],
        ),
        cli_case(
            "--push_to_hub with a read-only token",
            lambda c: base(c, **{"--push_to_hub": []}),
            patches=[(_huggingface_hub(), "whoami", hub_account(role="read"))],
        ),
        cli_case(
            "--hub_model_id in a namespace the account cannot write to",
            lambda c: base(c, **{"--push_to_hub": [], "--hub_model_id": "stabilityai/student"}),
            patches=[(_huggingface_hub(), "whoami", hub_account())],
        ),
        # diffusers-onestep distill as the launcher of accelerate
        cli_case("--num_processes 0", lambda c: base(c, **{"--num_processes": "0"}), launcher=True),
        cli_case(
            "--accelerate_config that does not exist",
            lambda c: base(c, **{"--accelerate_config": "no-such-accelerate.yaml"}),
            launcher=True,
        ),
        cli_case(
            "LoRA student of a local teacher pushed without --base_model_id",
            lambda c: base(c, **{"--push_to_hub": []}),
        ),
        cli_case("--base_model_id that is not a Hub id", lambda c: base(c, **{"--base_model_id": "./my teacher"})),
        cli_case("--eval_steps without held-out prompts", lambda c: base(c, **{"--eval_steps": "100"})),
        cli_case("--keep_best without --eval_steps", lambda c: base(c, **{"--keep_best": []})),
        cli_case(
            "--eval_reference folder missing",
            lambda c: base(
                c,
                **{
                    "--eval_steps": "10",
                    "--eval_prompts": c["prompts"],
                    "--eval_reference": "./no-reference",
                    "--eval_features": "digits",
                },
            ),
        ),
    ]


# ---------------------------------------------------------------------------------------------------------------
# diffusers-onestep push
# ---------------------------------------------------------------------------------------------------------------


def push_case(name, args_fn):
    """A refusal of ``diffusers-onestep push``: exit status 2 before any Hub call, one sentence on stderr."""

    def run(c):
        import contextlib
        import io

        from diffusers_onestep import cli

        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            c["last_exit_code"] = cli.main(["push", *[str(a) for a in args_fn(c)]])
        lines = [line for line in stderr.getvalue().strip().splitlines() if line]
        return lines[-1].split("error: ", 1)[1]

    return Case("diffusers-onestep push", name, run, cli=True)


def push_cases() -> List[Case]:
    return [
        push_case(
            "LoRA student of a local teacher without --base_model_id",
            lambda c: [c["local_base_lora"], "--repo_id", "me/student"],
        ),
        push_case(
            "--base_model_id for a full student",
            lambda c: [c["sdxl_dir"], "--repo_id", "me/student", "--base_model_id", "org/teacher"],
        ),
    ]


# ---------------------------------------------------------------------------------------------------------------
# diffusers-onestep evaluate
# ---------------------------------------------------------------------------------------------------------------


def evaluate_case(name, args_fn, env=None):
    """A refusal of ``diffusers-onestep evaluate``: exit status 2 before any model loads, one sentence on stderr."""

    def run(c):
        import contextlib
        import io

        from diffusers_onestep import cli

        saved = {key: os.environ.get(key) for key in (env or {})}
        os.environ.update({key: value(c) for key, value in (env or {}).items()})
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr):
                c["last_exit_code"] = cli.main(["evaluate", *[str(a) for a in args_fn(c)]])
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        lines = [line for line in stderr.getvalue().strip().splitlines() if line]
        return lines[-1].split("error: ", 1)[1]

    return Case("diffusers-onestep evaluate", name, run, cli=True)


def evaluate_args(c, **flags):
    """``evaluate`` of the context's student on its prompts against its images, with the tiny Inception."""
    args = {
        "--prompts": c["prompts"],
        "--reference": c["eval_reference"],
        "--num_images": "4",
        "--clip_model": "none",
        "--output_dir": c["out"],
    }
    args.update(flags)
    model = args.pop("MODEL", c["student_dir"])
    return [model, *[item for key, value in args.items() for item in (key, value)]]


def evaluate_cases() -> List[Case]:
    inception = {"DIFFUSERS_ONESTEP_CACHE": lambda c: c["eval_inception_cache"]}
    return [
        evaluate_case(
            "MODEL neither a folder nor a Hub id", lambda c: evaluate_args(c, MODEL="./no such student"), inception
        ),
        evaluate_case(
            "--prompts file missing", lambda c: evaluate_args(c, **{"--prompts": "./missing.txt"}), inception
        ),
        evaluate_case(
            "--reference folder missing", lambda c: evaluate_args(c, **{"--reference": "./no-images"}), inception
        ),
        evaluate_case("--num_images 1", lambda c: evaluate_args(c, **{"--num_images": "1"}), inception),
        evaluate_case("more images than captions", lambda c: evaluate_args(c, **{"--num_images": "100"}), inception),
        evaluate_case(
            "Inception weights missing while offline",
            lambda c: evaluate_args(c),
            {"DIFFUSERS_ONESTEP_CACHE": lambda c: c["empty_dir"]},
        ),
        evaluate_case(
            "--output_dir holding images of other settings",
            lambda c: evaluate_args(c, **{"--output_dir": c["eval_other_settings"]}),
            inception,
        ),
    ]


# ---------------------------------------------------------------------------------------------------------------
# diffusers-onestep serve
# ---------------------------------------------------------------------------------------------------------------


def serve_case(name, args_fn, without_gradio=False):
    """A refusal of ``diffusers-onestep serve``: exit status 2 before the model loads, one sentence on stderr.
    ``without_gradio``: as if the serve extra were not installed (``sys.modules["gradio"] = None`` makes
    ``importlib.util.find_spec`` answer None, as it does for a missing package)."""

    def run(c):
        import contextlib
        import io

        from diffusers_onestep import cli

        stderr = io.StringIO()
        missing = object()
        saved = sys.modules.get("gradio", missing)
        if without_gradio:
            sys.modules["gradio"] = None
        try:
            with contextlib.redirect_stderr(stderr):
                try:
                    c["last_exit_code"] = cli.main(["serve", *[str(a) for a in args_fn(c)]])
                except SystemExit as exit_:
                    c["last_exit_code"] = exit_.code
        finally:
            if saved is missing:
                sys.modules.pop("gradio", None)
            else:
                sys.modules["gradio"] = saved
        lines = [line for line in stderr.getvalue().strip().splitlines() if line]
        return lines[-1].split("error: ", 1)[1]

    return Case("diffusers-onestep serve", name, run, cli=True)


def serve_cases() -> List[Case]:
    return [
        serve_case("without the serve extra (gradio)", lambda c: [c["sdxl_dir"]], without_gradio=True),
        serve_case("--port outside 1-65535", lambda c: [c["sdxl_dir"], "--port", "70000"]),
    ]


def _huggingface_hub():
    import huggingface_hub

    return huggingface_hub


def _accelerate_utils():
    import accelerate.utils

    return accelerate.utils


def all_cases() -> List[Case]:
    return (
        pipeline_cases()
        + loading_cases()
        + scheduler_cases()
        + cli_cases()
        + push_cases()
        + evaluate_cases()
        + serve_cases()
    )


# ---------------------------------------------------------------------------------------------------------------
# context
# ---------------------------------------------------------------------------------------------------------------


class Payload:
    """Unpickling this would create a file: the proof that a pickle ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def build_context(root: str) -> dict:
    from training_utils import write_images, write_prompts

    from diffusers_onestep import OneStepPipeline, OneStepScheduler
    from diffusers_onestep.testing import save_tiny_native_pipeline, tiny_components

    os.makedirs(root, exist_ok=True)
    components = tiny_components("sdxl")
    pipe = OneStepPipeline(
        vae=components["vae"],
        unet=components["unet"],
        scheduler=OneStepScheduler(conditioning_timesteps=[399]),
        text_encoder=components["text_encoder"],
        text_encoder_2=components["text_encoder_2"],
        tokenizer=components["tokenizer"],
        tokenizer_2=components["tokenizer_2"],
    )
    pipe.set_progress_bar_config(disable=True)
    ctx = {"pipe": pipe, "components": components, "root": root}
    ctx["empty_dir"] = os.path.join(root, "empty")
    os.makedirs(ctx["empty_dir"], exist_ok=True)
    # an SD inpainting pipeline: its 9-channel UNet (latents, mask, masked image) is no text-to-image backbone
    ctx["inpaint_dir"] = os.path.join(root, "sd15-inpainting")
    os.makedirs(os.path.join(ctx["inpaint_dir"], "unet"), exist_ok=True)
    with open(os.path.join(ctx["inpaint_dir"], "model_index.json"), "w") as f:
        json.dump({"_class_name": "StableDiffusionInpaintPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}, f)
    with open(os.path.join(ctx["inpaint_dir"], "unet", "config.json"), "w") as f:
        json.dump(
            {"_class_name": "UNet2DConditionModel", "cross_attention_dim": 768, "in_channels": 9, "out_channels": 4}, f
        )
    ctx["marker"] = os.path.join(root, "payload-ran")
    ctx["evil_bin"] = os.path.join(root, "evil_unet.bin")
    with open(ctx["evil_bin"], "wb") as f:
        pickle.dump({"weight": Payload(ctx["marker"])}, f)
    ctx["weights_pkl"] = os.path.join(root, "weights.pkl")
    with open(ctx["weights_pkl"], "wb") as f:
        pickle.dump({}, f)
    ctx["pixart_dir"] = save_tiny_native_pipeline("pixart_alpha", os.path.join(root, "pixart"))
    ctx["sdxl_dir"] = save_tiny_native_pipeline("sdxl", os.path.join(root, "sdxl"))
    ctx["prompts"] = write_prompts(root)
    ctx["empty_prompts"] = os.path.join(root, "empty.txt")
    with open(ctx["empty_prompts"], "w") as f:
        f.write("\n \n")
    ctx["jsonl"] = os.path.join(root, "prompts.jsonl")
    with open(ctx["jsonl"], "w") as f:
        f.write(json.dumps({"text": "a cat"}) + "\n")
    ctx["busy_dir"] = os.path.join(root, "busy")
    os.makedirs(ctx["busy_dir"], exist_ok=True)
    with open(os.path.join(ctx["busy_dir"], "notes.txt"), "w") as f:
        f.write("mine")
    ctx["bad_config"] = os.path.join(root, "bad.yaml")
    with open(ctx["bad_config"], "w") as f:
        f.write("learning_rat: 1e-4\n")
    for key, line in (
        ("fractional_config", "max_train_steps: 2.5\n"),
        ("string_switch_config", "push_to_hub: yes please\n"),
        ("empty_validation_config", "validation_prompts: ['a cat', ' ']\n"),
    ):
        ctx[key] = os.path.join(root, f"{key}.yaml")
        with open(ctx[key], "w") as f:
            f.write(line)
    for key, text in (
        ("null_prompts", '{"text": null}\n'),
        ("number_prompts", '{"text": "a cat"}\n{"text": 3}\n'),
        ("string_line_prompts", '"a cat"\n'),
    ):
        ctx[key] = os.path.join(root, f"{key}.jsonl")
        with open(ctx[key], "w") as f:
            f.write(text)
    ctx["latin1_prompts"] = os.path.join(root, "latin1.txt")
    with open(ctx["latin1_prompts"], "wb") as f:
        f.write("a cat\ncaf\xe9 au lait\n".encode("latin-1"))
    ctx["corrupt_images"] = os.path.join(root, "corrupt-images")
    write_images(ctx["corrupt_images"], n=2, size=8)
    with open(os.path.join(ctx["corrupt_images"], "1.png"), "r+b") as f:
        f.truncate(40)  # the header survives, the pixel data does not
    ctx["student_dir"] = os.path.join(root, "student")
    pipe.save_pretrained(ctx["student_dir"])
    ctx["lora_student_dir"] = os.path.join(root, "lora-student")
    os.makedirs(ctx["lora_student_dir"])
    with open(os.path.join(ctx["lora_student_dir"], "onestep_lora.json"), "w") as f:
        json.dump({"base_model": "PixArt-alpha/PixArt-XL-2-512x512"}, f)
    _broken_teachers(ctx)
    ctx["out"] = os.path.join(root, "out")
    # evaluate: a tiny Inception where clean-fid's file goes, reference images, and a folder of other settings
    from diffusers_onestep.evaluation import GENERATION_NAME
    from diffusers_onestep.testing.evaluation import save_tiny_inception

    ctx["eval_inception_cache"] = os.path.join(root, "inception-cache")
    save_tiny_inception(ctx["eval_inception_cache"])
    ctx["eval_reference"] = write_images(os.path.join(root, "eval-reference"), n=4, size=8)
    ctx["eval_other_settings"] = os.path.join(root, "eval-other-settings")
    os.makedirs(ctx["eval_other_settings"])
    with open(os.path.join(ctx["eval_other_settings"], GENERATION_NAME), "w") as f:
        json.dump(
            {
                "model": ctx["student_dir"],
                "prompts": ctx["prompts"],
                "caption_column": "text",
                "num_images": 4,
                "height": None,
                "width": None,
                "steps": None,
                "guidance": None,
                "seed": 5,
            },
            f,
        )
    ctx["run_dir"] = os.path.join(root, "previous-run")
    _damaged_folders(ctx)
    return ctx


def _damaged_folders(ctx) -> None:
    """Copies of the SDXL folder with one thing broken (unbroken components linked, not copied), and LoRA student
    folders naming a local base (only their onestep_lora.json: the refusals come before anything else is read)."""
    import shutil

    def broken_copy(name, broken_component):
        folder = os.path.join(ctx["root"], name)
        os.makedirs(folder)
        for entry in os.listdir(ctx["sdxl_dir"]):
            source = os.path.join(ctx["sdxl_dir"], entry)
            if entry in ("model_index.json", broken_component):
                continue
            os.symlink(source, os.path.join(folder, entry))
        shutil.copy(os.path.join(ctx["sdxl_dir"], "model_index.json"), folder)
        if broken_component:
            os.makedirs(os.path.join(folder, broken_component))
            shutil.copy(
                os.path.join(ctx["sdxl_dir"], broken_component, "config.json"), folder + f"/{broken_component}"
            )
        return folder

    ctx["missing_weights_dir"] = broken_copy("missing-weights", "unet")
    ctx["damaged_weights_dir"] = broken_copy("damaged-weights", "vae")
    with open(os.path.join(ctx["damaged_weights_dir"], "vae", "diffusion_pytorch_model.safetensors"), "wb") as f:
        f.write(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    ctx["bad_index_dir"] = broken_copy("bad-index", None)
    with open(os.path.join(ctx["bad_index_dir"], "model_index.json"), "w") as f:
        f.write('{"_class_name": "StableDiffusionXLPipeline",')
    for key, base in (("gone_base_lora", os.path.join(ctx["root"], "deleted-teacher")), ("local_base_lora", None)):
        folder = os.path.join(ctx["root"], key.replace("_", "-"))
        os.makedirs(folder)
        with open(os.path.join(folder, "onestep_lora.json"), "w") as f:
            json.dump({"base_model": base or ctx["pixart_dir"], "family": "sdxl", "weight_name": "x.safetensors"}, f)
        ctx[key] = folder


def _broken_teachers(ctx) -> None:
    """Copies of the tiny PixArt teacher, each broken one way: a component folder gone, weights cut short, a config
    that is not JSON, weights only in the fp16 variant."""
    import shutil

    root, teacher = ctx["root"], ctx["pixart_dir"]
    weights = os.path.join("transformer", "diffusion_pytorch_model.safetensors")
    for key in ("teacher_no_vae", "teacher_truncated", "teacher_bad_json", "teacher_fp16_only"):
        ctx[key] = shutil.copytree(teacher, os.path.join(root, key.replace("_", "-")))
    shutil.rmtree(os.path.join(ctx["teacher_no_vae"], "vae"))
    with open(os.path.join(ctx["teacher_truncated"], weights), "r+b") as f:
        f.truncate(os.path.getsize(f.name) // 2)
    with open(os.path.join(ctx["teacher_bad_json"], "vae", "config.json"), "w") as f:
        f.write('{"_class_name": "AutoencoderKL",')
    folder = ctx["teacher_fp16_only"]
    os.replace(
        os.path.join(folder, weights),
        os.path.join(folder, "transformer", "diffusion_pytorch_model.fp16.safetensors"),
    )


def make_previous_run(ctx) -> None:
    """A finished 1-step run (rank 2) for the conflicting-resume case, and folders made from it: damaged copies of
    its checkpoint (each beside an intact copy, the previous complete checkpoint), a run stopped before its first
    checkpoint, and a run whose only checkpoint is damaged."""
    from diffusers_onestep.distill import cli
    from diffusers_onestep.distill.trainer import Trainer

    flags = {
        "--teacher": ctx["pixart_dir"],
        "--prompts": ctx["prompts"],
        "--output_dir": ctx["run_dir"],
        "--resolution": "8",
        **previous_run_flags(),
    }
    argv = [item for flag_and_value in flags.items() for item in flag_and_value]
    config, _ = cli.resolve_args(argv)
    Trainer(config).run()

    checkpoint = os.path.join(ctx["run_dir"], "checkpoint-1")
    damage = {
        "truncated": lambda folder: _truncate(os.path.join(folder, "trainable.safetensors")),
        "no_rng": lambda folder: os.remove(os.path.join(folder, "rng_0.safetensors")),
        "incomplete": lambda folder: os.remove(os.path.join(folder, "trainer_state.json")),
    }
    for kind, damage_fn in damage.items():
        folder = os.path.join(ctx["root"], f"damaged-{kind.replace('_', '-')}")
        shutil.copytree(checkpoint, os.path.join(folder, "checkpoint-1"))
        shutil.copytree(checkpoint, os.path.join(folder, "checkpoint-2"))
        damage_fn(os.path.join(folder, "checkpoint-2"))
        ctx[f"damaged_{kind}"] = os.path.join(folder, "checkpoint-2")
    ctx["unstarted_dir"] = os.path.join(ctx["root"], "unstarted")
    ctx["all_damaged_dir"] = os.path.join(ctx["root"], "all-damaged")
    for folder in (ctx["unstarted_dir"], ctx["all_damaged_dir"]):
        os.makedirs(folder)
        for name in ("training_config.json", "run.json"):
            shutil.copy(os.path.join(ctx["run_dir"], name), os.path.join(folder, name))
    shutil.copytree(checkpoint, os.path.join(ctx["all_damaged_dir"], "checkpoint-1"))
    _truncate(os.path.join(ctx["all_damaged_dir"], "checkpoint-1", "trainable.safetensors"))


def _truncate(path: str) -> None:
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def normalise(message: str, ctx) -> str:
    """Temporary paths are shown as <tmp> so that the doc does not change from run to run, and the list of registered
    methods names only the package's own (other tests register plug-in methods in the same process)."""
    from diffusers_onestep.distill.methods import get_method_class, method_names

    message = message.replace(ctx["root"], "<tmp>")
    registered = ", ".join(method_names())
    shipped = [n for n in method_names() if get_method_class(n).__module__.startswith("diffusers_onestep.")]
    return message.replace(f"registered methods are {registered}.", f"registered methods are {', '.join(shipped)}.")


def write_docs(path: str) -> None:
    import tempfile

    ctx = build_context(tempfile.mkdtemp())
    make_previous_run(ctx)
    lines = [
        "# Refused inputs and their messages",
        "",
        "Every input the project refuses, with the exact message (generated by `python tests/error_cases.py`;",
        "`tests/test_error_matrix.py` checks that this list is complete and current). The training CLI refuses",
        "before any model is loaded or anything is written, and exits with status 2.",
        "",
    ]
    area = None
    for case in all_cases():
        if case.area != area:
            area = case.area
            lines += [f"## {area}", "", "| input | message |", "|---|---|"]
        message = normalise(case.run(ctx), ctx).replace("|", "\\|")
        lines.append(f"| {case.name} | {message} |")
    out = []
    for line in lines:
        if line.startswith("## ") and out and out[-1] != "":
            out.append("")
        out.append(line)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(out) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    write_docs(os.path.join(REPO, "docs", "errors.md"))
    print("wrote docs/errors.md")
