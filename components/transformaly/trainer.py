"""Transformaly's student training: Adam on the students' weights, `epochs` passes over the good images in
seeded batches, per-step callbacks, and checkpoints to resume an interrupted run.

Determinism: the batch of each step is a pure function of (seed, step) (components.checkpoints.batch_indices
with drop_last=False: a seeded permutation per epoch, the last partial batch kept) and the teacher is frozen.
student_mode "eval": the network stays in eval mode (no dropout, fixed BatchNorm statistics), so nothing
random happens after initialisation. student_mode "train": the students train in train mode (dropout drawn
from the global RNG, seeded with `seed` inside a forked RNG so the caller's is untouched; checkpoints then
carry the RNG state). Either way a run resumed from a checkpoint (student weights and buffers + Adam moments
+ step [+ RNG]) continues exactly as the uninterrupted run would have.

The loop (resume, checkpoint every `checkpoint_every` steps, log_step, progress) is components.train_loop's;
the step is `train_step`. Checkpoints (components.checkpoints): the student weights and Adam's state, with the
fingerprint of config, teacher weights and training images; one of another run is ignored (logged).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from components import checkpoints
from components.detector import ProgressFn
from components.train_loop import TrainingRun
from components.transformaly.config import TransformalyConfig
from components.transformaly.loss import distillation_loss
from components.transformaly.model import TeacherPass, TransformalyNet
from components.type_aliases import LogStepFn

logger = logging.getLogger(__name__)


def fingerprint(params: TransformalyConfig, teacher_sha256: str, images: torch.Tensor) -> str:
    """What a checkpoint must match to be resumed: training hyperparameters, teacher weights, the images."""
    runtime = {*TransformalyConfig.RUNTIME_FIELDS, "smoothing_sigma"}
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
    images (see `teacher_passes`), or None to run the teacher every step. log_step(step, {"loss", "epoch",
    "loss_block<b>"}). Returns statistics."""
    optimizer = torch.optim.Adam(net.student.parameters(), lr=params.lr, weight_decay=params.weight_decay)
    per_epoch = checkpoints.steps_per_epoch(images.shape[0], params.batch_size, drop_last=False)
    random_layers = params.student_mode == "train"
    run = TrainingRun("transformaly", run_key, params.epochs * per_epoch, {"student": net.student},
                      {"student": optimizer}, device, params.checkpoint_every, checkpoint_dir,
                      save_rng=random_layers)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(params.seed)
        run.resume()
        net.train()
        try:
            last = run.run(lambda step: train_step(net, optimizer, images, cache, params, device, per_epoch, step),
                           progress, log_step)
        finally:
            net.eval()
    return {**run.stats("steps"), "final_loss": last.get("loss", float("nan")),
            "feature_cache": float(cache is not None)}


def train_step(net: TransformalyNet, optimizer: torch.optim.Optimizer, images: torch.Tensor,
               cache: TeacherPass | None, params: TransformalyConfig, device: torch.device, per_epoch: int,
               step: int) -> dict[str, float]:
    """One optimiser step (0-based `step`) on its seeded batch of images (N, 3, H, W) or of the teacher's
    cached pass. -> the step's metrics."""
    idx = checkpoints.batch_indices(step, images.shape[0], params.batch_size, params.seed, drop_last=False)
    passed = select_rows(cache, idx.to(cache.first_input.device)) if cache is not None else \
        net.teacher_pass(images[idx].to(device=device, dtype=torch.float32))
    loss, per_block = distillation_loss(passed.outputs, net.student_pass(passed.student_inputs()))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    metrics = {"loss": float(loss.item()), "epoch": float(step // per_epoch)}
    metrics.update({f"loss_block{b}": float(v) for b, v in enumerate(per_block.tolist())})
    return metrics


def select_rows(cache: TeacherPass, idx: torch.Tensor) -> TeacherPass:
    """The rows `idx` (K,) of every tensor of a cached TeacherPass."""
    return TeacherPass(cache.first_input[idx], [o[idx] for o in cache.outputs], cache.pooled[idx])
