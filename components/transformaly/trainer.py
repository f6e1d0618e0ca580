"""Transformaly's student training: Adam on the students' weights, `epochs` passes over the good images in
seeded batches, per-step callbacks, and checkpoints to resume an interrupted run.

Determinism: the batch of each step is a pure function of (seed, step) (components.checkpoints.batch_indices
with drop_last=False: a seeded permutation per epoch, the last partial batch kept), the network stays in
eval mode (no dropout, fixed BatchNorm statistics) and the teacher is frozen, so nothing random happens
after initialisation: a run resumed from a checkpoint (student weights + Adam moments + step) continues
exactly as the uninterrupted run would have.

Checkpoints (components.checkpoints): the student weights and Adam's state, with the fingerprint of config,
teacher weights and training images; one of another run is ignored (logged).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch

from components import checkpoints
from components.detector import ProgressFn
from components.transformaly.config import TransformalyConfig
from components.transformaly.loss import distillation_loss
from components.transformaly.model import TeacherPass, TransformalyNet

logger = logging.getLogger(__name__)

LogStepFn = Callable[[int, dict[str, float]], None]
"""log_step(step, metrics): called after every optimiser step (1-based) with loss, per-block losses, epoch."""


def fingerprint(params: TransformalyConfig, teacher_sha256: str, images: torch.Tensor) -> str:
    """What a checkpoint must match to be resumed: training hyperparameters, teacher weights, the images."""
    runtime = {"checkpoint_every", "threads", "device", "smoothing_sigma"}
    return checkpoints.run_fingerprint(params, runtime, teacher_sha256, images)


def teacher_passes(net: TransformalyNet, images: torch.Tensor, batch_size: int, device: torch.device) -> TeacherPass:
    """The teacher's pass over every image, concatenated: images (N, 3, H, W) -> TeacherPass with N rows."""
    parts = [net.teacher_pass(images[i:i + batch_size].to(device=device, dtype=torch.float32))
             for i in range(0, images.shape[0], batch_size)]
    return TeacherPass(torch.cat([p.first_input for p in parts]),
                       [torch.cat([p.outputs[b] for p in parts]) for b in range(len(parts[0].outputs))],
                       torch.cat([p.pooled for p in parts]))


def train(net: TransformalyNet, images: torch.Tensor, params: TransformalyConfig, device: torch.device,
          run_key: str, cache: TeacherPass | None, progress: ProgressFn | None = None,
          log_step: LogStepFn | None = None, checkpoint_dir: str | Path | None = None) -> dict[str, float]:
    """Train net's students on images (N, 3, H, W) (kept on the CPU). `cache`: the teacher's pass over all
    images (see `teacher_passes`), or None to run the teacher every step. Returns statistics."""
    optimizer = torch.optim.Adam(net.student.parameters(), lr=params.lr, weight_decay=params.weight_decay)
    modules, optimizers = {"student": net.student}, {"student": optimizer}
    start = checkpoints.restore_checkpoint(checkpoint_dir, "transformaly", run_key, modules, optimizers, device) \
        if checkpoint_dir else 0
    per_epoch = checkpoints.steps_per_epoch(images.shape[0], params.batch_size, drop_last=False)
    total = params.epochs * per_epoch
    t0, last = time.perf_counter(), float("nan")
    for step in range(start, total):
        idx = checkpoints.batch_indices(step, images.shape[0], params.batch_size, params.seed, drop_last=False)
        passed = select_rows(cache, idx.to(cache.first_input.device)) if cache is not None else \
            net.teacher_pass(images[idx].to(device=device, dtype=torch.float32))
        loss, per_block = distillation_loss(passed.outputs, net.student_pass(passed.student_inputs()))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        last, done = float(loss.item()), step + 1
        if checkpoint_dir is not None and checkpoints.checkpoint_due(done, params.checkpoint_every, total):
            checkpoints.save_checkpoint(checkpoint_dir, "transformaly", done, run_key, modules, optimizers)
        if log_step is not None:
            metrics = {"loss": last, "epoch": float(step // per_epoch)}
            metrics.update({f"loss_block{b}": float(v) for b, v in enumerate(per_block.tolist())})
            log_step(done, metrics)
        if progress is not None:
            progress("train", done, total)
    return {"steps": float(total), "resumed_from_step": float(start), "steps_run": float(total - start),
            "train_s": time.perf_counter() - t0, "final_loss": last, "feature_cache": float(cache is not None)}


def select_rows(cache: TeacherPass, idx: torch.Tensor) -> TeacherPass:
    """The rows `idx` (K,) of every tensor of a cached TeacherPass."""
    return TeacherPass(cache.first_input[idx], [o[idx] for o in cache.outputs], cache.pooled[idx])
