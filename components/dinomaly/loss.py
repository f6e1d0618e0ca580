"""Dinomaly's loose loss with hard-point mining, and the anomaly map it implies (image score of the map:
components.maps.top_mean).

Pure functions on group features: encoder and decoder lists of (B, D, h, w), one entry per layer group.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the incoming gradient by `weights` (broadcast)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weights)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (weights,) = ctx.saved_tensors
        return grad * weights, None


def scale_grad(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """x unchanged; its gradient multiplied by weights (broadcastable to x). x (B, D, h, w), weights (B, 1, h, w)."""
    return _ScaleGrad.apply(x, weights)


def point_distance(encoder: torch.Tensor, decoder: torch.Tensor) -> torch.Tensor:
    """1 - cosine similarity over channels. (B, D, h, w) x2 -> (B, h, w)."""
    return 1.0 - F.cosine_similarity(encoder, decoder, dim=1)


def mining_weights(distance: torch.Tensor, quantile: float, factor: float) -> torch.Tensor:
    """Gradient weights of the hard-point mining. distance (B, h, w) -> (B, 1, h, w).

    The threshold is the k-th largest distance in the batch with k = max(1, floor(n * (1 - quantile)))
    (floored with a 1e-9 tolerance: 50 * (1 - 0.9) is 4.999... in binary and must give 5); points strictly
    below it (already well reconstructed) get `factor`, the others 1. quantile 0 mines none.
    """
    flat = distance.reshape(-1)
    k = max(1, math.floor(flat.numel() * (1.0 - quantile) + 1e-9))
    threshold = torch.topk(flat, k).values[-1]
    weights = torch.where(distance < threshold, torch.full_like(distance, factor), torch.ones_like(distance))
    return weights.unsqueeze(1)


def global_cosine_distance(encoder: torch.Tensor, decoder: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of 1 - cos(flattened encoder map, flattened decoder map). (B, D, h, w) x2 -> ()."""
    return (1.0 - F.cosine_similarity(encoder.flatten(1), decoder.flatten(1), dim=1)).mean()


def loose_loss(encoder: list[torch.Tensor], decoder: list[torch.Tensor], quantile: float,
               factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The loose loss: per group, the global cosine distance between the (detached) encoder group map and
    the decoder group map, averaged over groups; the gradient reaching each decoder point below the
    `quantile` of point distances is scaled by `factor`.

    encoder, decoder: G tensors (B, D, h, w) -> (loss (), per-group losses (G,) detached).
    """
    if len(encoder) != len(decoder) or not encoder:
        raise ValueError(f"loose_loss needs as many encoder as decoder groups, got {len(encoder)}, {len(decoder)}")
    losses = []
    for enc, dec in zip(encoder, decoder, strict=True):
        enc = enc.detach()
        with torch.no_grad():
            weights = mining_weights(point_distance(enc, dec), quantile, factor)
        losses.append(global_cosine_distance(enc, scale_grad(dec, weights)))
    stacked = torch.stack(losses)
    return stacked.mean(), stacked.detach()


def mining_quantile_at(step: int, total_steps: int, final: float, ramp: float) -> float:
    """The mining quantile grows linearly from 0 to `final` over the first `ramp` fraction of training
    (the reference: 0.9 reached at step 1000 of 10 000), then stays. ramp 0 -> `final` from the start."""
    ramp_steps = ramp * total_steps
    if ramp_steps <= 0:
        return final
    return min(final * step / ramp_steps, final)


def anomaly_map(encoder: list[torch.Tensor], decoder: list[torch.Tensor]) -> torch.Tensor:
    """Mean over groups of the per-point cosine distance. G x (B, D, h, w) -> (B, h, w)."""
    return torch.stack([point_distance(e, d) for e, d in zip(encoder, decoder, strict=True)]).mean(dim=0)

