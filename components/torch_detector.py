"""The plumbing shared by the detectors that train torch networks (dinomaly, students, transformaly,
divide_assemble): their config section, device and thread settings, the training images in memory, the
scoring loop, and the saved model's safetensors + metadata.json around write_model_dir/read_saved_model.

A subclass is registered under the name of its `cfg.detector` section (`@register_detector("dinomaly")` ->
`self.params = cfg.detector.dinomaly`); that section has `device` ("auto", "cpu", "cuda") and `threads`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from safetensors.torch import save_file

from components.backbones import WeightsInfo
from components.config import Config, validate
from components.detector import (
    BaseDetector,
    ImageInput,
    ProgressFn,
    ScoreBatch,
    iter_image_batches,
    read_saved_model,
    write_model_dir,
)
from components.maps import top_mean

logger = logging.getLogger(__name__)
VERSION = "0.1.0"
T = TypeVar("T", bound="TorchDetector")


class TorchDetector(BaseDetector):
    """BaseDetector with `params` (the method's config section), `weights_` (lineage of the frozen weights)
    and `fit_stats_`. Subclasses implement fit, is_fitted, save/load (through `write_saved_model` and
    `open_saved_model`) and either `anomaly_maps` (image score = top_mean of the map) or `score_batch`."""

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.params: Any = getattr(cfg.detector, self.name)
        self.weights_: WeightsInfo | None = None
        self.fit_stats_: dict[str, float] = {}

    # -------------------------------------------------------------------------------------- runtime
    def device(self) -> torch.device:
        if self.params.device == "cuda" or (self.params.device == "auto" and torch.cuda.is_available()):
            return torch.device("cuda")
        return torch.device("cpu")

    def _set_threads(self) -> None:
        if self.params.threads > 0:
            torch.set_num_threads(self.params.threads)

    def collect_images(self, images: ImageInput, dtype: torch.dtype = torch.float16) -> torch.Tensor:
        """Every training image, in memory as `dtype` on the CPU. -> (N, 3, H, W); all must share H, W."""
        return collect_images(images, self.cfg.data.batch_size, dtype)

    # ---------------------------------------------------------------------------------------- score
    def score(self, images: ImageInput, progress: ProgressFn | None = None) -> ScoreBatch:
        """images (B, 3, H, W) in [0, 1] -> ScoreBatch with maps at (H, W), batch by batch (`score_batch`)."""
        self.check_fitted()
        self._set_threads()
        out, done = [], 0
        for batch in iter_image_batches(images, self.cfg.data.batch_size):
            check_input(batch)
            scores, amap = self.score_batch(batch)
            scores = scores.numpy() if isinstance(scores, torch.Tensor) else np.asarray(scores)
            out.append(ScoreBatch(scores.astype(np.float32), amap.numpy().astype(np.float32)))
            done += batch.shape[0]
            if progress:
                progress("score", done, None)
        return ScoreBatch.concat(out)

    def score_batch(self, batch: torch.Tensor) -> tuple[torch.Tensor | np.ndarray, torch.Tensor]:
        """batch (B, 3, H, W) -> (image scores (B,), anomaly maps (B, H, W) on the CPU). Default: the maps of
        `anomaly_maps`, image score = mean of the top `params.top_ratio` of each map."""
        amap = self.anomaly_maps(batch)
        return top_mean(amap, self.params.top_ratio), amap

    def anomaly_maps(self, batch: torch.Tensor) -> torch.Tensor:
        """batch (B, 3, H, W) -> anomaly maps (B, H, W) float on the CPU."""
        raise NotImplementedError

    # ----------------------------------------------------------------------------------- save/load
    def common_metadata(self) -> dict:
        """The metadata.json fields every trained detector writes (subclasses add their own)."""
        return {"method": self.name, "library_version": VERSION, "config": self.cfg.to_dict(),
                "fit_stats": self.fit_stats_}

    def write_saved_model(self, directory: str | Path, tensors: dict[str, dict[str, torch.Tensor]],
                          extra: dict[str, Callable[[Path], None]] | None = None) -> Path:
        """Save: one safetensors file per entry of `tensors` (file name -> state), metadata.json from
        `self.metadata()`, the threshold if calibrated, and `extra` writers, atomically with a manifest."""
        self.check_fitted()
        meta = self.metadata()
        writers: dict[str, Callable[[Path], None]] = {
            name: (lambda p, state=state: save_file(state, str(p))) for name, state in tensors.items()}
        writers["metadata.json"] = lambda p: p.write_text(json.dumps(meta, indent=2, sort_keys=True))
        writers.update(self.threshold_writer())
        writers.update(extra or {})
        return write_model_dir(directory, self.name, writers)

    def metadata(self) -> dict:
        return self.common_metadata()

    @classmethod
    def open_saved_model(cls: type[T], directory: str | Path,
                         needed: tuple[str, ...]) -> tuple[T, dict[str, Path], dict]:
        """Load's start: the checksum-verified files (`needed` must be there), a detector configured from the
        saved config with its fit_stats_ and threshold set, and the parsed metadata.json."""
        files, meta = read_saved_model(directory, cls.name, needed)
        det = cls(validate(meta["config"], source=str(files["metadata.json"])))
        det.fit_stats_ = meta.get("fit_stats", {})
        det.read_threshold(files)
        return det, files, meta


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


def check_input(batch: torch.Tensor) -> None:
    """ValueError unless batch is (B, 3, H, W)."""
    if batch.ndim != 4 or batch.shape[1] != 3:
        raise ValueError(f"expected images (B, 3, H, W), got {tuple(batch.shape)}")
