"""Noise paths and prediction-type conversions -- the only place in the project that converts between them.

Every supported backbone noises a clean latent ``x0`` along a Gaussian path ``x_t = alpha_t * x0 + sigma_t * eps``
(Ho et al. 2020, arXiv 2006.11239; Kingma et al. 2021, arXiv 2107.00630) and predicts one of several quantities at
``(x_t, t)``. Everything downstream (the one-step scheduler, the pipeline, every distillation loss) asks this module
for ``x0`` / ``eps`` and never converts inline.

Paths and their *natural* time variable ``t``:

=============  ==========================================  ==============================  =======================
path           alpha_t, sigma_t                            t                               scheduler ``timesteps``
=============  ==========================================  ==============================  =======================
``vp``         sqrt(alphā_t), sqrt(1 - alphā_t)            index in [0, N-1] (SD, SDXL,     t
                                                           PixArt)
``flow``       1 - t, t  (rectified flow)                  sigma in [0, 1] (SANA, SD3)      t * N  (diffusers'
                                                                                           FlowMatchEuler)
``trigflow``   cos t, sin t  (sCM, in units of sigma_data) t in [0, pi/2] (SANA-Sprint)     t
=============  ==========================================  ==============================  =======================

Prediction types use diffusers' names (the ``prediction_type`` of its schedulers):

* ``epsilon``: ``eps``;  ``sample``: ``x0``;
* ``v_prediction``: ``v = alpha * eps - sigma * x0`` (Salimans & Ho 2022, eq. 3 of "Progressive Distillation");
* ``flow_prediction``: the rectified-flow velocity ``v = eps - x0`` (Liu et al. 2022);
* ``trigflow``: the TrigFlow output ``F = cos(t) eps - sin(t) x0`` (Lu & Song 2024, sCM eq. 6); algebraically the
  v-prediction of the trig path;
* ``data_velocity``: the velocity toward the data, ``v = x0 - eps``, the negative of ``flow_prediction``: Rectified
  Flow's own orientation (Liu et al. 2022, arXiv 2209.03003, which integrates ``dZ = v dt`` from noise to data) and
  InstaFlow's (Liu et al. 2023, arXiv 2309.06380; its ``RectifiedFlowPipeline`` steps ``latents + dt * v``).

All conversions run in float64 (DMD2 ``get_x0_from_noise`` does the same) and return the input dtype.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import List, Optional, Sequence, Tuple, Union

import torch


PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow_prediction", "trigflow", "data_velocity")
NOISE_PATHS = ("vp", "flow", "trigflow")

# DMD/DMD2 sample the noise level of the score terms in [0.02 T, 0.98 T] (DMD, arXiv 2311.18828; DMD2's
# min/max_step_percent defaults, arXiv 2405.14867).
DEFAULT_TRAINING_TIME_RANGE = (0.02, 0.98)

TimeLike = Union[float, int, torch.Tensor, Sequence[float]]


def _compute_dtype(device: torch.device) -> torch.dtype:
    # MPS has no float64; everything else computes the conversions in double precision.
    return torch.float32 if device.type == "mps" else torch.float64


def _as_time(t: TimeLike, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(t, torch.Tensor):
        return t.to(device=device, dtype=dtype)
    return torch.as_tensor(t, device=device, dtype=dtype)


def _broadcast(coef: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Shape a per-sample (``[B]``) or scalar coefficient so that it broadcasts over ``like`` (``[B, ...]``)."""
    if coef.ndim == 0:
        return coef
    if coef.ndim == 1 and like.ndim >= 1 and coef.shape[0] in (1, like.shape[0]):
        return coef.reshape(coef.shape[0], *([1] * (like.ndim - 1)))
    return coef


