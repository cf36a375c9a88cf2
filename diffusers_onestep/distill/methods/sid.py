"""Score-divergence (Fisher-type) distillation: SiD, SiD-LSG and SIM.

Zhou et al. 2024, "Score identity Distillation: Exponentially Fast Distillation of Pretrained Diffusion Models for
One-Step Generation" (SiD, ICML 2024, arXiv 2404.04057); Zhou et al. 2025, "Guided Score identity Distillation for
Data-Free One-Step Text-to-Image Generation" (SiD-LSG, ICLR 2025, arXiv 2406.01561); Luo et al. 2024, "One-Step
Diffusion Distillation through Score Implicit Matching" (SIM, NeurIPS 2024, arXiv 2410.16794).

Unlike VSD (DMD2, f-distill), the generator loss differentiates the frozen teacher and the frozen fake score w.r.t.
their *input*: ``x_t = α_t G(z) + σ_t ε`` keeps its graph to the student through both networks (their parameters
stay frozen). The fake score trains by denoising score matching, one fake update per generator update (1:1).
SiD-LSG's guidance: κ1 on the fake inside its own loss (``fake_train_guidance_scale``), κ2 = κ3 on the fake in the
generator loss (``fake_guidance_scale``), κ4 on the teacher (``guidance_scale``).
"""

from __future__ import annotations

import copy
from typing import Tuple

import torch

from ... import parameterization as param
from .. import losses
from ..config import ConfigError, MethodConfig
from ..models import Batch, RandomSource
from .base import DistillationMethod, GeneratorTerms, Logs, register_method


@register_method
class SiD(DistillationMethod):
    """SiD's generator loss (eq. 23; :func:`~diffusers_onestep.distill.losses.sid_generator_loss`) with SiD-LSG's
    long-and-short guidance, gradients through ``x_t`` into the guided teacher and the guided fake score."""

    name = "sid"
    description = (
        "SiD / SiD-LSG: score identity distillation (Fisher-type score divergence, data-free), gradients through "
        "x_t into the teacher and the fake score; SiD-LSG guidance with --fake_guidance_scale and "
        "--fake_train_guidance_scale"
    )
    reference = "Zhou et al. 2024 (SiD, arXiv 2404.04057, eq. 23); Zhou et al. 2025 (SiD-LSG, arXiv 2406.01561)"
    tags = ("sid", "score-identity-distillation")
    #: label of the matched divergence for the model card (not an f-divergence of ``divergences.py``)
    divergence_label = "fisher"
    default_divergence = None
    divergences = ()
    #: method-specific settings of :class:`MethodConfig` this method reads (others are refused when set)
    settings = ("sid_alpha", "fake_guidance_scale", "fake_train_guidance_scale")
    default_alpha = 1.2
    #: Adam β = (0, 0.999) for the generator and the fake score: SiD's sid_train.py and SiD-LSG's run_sid.sh
    #: (algorithms.md §7.1-7.2). SIM released no training code and inherits these (built on SiD's loop, unconfirmed).
    optimizer_defaults = {"adam_beta1": 0.0, "adam_beta2": 0.999}

    @classmethod
    def accepts_divergence(cls, divergence: str) -> bool:
        return False

    @classmethod
    def resolve_config(cls, config: MethodConfig, defaults, has_real_images: bool) -> MethodConfig:
        config = copy.deepcopy(config)
        if config.divergence is not None:
            raise ConfigError(
                f"The {cls.name} method matches scores (divergence: {cls.divergence_label}), not an f-divergence; "
                "drop --divergence."
            )
        if config.gan_weight:
            raise ConfigError(f"The {cls.name} method trains no discriminator; drop --gan_weight.")
        config.gan_weight = 0.0
        if config.guidance_range is not None:
            raise ConfigError(f"The {cls.name} method takes a fixed --guidance_scale, not --guidance_range.")
        if config.critic_updates_per_student is None:
            config.critic_updates_per_student = 1  # SiD: one fake-score step, then one generator step
        if "sid_alpha" in cls.settings and config.sid_alpha is None:
            config.sid_alpha = cls.default_alpha
        for name in ("fake_guidance_scale", "fake_train_guidance_scale"):
            if getattr(config, name) is None:
                setattr(config, name, 1.0)
        config = super().resolve_config(config, defaults, has_real_images)
        config.divergence = None
        return config

    # -- the student step: x_t keeps its graph through both frozen networks ----------------------------------------

    def _guided(self, role: str, x_t, t, condition, scale: float, guidance=None):
        """``role``'s native prediction at ``(x_t, t)`` under classifier-free guidance ``scale``, differentiable
        w.r.t. ``x_t`` (one batched pass of the null and the prompt condition when ``scale != 1``)."""
        models = self.models
        network = models.teacher if role == "teacher" else models.critic
        kwargs = {"guidance": guidance} if guidance is not None else {}
        if role == "teacher" and models.teacher_has_embedded_guidance:
            return network(x_t, t, condition, **kwargs)
        if isinstance(scale, float) and scale == 1.0:
            return network(x_t, t, condition)
        both = network(
            torch.cat([x_t, x_t]), torch.cat([t, t]), models.concat([models.unconditional(condition), condition])
        )
        uncond, cond = both.chunk(2)
        return losses.classifier_free_guidance(uncond, cond, scale)

    def score_terms(self, batch: Batch, rng: RandomSource) -> GeneratorTerms:
        """``x = G(z)``, ``x_t`` and the guided teacher's and fake score's ``x̂0`` at ``x_t``, all with their
        graph to ``x`` (call inside the student phase)."""
        models = self.models
        x_in, t_student, k = self.student_input(batch, rng)
        x = self._student_x0(x_in, t_student, batch.condition)
        t = rng.times(self.path, x.shape[0], self.config.time_range).to(x.device)
        noise = rng.randn(x.shape, dtype=x.dtype).to(x.device)
        x_t = param.add_noise(x, noise, t, self.path)
        guidance = rng.guidance(x_t.shape[0], self.config.guidance_scale, None).to(x_t.device)
        with models.input_grad_pass("teacher"):
            teacher_scale = float(self.config.guidance_scale)
            real = self._guided("teacher", x_t, t, batch.condition, teacher_scale, guidance)
        with models.input_grad_pass("critic"):
            fake = self._guided("critic", x_t, t, batch.condition, float(self.config.fake_guidance_scale))
        return GeneratorTerms(
            x=x,
            x_t=x_t,
            t=t,
            noise=noise,
            x0_real=param.to_x0(real, x_t, t, self.path, models.prediction_type),
            x0_fake=param.to_x0(fake, x_t, t, self.path, models.prediction_type),
            logits=None,
            batch=batch,
            simulated_steps=k,
        )

    def student_step(self, batch: Batch, rng: RandomSource) -> Tuple[torch.Tensor, Logs]:
        with self.models.train_phase("student"):
            terms = self.score_terms(batch, rng)
            loss, term_logs = self.generator_loss(terms)
            logs = {f"student/{name}": value for name, value in term_logs.items()}
            logs["student/loss"] = float(loss.detach())
            logs["student/simulated_steps"] = float(terms.simulated_steps)
        return loss, logs

    def generator_loss(self, terms: GeneratorTerms) -> Tuple[torch.Tensor, Logs]:
        loss, logs = losses.sid_generator_loss(terms.x, terms.x0_real, terms.x0_fake, alpha=self.config.sid_alpha)
        loss = self.config.dm_weight * loss
        return loss, dict(logs, dm_loss=float(loss.detach()))

    # -- the fake-score step: DSM of the κ1-guided fake (SiD-LSG's cfg_train_fake) -------------------------------

    def critic_step(self, batch: Batch, rng: RandomSource) -> Tuple[torch.Tensor, Logs]:
        scale = float(self.config.fake_train_guidance_scale)
        if scale == 1.0:
            return super().critic_step(batch, rng)
        models = self.models
        with models.train_phase("critic"):
            with torch.no_grad():
                x_in, t_student, _ = self.student_input(batch, rng)
                x = self._student_x0(x_in, t_student, batch.condition).detach()
            t = rng.times(self.path, x.shape[0], self.config.critic_time_range).to(x.device)
            noise = rng.randn(x.shape, dtype=x.dtype).to(x.device)
            x_t = param.add_noise(x, noise, t, self.path)
            pred = self._guided("critic", x_t, t, batch.condition, scale)
            loss = losses.denoising_loss(pred, x, noise, t, self.path, models.prediction_type)
            logs = {"critic/dsm_loss": float(loss.detach()), "critic/loss": float(loss.detach())}
        return loss, logs


