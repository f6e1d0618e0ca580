"""Divide-and-Assemble's losses and anomaly maps, as pure functions.

Training: L_G = rec_weight * L2(x, x_hat) + adv_weight * LSGAN(D(x_hat) -> 1) + align_weight * alignment,
L_D = LSGAN (D(x) -> 1, D(x_hat) -> 0), alignment = mean cosine distance between a frozen extractor's
features of x and of x_hat. LSGAN (least squares, Mao et al. 2017) rather than the saturating BCE: bounded
gradients, stable with the few steps this CPU allows.

Score: the paper combines a pixel reconstruction error with a feature-level error as
A = (1 - lambda) * rec + lambda * feature. Here each map is first divided by its mean over the training
images (`MapScales`), so lambda weighs two unitless maps; 0 = perfect reconstruction in both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def reconstruction_map(images: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """Squared error averaged over channels. images, recon (B, 3, H, W) -> (B, H, W)."""
    return (images - recon).pow(2).mean(dim=1)


def alignment_maps(feats: list[torch.Tensor], recon_feats: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per-level cosine distance of extractor features. L x (B, C_l, h_l, w_l) twice -> L x (B, h_l, w_l)."""
    return [1.0 - F.cosine_similarity(a, b, dim=1) for a, b in zip(feats, recon_feats, strict=True)]


def alignment_map(feats: list[torch.Tensor], recon_feats: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """Mean over levels of the cosine-distance maps, each upsampled (bilinear) to `size`. -> (B, *size)."""
    maps = [F.interpolate(m.unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1)
            for m in alignment_maps(feats, recon_feats)]
    return torch.stack(maps).mean(dim=0)


def alignment_loss(feats: list[torch.Tensor], recon_feats: list[torch.Tensor]) -> torch.Tensor:
    """Scalar: the mean over levels of each level's mean cosine distance."""
    return torch.stack([m.mean() for m in alignment_maps(feats, recon_feats)]).mean()


def lsgan_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """0.5 * (mean (D(x) - 1)^2 + mean D(x_hat)^2). Logits of any shape -> scalar."""
    return 0.5 * ((real_logits - 1.0).pow(2).mean() + fake_logits.pow(2).mean())


def lsgan_generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """mean (D(x_hat) - 1)^2: the generator wants its reconstructions judged real. -> scalar."""
    return (fake_logits - 1.0).pow(2).mean()


@dataclass(frozen=True)
class MapScales:
    """Mean value of the reconstruction and alignment maps over the training images (both > 0)."""

    reconstruction: float
    alignment: float

    def to_dict(self) -> dict[str, float]:
        return {"reconstruction": self.reconstruction, "alignment": self.alignment}


def combine_maps(rec: torch.Tensor, align: torch.Tensor, scales: MapScales, align_weight: float) -> torch.Tensor:
    """(1 - w) * rec / scale_rec + w * align / scale_align. rec, align (B, H, W) -> (B, H, W)."""
    return (1.0 - align_weight) * rec / scales.reconstruction + align_weight * align / scales.alignment

