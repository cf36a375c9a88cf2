"""DMD2: variational score distillation (reverse KL) with a diffusion GAN on real data.

Yin et al. 2024, "One-step Diffusion with Distribution Matching Distillation" (DMD, eq. 7) and Yin et al. 2024b,
"Improved Distribution Matching Distillation for Fast Image Synthesis" (DMD2: the diffusion GAN, two time-scale updates, backward simulation).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import losses
from .base import DistillationMethod, GeneratorTerms, Logs, register_method


@register_method
class DMD2(DistillationMethod):
    """Reverse-KL distribution matching (DMD eq. 7) with DMD2's GAN term and two time-scale updates.

    Generator loss (DMD2's ``compute_distribution_matching_loss``): ``dm_weight · 0.5 ||x - sg(x - g)||^2`` with
    ``g = (x̂0_fake - x̂0_real) / mean|x - x̂0_real|`` (per sample), plus ``gan_weight`` times the non-saturating
    GAN loss of the discriminator's logits when a discriminator trains (DMD2; on by default with
    ``--real_images``), plus ``regression_weight`` times DMD's regression loss on the teacher's (noise, sample) pairs
    (:meth:`~.base.DistillationMethod.regression_loss`; ``--real_images teacher``).
    """

    name = "dmd2"
    description = (
        "DMD/DMD2: reverse-KL distribution matching (variational score distillation) with an optional "
        "diffusion-GAN term on real images"
    )
    reference = "Yin et al. 2024 (DMD, arXiv 2311.18828); Yin et al. 2024b (DMD2, arXiv 2405.14867)"
    tags = ("dmd", "dmd2")
    default_divergence = "reverse_kl"
    divergences = ("reverse_kl",)
    default_discriminator_weight = 1e-2
    default_discriminator_trunk = "critic"
    #: DMD's regression loss on the teacher's (noise, sample) pairs (``--regression_weight``; f-distill inherits it)
    settings = ("regression_weight",)

    def distribution_matching_weight(self, logits: Optional[torch.Tensor], t: torch.Tensor) -> Optional[torch.Tensor]:
        """Per-sample weight ``h(r)`` on the VSD gradient: none for reverse KL (``h = 1``)."""
        return None

    def generator_loss(self, terms: GeneratorTerms) -> Tuple[torch.Tensor, Logs]:
        weight = self.distribution_matching_weight(terms.logits, terms.t)
        dm_loss, logs = losses.vsd_generator_loss(terms.x, terms.x0_real, terms.x0_fake, weight=weight)
        loss = self.config.dm_weight * dm_loss
        logs = dict(logs)
        logs["dm_loss"] = float(dm_loss.detach())
        if terms.logits is not None and self.gan_weight > 0:
            gan_loss = losses.gan_generator_loss(terms.logits)
            loss = loss + self.gan_weight * gan_loss
            logs["gan_loss"] = float(gan_loss.detach())
        return loss, logs