@register_method
class SIM(SiD):
    """SIM's generator loss (Thm 3.1; :func:`~diffusers_onestep.distill.losses.sim_generator_loss`), pseudo-Huber
    distance by default, with the same networks, guidance flags and 1:1 updates as :class:`SiD`.

    The time weight is ``w_t = σ_t⁴ / (2 α_t² W)`` with SiD's per-sample normaliser ``W = mean|x − x̂_real|``: with
    ``--sim_distance squared`` this makes the loss SiD's at α = 1 exactly (tested), and it keeps the pseudo-Huber
    loss on the x0 scale of SiD's (SIM's own weighting and ``c`` are not confirmed, algorithms.md §7.3).
    """

    name = "sim"
    description = (
        "SIM: score implicit matching (general score divergence, pseudo-Huber distance by default, data-free), "
        "gradients through x_t into the teacher and the fake score"
    )
    reference = "Luo et al. 2024 (SIM, arXiv 2410.16794, Theorem 3.1)"
    tags = ("sim", "score-implicit-matching")
    divergence_label = "score divergence"
    settings = ("fake_guidance_scale", "fake_train_guidance_scale", "sim_distance", "sim_huber_c")

    @classmethod
    def resolve_config(cls, config: MethodConfig, defaults, has_real_images: bool) -> MethodConfig:
        config = super().resolve_config(config, defaults, has_real_images)
        if config.sim_distance is None:
            config.sim_distance = "pseudo_huber"
        if config.sim_huber_c is None:
            config.sim_huber_c = 1.0
        return config

    def generator_loss(self, terms: GeneratorTerms) -> Tuple[torch.Tensor, Logs]:
        with torch.no_grad():
            alpha_t, sigma_t = self.path.alpha_sigma(terms.t, device=terms.x.device)
            dims = tuple(range(1, terms.x.ndim))
            normalizer = (terms.x.float() - terms.x0_real.float()).abs().mean(dim=dims).clamp_min(1e-5)
            weight = sigma_t**4 / (2 * alpha_t**2 * normalizer.to(sigma_t.dtype))
        loss, logs = losses.sim_generator_loss(
            terms.x,
            terms.x0_real,
            terms.x0_fake,
            terms.t,
            self.path,
            distance=self.config.sim_distance,
            huber_c=self.config.sim_huber_c,
            weight=weight,
        )
        loss = self.config.dm_weight * loss
        return loss, dict(logs, dm_loss=float(loss.detach()))