class NoisePath:
    """A Gaussian noise path ``x_t = alpha_t x0 + sigma_t eps`` with a natural time variable ``t``."""

    kind: str = ""
    #: smallest and largest natural time of the path
    t_min: float = 0.0
    t_max: float = 1.0

    def alpha_sigma(self, t: TimeLike, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(alpha_t, sigma_t)`` in float64 (float32 on MPS)."""
        raise NotImplementedError

    def to_scheduler_timestep(self, t: torch.Tensor) -> torch.Tensor:
        """Natural time -> the ``timesteps`` value a diffusers scheduler/pipeline of this family uses."""
        return t

    def from_scheduler_timestep(self, timestep: TimeLike) -> torch.Tensor:
        """Inverse of :meth:`to_scheduler_timestep`."""
        return torch.as_tensor(timestep, dtype=torch.float64)

    def training_time(self, u: torch.Tensor) -> torch.Tensor:
        """Map ``u`` in [0, 1] (0 = clean, 1 = pure noise) to natural time, including any schedule shift."""
        return self.t_min + u * (self.t_max - self.t_min)

    @property
    def resolution_dependent(self) -> bool:
        """Whether the path's schedule depends on the image's size (a flow path with dynamic shifting, FLUX.1)."""
        return False

    def at_image_seq_len(self, image_seq_len: Optional[int]) -> "NoisePath":
        """The path of one resolution (``image_seq_len`` latent tokens after patchifying): itself unless
        :attr:`resolution_dependent`."""
        return self

    def timesteps_at(
        self, timesteps: Sequence[float], image_seq_len: Optional[int] = None, mu: Optional[float] = None
    ) -> List[float]:
        """The natural times a student's stored conditioning ``timesteps`` stand for in an image of ``image_seq_len``
        tokens: the stored values themselves, except on a :attr:`resolution_dependent` path (see
        :meth:`FlowPath.timesteps_at`)."""
        return [float(t) for t in timesteps]

    def sample_training_times(
        self,
        batch_size: int,
        generator: Optional[torch.Generator] = None,
        time_range: Tuple[float, float] = DEFAULT_TRAINING_TIME_RANGE,
        device=None,
    ) -> torch.Tensor:
        """Draw times for the score terms; ``time_range`` is a fraction of the path (DMD: 0.02-0.98)."""
        lo, hi = time_range
        u = lo + (hi - lo) * torch.rand(batch_size, generator=generator, dtype=torch.float64)
        return self.training_time(u).to(device or "cpu")

    def describe(self) -> dict:
        return {"noise_path": self.kind}

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.describe().items() if k != "noise_path")
        return f"{type(self).__name__}({fields})"


class VPPath(NoisePath):
    """Discrete variance-preserving path of DDPM (Ho et al. 2020): ``alpha_t = sqrt(alphā_t)``.

    ``t`` is the training-step index in ``[0, N-1]``; fractional ``t`` interpolates ``log alphā`` linearly.
    """

    kind = "vp"

    def __init__(self, alphas_cumprod: torch.Tensor, beta_config: Optional[dict] = None):
        alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten()
        if alphas_cumprod.numel() < 2 or not torch.all((alphas_cumprod > 0) & (alphas_cumprod <= 1)):
            raise ValueError("alphas_cumprod must hold at least two values in (0, 1].")
        self.alphas_cumprod = alphas_cumprod
        self._log_alphas_cumprod = torch.log(alphas_cumprod)
        #: the beta-schedule arguments the path was built from (written into scheduler configs)
        self.beta_config = dict(beta_config or {})
        self.num_train_timesteps = alphas_cumprod.numel()
        self.t_min = 0.0
        self.t_max = float(self.num_train_timesteps - 1)

    @classmethod
    def from_betas(
        cls,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Optional[Sequence[float]] = None,
        rescale_betas_zero_snr: bool = False,
    ) -> "VPPath":
        """Build the path exactly as diffusers' DDPM-family schedulers build ``alphas_cumprod``."""
        from diffusers import DDPMScheduler

        scheduler = DDPMScheduler(
            num_train_timesteps=num_train_timesteps,
            beta_start=beta_start,
            beta_end=beta_end,
            beta_schedule=beta_schedule,
            trained_betas=trained_betas,
            rescale_betas_zero_snr=rescale_betas_zero_snr,
        )
        alphas_cumprod = scheduler.alphas_cumprod.to(torch.float64)
        if rescale_betas_zero_snr:
            # Zero terminal SNR makes alphā_{N-1} exactly 0; diffusers uses 2**-24 for the same reason.
            alphas_cumprod[-1] = 2**-24
        beta_config = {
            "num_train_timesteps": num_train_timesteps,
            "beta_start": beta_start,
            "beta_end": beta_end,
            "beta_schedule": beta_schedule,
            "trained_betas": list(trained_betas) if trained_betas is not None else None,
            "rescale_betas_zero_snr": rescale_betas_zero_snr,
        }
        return cls(alphas_cumprod, beta_config)

    @classmethod
    def from_scheduler_config(cls, config) -> "VPPath":
        get = config.get if hasattr(config, "get") else (lambda k, d=None: getattr(config, k, d))
        return cls.from_betas(
            num_train_timesteps=get("num_train_timesteps", 1000),
            beta_start=get("beta_start", 0.0001),
            beta_end=get("beta_end", 0.02),
            beta_schedule=get("beta_schedule", "linear"),
            trained_betas=get("trained_betas", None),
            rescale_betas_zero_snr=get("rescale_betas_zero_snr", False),
        )

    def alpha_sigma(self, t, device=None):
        t_tensor = t if isinstance(t, torch.Tensor) else torch.as_tensor(t)
        device = device or t_tensor.device
        dtype = _compute_dtype(torch.device(device))
        t64 = t_tensor.to(device=device, dtype=dtype)
        if torch.any((t64 < self.t_min) | (t64 > self.t_max)):
            raise ValueError(f"VP timesteps must lie in [0, {self.num_train_timesteps - 1}], got {t_tensor.tolist()}.")
        log_ac = self._log_alphas_cumprod.to(device=device, dtype=dtype)
        lower = torch.floor(t64).long().clamp(max=self.num_train_timesteps - 1)
        upper = (lower + 1).clamp(max=self.num_train_timesteps - 1)
        frac = t64 - lower.to(dtype)
        alpha_bar = torch.exp(log_ac[lower] * (1 - frac) + log_ac[upper] * frac)
        return alpha_bar.sqrt(), (1 - alpha_bar).sqrt()

    def from_scheduler_timestep(self, timestep):
        return torch.as_tensor(timestep).to(torch.float64)

    def sample_training_times(self, batch_size, generator=None, time_range=DEFAULT_TRAINING_TIME_RANGE, device=None):
        # DMD2 draws integer steps: randint(0.02 N, 0.98 N + 1) (its official code's distribution-matching loss).
        lo = int(round(time_range[0] * self.num_train_timesteps))
        hi = min(int(round(time_range[1] * self.num_train_timesteps)), self.num_train_timesteps - 1)
        return torch.randint(lo, hi + 1, (batch_size,), generator=generator).to(device or "cpu")

    def training_time(self, u):
        return torch.round(u * self.t_max)

    def describe(self):
        return {"noise_path": self.kind, "num_train_timesteps": self.num_train_timesteps, **self.beta_config}


@dataclass(frozen=True)
class DynamicShift:
    """Resolution-dependent flow shift (Esser et al. 2024, arXiv 2403.03206, its resolution-dependent shifting of
    timestep schedules; FLUX.1; SD3.5): ``mu`` is linear in the image sequence length ``n``, through
    ``(base_image_seq_len, base_shift)`` and ``(max_image_seq_len, max_shift)``, and the shift is ``exp(mu)``
    (``time_shift_type="exponential"``) or ``mu`` (``"linear"``).

    The fields and formulas are those of diffusers' ``FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)``
    (its ``time_shift``) and of ``calculate_shift`` in the FLUX pipeline, which computes ``mu``.
    """

    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    time_shift_type: str = "exponential"

    def __post_init__(self):
        if self.time_shift_type not in ("exponential", "linear"):
            raise ValueError(f"time_shift_type must be 'exponential' or 'linear', got {self.time_shift_type!r}.")
        if self.max_image_seq_len == self.base_image_seq_len:
            raise ValueError("max_image_seq_len and base_image_seq_len must differ (mu is a line through both).")

    def mu(self, image_seq_len: int) -> float:
        """``mu = m n + b`` with ``m = (max_shift - base_shift) / (max_seq - base_seq)``, ``b = base_shift - m base_seq``."""
        m = (self.max_shift - self.base_shift) / (self.max_image_seq_len - self.base_image_seq_len)
        b = self.base_shift - m * self.base_image_seq_len
        return image_seq_len * m + b

    def shift(self, image_seq_len: int) -> float:
        """The fixed shift ``s`` at this resolution: ``exp(mu)`` / ``mu`` turn diffusers' ``time_shift(mu, 1, t)``
        into ``s t / (1 + (s - 1) t)``."""
        return self.shift_of_mu(self.mu(image_seq_len))

    def shift_of_mu(self, mu: float) -> float:
        """The fixed shift of a given ``mu`` (what diffusers' ``set_timesteps(mu=...)`` takes)."""
        return math.exp(mu) if self.time_shift_type == "exponential" else mu

    def describe(self) -> dict:
        return {"use_dynamic_shifting": True, **asdict(self)}


class FlowPath(NoisePath):
    """Rectified-flow path ``x_t = (1 - t) x0 + t eps`` (Liu et al. 2022; SANA, SD3), ``t = sigma`` in [0, 1].

    ``shift`` is the resolution shift ``t' = s t / (1 + (s - 1) t)`` used when sampling training times
    (Esser et al. 2024, eq. 23; diffusers ``FlowMatchEulerDiscreteScheduler(shift=...)``). With ``dynamic_shift``
    the shift depends on the image sequence length (FLUX.1, SD3.5): :meth:`at_image_seq_len` gives the fixed-shift
    path of one resolution. The shift only moves where training times are drawn; ``alpha_t, sigma_t`` are the same.
    """

    kind = "flow"

    def __init__(
        self, shift: float = 1.0, num_train_timesteps: int = 1000, dynamic_shift: Optional[DynamicShift] = None
    ):
        if shift <= 0:
            raise ValueError(f"The flow shift must be positive, got {shift}.")
        self.shift = float(shift)
        self.num_train_timesteps = int(num_train_timesteps)
        #: resolution-dependent shift; ``shift`` is then the config's value, unused as diffusers leaves it unused
        self.dynamic_shift = dynamic_shift
        self.t_min, self.t_max = 0.0, 1.0

    @property
    def resolution_dependent(self) -> bool:
        return self.dynamic_shift is not None

    def at_image_seq_len(self, image_seq_len: Optional[int]) -> "FlowPath":
        """The fixed-shift path at an image sequence length (latent tokens after patchifying)."""
        if self.dynamic_shift is None:
            return self
        if image_seq_len is None:
            raise ValueError(
                "This flow path's shift depends on the resolution (dynamic shifting); give the image sequence length."
            )
        return self.at_mu(self.dynamic_shift.mu(image_seq_len))

    def at_mu(self, mu: float) -> "FlowPath":
        """The fixed-shift path of a dynamic-shift path at a given ``mu`` (diffusers' ``set_timesteps(mu=...)``)."""
        if self.dynamic_shift is None:
            return self
        return FlowPath(shift=self.dynamic_shift.shift_of_mu(mu), num_train_timesteps=self.num_train_timesteps)

    def timesteps_at(
        self, timesteps: Sequence[float], image_seq_len: Optional[int] = None, mu: Optional[float] = None
    ) -> List[float]:
        """With dynamic shifting, a student's stored conditioning timesteps are *unshifted* sigmas, shifted at the
        image's resolution -- what ``FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=..., mu=...)`` does with the
        sigmas FluxPipeline passes it, so one stored schedule runs at every size as FLUX.1's own sampler would; both
        sampling (:class:`~diffusers_onestep.OneStepScheduler`) and training (the student's conditioning times at the
        training resolution) read them so. ``mu`` (diffusers' argument) replaces ``image_seq_len`` when given. A fixed
        shift is resolution-independent: stored timesteps are then the times themselves (already shifted)."""
        if self.dynamic_shift is None:
            return [float(t) for t in timesteps]
        fixed = self.at_mu(mu) if mu is not None else self.at_image_seq_len(image_seq_len)
        shifted = fixed.shift_time(torch.tensor([float(t) for t in timesteps], dtype=torch.float64))
        return [float(t) for t in shifted]

    def alpha_sigma(self, t, device=None):
        t_tensor = t if isinstance(t, torch.Tensor) else torch.as_tensor(t)
        device = device or t_tensor.device
        t64 = t_tensor.to(device=device, dtype=_compute_dtype(torch.device(device)))
        if torch.any((t64 < 0) | (t64 > 1)):
            raise ValueError(f"Flow times (sigmas) must lie in [0, 1], got {t_tensor.tolist()}.")
        return 1 - t64, t64

    def shift_time(self, t: torch.Tensor) -> torch.Tensor:
        if self.dynamic_shift is not None:
            raise ValueError(
                "This flow path's shift depends on the resolution (dynamic shifting); take the path of one "
                "resolution with `path.at_image_seq_len(n)` first."
            )
        return self.shift * t / (1 + (self.shift - 1) * t)

    def training_time(self, u):
        return self.shift_time(u)

    def to_scheduler_timestep(self, t):
        return t * self.num_train_timesteps

    def from_scheduler_timestep(self, timestep):
        return torch.as_tensor(timestep).to(torch.float64) / self.num_train_timesteps

    def describe(self):
        described = {"noise_path": self.kind, "shift": self.shift, "num_train_timesteps": self.num_train_timesteps}
        if self.dynamic_shift is not None:  # only then: fixed-shift paths describe themselves as before
            described.update(self.dynamic_shift.describe())
        return described


class TrigFlowPath(NoisePath):
    """TrigFlow path of sCM (Lu & Song 2024): ``x_t = cos(t) x0 + sin(t) eps`` in units of ``sigma_data``.

    SANA-Sprint's sample space is ``sigma_data`` times the VAE latent; this module works in latent units, so
    ``sigma_data`` only matters when a model is fed sample-space tensors.
    """

    kind = "trigflow"

    def __init__(self, sigma_data: float = 0.5):
        self.sigma_data = float(sigma_data)
        self.t_min, self.t_max = 0.0, math.pi / 2

    def alpha_sigma(self, t, device=None):
        t_tensor = t if isinstance(t, torch.Tensor) else torch.as_tensor(t)
        device = device or t_tensor.device
        t64 = t_tensor.to(device=device, dtype=_compute_dtype(torch.device(device)))
        # diffusers stores pi/2 as 1.57080, a hair above it.
        if torch.any((t64 < 0) | (t64 > math.pi / 2 + 1e-5)):
            raise ValueError(f"TrigFlow times must lie in [0, pi/2], got {t_tensor.tolist()}.")
        return torch.cos(t64), torch.sin(t64)

    def describe(self):
        return {"noise_path": self.kind, "sigma_data": self.sigma_data}


def make_noise_path(noise_path: str, **config) -> NoisePath:
    """Build a path from its name and a (scheduler) config; unknown keys are ignored."""
    if noise_path == "vp":
        return VPPath.from_scheduler_config(config)
    if noise_path == "flow":
        dynamic = None
        if config.get("use_dynamic_shifting"):
            dynamic = DynamicShift(**{f.name: config[f.name] for f in fields(DynamicShift) if f.name in config})
        return FlowPath(
            shift=config.get("shift", 1.0),
            num_train_timesteps=config.get("num_train_timesteps", 1000),
            dynamic_shift=dynamic,
        )
    if noise_path == "trigflow":
        return TrigFlowPath(sigma_data=config.get("sigma_data", 0.5))
    raise ValueError(f"Unknown noise path {noise_path!r}; expected one of {', '.join(NOISE_PATHS)}.")


def noise_path_kind_of_scheduler_config(config) -> str:
    """The kind of path a scheduler config describes: its ``noise_path`` (OneStepScheduler configs); ``"trigflow"``
    for ``SCMScheduler``; ``"flow"`` for ``FlowMatch*`` schedulers (a live scheduler's config has no ``_class_name``:
    they are the ones with ``use_dynamic_shifting``), DPM-Solver's ``use_flow_sigmas`` and flow predictions;
    ``"vp"`` for everything else (the DDPM family)."""
    if config.get("noise_path"):
        return config["noise_path"]
    name = config.get("_class_name", "") or ""
    if name == "SCMScheduler" or config.get("prediction_type") == "trigflow":
        return "trigflow"
    flow_match = name.startswith("FlowMatch") or "use_dynamic_shifting" in config
    if flow_match or config.get("use_flow_sigmas") or config.get("prediction_type") == "flow_prediction":
        return "flow"
    return "vp"


def noise_path_from_scheduler_config(config, kind: Optional[str] = None) -> NoisePath:
    """The noise path of a scheduler config -- a OneStepScheduler's or any diffusers scheduler's -- the one place
    where a scheduler config becomes a path (OneStepScheduler.from_config, every family adapter, the loader).

    Args:
        config: the scheduler config (``scheduler.config`` or ``scheduler_config.json`` as a dict).
        kind: the kind of path to read where the config does not name one with a ``noise_path`` key (a family
            adapter's ``noise_path_kind``; ``OneStepScheduler.from_config(..., noise_path=...)``); ``None`` reads it
            off the config (:func:`noise_path_kind_of_scheduler_config`).

    Values the config leaves out take diffusers' DDPM defaults (VP), shift 1 (flow) and ``sigma_data`` 0.5 (TrigFlow);
    a flow config's shift is ``shift`` (FlowMatchEuler) or ``flow_shift`` (DPM-Solver's flow variant).
    """
    config = dict(config or {})
    kind = config.pop("noise_path", None) or kind or noise_path_kind_of_scheduler_config(config)
    if kind == "flow":
        config["shift"] = config.get("shift") or config.get("flow_shift") or 1.0
    return make_noise_path(kind, **config)


def prediction_type_from_scheduler_config(config, kind: str) -> str:
    """What a model on a path of ``kind`` predicts, read off the scheduler config it came with: a OneStepScheduler
    config names the student's parameterization; a native one the teacher's, where flow schedulers name none (or
    DPM-Solver's default ``"epsilon"``, which its flow variant does not use) and mean ``"flow_prediction"``."""
    stated = config.get("prediction_type")
    if config.get("noise_path"):
        return stated or "epsilon"
    if kind == "flow":
        return stated if stated not in (None, "epsilon") else "flow_prediction"
    if kind == "trigflow":
        return stated or "trigflow"
    return stated or "epsilon"


def check_prediction_type(prediction_type: str) -> str:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"Unknown prediction_type {prediction_type!r}; expected one of {', '.join(PREDICTION_TYPES)}."
        )
    return prediction_type


