"""OneStepScheduler: the scheduler of a distilled one- or few-step (1-16) student, carrying the student's own timesteps.

Public one-step students are run today with borrowed schedulers and magic numbers (``LCMScheduler`` plus
``timesteps=[399]`` for DMD2, trailing Euler with ``prediction_type="sample"`` for SDXL-Lightning, ...). This
scheduler stores what the student was trained with -- its conditioning timestep(s), its output parameterization and
the noise path -- in ``scheduler_config.json``, so ``pipe(prompt)`` needs no further arguments.

Sampling is the multistep consistency/DMD2 scheme (Song et al. 2023, arXiv 2303.01469, Algorithm 1; DMD2's
multi-step sampling, Yin et al. 2024b, arXiv 2405.14867): at each conditioning timestep predict ``x0``, then re-noise
it to the next conditioning timestep with fresh noise from the caller's generator (``solver="sde"``); the last step
returns ``x0``. ``solver="ode"`` re-noises with the predicted noise instead (DDIM, Song et al. 2021, arXiv 2010.02502,
eq. 12 with eta = 0), which on the flow path is exactly an Euler step of the probability-flow ODE -- the ``"ode"``
solver of the serving engines' ``dmd2_config``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .. import parameterization as param


#: the most conditioning timesteps a student may store: Hyper-SD's 16-step FLUX.1-dev LoRA is the longest published
#: schedule (the trainer's own students take 1-8 timesteps, a separate limit in distill/config.py)
MAX_STEPS = 16
#: multi-step samplers: re-noise with fresh noise (DMD2) or with the predicted noise (deterministic)
SOLVERS = ("sde", "ode")


def timestep_values(timesteps, what: str = "timesteps") -> List[float]:
    """``timesteps`` (a list or tuple of numbers, or a 1-D tensor or array) as floats, or one sentence naming the value:
    a bare number or a string would otherwise be iterated (``"399"`` as 3, 9, 9) or fail deep inside sampling."""
    if isinstance(timesteps, (torch.Tensor, np.ndarray)) and timesteps.ndim == 1:
        timesteps = timesteps.tolist()
    if isinstance(timesteps, (list, tuple)):  # a list of 0-d tensors, e.g. taken from another scheduler's timesteps
        timesteps = [t.item() if isinstance(t, (torch.Tensor, np.ndarray)) and t.ndim == 0 else t for t in timesteps]
    if not isinstance(timesteps, (list, tuple)) or not all(
        isinstance(t, (int, float, np.integer, np.floating)) and not isinstance(t, bool) for t in timesteps
    ):
        raise ValueError(f"`{what}` must be a list of numbers such as [999, 499], got {timesteps!r}.")
    return [float(t) for t in timesteps]


@dataclass
class OneStepSchedulerOutput(BaseOutput):
    """Output of :meth:`OneStepScheduler.step`.

    Args:
        prev_sample (`torch.Tensor` of shape `(batch_size, num_channels, height, width)`):
            The input of the next step: ``x0`` re-noised to the next conditioning timestep, or ``x0`` itself after
            the last step.
        denoised (`torch.Tensor` of shape `(batch_size, num_channels, height, width)`):
            The student's clean-sample prediction ``x0`` at this step.
    """

    prev_sample: torch.Tensor
    denoised: torch.Tensor


class OneStepScheduler(SchedulerMixin, ConfigMixin):
    """Scheduler for distilled one- and few-step students.

    Args:
        conditioning_timesteps (`list[float]`, defaults to `[999]`):
            The timestep(s) the student was trained to denoise from, in the noise path's natural units and in
            descending order: integer steps in `[0, num_train_timesteps)` for `"vp"` (DMD2 SDXL: `[399]`, 4-step:
            `[999, 749, 499, 249]`), sigmas in `(0, 1]` for `"flow"`, angles in `(0, pi/2]` for `"trigflow"`
            (SANA-Sprint: `[1.5708]`). One to sixteen values (Hyper-SD's 16-step FLUX.1-dev LoRA).
        prediction_type (`str`, defaults to `"epsilon"`):
            What the student outputs: `"epsilon"`, `"v_prediction"`, `"sample"`, `"flow_prediction"`, `"trigflow"`
            or `"data_velocity"` (`x0 - eps`, Rectified Flow's and InstaFlow's orientation).
        noise_path (`str`, defaults to `"vp"`):
            `"vp"` (DDPM betas below), `"flow"` (rectified flow) or `"trigflow"` (sCM).
        num_train_timesteps (`int`, defaults to 1000):
            Number of training steps of the VP schedule; the flow path reports `timesteps` as `sigma * this`.
        beta_start, beta_end, beta_schedule, trained_betas, rescale_betas_zero_snr:
            The VP beta schedule, with the meaning of diffusers' DDPM-family schedulers.
        shift (`float`, defaults to 1.0):
            Flow-matching resolution shift (kept for training-time sampling; sampling uses the stored timesteps).
        use_dynamic_shifting, base_shift, max_shift, base_image_seq_len, max_image_seq_len, time_shift_type:
            A resolution-dependent flow shift (FLUX.1), with the meaning of diffusers'
            `FlowMatchEulerDiscreteScheduler`. Unlike a fixed `shift`, it also applies at sampling: the stored
            conditioning timesteps are then unshifted sigmas, shifted at each image's resolution (`set_timesteps`
            takes `image_seq_len` or diffusers' `mu`), as FluxPipeline's `sigmas` are; sigma 1 stays 1.
        sigma_data (`float`, defaults to 0.5):
            TrigFlow data standard deviation.
        solver (`str`, defaults to `"sde"`):
            How multi-step sampling moves from one conditioning timestep to the next: `"sde"` re-noises `x0` with
            fresh noise (DMD2, consistency models), `"ode"` with the noise the student predicted (deterministic:
            DDIM with eta 0, an Euler step on the flow path). One-step sampling is the same for both.
    """

    _compatibles: List[str] = []
    order = 1

    @register_to_config
    def __init__(
        self,
        conditioning_timesteps: Sequence[float] = (999,),
        prediction_type: str = "epsilon",
        noise_path: str = "vp",
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        trained_betas: Optional[Union[np.ndarray, List[float]]] = None,
        rescale_betas_zero_snr: bool = False,
        shift: float = 1.0,
        sigma_data: float = 0.5,
        use_dynamic_shifting: bool = False,
        base_shift: float = 0.5,
        max_shift: float = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        time_shift_type: str = "exponential",
        solver: str = "sde",
    ):
        param.check_prediction_type(prediction_type)
        if solver not in SOLVERS:
            raise ValueError(f"`solver` must be one of {', '.join(map(repr, SOLVERS))}, got {solver!r}.")
        self.path = param.make_noise_path(
            noise_path,
            num_train_timesteps=num_train_timesteps,
            beta_start=beta_start,
            beta_end=beta_end,
            beta_schedule=beta_schedule,
            trained_betas=trained_betas,
            rescale_betas_zero_snr=rescale_betas_zero_snr,
            shift=shift,
            sigma_data=sigma_data,
            use_dynamic_shifting=use_dynamic_shifting,
            base_shift=base_shift,
            max_shift=max_shift,
            base_image_seq_len=base_image_seq_len,
            max_image_seq_len=max_image_seq_len,
            time_shift_type=time_shift_type,
        )
        self.check_timesteps(conditioning_timesteps, what="conditioning_timesteps")
        self.init_noise_sigma = 1.0
        self.num_inference_steps: Optional[int] = None
        self.timesteps: Optional[torch.Tensor] = None
        self.path_timesteps: Optional[torch.Tensor] = None
        self._step_index: Optional[int] = None
        self._begin_index: Optional[int] = None
        # The last schedule set_timesteps built, reused while callers ask for the same one (a pipeline asks once per
        # call): ((natural timesteps, device), path_timesteps, timesteps, {device: [(alpha, sigma) per step]}).
        self._schedule = None

    # ------------------------------------------------------------------------------------------------------------
    # construction helpers
    # ------------------------------------------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """``ConfigMixin.from_config``, also for a native scheduler's config: when neither the config nor ``kwargs``
        name a ``noise_path``, the path and the matching parameterization are read off the config by
        :func:`~diffusers_onestep.parameterization.noise_path_from_scheduler_config` -- ``FlowMatchEulerDiscreteScheduler``
        and DPM-Solver's ``use_flow_sigmas`` give ``"flow"`` (with their ``shift``/``flow_shift`` and
        ``"flow_prediction"``), ``SCMScheduler`` gives ``"trigflow"``, anything else ``"vp"`` with its betas."""
        if isinstance(config, dict) and "noise_path" not in config:
            native = dict(config)
            path = param.noise_path_from_scheduler_config(native, kind=kwargs.get("noise_path"))
            # Every value of the source schedule is passed on explicitly: diffusers would drop the ones the source
            # class left at its defaults (`_use_default_values`), and ours differ (DDPM's linear betas would become
            # SDXL's). Keys OneStepScheduler does not have are left out instead of being warned about.
            accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
            config = {k: v for k, v in native.items() if k in accepted}
            config.update(path.describe())
            config["prediction_type"] = param.prediction_type_from_scheduler_config(native, path.kind)
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    @classmethod
    def from_noise_path(
        cls,
        noise_path: param.NoisePath,
        conditioning_timesteps: Sequence[float],
        prediction_type: str,
        solver: str = "sde",
    ) -> "OneStepScheduler":
        """A scheduler for a student trained on ``noise_path`` (e.g. its teacher adapter's path)."""
        config = {k: v for k, v in noise_path.describe().items() if k != "noise_path"}
        return cls(
            conditioning_timesteps=list(conditioning_timesteps),
            prediction_type=prediction_type,
            noise_path=noise_path.kind,
            solver=solver,
            **config,
        )

    # ------------------------------------------------------------------------------------------------------------
    # timesteps
    # ------------------------------------------------------------------------------------------------------------

    def check_timesteps(self, timesteps: Sequence[float], what: str = "timesteps") -> List[float]:
        values = timestep_values(timesteps, what)
        if not 1 <= len(values) <= MAX_STEPS:
            raise ValueError(f"`{what}` must hold 1 to {MAX_STEPS} timesteps, got {len(values)}: {values}.")
        if any(b >= a for a, b in zip(values, values[1:])):
            raise ValueError(f"`{what}` must be strictly decreasing, got {values}.")
        lo, hi = self.path.t_min, self.path.t_max
        kind = self.path.kind
        if kind == "vp" and any(v != int(v) for v in values):
            raise ValueError(f"`{what}` of a VP student must be integer steps, got {values}.")
        if any(not (lo < v <= hi + 1e-5) for v in values):
            raise ValueError(f"`{what}` of a {kind} student must lie in ({lo:g}, {hi:.5g}], got {values}.")
        if self.config.prediction_type == "epsilon":
            # x0 = (x_t - sigma eps) / alpha: undefined where the path has no signal left (flow t=1, TrigFlow pi/2,
            # zero-terminal-SNR VP t=999 -- Lin et al. 2024 switch to v-prediction for exactly this reason).
            alpha, _ = self.path.alpha_sigma(torch.tensor(values, dtype=torch.float64))
            bad = [v for v, a in zip(values, alpha.tolist()) if abs(a) < 1e-3]
            if bad:
                raise ValueError(
                    f"`{what}` {bad} leave no signal on the {kind} path (alpha_t < 1e-3), where an epsilon-prediction "
                    "student cannot recover x0; use an earlier timestep or a v/sample/flow/trigflow prediction type."
                )
        return values

    @property
    def max_inference_steps(self) -> int:
        """The most steps this student supports: the number of conditioning timesteps it was trained at."""
        return len(self.config.conditioning_timesteps)

    def select_timesteps(self, num_inference_steps: Optional[int] = None) -> List[float]:
        """Natural timesteps for ``num_inference_steps`` (``None``: all stored ones).

        Fewer steps than stored take evenly spaced entries from the top, as LCMScheduler does on its grid
        (4-step ``[999, 749, 499, 249]`` at 2 steps -> ``[999, 499]``).
        """
        stored = [float(t) for t in self.config.conditioning_timesteps]
        if num_inference_steps is None:
            return stored
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)):
            raise ValueError(f"`num_inference_steps` must be an integer, got {num_inference_steps!r}.")
        if not 1 <= num_inference_steps <= len(stored):
            raise ValueError(
                f"This student supports 1 to {len(stored)} inference steps (it was trained at timesteps {stored}), "
                f"got num_inference_steps={num_inference_steps}."
            )
        indices = np.floor(np.linspace(0, len(stored), num_inference_steps, endpoint=False)).astype(int)
        return [stored[i] for i in indices]

    def set_timesteps(
        self,
        num_inference_steps: Optional[int] = None,
        device: Union[str, torch.device, None] = None,
        timesteps: Optional[Sequence[float]] = None,
        image_seq_len: Optional[int] = None,
        mu: Optional[float] = None,
    ):
        """Set the sampling timesteps.

        Args:
            num_inference_steps (`int`, *optional*):
                Number of steps; `None` runs every stored conditioning timestep.
            device (`str` or `torch.device`, *optional*):
                Device of `self.timesteps`.
            timesteps (`list[float]`, *optional*):
                Override the stored timesteps (natural units of the path, descending, 1-16 values). Mutually
                exclusive with `num_inference_steps`.
            image_seq_len (`int`, *optional*):
                Latent tokens of the image (after patchifying); with `use_dynamic_shifting` the timesteps are shifted
                at this resolution (:meth:`~diffusers_onestep.parameterization.FlowPath.timesteps_at`), as
                `FlowMatchEulerDiscreteScheduler` shifts sigmas; ignored otherwise.
            mu (`float`, *optional*):
                The shift exponent itself (diffusers' `set_timesteps(mu=...)`, FluxPipeline's `calculate_shift`),
                instead of `image_seq_len`.
        """
        if timesteps is not None and num_inference_steps is not None and num_inference_steps != len(timesteps):
            raise ValueError("Pass either `num_inference_steps` or `timesteps`, not both.")
        if timesteps is not None:
            if isinstance(timesteps, torch.Tensor):
                timesteps = timesteps.tolist()
            natural = self.check_timesteps(timesteps, what="timesteps")
        else:
            natural = self.select_timesteps(num_inference_steps)
        if self.path.resolution_dependent:
            if image_seq_len is None and mu is None:
                raise ValueError(
                    "This student's timesteps shift with the resolution (use_dynamic_shifting); pass `image_seq_len` "
                    "(or `mu`) to `set_timesteps`."
                )
            natural = self.path.timesteps_at(natural, image_seq_len, mu=mu)
        key = (tuple(natural), device)
        if self._schedule is None or self._schedule[0] != key:
            path_timesteps = torch.tensor(natural, dtype=torch.float64)
            scheduler_timesteps = self.path.to_scheduler_timestep(path_timesteps)
            if self.path.kind == "vp":
                scheduler_timesteps = scheduler_timesteps.round().long().to(device)
            else:
                scheduler_timesteps = scheduler_timesteps.to(device=device, dtype=torch.float32)
            self._schedule = (key, path_timesteps, scheduler_timesteps, {})
        _, self.path_timesteps, self.timesteps, _ = self._schedule
        self.num_inference_steps = len(natural)
        self._step_index = None
        self._begin_index = None

    def _step_coefficients(self, index: int, device: torch.device) -> param.Coefficients:
        """``path.alpha_sigma`` at ``path_timesteps[index]`` on ``device``, computed (in float64, as every conversion
        is) once per schedule and device instead of at every step of every call; each entry is evaluated exactly as
        :func:`~diffusers_onestep.parameterization.to_x0` would evaluate it, so results are bit-identical."""
        if self._schedule is None or self._schedule[1] is not self.path_timesteps:  # set by hand: no cache
            return self.path.alpha_sigma(self.path_timesteps[index].to(device), device=device)
        per_device = self._schedule[3]
        coefficients = per_device.get(device)
        if coefficients is None:
            coefficients = [self.path.alpha_sigma(t.to(device), device=device) for t in self.path_timesteps]
            per_device[device] = coefficients
        return coefficients[index]

    def to_path_time(self, timestep) -> torch.Tensor:
        """A ``timesteps`` entry (scheduler units) as natural path time, e.g. for an adapter's ``denoise``."""
        return self.path.from_scheduler_timestep(torch.as_tensor(timestep).detach().cpu())

    # ------------------------------------------------------------------------------------------------------------
    # step bookkeeping (diffusers conventions)
    # ------------------------------------------------------------------------------------------------------------

    @property
    def step_index(self) -> Optional[int]:
        return self._step_index

    @property
    def begin_index(self) -> Optional[int]:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0):
        self._begin_index = begin_index

    def index_for_timestep(self, timestep) -> int:
        value = torch.as_tensor(timestep).detach().flatten()[0].to(torch.float64).cpu()
        matches = torch.nonzero(torch.isclose(self.timesteps.cpu().to(torch.float64), value, rtol=0, atol=1e-4))
        if len(matches) == 0:
            raise ValueError(
                f"Timestep {value.item():g} is not one of this scheduler's timesteps {self.timesteps.tolist()}."
            )
        return int(matches[0])

    def _init_step_index(self, timestep):
        self._step_index = self.index_for_timestep(timestep) if self.begin_index is None else self._begin_index

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """Identity: students take ``x_t`` unscaled (kept for interchangeability with other schedulers)."""
        return sample

    # ------------------------------------------------------------------------------------------------------------
    # step
    # ------------------------------------------------------------------------------------------------------------

    def step(
        self,
        model_output: torch.Tensor,
        timestep: Union[int, float, torch.Tensor],
        sample: torch.Tensor,
        generator: Optional[torch.Generator] = None,
        return_dict: bool = True,
    ) -> Union[OneStepSchedulerOutput, Tuple[torch.Tensor, torch.Tensor]]:
        """Predict ``x0`` at ``timestep`` and move to the next conditioning timestep.

        Args:
            model_output (`torch.Tensor`): the student's output, of type `config.prediction_type`.
            timestep (`int`, `float` or `torch.Tensor`): the current entry of `self.timesteps`.
            sample (`torch.Tensor`): the current noisy sample `x_t`.
            generator (`torch.Generator`, *optional*): draws the re-noising noise of multi-step sampling.
            return_dict (`bool`): return a :class:`OneStepSchedulerOutput` instead of a tuple.

        Returns:
            :class:`OneStepSchedulerOutput` or `(prev_sample, denoised)`.
        """
        if self.timesteps is None:
            raise ValueError("`set_timesteps` must be called before `step`.")
        if self.step_index is None:
            self._init_step_index(timestep)
        if self.step_index >= len(self.timesteps):
            raise ValueError(f"All {len(self.timesteps)} steps have been taken; call `set_timesteps` again.")

        # 1. x0 from the student's output at its conditioning timestep
        index = self.step_index
        t = self.path_timesteps[index]
        coefficients = self._step_coefficients(index, sample.device)
        last = index == len(self.timesteps) - 1
        if last or self.config.solver == "sde":
            denoised = param.to_x0(model_output, sample, t, self.path, self.config.prediction_type, coefficients)
        else:
            denoised, predicted_noise = param.to_x0_and_epsilon(
                model_output, sample, t, self.path, self.config.prediction_type, coefficients
            )

        # 2. re-noise to the next conditioning timestep (not on the last step)
        if last:
            prev_sample = denoised
        else:
            if self.config.solver == "ode":
                noise = predicted_noise
            else:
                noise = randn_tensor(
                    model_output.shape, generator=generator, device=model_output.device, dtype=denoised.dtype
                )
            prev_sample = param.add_noise(
                denoised,
                noise,
                self.path_timesteps[index + 1],
                self.path,
                self._step_coefficients(index + 1, denoised.device),
            )

        self._step_index += 1
        if not return_dict:
            return prev_sample, denoised
        return OneStepSchedulerOutput(prev_sample=prev_sample, denoised=denoised)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Noise ``original_samples`` to ``timesteps`` (scheduler units, one per sample)."""
        return param.add_noise(original_samples, noise, self.to_path_time(timesteps), self.path)

    def __len__(self) -> int:
        return self.config.num_train_timesteps
