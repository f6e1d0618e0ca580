"""Uninformed Students' losses and scores as pure functions (Bergmann et al., CVPR 2020, sections 3.1-3.3).

Teacher: knowledge distillation through a decoder (L_k), triplet metric learning (L_m), descriptor
compactness (L_c). Students: regression of the teacher's normalised descriptors. Scores: the ensemble's
regression error e and predictive variance v, each normalised by its mean/std on good images.
"""

from __future__ import annotations

import torch


def distillation_loss(decoded: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L_k: mean squared L2 distance between the decoded descriptors and the pretrained network's features.

    decoded (B, F), target (B, F) -> scalar."""
    return (decoded - target).pow(2).sum(dim=1).mean()


def triplet_loss(anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor,
                 margin: float) -> torch.Tensor:
    """L_m: max(0, margin + d+ - d-), d+ = |a - p|^2, d- = min(|a - n|^2, |p - n|^2) (the harder negative
    distance, as in the paper, after Balntas et al.), averaged over the batch.

    anchor, positive, negative (B, D) -> scalar."""
    d_pos = (anchor - positive).pow(2).sum(dim=1)
    d_neg = torch.minimum((anchor - negative).pow(2).sum(dim=1), (positive - negative).pow(2).sum(dim=1))
    return torch.relu(margin + d_pos - d_neg).mean()


def correlation_matrix(descriptors: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation between descriptor dimensions over the batch. (B, D) -> (D, D)."""
    centred = descriptors - descriptors.mean(dim=0, keepdim=True)
    cov = centred.T @ centred / descriptors.shape[0]
    std = cov.diagonal().clamp_min(0).sqrt() + eps
    return cov / (std[:, None] * std[None, :])


def compactness_loss(descriptors: torch.Tensor, form: str = "squared") -> torch.Tensor:
    """L_c over the off-diagonal correlations c_ij (i != j) of the batch's descriptors. form "squared":
    sum of c_ij^2 (0 for decorrelated dimensions, the default here); "sum": sum of c_ij, the paper's L_c
    (Bergmann et al. eq. 4; bounded below by -D, since the sum of all c_ij is the variance of the sum of the
    standardised dimensions). (B, D) -> scalar."""
    corr = correlation_matrix(descriptors)
    off = corr - torch.diag_embed(corr.diagonal())
    if form == "squared":
        return off.pow(2).sum()
    if form == "sum":
        return off.sum()
    raise ValueError(f"compactness {form!r}: expected 'squared' or 'sum'")


def regression_loss(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A student's loss: mean over pixels of the squared L2 distance to the teacher's normalised
    descriptor. predicted, target (B, D, h, w) -> scalar."""
    return (predicted - target).pow(2).sum(dim=1).mean()


def regression_error(students: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """e: squared distance of the ensemble mean to the teacher. students (M, B, D, H, W), target (B, D, H, W)
    -> (B, H, W)."""
    return (students.mean(dim=0) - target).pow(2).sum(dim=1)


def predictive_variance(students: torch.Tensor) -> torch.Tensor:
    """v: the ensemble's variance, mean_m |s_m|^2 - |mean_m s_m|^2 (written as mean_m |s_m - mean|^2, its
    numerically stable form). students (M, B, D, H, W) -> (B, H, W)."""
    return (students - students.mean(dim=0, keepdim=True)).pow(2).sum(dim=2).mean(dim=0)


def standardise(values: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(values - mean) / std, std floored at 1e-12. Any shape; mean/std broadcast."""
    return (values - mean) / std.clamp_min(1e-12)