# ----------------------------------------------------------------------------------------------------------------
# Conversions (standard Gaussian-path algebra). Each takes tensors ``[B, ...]`` and a time that is a scalar or ``[B]``.
# ----------------------------------------------------------------------------------------------------------------


#: ``(alpha_t, sigma_t)`` as :meth:`NoisePath.alpha_sigma` returns them for a time ``t`` on a device
Coefficients = Tuple[torch.Tensor, torch.Tensor]


def _coefficients(path: NoisePath, t: TimeLike, like: torch.Tensor, coefficients: Optional[Coefficients] = None):
    if coefficients is None:
        t = t.to(like.device) if isinstance(t, torch.Tensor) else _as_time(t, like.device, torch.float64)
        coefficients = path.alpha_sigma(t, device=like.device)
    alpha, sigma = coefficients
    return _broadcast(alpha, like), _broadcast(sigma, like)


def add_noise(
    x0: torch.Tensor, noise: torch.Tensor, t: TimeLike, path: NoisePath, coefficients: Optional[Coefficients] = None
) -> torch.Tensor:
    """``x_t = alpha_t x0 + sigma_t eps``.

    ``coefficients``, here and in the conversions below, is ``path.alpha_sigma(t, device=x0.device)`` computed ahead
    (a sampler evaluates the same few times on every call); it then replaces the lookup and ``t`` is not read.
    """
    alpha, sigma = _coefficients(path, t, x0, coefficients)
    dtype = alpha.dtype
    return (alpha * x0.to(dtype) + sigma * noise.to(dtype)).to(x0.dtype)


