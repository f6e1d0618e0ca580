"""Divide-and-Assemble's adversarial training loop, with per-step callbacks and resumable checkpoints.

Each step: one discriminator update (LSGAN on real images and detached reconstructions), then one generator
update on rec_weight * L2 + adv_weight * LSGAN + align_weight * feature alignment (the `extractor`: a frozen
ImageNet one, or the discriminator's latent features, frozen during the generator's update).
Both optimisers are Adam with constant learning rates.

Determinism: batches are a pure function of (seed, step) (components.checkpoints.batch_indices), the
networks have no dropout and no running statistics, and the RNG state is saved anyway. A resumed run
therefore continues exactly as the uninterrupted run would have.

The loop (resume, checkpoint every `checkpoint_every` steps, log_step, progress) is components.train_loop's;
the step is `train_step`. Checkpoints (components.checkpoints): both networks, both optimisers' state (named
"g" and "d") and the RNG state, with the fingerprint of config, extractor weights and training images; one of
another run is ignored.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from components import checkpoints
from components.backbones import FeatureExtractor
from components.detector import ProgressFn
from components.divide_assemble.config import DivideAssembleConfig
from components.divide_assemble.losses import (
    MapScales,
    alignment_loss,
    alignment_map,
    lsgan_discriminator_loss,
    lsgan_generator_loss,
    reconstruction_map,
)
from components.divide_assemble.networks import Generator, PatchDiscriminator
from components.train_loop import TrainingRun
from components.type_aliases import LogStepFn

logger = logging.getLogger(__name__)


def fingerprint(params: DivideAssembleConfig, extractor_sha256: str, images: torch.Tensor) -> str:
    """What a checkpoint must match to be resumed: training hyperparameters, extractor weights, the images."""
    runtime = {*DivideAssembleConfig.RUNTIME_FIELDS, "smoothing_sigma", "top_ratio", "score_align_weight"}
    return checkpoints.run_fingerprint(params, runtime, extractor_sha256, images)


def make_optimizers(gen: Generator, disc: PatchDiscriminator,
                    params: DivideAssembleConfig) -> dict[str, torch.optim.Adam]:
    betas = tuple(params.betas)
    return {"g": torch.optim.Adam(gen.parameters(), lr=params.lr, betas=betas),
            "d": torch.optim.Adam(disc.parameters(), lr=params.lr_d, betas=betas)}


def train(gen: Generator, disc: PatchDiscriminator, extractor: FeatureExtractor, images: torch.Tensor,
          params: DivideAssembleConfig, device: torch.device, run_key: str, progress: ProgressFn | None = None,
          log_step: LogStepFn | None = None, checkpoint_dir: str | Path | None = None) -> dict[str, float]:
    """Train gen and disc on images (N, 3, S, S) in [0, 1] at the working size S (kept on the CPU).

    `run_key` is the fingerprint of this run (see `fingerprint`); the caller seeds the weights' initialisation.
    log_step(step, {"loss_g", "loss_d", "loss_rec", "loss_adv", "loss_align", "lr"}). Returns statistics:
    steps run here, resumed step, seconds, last losses.
    """
    optimizers = make_optimizers(gen, disc, params)
    run = TrainingRun("divide_assemble", run_key, params.iterations, {"generator": gen, "discriminator": disc},
                      optimizers, device, params.checkpoint_every, checkpoint_dir, save_rng=True)
    run.resume()
    gen.train()
    disc.train()

    def step(i: int) -> dict[str, float]:
        idx = checkpoints.batch_indices(i, images.shape[0], params.batch_size, params.seed)
        return train_step(gen, disc, extractor, images[idx].to(device=device, dtype=torch.float32), optimizers,
                          params)

    metrics = run.run(step, progress, log_step)
    gen.eval()
    disc.eval()
    return {**run.stats(), **{f"final_{k}": v for k, v in metrics.items() if k != "lr"}}


def train_step(gen: Generator, disc: PatchDiscriminator, extractor: FeatureExtractor, x: torch.Tensor,
               optimizers: dict[str, torch.optim.Optimizer], params: DivideAssembleConfig) -> dict[str, float]:
    """One discriminator update then one generator update on the batch x (B, 3, S, S). -> the step's losses."""
    recon = gen(x)
    disc.requires_grad_(True)
    loss_d = lsgan_discriminator_loss(disc(x), disc(recon.detach()))
    optimizers["d"].zero_grad(set_to_none=True)
    loss_d.backward()
    optimizers["d"].step()

    disc.requires_grad_(False)  # the generator's step needs gradients through D, not into it
    loss_rec = F.mse_loss(recon, x)
    loss_adv = lsgan_generator_loss(disc(recon))
    with torch.no_grad():
        target = extractor(x)
    loss_align = alignment_loss(target, extractor(recon))
    loss_g = params.rec_weight * loss_rec + params.adv_weight * loss_adv + params.align_weight * loss_align
    optimizers["g"].zero_grad(set_to_none=True)
    loss_g.backward()
    optimizers["g"].step()
    disc.requires_grad_(True)
    return {"loss_g": float(loss_g.item()), "loss_d": float(loss_d.item()), "loss_rec": float(loss_rec.item()),
            "loss_adv": float(loss_adv.item()), "loss_align": float(loss_align.item()),
            "lr": float(optimizers["g"].param_groups[0]["lr"])}


def batch_maps(gen: Generator, extractor: FeatureExtractor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reconstruction and alignment error maps of x (B, 3, S, S) -> ((B, S, S), (B, S, S)), no gradients."""
    with torch.inference_mode():
        recon = gen(x)
        rec = reconstruction_map(x, recon)
        align = alignment_map(extractor(x), extractor(recon), tuple(x.shape[-2:]))
    return rec, align


def map_scales(gen: Generator, extractor: FeatureExtractor, images: torch.Tensor, batch_size: int,
               device: torch.device) -> MapScales:
    """Mean of each error map over the training images (N, 3, S, S): the score's normalisers."""
    rec_sum = align_sum = 0.0
    for start in range(0, images.shape[0], batch_size):
        rec, align = batch_maps(gen, extractor, images[start:start + batch_size].to(device, torch.float32))
        rec_sum += float(rec.double().sum())
        align_sum += float(align.double().sum())
    count = images.shape[0] * images.shape[-2] * images.shape[-1]
    return MapScales(max(rec_sum / count, 1e-12), max(align_sum / count, 1e-12))
