"""What every distribution-matching method shares, and the registry that makes a method a plug-in.

A method is one class: a ``student_step`` and a ``critic_step`` returning ``(loss, logs)`` (the trainer
back-propagates the loss into the role named by the step and steps that role's optimizer). :class:`DistillationMethod`
implements both for the family of methods that match the student's distribution to the teacher's through a critic
("fake score") trained on student samples (DMD, DMD2, f-distill, SiD, ...): the student step generates ``x = G(z)``,
noises it to ``x_t``, asks the guided teacher and the critic for their ``x̂0`` (and a discriminator for its logits),
then hands everything to :meth:`DistillationMethod.generator_loss` -- the one hook a new method writes. The critic step
is denoising score matching on detached student samples, plus the diffusion-GAN discriminator loss when one trains.

Methods are written against :class:`~..models.DistillationModels`, so the same code trains SDXL, PixArt and SANA
students (through :mod:`..roles`) and the 2-D analytic test beds. Losses never ask which backbone they run on; every
conversion goes through :mod:`diffusers_onestep.parameterization`.

A new method is a subclass in one file with ``name``, ``description`` and ``generator_loss``, decorated with
:func:`register_method`; ``--method NAME`` then selects it and the model card names it.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple, Type

import torch

from ... import parameterization as param
from .. import losses
from ..config import ConfigError, MethodConfig
from ..divergences import get_divergence
from ..models import Batch, DistillationModels, RandomSource


Logs = Dict[str, float]

METHODS: Dict[str, Type["DistillationMethod"]] = {}

#: :class:`MethodConfig` fields that only some methods read (a method lists its own in ``settings``); setting one
#: for another method is refused in one sentence
METHOD_SETTINGS = (
    "sid_alpha",
    "fake_guidance_scale",
    "fake_train_guidance_scale",
    "sim_distance",
    "sim_huber_c",
    "tdm_loss",
    "tdm_huber_c",
    "tdm_random_mid",
    "regression_weight",
)


def register_method(cls: Type["DistillationMethod"]) -> Type["DistillationMethod"]:
    """Add a method class to the registry under ``cls.name`` (usable as a class decorator)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no `name`; set the name --method selects it by.")
    METHODS[cls.name] = cls
    return cls


def method_names() -> Tuple[str, ...]:
    return tuple(METHODS)


def get_method_class(name: str) -> Type["DistillationMethod"]:
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"Unknown method {name!r}; registered methods are {', '.join(METHODS)}.") from None


def method_for(name: Optional[str], divergence: Optional[str]) -> Type["DistillationMethod"]:
    """The method a config asks for: by name, else the first registered method whose ``default_divergence`` is the
    given divergence or that accepts it (``--divergence js`` alone selects f-distill)."""
    if name is not None:
        return get_method_class(name)
    if divergence is None:
        return next(iter(METHODS.values()))
    for cls in METHODS.values():
        if cls.default_divergence == divergence:
            return cls
    for cls in METHODS.values():
        if cls.accepts_divergence(divergence):
            return cls
    raise ConfigError(f"No registered method accepts the {divergence} divergence; pass --method.")


def resolve_method_config(config: MethodConfig, defaults=None, has_real_images: bool = False) -> MethodConfig:
    """A copy of ``config`` with the method chosen and every ``None`` filled: the method class's own defaults, then the
    family's ``training_defaults`` (``None``: the generic ones of :class:`~diffusers_onestep.FamilyAdapter`).
    The method class then checks the combination (e.g. f-distill needs a discriminator)."""
    from ...families import FamilyAdapter

    config = copy.deepcopy(config).validate()
    defaults = defaults or FamilyAdapter.training_defaults
    method_cls = method_for(config.method, config.divergence)
    config.method = method_cls.name
    # The family's record of this method's published settings fills what the user left unset.
    for setting_name, value in getattr(defaults, "method_defaults", {}).get(method_cls.name, {}).items():
        if setting_name != "learning_rate" and getattr(config, setting_name) is None:
            setattr(config, setting_name, copy.deepcopy(list(value) if isinstance(value, tuple) else value))
    for setting_name in METHOD_SETTINGS:
        if getattr(config, setting_name) is not None and setting_name not in method_cls.settings:
            owners = [name for name, cls in METHODS.items() if setting_name in cls.settings]
            raise ConfigError(
                f"--{setting_name} applies to the {' and '.join(owners)} method{'s' if len(owners) > 1 else ''}, "
                f"not {method_cls.name}; drop it or pick --method {owners[0]}."
            )
    return method_cls.resolve_config(config, defaults, has_real_images)


