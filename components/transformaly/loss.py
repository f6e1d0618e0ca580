"""The distillation loss and the discrepancy features derived from the same per-element squared error.

For a fine-tuned block with teacher output T and student output S (CNN (B, C, h, w) or ViT tokens (B, T, C)):
location error = mean over channels of (S - T)^2; the image's block discrepancy = its mean over locations
(tokens, the CLS token included, as the paper's code); the loss = mean over blocks of the batch's
per-block mean squared error.
"""

from __future__ import annotations

import torch


def location_errors(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """Squared error averaged over channels. (B, C, h, w) -> (B, h, w); ViT tokens (B, T, C) -> (B, T)."""
    if teacher.shape != student.shape:
        raise ValueError(f"teacher {tuple(teacher.shape)} and student {tuple(student.shape)} outputs differ")
    channel_dim = 1 if teacher.ndim == 4 else -1
    return (student - teacher).pow(2).mean(dim=channel_dim)


def block_discrepancy(teacher: list[torch.Tensor], student: list[torch.Tensor]) -> torch.Tensor:
    """Per-image, per-block mean squared error: n_blocks outputs -> (B, n_blocks)."""
    return torch.stack([location_errors(t, s).flatten(1).mean(dim=1) for t, s in
                        zip(teacher, student, strict=True)], dim=1)


def distillation_loss(teacher: list[torch.Tensor], student: list[torch.Tensor]) -> tuple[torch.Tensor,
                                                                                           torch.Tensor]:
    """(loss = mean of the per-block MSEs (scalar), per-block MSEs (n_blocks,)). Teacher outputs are targets
    (no gradient flows into them)."""
    per_block = torch.stack([(s - t.detach()).pow(2).mean() for t, s in zip(teacher, student, strict=True)])
    return per_block.mean(), per_block
