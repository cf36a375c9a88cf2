"""f-distill: f-divergence distribution matching.

Xu, Nie & Vahdat 2025, "One-step Diffusion Models with f-Divergence Distribution Matching" (arXiv 2502.15681).
"""

from __future__ import annotations

from typing import Sequence

from .. import losses
from ..config import MethodConfig
from ..models import DistillationModels
from .base import register_method
from .dmd2 import DMD2


@register_method
class FDistill(DMD2):
    """f-divergence distribution matching: the VSD gradient of each sample weighted by ``h(r)``.

    ``h(r) = r^2 f''(r)`` (f-distill's gradient theorem) of the density ratio ``r_t = p_t / q_t``, estimated as ``exp(logit)`` of the
    discriminator at the same ``(x_t, t)``, clipped to ``ratio_clip`` and normalised per time bin and over the batch. The
    discriminator reads the teacher's features by default, trains in the critic step, and also gives the generator
    its non-saturating GAN term.
    """

    name = "fdistill"
    description = (
        "f-distill: f-divergence distribution matching (Jensen-Shannon by default; forward KL, Hellinger, "
        "...), the VSD gradient weighted by h(r) of a discriminator's density-ratio estimate"
    )
    reference = "Xu, Nie & Vahdat 2025 (f-distill, arXiv 2502.15681)"
    tags = ("f-distill",)
    default_divergence = "js"
    divergences = None
    requires_discriminator = True
    default_discriminator_weight = 1.0
    default_discriminator_trunk = "teacher"

    def __init__(self, config: MethodConfig, models: DistillationModels, student_timesteps: Sequence[float]):
        super().__init__(config, models, student_timesteps)
        self.ratio_normalizer = losses.RatioNormalizer(
            num_bins=self.config.ratio_bins, t_min=self.path.t_min, t_max=self.path.t_max, ema=self.config.ratio_ema
        )

    def distribution_matching_weight(self, logits, t):
        ratio = losses.density_ratio(
            logits.detach(),
            logit_clamp=self.config.logit_clamp,
            lower=self.config.ratio_clip[0],
            upper=self.config.ratio_clip[1],
        )
        ratio = self.ratio_normalizer(ratio, t.to(ratio.device))
        return losses.f_divergence_weight(ratio, self.divergence)

    def state_dict(self):
        return {"ratio_normalizer": self.ratio_normalizer.state_dict()}

    def load_state_dict(self, state):
        if "ratio_normalizer" in state:
            self.ratio_normalizer.load_state_dict(state["ratio_normalizer"])
