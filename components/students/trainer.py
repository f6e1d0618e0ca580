"""Training the student ensemble: normalisation statistics, the regression loop on random crops, and
checkpoints to resume an interrupted run.

Each step takes `batch_size` random crops of `crop_size` x `crop_size` output pixels (from the image
reflect-padded by p // 2, so that border pixels are trained as they are scored) and, at every scale, trains
all M students to regress the teacher's normalised descriptors (one Adam over all students: their
parameters are disjoint, so this is M independent optimisers). Crops are a pure function of (seed, step)
and no layer is random, so a resumed run continues exactly as the uninterrupted run would have.

Checkpoints (components.checkpoints): the student weights and Adam's state, with the fingerprint of config,
teacher and images (no RNG: nothing random happens after initialisation); one of another run is ignored.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch

from components import checkpoints
from components.detector import ProgressFn
from components.students.config import StudentsConfig
from components.students.losses import regression_loss
from components.students.model import StudentsNet
from components.students.networks import pad_for_dense

logger = logging.getLogger(__name__)

LogStepFn = Callable[[int, dict[str, float]], None]
"""log_step(step, metrics): after every optimiser step (1-based): loss (mean over students and scales),
loss_p<size> (mean over students at that scale)."""


def crop_positions(step: int, n_images: int, height: int, width: int, crop: int, batch_size: int,
                   seed: int) -> torch.Tensor:
    """The crops of 0-based `step`: rows (image index, top, left), seeded by (seed, step). -> (B, 3) int64."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    idx = torch.randint(n_images, (batch_size,), generator=generator)
    tops = torch.randint(height - crop + 1, (batch_size,), generator=generator)
    lefts = torch.randint(width - crop + 1, (batch_size,), generator=generator)
    return torch.stack([idx, tops, lefts], dim=1)


def take_crops(padded: torch.Tensor, positions: torch.Tensor, crop: int, patch_size: int) -> torch.Tensor:
    """Network inputs whose valid output covers image pixels [top, top + crop) x [left, left + crop).

    padded (N, 3, H + p - 1, W + p - 1) -> (B, 3, crop + p - 1, crop + p - 1)."""
    side = crop + patch_size - 1
    return torch.stack([padded[i, :, t:t + side, c:c + side] for i, t, c in positions.tolist()])


def fingerprint(params: StudentsConfig, teacher_key: str, images: torch.Tensor) -> str:
    """What a checkpoint must match to be resumed: student hyperparameters, the teacher, the images."""
    runtime = {"checkpoint_every", "threads", "device", "teacher_cache", "stats_max_images", "smoothing_sigma",
               "top_ratio"}
    return checkpoints.run_fingerprint(params, runtime, teacher_key, images)


def stats_subset(images: torch.Tensor, limit: int) -> torch.Tensor:
    """At most `limit` images, evenly spaced. (N, 3, H, W) -> (min(N, limit), 3, H, W)."""
    if images.shape[0] <= limit:
        return images
    return images[torch.linspace(0, images.shape[0] - 1, limit).round().long()]


@torch.no_grad()
def fit_teacher_stats(net: StudentsNet, images: torch.Tensor, device: torch.device) -> None:
    """Per-channel mean/std of the teacher's dense descriptors over `images` (N, 3, H, W) -> t_mean/t_std."""
    for p in net.patch_sizes:
        total = sq = None
        count = 0
        for image in images.split(1):
            d = net.teacher_dense(image.to(device, torch.float32), p).double()  # (1, D, H, W)
            s, s2 = d.sum(dim=(0, 2, 3)), d.pow(2).sum(dim=(0, 2, 3))
            total, sq = (s, s2) if total is None else (total + s, sq + s2)
            count += d.shape[0] * d.shape[2] * d.shape[3]
        mean = total / count
        std = (sq / count - mean.pow(2)).clamp_min(0).sqrt()
        net.stat("t_mean", p).copy_(mean.float())
        net.stat("t_std", p).copy_(std.float().clamp_min(1e-6))


@torch.no_grad()
def fit_score_stats(net: StudentsNet, images: torch.Tensor, device: torch.device) -> None:
    """Mean/std over every pixel of `images` of the raw regression error and predictive variance per scale."""
    for p in net.patch_sizes:
        es, vs = [], []
        for image in images.split(1):
            e, v = net.raw_scores(image.to(device, torch.float32), p)
            es.append(e.flatten().double())
            vs.append(v.flatten().double())
        for name, values in (("e_stats", torch.cat(es)), ("v_stats", torch.cat(vs))):
            net.stat(name, p).copy_(torch.stack([values.mean(), values.std().clamp_min(1e-12)]).float())


def train_students(net: StudentsNet, images: torch.Tensor, params: StudentsConfig, device: torch.device,
                   run_key: str, progress: ProgressFn | None = None, log_step: LogStepFn | None = None,
                   checkpoint_dir: str | Path | None = None) -> dict[str, float]:
    """Train net.students on images (N, 3, H, W) in [0, 1] (CPU). Teacher statistics must be set already."""
    optimizer = torch.optim.Adam(net.students.parameters(), lr=params.lr, weight_decay=params.weight_decay)
    modules, optimizers = {"students": net.students}, {"students": optimizer}
    start = checkpoints.restore_checkpoint(checkpoint_dir, "students", run_key, modules, optimizers, device) \
        if checkpoint_dir else 0
    n, _, h, w = images.shape
    crop = min(params.crop_size, h, w)
    padded = {p: pad_for_dense(images, p) for p in net.patch_sizes}
    t0, last = time.perf_counter(), float("nan")
    net.students.train()
    for step in range(start, params.iterations):
        positions = crop_positions(step, n, h, w, crop, params.batch_size, params.seed)
        losses = {}
        for p in net.patch_sizes:
            x = take_crops(padded[p], positions, crop, p).to(device)
            with torch.no_grad():
                target = net.teacher_target(x, p)
            losses[p] = torch.stack([regression_loss(s[f"p{p}"](x), target) for s in net.students])
        loss = torch.cat(list(losses.values())).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        last, done = float(loss.detach()) / (len(net.students) * len(net.patch_sizes)), step + 1
        due = checkpoints.checkpoint_due(done, params.checkpoint_every, params.iterations)
        if checkpoint_dir is not None and due:
            checkpoints.save_checkpoint(checkpoint_dir, "students", done, run_key, modules, optimizers)
        if log_step is not None:
            log_step(done, {"loss": last, **{f"loss_p{p}": float(v.detach().mean()) for p, v in losses.items()}})
        if progress is not None:
            progress("train", done, params.iterations)
    net.eval()
    return {"iterations": float(params.iterations), "resumed_from_step": float(start),
            "steps_run": float(params.iterations - start), "train_s": time.perf_counter() - t0,
            "final_loss": last}