def _x0_of(y: torch.Tensor, x_t: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, prediction_type: str):
    """``x0`` from a prediction ``y`` at ``x_t`` (both already in the coefficients' dtype)."""
    if prediction_type == "epsilon":
        return (x_t - sigma * y) / alpha
    if prediction_type == "sample":
        return y
    if prediction_type in ("v_prediction", "trigflow"):
        # v = alpha eps - sigma x0 and x_t = alpha x0 + sigma eps; alpha^2 + sigma^2 = 1 on vp and trigflow paths,
        # the general solution divides by it.
        return (alpha * x_t - sigma * y) / (alpha**2 + sigma**2)
    if prediction_type == "data_velocity":
        # v = x0 - eps, so x_t = (alpha + sigma) x0 - sigma v
        return (x_t + sigma * y) / (alpha + sigma)
    # flow_prediction: v = eps - x0, so x_t = (alpha + sigma) x0 + sigma v
    return (x_t - sigma * y) / (alpha + sigma)


def to_x0_and_epsilon(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    t: TimeLike,
    path: NoisePath,
    prediction_type: str,
    coefficients: Optional[Coefficients] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Convert a prediction at ``(x_t = sample, t)`` into ``(x0, eps)``."""
    check_prediction_type(prediction_type)
    alpha, sigma = _coefficients(path, t, sample, coefficients)
    dtype = alpha.dtype
    y, x_t = model_output.to(dtype), sample.to(dtype)
    x0 = _x0_of(y, x_t, alpha, sigma, prediction_type)
    if prediction_type == "epsilon":
        eps = y
    elif prediction_type == "sample":
        eps = (x_t - alpha * y) / sigma
    elif prediction_type in ("v_prediction", "trigflow"):
        eps = (sigma * x_t + alpha * y) / (alpha**2 + sigma**2)
    elif prediction_type == "data_velocity":
        eps = x0 - y
    else:  # flow_prediction
        eps = y + x0
    return x0.to(model_output.dtype), eps.to(model_output.dtype)


def to_x0(model_output, sample, t, path, prediction_type, coefficients: Optional[Coefficients] = None) -> torch.Tensor:
    """The clean-sample estimate ``x̂0`` of a prediction (the same values as ``to_x0_and_epsilon(...)[0]``, without
    computing ``eps``)."""
    check_prediction_type(prediction_type)
    alpha, sigma = _coefficients(path, t, sample, coefficients)
    dtype = alpha.dtype
    return _x0_of(model_output.to(dtype), sample.to(dtype), alpha, sigma, prediction_type).to(model_output.dtype)


def to_epsilon(model_output, sample, t, path, prediction_type) -> torch.Tensor:
    """The noise estimate ``ε̂`` of a prediction."""
    return to_x0_and_epsilon(model_output, sample, t, path, prediction_type)[1]


def from_x0_and_epsilon(
    x0: torch.Tensor, eps: torch.Tensor, t: TimeLike, path: NoisePath, prediction_type: str
) -> torch.Tensor:
    """The prediction a perfect model of type ``prediction_type`` outputs: the denoising training target."""
    check_prediction_type(prediction_type)
    alpha, sigma = _coefficients(path, t, x0)
    dtype = alpha.dtype
    x0_, eps_ = x0.to(dtype), eps.to(dtype)
    if prediction_type == "epsilon":
        out = eps_
    elif prediction_type == "sample":
        out = x0_
    elif prediction_type in ("v_prediction", "trigflow"):
        out = alpha * eps_ - sigma * x0_
    elif prediction_type == "data_velocity":
        out = x0_ - eps_
    else:
        out = eps_ - x0_
    return out.to(x0.dtype)


def convert_prediction(
    model_output: torch.Tensor, sample: torch.Tensor, t: TimeLike, path: NoisePath, source: str, target: str
) -> torch.Tensor:
    """Re-express a prediction of type ``source`` as type ``target`` at the same ``(x_t, t)``."""
    if source == target:
        return model_output
    x0, eps = to_x0_and_epsilon(model_output, sample, t, path, source)
    return from_x0_and_epsilon(x0, eps, t, path, target)


def _time_tensor(t: TimeLike) -> torch.Tensor:
    return t if isinstance(t, torch.Tensor) else torch.as_tensor(t, dtype=torch.float64)


def forward_transition_coefficients(
    s: TimeLike, t: TimeLike, path: NoisePath, device=None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(a, b)`` of the forward transition ``q(x_t | x_s) = N(a x_s, b² I)`` from time ``s`` to a noisier ``t``:
    ``a = alpha_t / alpha_s`` and ``b = sqrt(sigma_t² − (a sigma_s)²)`` (Kingma et al. 2021, arXiv 2107.00630,
    eq. 10; TDM's ``Predictor.add_noise``). It composes with ``x_s = alpha_s x0 + sigma_s eps`` into the marginal
    ``x_t = alpha_t x0 + sigma_t eps'`` on every path (VP, flow, TrigFlow), since only ``alpha`` and ``sigma`` enter.
    ``b²`` is clipped at 0, where rounding makes ``t`` and ``s`` the same noise level."""
    alpha_s, sigma_s = path.alpha_sigma(_time_tensor(s), device=device)
    alpha_t, sigma_t = path.alpha_sigma(_time_tensor(t), device=device)
    scale = alpha_t / alpha_s
    return scale, (sigma_t**2 - (scale * sigma_s) ** 2).clamp_min(0).sqrt()


def forward_transition(
    x_s: torch.Tensor, noise: torch.Tensor, s: TimeLike, t: TimeLike, path: NoisePath
) -> torch.Tensor:
    """``x_t = (alpha_t/alpha_s) x_s + sqrt(sigma_t² − (alpha_t sigma_s/alpha_s)²) · noise``: a sample of the
    forward transition from ``s`` to ``t >= s`` (:func:`forward_transition_coefficients`), in float64."""
    scale, std = forward_transition_coefficients(s, t, path, device=x_s.device)
    scale, std = _broadcast(scale, x_s), _broadcast(std, x_s)
    return (scale * x_s.to(scale.dtype) + std * noise.to(scale.dtype)).to(x_s.dtype)


def signal_to_noise(t: TimeLike, path: NoisePath, device=None) -> torch.Tensor:
    """``SNR_t = alpha_t² / sigma_t²`` (Kingma et al. 2021), float64."""
    alpha, sigma = path.alpha_sigma(_time_tensor(t), device=device)
    return alpha**2 / sigma**2


def x0_to_score(x0: torch.Tensor, sample: torch.Tensor, t: TimeLike, path: NoisePath) -> torch.Tensor:
    """Tweedie: ``∇ log p_t(x_t) = -(x_t - alpha_t x̂0) / sigma_t^2``."""
    alpha, sigma = _coefficients(path, t, sample)
    dtype = alpha.dtype
    return (-(sample.to(dtype) - alpha * x0.to(dtype)) / sigma**2).to(sample.dtype)


# ----------------------------------------------------------------------------------------------------------------
# TrigFlow <-> flow model wrapping (SANA-Sprint's training-free transformation, Chen et al. 2025, arXiv 2503.09641):
# a flow-matching transformer is run as a TrigFlow model by feeding it the equivalent flow sample and time and
# converting its velocity.
# ----------------------------------------------------------------------------------------------------------------


def trigflow_to_flow_time(t: torch.Tensor) -> torch.Tensor:
    """Flow time ``s = sin t / (sin t + cos t)`` of TrigFlow time ``t``."""
    return torch.sin(t) / (torch.sin(t) + torch.cos(t))


def trigflow_to_flow_sample(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x_s = x_t / (sin t + cos t)``, the flow sample at ``s = trigflow_to_flow_time(t)`` (latent units)."""
    t64 = _broadcast(torch.as_tensor(t, device=x_t.device, dtype=_compute_dtype(x_t.device)), x_t)
    return (x_t.to(t64.dtype) / (torch.sin(t64) + torch.cos(t64))).to(x_t.dtype)


def flow_velocity_to_trigflow(velocity: torch.Tensor, flow_sample: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``F = [(1 - 2s) x_s + (s^2 + (1 - s)^2) v] / sqrt(s^2 + (1 - s)^2)`` (TrigFlow's ``F`` in flow terms)."""
    s64 = _broadcast(torch.as_tensor(s, device=velocity.device, dtype=_compute_dtype(velocity.device)), velocity)
    norm_sq = s64**2 + (1 - s64) ** 2
    out = ((1 - 2 * s64) * flow_sample.to(s64.dtype) + norm_sq * velocity.to(s64.dtype)) / norm_sq.sqrt()
    return out.to(velocity.dtype)
