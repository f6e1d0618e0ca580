"""Dinomaly's training loop: AdamW (amsgrad) with linear warm-up and cosine decay, gradient clipping, the
loose loss with a ramped mining quantile, per-step callbacks, and checkpoints to resume an interrupted run.

Determinism: batches are a pure function of (seed, step) (a seeded permutation per epoch, last partial
batch dropped as in the reference), and dropout draws from the global torch RNG, seeded at the start and
saved in every checkpoint. A resumed run therefore continues exactly as the uninterrupted run would have.

Checkpoint folder (written atomically, sha256 manifest as every model): `state.safetensors` (trainable
weights, optimiser moments, RNG state) and `checkpoint.json` (step, fingerprint of config, encoder weights
and training images, optimiser hyperparameters). A checkpoint whose fingerprint differs is ignored (logged).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from components.detector import ArtifactError, ProgressFn, read_manifest, verified_files, write_model_dir
from components.dinomaly.config import DinomalyConfig
from components.dinomaly.loss import loose_loss, mining_quantile_at
from components.dinomaly.model import DinomalyNet, Encoded

logger = logging.getLogger(__name__)

CHECKPOINT_METHOD = "dinomaly-checkpoint"
LogStepFn = Callable[[int, dict[str, float]], None]
"""log_step(step, metrics): called after every optimiser step (1-based) with loss, per-group losses, lr."""


def warm_cosine_lr(step: int, base: float, final: float, total: int, warmup: int) -> float:
    """Learning rate of 0-based `step`: linear warm-up to `base` over `warmup` steps, then cosine decay from
    `base` to `final` over the remaining steps."""
    if step < warmup:
        return base * (step + 1) / warmup
    t, n = step - warmup, max(1, total - warmup)
    return final + 0.5 * (base - final) * (1.0 + math.cos(math.pi * t / n))


def batch_indices(step: int, n_images: int, batch_size: int, seed: int) -> torch.Tensor:
    """Indices of the images in 0-based `step`'s batch: a seeded permutation per epoch, drop-last.

    -> (min(batch_size, n_images),) int64. With fewer images than batch_size every batch is all images.
    """
    size = min(batch_size, n_images)
    per_epoch = n_images // size
    epoch, position = divmod(step, per_epoch)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n_images, generator=generator)
    return perm[position * size:(position + 1) * size]


def fingerprint(params: DinomalyConfig, encoder_sha256: str, images: torch.Tensor) -> str:
    """What a checkpoint must match to be resumed: training hyperparameters, encoder weights, the images."""
    digest = hashlib.sha256()
    hyper = params.model_dump(mode="json", exclude={"checkpoint_every", "threads", "device"})
    digest.update(json.dumps(hyper, sort_keys=True).encode())
    digest.update(encoder_sha256.encode())
    digest.update(str(tuple(images.shape)).encode())
    digest.update(images.contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def make_optimizer(net: DinomalyNet, params: DinomalyConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(net.trainable_modules().parameters(), lr=params.lr, betas=tuple(params.betas),
                             eps=params.eps, weight_decay=params.weight_decay, amsgrad=params.amsgrad)


def train(net: DinomalyNet, images: torch.Tensor, params: DinomalyConfig, device: torch.device,
          run_key: str, progress: ProgressFn | None = None, log_step: LogStepFn | None = None,
          checkpoint_dir: str | Path | None = None) -> dict[str, float]:
    """Train net's bottleneck and decoder on images (N, 3, H, W) (any float dtype, kept on the CPU).

    `run_key` is the fingerprint of this run (see `fingerprint`). The caller seeds the global RNG (dropout)
    and initialises the weights. Returns statistics: steps run here, resumed step, seconds, last loss.
    """
    optimizer = make_optimizer(net, params)
    start = 0
    if checkpoint_dir is not None:
        start = restore_checkpoint(Path(checkpoint_dir), net, optimizer, run_key, device)
    trainable = list(net.trainable_modules().parameters())
    t0, last = time.perf_counter(), float("nan")
    cache = encode_all(net, images, params, device) if start < params.iterations else None
    net.train()
    for step in range(start, params.iterations):
        idx = batch_indices(step, images.shape[0], params.batch_size, params.seed)
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
        last = float(loss.item())
        done = step + 1
        if checkpoint_dir is not None and params.checkpoint_every and (
                done % params.checkpoint_every == 0 or done == params.iterations):
            save_checkpoint(Path(checkpoint_dir), net, optimizer, done, run_key, device)
        if log_step is not None:
            metrics = {"loss": last, "lr": lr, "mining_quantile": quantile, "grad_norm": float(grad_norm)}
            metrics.update({f"loss_group{g}": float(v) for g, v in enumerate(group_losses.tolist())})
            log_step(done, metrics)
        if progress is not None:
            progress("train", done, params.iterations)
    net.eval()
    return {"iterations": float(params.iterations), "resumed_from_step": float(start),
            "steps_run": float(params.iterations - start), "train_s": time.perf_counter() - t0,
            "final_loss": last, "feature_cache": float(cache is not None)}


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


# ---------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(directory: Path, net: DinomalyNet, optimizer: torch.optim.Optimizer, step: int,
                    run_key: str, device: torch.device) -> Path:
    """Write (atomically, with sha256 manifest) everything needed to continue after `step` steps."""
    tensors = {f"net.{k}": v.detach().cpu().contiguous() for k, v in net.trainable_modules().state_dict().items()}
    state = optimizer.state_dict()
    for pid, moments in state["state"].items():
        for name, value in moments.items():
            tensors[f"optim.{pid}.{name}"] = torch.as_tensor(value).detach().cpu().contiguous()
    tensors["rng.cpu"] = torch.get_rng_state()
    if device.type == "cuda":
        tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
    meta = {"step": step, "fingerprint": run_key, "param_groups": state["param_groups"]}
    writers = {"state.safetensors": lambda p: save_file(tensors, str(p)),
               "checkpoint.json": lambda p: p.write_text(json.dumps(meta, indent=2, sort_keys=True))}
    path = write_model_dir(directory, CHECKPOINT_METHOD, writers)
    logger.info("dinomaly checkpoint at step %d -> %s", step, directory)
    return path


def restore_checkpoint(directory: Path, net: DinomalyNet, optimizer: torch.optim.Optimizer, run_key: str,
                       device: torch.device) -> int:
    """Load a matching checkpoint into net and optimizer (and the RNG); return its step (0 if none applies)."""
    if not (directory / "manifest.json").is_file():
        return 0
    if read_manifest(directory).get("method") != CHECKPOINT_METHOD:
        raise ArtifactError(f"{directory}: holds a saved model, not a dinomaly checkpoint; choose another folder")
    files = verified_files(directory, CHECKPOINT_METHOD)
    meta = json.loads(files["checkpoint.json"].read_text())
    if meta.get("fingerprint") != run_key:
        logger.warning("%s: checkpoint is from a different config, encoder or image set; training from step 0",
                       directory)
        return 0
    tensors = load_file(str(files["state.safetensors"]))
    net.trainable_modules().load_state_dict(
        {k[4:]: v for k, v in tensors.items() if k.startswith("net.")}, strict=True)
    moments: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            moments.setdefault(int(pid), {})[name] = value.to(device) if name != "step" else value
    optimizer.load_state_dict({"state": moments, "param_groups": meta["param_groups"]})
    torch.set_rng_state(tensors["rng.cpu"])
    if device.type == "cuda" and "rng.cuda" in tensors:
        torch.cuda.set_rng_state(tensors["rng.cuda"], device)
    logger.info("dinomaly: resumed from %s at step %d", directory, meta["step"])
    return int(meta["step"])
