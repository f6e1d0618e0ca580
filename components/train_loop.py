"""The training loop every torch-trained method shares (dinomaly, students, transformaly, divide_assemble):
resume from a checkpoint, run the remaining optimiser steps, checkpoint every `checkpoint_every` steps (and
after the last), report each step to `log_step` and `progress`. The step itself (batch, loss, optimiser
update) is the method's own: a function of the 0-based step that returns that step's metrics.

A run is resumable because the step function draws its batch from (seed, step) only
(components.checkpoints.batch_indices) and the checkpoint holds the modules, the optimisers' state and,
with save_rng, the global RNG: a resumed run continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from components import checkpoints
from components.detector import ProgressFn
from components.type_aliases import LogStepFn

logger = logging.getLogger(__name__)

StepFn = Callable[[int], dict[str, float]]
"""step(i): run 0-based optimiser step i -> its metrics (what log_step receives)."""


class TrainingRun:
    """`total` optimiser steps of the `name` method's run `run_key` (its fingerprint, components.checkpoints.
    run_fingerprint) over `modules` and `optimizers`; checkpoints in `checkpoint_dir` (None: none) every
    `checkpoint_every` steps, with the global RNG of `device` when save_rng."""

    def __init__(self, name: str, run_key: str, total: int, modules: dict[str, nn.Module],
                 optimizers: dict[str, torch.optim.Optimizer], device: torch.device, checkpoint_every: int,
                 checkpoint_dir: str | Path | None = None, save_rng: bool = False) -> None:
        self.name, self.run_key, self.total = name, run_key, total
        self.modules, self.optimizers, self.device = modules, optimizers, device
        self.checkpoint_every, self.checkpoint_dir, self.save_rng = checkpoint_every, checkpoint_dir, save_rng
        self.start = 0
        self._t0 = time.perf_counter()
        self.seconds = 0.0

    def resume(self) -> int:
        """Load a matching checkpoint from checkpoint_dir (if any) -> the step to start from (0: none). Starts
        the clock of `stats`' train_s."""
        if self.checkpoint_dir is not None:
            self.start = checkpoints.restore_checkpoint(self.checkpoint_dir, self.name, self.run_key, self.modules,
                                                        self.optimizers, self.device)
        self._t0 = time.perf_counter()
        return self.start

    def run(self, step: StepFn, progress: ProgressFn | None = None,
            log_step: LogStepFn | None = None) -> dict[str, float]:
        """Steps start .. total - 1; after each (1-based `done`): a checkpoint when due, log_step(done, metrics),
        progress("train", done, total). -> the last step's metrics ({} when no step was left to run)."""
        last: dict[str, float] = {}
        for i in range(self.start, self.total):
            last = step(i)
            done = i + 1
            if self.checkpoint_dir is not None and checkpoints.checkpoint_due(done, self.checkpoint_every,
                                                                              self.total):
                checkpoints.save_checkpoint(self.checkpoint_dir, self.name, done, self.run_key, self.modules,
                                            self.optimizers, rng_device=self.device if self.save_rng else None)
            if log_step is not None:
                log_step(done, last)
            if progress is not None:
                progress("train", done, self.total)
        self.seconds = time.perf_counter() - self._t0
        return last

    def stats(self, total_key: str = "iterations") -> dict[str, float]:
        """{total_key: total, resumed_from_step, steps_run, train_s} (the fit_stats every method records)."""
        return {total_key: float(self.total), "resumed_from_step": float(self.start),
                "steps_run": float(self.total - self.start), "train_s": self.seconds}
