"""Distillation methods: a method is a class with a ``student_step`` and a ``critic_step``.

Both steps return ``(loss, logs)``: the trainer back-propagates the loss into the role named by the step and steps
that role's optimizer. Methods are written against :class:`DistillationModels` -- the teacher, critic, student and
discriminator as *native-prediction* functions over one noise path -- so the same code trains SDXL, PixArt and SANA
students (through :mod:`.roles`) and the 2-D analytic testbeds of ``benchmarks/gmm.py``. Losses never ask which
backbone they run on; every conversion goes through :mod:`..parameterization`.

* :class:`VSD` -- variational score distillation, i.e. reverse KL (DMD, Yin et al. 2024, eq. 7; DMD2, Yin et al.
  2024b, with its GAN on real data and two-time-scale updates).
* :class:`FDistill` -- f-divergence distribution matching (Xu, Nie & Vahdat 2025, eq. 9): the VSD gradient weighted
  by ``h(r) = r^2 f''(r)`` of a discriminator's density-ratio estimate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from .. import parameterization as param
from . import losses
from .config import MethodConfig
from .divergences import get_divergence
from .models import Batch, DistillationModels, RandomSource

Logs = Dict[str, float]


class VSD:
    """Variational score distillation / reverse-KL distribution matching (DMD §3, DMD2 §4).

    Student update (DMD eq. 7, surrogate of algorithms.md §2): generate ``x = G(z)``, noise it to
    ``t ~ U[0.02, 0.98]``, and descend ``0.5 ||x - sg(x - g)||^2`` with
    ``g = (x̂0_fake - x̂0_real) / mean|x - x̂0_real|``, where ``x̂0_real`` is the CFG-guided teacher and
    ``x̂0_fake`` the critic. Critic update: denoising score matching on detached student samples, in the teacher's
    native parameterization. With ``gan_weight > 0`` (DMD2) a discriminator head on the critic's (or teacher's)
    features tells real latents from student samples, and the student also minimises the non-saturating GAN loss.
    """

    def __init__(self, config: MethodConfig, models: DistillationModels, student_timesteps: Sequence[float]):
        self.config = config
        self.models = models
        self.path = models.path
        self.student_timesteps = [float(t) for t in student_timesteps]
        self.divergence = get_divergence(config.divergence)
        self.gan_weight = config.resolved_gan_weight()
        self.discriminator_weight = config.resolved_discriminator_weight()
        self.discriminator_trunk = config.resolved_discriminator_trunk()
        self.uses_discriminator = config.uses_discriminator

    # --------------------------------------------------------------------------------------------------------
    # helpers
    # --------------------------------------------------------------------------------------------------------


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

    def _teacher_x0(self, x_t, t, condition, rng: RandomSource):
        """CFG-guided teacher ``x̂0`` (no grad), plus discriminator logits if the teacher is the trunk."""
        models = self.models
        guidance = rng.guidance(x_t.shape[0], self.config.guidance_scale, self.config.guidance_range).to(x_t.device)
        logits = None
        if models.teacher_has_embedded_guidance:
            with torch.no_grad():
                pred = models.teacher(x_t, t, condition, guidance=guidance)
            return param.to_x0(pred, x_t, t, self.path, models.prediction_type), logits
        want_logits = self.uses_discriminator and self.discriminator_trunk == "teacher"
        if want_logits:
            with models.input_grad_pass("teacher"), torch.enable_grad():
                cond_pred, features = models.teacher(x_t, t, condition, return_features=True)
                logits = models.discriminator(features, t)
            cond_pred = cond_pred.detach()
            with torch.no_grad():
                uncond_pred = models.teacher(x_t.detach(), t, models.unconditional(condition))
        else:
            with torch.no_grad():
                both = models.teacher(torch.cat([x_t, x_t]).detach(), torch.cat([t, t]),
                                      models.concat([models.unconditional(condition), condition]))
                uncond_pred, cond_pred = both.chunk(2)
        guided = losses.classifier_free_guidance(uncond_pred, cond_pred, guidance)
        return param.to_x0(guided, x_t.detach(), t, self.path, models.prediction_type), logits

    def _critic_x0(self, x_t, t, condition):
        """Critic ``x̂0`` (no grad), plus discriminator logits if the critic is the trunk."""
        models = self.models
        if self.uses_discriminator and self.discriminator_trunk == "critic":
            with models.input_grad_pass("critic"), torch.enable_grad():
                pred, features = models.critic(x_t, t, condition, return_features=True)
                logits = models.discriminator(features, t)
            pred = pred.detach()
        else:
            with torch.no_grad():
                pred = models.critic(x_t.detach(), t, condition)
            logits = None
        return param.to_x0(pred, x_t.detach(), t, self.path, models.prediction_type), logits

    def distribution_matching_weight(self, logits: Optional[torch.Tensor], t: torch.Tensor) -> Optional[torch.Tensor]:
        """Per-sample weight on the VSD gradient: none for reverse KL (h = 1)."""
        return None

    # --------------------------------------------------------------------------------------------------------
    # the two steps
    # --------------------------------------------------------------------------------------------------------

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

            x0_real, teacher_logits = self._teacher_x0(x_t, t, batch.condition, rng)
            x0_fake, critic_logits = self._critic_x0(x_t, t, batch.condition)
            logits = teacher_logits if teacher_logits is not None else critic_logits

            weight = self.distribution_matching_weight(logits, t)
            dm_loss, logs = losses.vsd_generator_loss(x, x0_real, x0_fake, weight=weight)
            loss = self.config.dm_weight * dm_loss
            logs = {f"student/{k_}": v for k_, v in logs.items()}
            logs["student/dm_loss"] = float(dm_loss.detach())
            if logits is not None and self.gan_weight > 0:
                gan_loss = losses.gan_generator_loss(logits)
                loss = loss + self.gan_weight * gan_loss
                logs["student/gan_loss"] = float(gan_loss.detach())
            logs["student/loss"] = float(loss.detach())
            logs["student/simulated_steps"] = float(k)
        return loss, logs

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

            real, real_condition = batch.real, batch.real_condition
            if real is None:
                raise ValueError(
                    "This method trains a discriminator, which needs real images: pass `real` latents in the batch "
                    "(--real_images)."
                )
            # Diffusion-GAN: the discriminator sees fake and real samples at random noise levels (DMD2 §4.2).
            t_fake = rng.times(self.path, n, self.config.diffusion_gan_time_range).to(x.device)
            t_real = rng.times(self.path, real.shape[0], self.config.diffusion_gan_time_range).to(x.device)
            fake_noisy = param.add_noise(x, rng.randn(x.shape).to(x), t_fake, self.path)
            real_noisy = param.add_noise(real, rng.randn(real.shape).to(real), t_real, self.path)
            if self.discriminator_trunk == "critic":
                # One pass through the critic for the DSM batch and both discriminator batches: the trunk learns
                # from both losses (DMD2), and DDP sees exactly one forward per backward.
                both_t = torch.cat([t, t_fake, t_real])
                pred, features = models.critic(
                    torch.cat([x_t, fake_noisy, real_noisy]), both_t,
                    models.concat([batch.condition, batch.condition, real_condition]), return_features=True,
                )
                pred = pred[:n]
                logits = models.discriminator(features[n:], both_t[n:])
            else:
                pred = models.critic(x_t, t, batch.condition)
                with torch.no_grad():
                    _, features = models.teacher(
                        torch.cat([fake_noisy, real_noisy]), torch.cat([t_fake, t_real]),
                        models.concat([batch.condition, real_condition]), return_features=True,
                    )
                logits = models.discriminator(features.detach(), torch.cat([t_fake, t_real]))
            logits_fake, logits_real = logits[:n], logits[n:]
            dsm = losses.denoising_loss(pred, x, noise, t, self.path, models.prediction_type)
            d_loss = losses.gan_discriminator_loss(logits_real, logits_fake)
            loss = dsm + self.discriminator_weight * d_loss
            logs.update({
                "critic/dsm_loss": float(dsm.detach()),
                "critic/discriminator_loss": float(d_loss.detach()),
                "critic/logit_real": float(logits_real.detach().float().mean()),
                "critic/logit_fake": float(logits_fake.detach().float().mean()),
                "critic/loss": float(loss.detach()),
            })
        return loss, logs

    def state_dict(self) -> Dict[str, Any]:
        """Method state that must survive a resume (none for VSD)."""
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass


class FDistill(VSD):
    """f-divergence distribution matching (f-distill, Xu et al. 2025, §3-4).

    The VSD gradient of each sample is weighted by ``h(r_t(x_t))/mean(h)`` where ``h(r) = r^2 f''(r)`` and
    ``r_t = p_t/q_t`` is estimated as ``exp(logit)`` of the discriminator at the same ``(x_t, t)``, clipped to
    ``[0.1, 20]`` and normalised per time bin (§6.3-6.4). The discriminator is trained in the critic step and also
    gives the generator its non-saturating GAN term.
    """

    def __init__(self, config: MethodConfig, models: DistillationModels, student_timesteps: Sequence[float]):
        super().__init__(config, models, student_timesteps)
        self.ratio_normalizer = losses.RatioNormalizer(
            num_bins=config.ratio_bins, t_min=self.path.t_min, t_max=self.path.t_max, ema=config.ratio_ema
        )

    def distribution_matching_weight(self, logits, t):
        ratio = losses.density_ratio(
            logits.detach(), logit_clamp=self.config.logit_clamp,
            lower=self.config.ratio_clip[0], upper=self.config.ratio_clip[1],
        )
        ratio = self.ratio_normalizer(ratio, t.to(ratio.device))
        return losses.f_divergence_weight(ratio, self.divergence)

    def state_dict(self):
        return {"ratio_normalizer": self.ratio_normalizer.state_dict()}

    def load_state_dict(self, state):
        if "ratio_normalizer" in state:
            self.ratio_normalizer.load_state_dict(state["ratio_normalizer"])


def build_method(config: MethodConfig, models: DistillationModels, student_timesteps: Sequence[float]) -> VSD:
    """The method class for a config: VSD for reverse KL, FDistill for every other divergence."""
    cls = FDistill if config.is_f_divergence else VSD
    return cls(config, models, student_timesteps)

