"""Shared fixtures: a tiny config (random tiny backbone, 64 px) and a tiny MVTec-layout line on disk.

Textures are seeded noise, smoothed so neighbouring pixels correlate; a defect is a bright square.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything can import huggingface_hub

import components  # noqa: E402,F401  (first: makes torchvision, and so timm, importable)

from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from scipy import ndimage  # noqa: E402

from components.config import Config, validate  # noqa: E402

TINY_PARAMS = {
    "data": {"image_size": [64, 64], "batch_size": 4, "calibration_fraction": 0.25, "seed": 0},
    "backbone": {"name": "mobilenetv2_050", "layers": [1, 2], "weights": "random"},
    "detector": {"method": "patchcore", "patchcore": {
        "pretrain_embed_dim": 32, "target_embed_dim": 32, "coreset_ratio": 0.25, "projection_dim": 16,
        "num_neighbors": 3, "smoothing_sigma": 2.0, "seed": 0}},
}
SIZE = 64
SQUARE = (20, 36, 24, 40)  # top, bottom, left, right of the bright square (16 x 16 px)


def texture(seed: int, size: int = SIZE) -> np.ndarray:
    """Seeded smoothed noise texture. -> uint8 (size, size, 3) with values roughly in [60, 190]."""
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.normal(size=(size, size, 3)), sigma=(1.0, 1.0, 0))
    noise = noise / noise.std()
    return np.clip(125 + 30 * noise, 0, 255).astype(np.uint8)


def with_square(image: np.ndarray, square: tuple[int, int, int, int] = SQUARE) -> tuple[np.ndarray, np.ndarray]:
    """A copy of image (H, W, 3) with a bright square, and its bool mask (H, W)."""
    top, bottom, left, right = square
    out = image.copy()
    out[top:bottom, left:right] = 250
    mask = np.zeros(image.shape[:2], dtype=bool)
    mask[top:bottom, left:right] = True
    return out, mask


def to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 (H, W, 3) images -> float (N, 3, H, W) in [0, 1]."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(255.0)


def write_line(root: Path, n_train: int = 8, n_good_test: int = 3, n_defect: int = 3) -> Path:
    """A small product line in MVTec layout under root (train/good, test/{good,square}, ground_truth)."""
    for sub in ("train/good", "test/good", "test/square", "ground_truth/square"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n_train):
        Image.fromarray(texture(i)).save(root / "train" / "good" / f"{i:03d}.png")
    for i in range(n_good_test):
        Image.fromarray(texture(1000 + i)).save(root / "test" / "good" / f"{i:03d}.png")
    for i in range(n_defect):
        image, mask = with_square(texture(2000 + i))
        Image.fromarray(image).save(root / "test" / "square" / f"{i:03d}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(root / "ground_truth" / "square" / f"{i:03d}_mask.png")
    return root


@pytest.fixture(autouse=True, scope="session")
def _offline_hub() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture
def tiny_params() -> dict:
    """The raw (YAML-shaped) tiny parameters; a fresh deep copy per test."""
    import copy

    return copy.deepcopy(TINY_PARAMS)


@pytest.fixture
def tiny_config(tiny_params: dict) -> Config:
    """Random-init mobilenetv2_050 (levels 1, 2: strides 4, 8), 64 px, batch 4, coreset ratio 0.25."""
    return validate(tiny_params, source="tiny_config")


@pytest.fixture
def tiny_line(tmp_path: Path) -> Path:
    """A product line on disk: 8 good train images, 3 good and 3 defective (bright square) test images."""
    return write_line(tmp_path / "line")


@pytest.fixture
def textures() -> Callable[..., torch.Tensor]:
    """Factory: textures(seeds, defect=False) -> (N, 3, 64, 64) float in [0, 1]."""

    def make(seeds, defect: bool = False) -> torch.Tensor:
        return to_tensor([with_square(texture(s))[0] if defect else texture(s) for s in seeds])

    return make