@dataclass
class GeneratorTerms:
    """What a student step computed before its loss (all on the teacher path's natural times).

    Attributes:
        x: the student's sample ``x̂0 = G(z)``, carrying the graph to the student.
        x_t: ``x`` noised to ``t`` (its graph reaches ``x`` where a discriminator differentiates through it).
        t: the noise times ``[B]``; noise: the noise used.
        x0_real: the guided teacher's ``x̂0`` at ``(x_t, t)``, no gradient.
        x0_fake: the critic's ``x̂0`` at ``(x_t, t)``, no gradient.
        logits: discriminator logits of ``x_t`` (graph to ``x``), or ``None`` when no discriminator trains.
        batch: the batch; simulated_steps: student steps simulated to make its input (DMD2 backward simulation).
    """

    x: torch.Tensor
    x_t: torch.Tensor
    t: torch.Tensor
    noise: torch.Tensor
    x0_real: torch.Tensor
    x0_fake: torch.Tensor
    logits: Optional[torch.Tensor]
    batch: Batch
    simulated_steps: int


class DistillationMethod:
    """Distribution matching through a critic; subclasses write :meth:`generator_loss` (see the module docstring).

    Class attributes describe the method to the resolver, the CLI and the model card.
    """

    #: the name ``--method`` selects
    name: str = ""
    #: one sentence for ``--help`` and the model card
    description: str = ""
    #: the paper (and equation) the generator loss follows, for the model card
    reference: str = ""
    #: Hub tags of a student trained with the method
    tags: Tuple[str, ...] = ()
    #: the divergence used where none is given
    default_divergence: str = "reverse_kl"
    #: divergences the method accepts; ``None``: every one of the table (``divergences.py``)
    divergences: Optional[Tuple[str, ...]] = ("reverse_kl",)
    #: the method cannot run without a discriminator (f-distill's density ratio)
    requires_discriminator: bool = False
    default_discriminator_weight: float = 1e-2
    default_discriminator_trunk: str = "critic"
    #: the method-specific settings (of ``METHOD_SETTINGS``) this method reads
    settings: Tuple[str, ...] = ()
    #: what the model card names as the matched divergence when the method takes no ``--divergence``
    divergence_label: Optional[str] = None
    #: how the exported student's OneStepScheduler moves between conditioning timesteps (``"sde"``: fresh noise, as
    #: DMD2's backward simulation; ``"ode"``: the student's own noise, TDM's deterministic trajectory)
    sampler_solver: str = "sde"
    #: optimizer settings of the method's released runs (``learning_rate``, ``critic_learning_rate``, ``adam_beta1``,
    #: ``adam_beta2``) that fill what the user and the family left unset (:func:`~..resolve.resolve`)
    optimizer_defaults: Dict[str, float] = {}
    #: the critic's learning rate as a multiple of the student's where ``critic_learning_rate`` is unset
    critic_learning_rate_ratio: float = 1.0

    # ------------------------------------------------------------------------------------------------------------
    # configuration
    # ------------------------------------------------------------------------------------------------------------

    @classmethod
    def accepts_divergence(cls, divergence: str) -> bool:
        return cls.divergences is None or divergence in cls.divergences

    @classmethod
    def resolve_config(cls, config: MethodConfig, defaults, has_real_images: bool) -> MethodConfig:
        """``config`` with every ``None`` filled from this method's defaults and the family's ``defaults``
        (:class:`~diffusers_onestep.families.base.TrainingDefaults`), checked."""
        config = copy.deepcopy(config)
        if config.divergence is None:
            config.divergence = cls.default_divergence
        if cls.divergences != () and not cls.accepts_divergence(config.divergence):
            raise ConfigError(
                f"The {cls.name} method takes the {' or '.join(cls.divergences)} divergence, not "
                f"{config.divergence}; drop --divergence or pick another --method."
            )
        if config.student_timesteps is None:
            config.student_timesteps = [float(t) for t in defaults.student_timesteps]
        if config.guidance_scale is None:
            config.guidance_scale = float(defaults.guidance_scale)
        if config.critic_updates_per_student is None:
            config.critic_updates_per_student = int(defaults.critic_updates_per_student)
        if config.gan_weight is None:
            config.gan_weight = float(defaults.gan_weight) if (cls.requires_discriminator or has_real_images) else 0.0
        if config.discriminator_weight is None:
            config.discriminator_weight = cls.default_discriminator_weight
        if config.discriminator_trunk is None:
            config.discriminator_trunk = cls.default_discriminator_trunk
        if cls.requires_discriminator and not config.gan_weight > 0:
            raise ConfigError(
                f"The {cls.name} method ({config.divergence}) estimates the density ratio with a discriminator, so "
                "`gan_weight` must be > 0."
            )
        return config.validate()

    # ------------------------------------------------------------------------------------------------------------
    # construction
    # ------------------------------------------------------------------------------------------------------------

    def __init__(self, config: MethodConfig, models: DistillationModels, student_timesteps: Sequence[float]):
        if config.method is None:
            config = dataclasses.replace(config, method=self.name)
        if config.method != self.name:
            raise ValueError(f"A {config.method} config cannot build the {self.name} method.")
        if config.gan_weight is None or config.discriminator_trunk is None or config.guidance_scale is None:
            config = resolve_method_config(config)
        self.config = config
        self.models = models
        self.path = models.path
        self.student_timesteps = [float(t) for t in student_timesteps]
        # None for methods that match scores rather than an f-divergence (SiD, SIM: ``divergences = ()``)
        self.divergence = get_divergence(config.divergence) if config.divergence is not None else None
        self.gan_weight = float(config.gan_weight)
        self.discriminator_weight = float(config.discriminator_weight)
        self.discriminator_trunk = config.discriminator_trunk
        self.uses_discriminator = config.uses_discriminator
        #: λ of DMD's regression loss on the teacher's (noise, sample) pairs (0: none)
        self.regression_weight = float(config.regression_weight or 0.0)

    # ------------------------------------------------------------------------------------------------------------
    # the hook a method writes
    # ------------------------------------------------------------------------------------------------------------

    def generator_loss(self, terms: GeneratorTerms) -> Tuple[torch.Tensor, Logs]:
        """The student's loss from one step's terms, and its logs (names without the ``student/`` prefix)."""
        raise NotImplementedError

    def state_dict(self) -> Dict[str, Any]:
        """Method state that must survive a resume (none by default)."""
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass

    # ------------------------------------------------------------------------------------------------------------
    # helpers
    # ------------------------------------------------------------------------------------------------------------

    def _student_x0(self, x_in: torch.Tensor, t: torch.Tensor, condition) -> torch.Tensor:
        pred = self.models.student(x_in, t, condition)
        return param.to_x0(pred, x_in, t, self.path, self.models.student_prediction_type)

    def _full_time(self, value: float, like: torch.Tensor) -> torch.Tensor:
        return torch.full((like.shape[0],), value, device=like.device, dtype=torch.float64)

    @torch.no_grad()
    def simulate(self, noise: torch.Tensor, condition, steps: int, rng: RandomSource) -> torch.Tensor:
        """Run the current student for ``steps`` steps from noise, as at inference (DMD2 backward simulation)."""
        x = noise
        for k in range(steps):
            x0 = self._student_x0(x, self._full_time(self.student_timesteps[k], x), condition)
            fresh = rng.randn(x0.shape, dtype=x0.dtype).to(x0.device)
            x = param.add_noise(x0, fresh, self._full_time(self.student_timesteps[k + 1], x), self.path)
        return x

    def student_input(self, batch: Batch, rng: RandomSource) -> Tuple[torch.Tensor, torch.Tensor, int]:
        """``(x_in, t_student, k)``: the student's input and conditioning time, with ``k`` simulated steps."""
        n = len(self.student_timesteps)
        k = rng.randint(n) if n > 1 and self.config.backward_simulation else 0
        x_in = self.simulate(batch.noise, batch.condition, k, rng) if k else batch.noise
        return x_in, self._full_time(self.student_timesteps[k], x_in), k

    def discriminator_conditions(self, batch: Batch) -> Tuple[Any, Any, bool]:
        """``(fake, real, null)``: the conditions the discriminator judges generated and real samples under.

        Real images with captions are judged under their captions and generated ones under their prompts (DMD2
        pairs each real image with its caption). Without captions (``batch.real_condition is None``) both sides are
        judged under the null prompt, so the discriminator cannot tell them apart by conditioning alone.
        """
        if batch.real_condition is not None:
            return batch.condition, batch.real_condition, False
        null = self.models.unconditional(batch.condition)
        return null, null, True

    @property
    def critic_guided(self) -> bool:
        """Whether the critic (fake score) is guided too: SNOOPI's PG-SB (arXiv 2412.02687, §3.2) varies the CFG
        scale of *both* teachers of the VSD loss, the frozen teacher and the fake score, with one draw per sample.
        Only with ``guidance_range`` (a fixed scale keeps DMD/SwiftBrush's conditional fake score) and only for
        teachers guided by classifier-free combination (an embedded-guidance critic has no null branch here)."""
        return (
            self.config.guidance_range is not None
            and self.config.critic_guidance
            and not self.models.teacher_has_embedded_guidance
        )

    def sample_guidance(self, x_t: torch.Tensor, rng: RandomSource) -> torch.Tensor:
        """Per-sample CFG scales ``[B]`` for one student step: the constant scale, or SNOOPI's uniform draw."""
        return rng.guidance(x_t.shape[0], self.config.guidance_scale, self.config.guidance_range).to(x_t.device)

    def _teacher_x0(
        self,
        x_t,
        t,
        condition,
        rng: RandomSource,
        null_discriminator: bool = False,
        guidance: Optional[torch.Tensor] = None,
    ):
        """Guided teacher ``x̂0`` (no grad), plus discriminator logits if the teacher is the trunk.

        The logits come from the teacher pass under the discriminator's condition (the prompt, or the null prompt
        when ``null_discriminator``); that pass keeps its graph to ``x_t`` for the GAN term, the others run without.
        ``guidance`` is the step's per-sample scale (:meth:`sample_guidance`); ``None`` draws it from ``rng``.
        """
        models = self.models
        if guidance is None:
            guidance = self.sample_guidance(x_t, rng)
        want_logits = self.uses_discriminator and self.discriminator_trunk == "teacher"
        null = (
            models.unconditional(condition)
            if (want_logits and null_discriminator) or not models.teacher_has_embedded_guidance
            else None
        )
        logits = None
        if models.teacher_has_embedded_guidance:
            # Guidance is an input of the network (SANA-Sprint): one pass, no classifier-free combination.
            if want_logits:
                with models.input_grad_pass("teacher"), torch.enable_grad():
                    features_condition = null if null_discriminator else condition
                    pred, features = models.teacher(
                        x_t, t, features_condition, guidance=guidance, return_features=True
                    )
                    logits = models.discriminator(features, t)
                if null_discriminator:
                    with torch.no_grad():
                        pred = models.teacher(x_t.detach(), t, condition, guidance=guidance)
                pred = pred.detach()
            else:
                with torch.no_grad():
                    pred = models.teacher(x_t.detach(), t, condition, guidance=guidance)
            return param.to_x0(pred, x_t.detach(), t, self.path, models.prediction_type), logits
        if want_logits:
            graph_condition = null if null_discriminator else condition
            with models.input_grad_pass("teacher"), torch.enable_grad():
                graph_pred, features = models.teacher(x_t, t, graph_condition, return_features=True)
                logits = models.discriminator(features, t)
            graph_pred = graph_pred.detach()
            with torch.no_grad():
                other_pred = models.teacher(x_t.detach(), t, condition if null_discriminator else null)
            uncond_pred, cond_pred = (graph_pred, other_pred) if null_discriminator else (other_pred, graph_pred)
        else:
            with torch.no_grad():
                both = models.teacher(
                    torch.cat([x_t, x_t]).detach(), torch.cat([t, t]), models.concat([null, condition])
                )
                uncond_pred, cond_pred = both.chunk(2)
        guided = losses.classifier_free_guidance(uncond_pred, cond_pred, guidance)
        return param.to_x0(guided, x_t.detach(), t, self.path, models.prediction_type), logits

    def _critic_x0(self, x_t, t, condition, null_discriminator: bool = False, guidance: Optional[torch.Tensor] = None):
        """Critic ``x̂0`` (no grad), plus discriminator logits if the critic is the trunk.

        With ``guidance`` (per-sample scales ``[B]``; SNOOPI's PG-SB, see :attr:`critic_guided`) the fake score is
        classifier-free guided like the teacher, ``u + w (c - u)`` of the critic's null and prompt passes at the same
        ``x_t`` with the same ``w``; without, it is the conditional critic (DMD, SwiftBrush).
        """
        x0, logits = self._critic_x0_conditional(x_t, t, condition, null_discriminator)
        if guidance is None:
            return x0, logits
        models = self.models
        with torch.no_grad():
            uncond_pred = models.critic(x_t.detach(), t, models.unconditional(condition))
        uncond_x0 = param.to_x0(uncond_pred, x_t.detach(), t, self.path, models.prediction_type)
        # CFG is affine in the prediction at a shared x_t, so guiding x̂0 equals guiding the native prediction.
        return losses.classifier_free_guidance(uncond_x0, x0, guidance).to(x0.dtype), logits

    def _critic_x0_conditional(self, x_t, t, condition, null_discriminator: bool = False):
        models = self.models
        logits = None
        if self.uses_discriminator and self.discriminator_trunk == "critic":
            features_condition = models.unconditional(condition) if null_discriminator else condition
            with models.input_grad_pass("critic"), torch.enable_grad():
                pred, features = models.critic(x_t, t, features_condition, return_features=True)
                logits = models.discriminator(features, t)
            if null_discriminator:
                # The critic's x̂0 is the fake score under the prompt: a second pass, without grad.
                with torch.no_grad():
                    pred = models.critic(x_t.detach(), t, condition)
            pred = pred.detach()
        else:
            with torch.no_grad():
                pred = models.critic(x_t.detach(), t, condition)
        return param.to_x0(pred, x_t.detach(), t, self.path, models.prediction_type), logits

    # ------------------------------------------------------------------------------------------------------------
    # the two steps
    # ------------------------------------------------------------------------------------------------------------

    def student_step(self, batch: Batch, rng: RandomSource) -> Tuple[torch.Tensor, Logs]:
        """The student (generator) loss of one batch; the trainer back-propagates it into the student."""
        models = self.models
        with models.train_phase("student"):
            x_in, t_student, k = self.student_input(batch, rng)
            x = self._student_x0(x_in, t_student, batch.condition)

            t = rng.times(self.path, x.shape[0], self.config.time_range).to(x.device)
            noise = rng.randn(x.shape, dtype=x.dtype).to(x.device)
            # x_t keeps its graph to x only where a discriminator differentiates through it (the GAN term).
            x_t = param.add_noise(x, noise, t, self.path)
            null_discriminator = self.uses_discriminator and batch.real_condition is None

            # One draw of the CFG scale per sample, shared by the teacher and (SNOOPI's PG-SB) the critic.
            guidance = self.sample_guidance(x_t, rng)
            x0_real, teacher_logits = self._teacher_x0(
                x_t, t, batch.condition, rng, null_discriminator, guidance=guidance
            )
            x0_fake, critic_logits = self._critic_x0(
                x_t, t, batch.condition, null_discriminator, guidance=guidance if self.critic_guided else None
            )
            logits = teacher_logits if teacher_logits is not None else critic_logits
            terms = GeneratorTerms(
                x=x,
                x_t=x_t,
                t=t,
                noise=noise,
                x0_real=x0_real,
                x0_fake=x0_fake,
                logits=logits,
                batch=batch,
                simulated_steps=k,
            )
            loss, term_logs = self.generator_loss(terms)
            if self.regression_weight > 0:
                regression = self.regression_loss(batch)
                loss = loss + self.regression_weight * regression
                term_logs = {**term_logs, "regression_loss": float(regression.detach())}
            logs = {f"student/{name}": value for name, value in term_logs.items()}
            logs["student/loss"] = float(loss.detach())
            logs["student/simulated_steps"] = float(k)
        return loss, logs

    def regression_loss(self, batch: Batch) -> torch.Tensor:
        """DMD's regression loss (Yin et al. 2024, arXiv 2311.18828, §3.3) on the batch's teacher pairs: the
        student maps the noise ``z`` each reference latent was sampled from (``batch.real_noise``), under that
        reference's prompt, from its first timestep (pure noise), and is pulled toward the teacher's multi-step
        sample ``y = batch.real`` by :func:`~..losses.regression_loss` (latent MSE; DMD uses LPIPS)."""
        if batch.real is None or batch.real_noise is None or batch.real_condition is None:
            raise ValueError(
                "The regression loss needs the teacher's (noise, sample) pairs with their prompts: pass `real`, "
                "`real_noise` and `real_condition` in the batch (--real_images teacher)."
            )
        z = batch.real_noise.to(batch.real.device)
        x = self._student_x0(z, self._full_time(self.student_timesteps[0], z), batch.real_condition)
        return losses.regression_loss(x, batch.real)

    def critic_step(self, batch: Batch, rng: RandomSource) -> Tuple[torch.Tensor, Logs]:
        """The critic loss: denoising score matching on detached student samples (+ the discriminator loss)."""
        models = self.models
        with models.train_phase("critic"):
            with torch.no_grad():
                x_in, t_student, _ = self.student_input(batch, rng)
                x = self._student_x0(x_in, t_student, batch.condition).detach()
            n = x.shape[0]
            t = rng.times(self.path, n, self.config.critic_time_range).to(x.device)
            noise = rng.randn(x.shape, dtype=x.dtype).to(x.device)
            x_t = param.add_noise(x, noise, t, self.path)
            logs: Logs = {}

            if not self.uses_discriminator:
                pred = models.critic(x_t, t, batch.condition)
                loss = losses.denoising_loss(pred, x, noise, t, self.path, models.prediction_type)
                logs["critic/dsm_loss"] = float(loss.detach())
                logs["critic/loss"] = logs["critic/dsm_loss"]
                return loss, logs

            real = batch.real
            if real is None:
                raise ValueError(
                    "This method trains a discriminator, which needs real images: pass `real` latents in the batch "
                    "(--real_images)."
                )
            fake_condition, real_condition, _ = self.discriminator_conditions(batch)
            # Diffusion-GAN: the discriminator sees fake and real samples at random noise levels (DMD2).
            t_fake = rng.times(self.path, n, self.config.diffusion_gan_time_range).to(x.device)
            t_real = rng.times(self.path, real.shape[0], self.config.diffusion_gan_time_range).to(x.device)
            fake_noisy = param.add_noise(x, rng.randn(x.shape).to(x), t_fake, self.path)
            real_noisy = param.add_noise(real, rng.randn(real.shape).to(real), t_real, self.path)
            if self.discriminator_trunk == "critic":
                # One pass through the critic for the DSM batch and both discriminator batches: the trunk learns
                # from both losses (DMD2), and DDP sees exactly one forward per backward.
                both_t = torch.cat([t, t_fake, t_real])
                pred, features = models.critic(
                    torch.cat([x_t, fake_noisy, real_noisy]),
                    both_t,
                    models.concat([batch.condition, fake_condition, real_condition]),
                    return_features=True,
                )
                pred = pred[:n]
                logits = models.discriminator(features[n:], both_t[n:])
            else:
                pred = models.critic(x_t, t, batch.condition)
                with torch.no_grad():
                    _, features = models.teacher(
                        torch.cat([fake_noisy, real_noisy]),
                        torch.cat([t_fake, t_real]),
                        models.concat([fake_condition, real_condition]),
                        return_features=True,
                        **self._teacher_guidance_kwargs(n + real.shape[0], x.device),
                    )
                logits = models.discriminator(features.detach(), torch.cat([t_fake, t_real]))
            logits_fake, logits_real = logits[:n], logits[n:]
            dsm = losses.denoising_loss(pred, x, noise, t, self.path, models.prediction_type)
            d_loss = losses.gan_discriminator_loss(logits_real, logits_fake)
            loss = dsm + self.discriminator_weight * d_loss
            logs.update(
                {
                    "critic/dsm_loss": float(dsm.detach()),
                    "critic/discriminator_loss": float(d_loss.detach()),
                    "critic/logit_real": float(logits_real.detach().float().mean()),
                    "critic/logit_fake": float(logits_fake.detach().float().mean()),
                    "critic/loss": float(loss.detach()),
                }
            )
        return loss, logs

    def _teacher_guidance_kwargs(self, batch_size: int, device) -> Dict[str, Any]:
        """The guidance input of an embedded-guidance teacher used as the discriminator trunk: the run's scale
        (not a random draw, so the critic step consumes the same random numbers for every teacher)."""
        if not self.models.teacher_has_embedded_guidance:
            return {}
        return {"guidance": torch.full((batch_size,), float(self.config.guidance_scale), device=device)}


def build_method(
    config: MethodConfig, models: DistillationModels, student_timesteps: Sequence[float]
) -> DistillationMethod:
    """An instance of the registered method ``config`` names (resolving the method's defaults where unset)."""
    if config.method is None or config.gan_weight is None or config.discriminator_trunk is None:
        config = resolve_method_config(config)
    return get_method_class(config.method)(config, models, student_timesteps)
