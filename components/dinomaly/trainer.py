"""Dinomaly's training loop: AdamW (amsgrad) with linear warm-up and cosine decay, gradient clipping, the
loose loss with a ramped mining quantile, per-step callbacks, and checkpoints to resume an interrupted run.

Determinism: batches are a pure function of (seed, step) (components.checkpoints.batch_indices: a seeded
permutation per epoch, last partial batch dropped as in the reference), and dropout draws from the global
torch RNG, seeded at the start and saved in every checkpoint. A resumed run therefore continues exactly as
the uninterrupted run would have.

The loop (resume, checkpoint every `checkpoint_every` steps, log_step, progress) is components.train_loop's;
the step (`train_step`) is Dinomaly's. Checkpoints (components.checkpoints): the trainable weights, the
optimiser's state and the RNG state, with the fingerprint of config, encoder weights and training images; one
of another run is ignored (logged).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from torch import nn

from components import checkpoints
from components.detector import ProgressFn
from components.dinomaly.config import DinomalyConfig
from components.dinomaly.loss import loose_loss, mining_quantile_at
from components.dinomaly.model import DinomalyNet, Encoded
from components.train_loop import TrainingRun
from components.type_aliases import LogStepFn

logger = logging.getLogger(__name__)


def warm_cosine_lr(step: int, base: float, final: float, total: int, warmup: int) -> float:
    """Learning rate of 0-based `step`: linear warm-up to `base` over `warmup` steps, then cosine decay from
    `base` to `final` over the remaining steps."""
    if step < warmup:
        return base * (step + 1) / warmup
    t, n = step - warmup, max(1, total - warmup)
    return final + 0.5 * (base - final) * (1.0 + math.cos(math.pi * t / n))


def fingerprint(params: DinomalyConfig, encoder_sha256: str, images: torch.Tensor) -> str:
    """What a checkpoint must match to be resumed: training hyperparameters, encoder weights, the images."""
    return checkpoints.run_fingerprint(params, set(DinomalyConfig.RUNTIME_FIELDS), encoder_sha256, images)


def make_optimizer(net: DinomalyNet, params: DinomalyConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(net.trainable_modules().parameters(), lr=params.lr, betas=tuple(params.betas),
                             eps=params.eps, weight_decay=params.weight_decay, amsgrad=params.amsgrad)


def train(net: DinomalyNet, images: torch.Tensor, params: DinomalyConfig, device: torch.device,
          run_key: str, progress: ProgressFn | None = None, log_step: LogStepFn | None = None,
          checkpoint_dir: str | Path | None = None) -> dict[str, float]:
    """Train net's bottleneck and decoder on images (N, 3, H, W) (any float dtype, kept on the CPU).

    `run_key` is the fingerprint of this run (see `fingerprint`). The caller seeds the global RNG (dropout)
    and initialises the weights. log_step(step, {"loss", "lr", "mining_quantile", "grad_norm",
    "loss_group<g>"}). Returns statistics: steps run here, resumed step, seconds, last loss.
    """
    optimizer = make_optimizer(net, params)
    run = TrainingRun("dinomaly", run_key, params.iterations, {"net": net.trainable_modules()},
                      {"net": optimizer}, device, params.checkpoint_every, checkpoint_dir, save_rng=True)
    start = run.resume()
    trainable = list(net.trainable_modules().parameters())
    cache = encode_all(net, images, params, device) if start < params.iterations else None
    net.train()
    last = run.run(lambda step: train_step(net, optimizer, trainable, images, cache, params, device, step),
                   progress, log_step)
    net.eval()
    return {**run.stats(), "final_loss": last.get("loss", float("nan")),
            "feature_cache": float(cache is not None)}


def train_step(net: DinomalyNet, optimizer: torch.optim.Optimizer, trainable: list[nn.Parameter],
               images: torch.Tensor, cache: Encoded | None, params: DinomalyConfig, device: torch.device,
               step: int) -> dict[str, float]:
    """One optimiser step (0-based `step`) on its seeded batch of images (N, 3, H, W) or of the encoder cache.
    -> the step's metrics."""
    idx = checkpoints.batch_indices(step, images.shape[0], params.batch_size, params.seed)
    encoded = _select(cache, idx) if cache is not None else \
        net.encode(images[idx].to(device=device, dtype=torch.float32))
    quantile = mining_quantile_at(step, params.iterations, params.mining_quantile, params.mining_ramp)
    decoded = net.decode(encoded.fused, encoded.grid)
    loss, group_losses = loose_loss(encoded.targets, decoded, quantile, params.mining_factor)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = nn.utils.clip_grad_norm_(trainable, params.grad_clip_norm) if params.grad_clip_norm > 0 \
        else torch.tensor(float("nan"))
    lr = warm_cosine_lr(step, params.lr, params.final_lr, params.iterations, params.warmup_steps)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    metrics = {"loss": float(loss.item()), "lr": lr, "mining_quantile": quantile, "grad_norm": float(grad_norm)}
    metrics.update({f"loss_group{g}": float(v) for g, v in enumerate(group_losses.tolist())})
    return metrics


def encode_all(net: DinomalyNet, images: torch.Tensor, params: DinomalyConfig,
               device: torch.device) -> Encoded | None:
    """The frozen encoder's output for every image, computed once (exact: the encoder never changes and
    images are not augmented), or None when `cache_features` is off or it would exceed `cache_max_mb`.

    images (N, 3, H, W) -> Encoded with fused (N, T, D) and targets G x (N, D, h, w), on `device`.
    """
    if not params.cache_features:
        return None
    net.eval()
    chunks = []
    for start in range(0, images.shape[0], params.batch_size):
        chunks.append(net.encode(images[start:start + params.batch_size].to(device=device, dtype=torch.float32)))
        if start == 0:
            first = chunks[0]
            per_image = (first.fused[0].numel() + sum(t[0].numel() for t in first.targets)) * 4
            size_mb = per_image * images.shape[0] / 2**20
            if size_mb > params.cache_max_mb:
                logger.info("dinomaly: encoder cache would take %.0f MB > cache_max_mb %d: encoding every step",
                            size_mb, params.cache_max_mb)
                return None
    return Encoded(torch.cat([c.fused for c in chunks]),
                   [torch.cat([c.targets[g] for c in chunks]) for g in range(len(chunks[0].targets))],
                   chunks[0].grid)


def _select(cache: Encoded, idx: torch.Tensor) -> Encoded:
    idx = idx.to(cache.fused.device)
    return Encoded(cache.fused[idx], [t[idx] for t in cache.targets], cache.grid)
