"""Training the student ensemble: normalisation statistics, the regression loop on random crops, and
checkpoints to resume an interrupted run.

Each step takes `batch_size` random crops of `crop_size` x `crop_size` output descriptors (from the image
reflect-padded by p // 2, so that border pixels are trained as they are scored) and, at every scale, trains
all M students to regress the teacher's normalised descriptors (one Adam over all students: their
parameters are disjoint, so this is M independent optimisers). Crops are a pure function of (seed, step)
and no layer is random, so a resumed run continues exactly as the uninterrupted run would have.

The loop (resume, checkpoint every `checkpoint_every` steps, log_step, progress) is components.train_loop's;
the step is `train_step`. Checkpoints (components.checkpoints): the student weights and Adam's state, with the
fingerprint of config, teacher and images (no RNG: nothing random happens after initialisation); one of
another run is ignored.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from components import checkpoints
from components.detector import ProgressFn
from components.students.config import StudentsConfig
from components.students.losses import regression_loss
from components.students.model import StudentsNet
from components.students.networks import pad_for_dense
from components.train_loop import TrainingRun
from components.type_aliases import LogStepFn

logger = logging.getLogger(__name__)


def crop_positions(step: int, n_images: int, height: int, width: int, crop: int, batch_size: int,
                   seed: int) -> torch.Tensor:
    """The crops of 0-based `step`: rows (image index, top, left), seeded by (seed, step). -> (B, 3) int64.

    Every pixel is equally likely to be in a crop: a corner drawn uniformly from [-(crop - 1), side - 1] and
    clamped into the image, so a border pixel is trained as often as an interior one (uniform corners would
    cover a pixel at the edge once for every `crop` times an interior pixel, leaving the borders undertrained
    and their regression error high on good images; seen on held-out good images, not on test labels)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    idx = torch.randint(n_images, (batch_size,), generator=generator)
    tops = (torch.randint(height + crop - 1, (batch_size,), generator=generator) - (crop - 1)).clamp(0, height - crop)
    lefts = (torch.randint(width + crop - 1, (batch_size,), generator=generator) - (crop - 1)).clamp(0, width - crop)
    return torch.stack([idx, tops, lefts], dim=1)


def crop_span(crop: int, stride: int) -> int:
    """Image pixels (per side) a crop of `crop` x `crop` output descriptors spans at dense stride `stride`."""
    return stride * (crop - 1) + 1


def take_crops(padded: torch.Tensor, positions: torch.Tensor, crop: int, patch_size: int,
               stride: int = 1) -> torch.Tensor:
    """Network inputs whose valid output is `crop` x `crop` descriptors centred at image pixels top + stride * i,
    left + stride * j (i, j < crop).

    padded (N, 3, H + p - 1, W + p - 1) -> (B, 3, span + p - 1, span + p - 1), span = crop_span(crop, stride)."""
    side = crop_span(crop, stride) + patch_size - 1
    return torch.stack([padded[i, :, t:t + side, c:c + side] for i, t, c in positions.tolist()])


def fingerprint(params: StudentsConfig, teacher_key: str, images: torch.Tensor) -> str:
    """What a checkpoint must match to be resumed: student hyperparameters, the teacher, the images."""
    runtime = {*StudentsConfig.RUNTIME_FIELDS, "teacher_cache", "stats_max_images", "smoothing_sigma",
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
    """Train net.students on images (N, 3, H, W) in [0, 1] (CPU). Teacher statistics must be set already.

    log_step(step, {"loss": mean over students and scales, "loss_p<size>": mean over students at that scale})."""
    optimizer = torch.optim.Adam(net.students.parameters(), lr=params.lr, weight_decay=params.weight_decay)
    run = TrainingRun("students", run_key, params.iterations, {"students": net.students},
                      {"students": optimizer}, device, params.checkpoint_every, checkpoint_dir)
    run.resume()
    padded = {p: pad_for_dense(images, p) for p in net.patch_sizes}
    net.students.train()
    last = run.run(lambda step: train_step(net, optimizer, images, padded, params, device, step), progress,
                   log_step)
    net.eval()
    return {**run.stats(), "final_loss": last.get("loss", float("nan"))}


def train_step(net: StudentsNet, optimizer: torch.optim.Optimizer, images: torch.Tensor,
               padded: dict[int, torch.Tensor], params: StudentsConfig, device: torch.device,
               step: int) -> dict[str, float]:
    """One optimiser step (0-based `step`) on its seeded crops of images (N, 3, H, W), taken from `padded`
    (patch size -> the images reflect-padded by pad_for_dense). -> the step's metrics."""
    n, _, h, w = images.shape
    stride = params.dense_stride
    crop = min(params.crop_size, (h - 1) // stride + 1, (w - 1) // stride + 1)
    span = crop_span(crop, stride)
    positions = crop_positions(step, n, h, w, span, params.batch_size, params.seed)
    losses = {}
    for p in net.patch_sizes:
        x = take_crops(padded[p], positions, crop, p, stride).to(device)
        with torch.no_grad():
            target = net.teacher_target(x, p)
        losses[p] = torch.stack([regression_loss(s[f"p{p}"](x), target) for s in net.students])
    loss = torch.cat(list(losses.values())).sum()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    mean = float(loss.detach()) / (len(net.students) * len(net.patch_sizes))
    return {"loss": mean, **{f"loss_p{p}": float(v.detach().mean()) for p, v in losses.items()}}
