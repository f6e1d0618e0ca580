"""What the detectors that train torch networks (dinomaly, students, transformaly, divide_assemble) add to
BaseDetector (components.detector, which holds config, threads, input checks, the score loop and save/load):
the device, the training images in memory, seeded initialisation, and a default score built from an anomaly
map.

A subclass is registered under the name of its `cfg.detector` section (`@register_detector("dinomaly")` ->
`self.params = cfg.detector.dinomaly`); that section (components.method_config.TrainedMethodConfig) has
`device` ("auto", "cpu", "cuda"), `threads`, `seed` and `checkpoint_every`. Its `fit` trains in optimiser
steps (components.train_loop) and takes `log_step` and `checkpoint_dir` (capability `StepTrained`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import ClassVar, Literal

import numpy as np
import torch

from components.detector import BaseDetector, ImageInput, ScoreBatch, check_input, iter_image_batches
from components.maps import top_mean

logger = logging.getLogger(__name__)


class TorchDetector(BaseDetector):
    """BaseDetector for the torch-trained methods. Subclasses implement fit, is_fitted, save/load (through
    `write_saved_model` and `open_saved_model`) and either `anomaly_maps` (image score = top_mean of the map)
    or `score_batch`."""

    # components.capabilities.StepTrained: fit takes log_step and checkpoint_dir
    trains_in_steps: ClassVar[Literal[True]] = True

    # -------------------------------------------------------------------------------------- runtime
    def device(self) -> torch.device:
        if self.params.device == "cuda" or (self.params.device == "auto" and torch.cuda.is_available()):
            return torch.device("cuda")
        return torch.device("cpu")

    def collect_images(self, images: ImageInput, dtype: torch.dtype = torch.float16) -> torch.Tensor:
        """Every training image, in memory as `dtype` on the CPU. -> (N, 3, H, W); all must share H, W."""
        return collect_images(images, self.cfg.data.batch_size, dtype)

    # ---------------------------------------------------------------------------------------- score
    def _score_batch(self, batch: torch.Tensor) -> ScoreBatch:
        scores, amap = self.score_batch(batch)
        scores = scores.numpy() if isinstance(scores, torch.Tensor) else np.asarray(scores)
        return ScoreBatch(scores.astype(np.float32), amap.numpy().astype(np.float32))

    def score_batch(self, batch: torch.Tensor) -> tuple[torch.Tensor | np.ndarray, torch.Tensor]:
        """batch (B, 3, H, W) -> (image scores (B,), anomaly maps (B, H, W) on the CPU). Default: the maps of
        `anomaly_maps`, image score = mean of the top `params.top_ratio` of each map."""
        amap = self.anomaly_maps(batch)
        return top_mean(amap, self.params.top_ratio), amap

    def anomaly_maps(self, batch: torch.Tensor) -> torch.Tensor:
        """batch (B, 3, H, W) -> anomaly maps (B, H, W) float on the CPU."""
        raise NotImplementedError


@contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Run the block with the global RNG (and CUDA's on a CUDA device) seeded by `seed`, restored after."""
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        if device.type == "cuda":
            torch.cuda.manual_seed(seed)
        yield


def collect_images(images: ImageInput, batch_size: int, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """Every training image, in memory as `dtype` on the CPU. -> (N, 3, H, W); all must share H, W."""
    chunks = []
    for batch in iter_image_batches(images, batch_size):
        check_input(batch)
        if chunks and batch.shape[-2:] != chunks[0].shape[-2:]:
            raise ValueError(f"training images must share one size: got {tuple(chunks[0].shape[-2:])} and "
                             f"{tuple(batch.shape[-2:])} (set data.image_size)")
        chunks.append(batch.detach().to("cpu", dtype).contiguous())  # one layout: same numerics
    if not chunks:
        raise ValueError("fit needs at least one training image")
    return torch.cat(chunks)
