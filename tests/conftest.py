"""Shared fixtures: a tiny config (random tiny backbone, 64 px) and a tiny MVTec-layout line on disk.

Textures are seeded noise, smoothed so neighbouring pixels correlate; a defect is a bright square.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before anything imports huggingface_hub (it reads this once, at import)
# Idle OpenMP threads sleep instead of spinning: tiny test steps on 2 shared cores ran ~10x faster this way.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import components  # noqa: E402,F401,I001  (first, on purpose: makes torchvision, and so timm, importable)

from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from scipy import ndimage  # noqa: E402

from components.config import Config, validate  # noqa: E402

# The real-services fixtures, shared by tests/e2e and tests/reliability (one set of services per session).
pytest_plugins = ("tests.service_fixtures",)

TINY_PARAMS = {
    "data": {"image_size": [64, 64], "batch_size": 4, "calibration_fraction": 0.25, "seed": 0},
    "backbone": {"name": "test_resnet", "layers": [1, 2], "weights": "random"},
    "detector": {"method": "patchcore", "patchcore": {
        "pretrain_embed_dim": 32, "target_embed_dim": 32, "coreset_ratio": 0.25, "projection_dim": 16,
        "num_neighbors": 3, "smoothing_sigma": 2.0, "seed": 0, "threads": 1}},
}
# Per-method tiny sections, merged into TINY_PARAMS by `tiny_config_for(method)` (the registry-wide contract
# tests in tests/unit/components/test_detector.py use it). A newly registered method adds its small, fast settings
# here; they are validated only when that method is tested, so a schema change elsewhere breaks nothing else.
TINY_METHOD_PARAMS: dict[str, dict] = {
    "dinomaly": {"encoder": "cnn-variant", "cnn_layers": [1, 2, 3], "cnn_token_level": 1, "decoder_depth": 2,
                 "num_groups": 2, "iterations": 6, "warmup_steps": 1, "batch_size": 4, "mining_ramp": 0.5,
                 "smoothing_sigma": 2.0, "seed": 0, "device": "cpu", "threads": 1},
    "divide_assemble": {"image_size": 64, "channels": [8, 16, 16], "memory_size": 16, "block_sizes": [2, 4],
                        "iterations": 12, "batch_size": 4, "smoothing_sigma": 2.0, "seed": 0, "device": "cpu",
                        "threads": 1},
    # student_mode eval: train mode (the default) trains the tiny resnet's student BatchNorms on batch
    # statistics of 4 textures, whose running statistics then blur the 64 px map (the contract test's square
    # falls to 1.4x its surround); train mode has its own tests in test_transformaly.py
    "transformaly": {"encoder": "cnn-variant", "cnn_blocks": [1, 2], "epochs": 5, "batch_size": 4,
                     "student_mode": "eval", "smoothing_sigma": 2.0, "seed": 0, "device": "cpu", "threads": 1},
    # two tiny random timm backbones, both at backbone.layers [1, 2] (strides 4 and 8); the rest from patchcore
    "patchcore_ensemble": {"backbones": ["test_resnet", "test_efficientnet"]},
    "students": {"patch_sizes": [9], "channels": 8, "descriptor_dim": 8, "teacher_patches": 64,
                 "teacher_iterations": 8, "teacher_batch_size": 16, "distill_size": 32, "num_students": 2,
                 "iterations": 30, "batch_size": 2, "crop_size": 24, "lr": 1e-3, "teacher_cache": False,
                 "stats_max_images": 4, "smoothing_sigma": 2.0, "seed": 0, "device": "cpu", "threads": 1},
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


@pytest.fixture
def tiny_params() -> dict:
    """The raw (YAML-shaped) tiny parameters; a fresh deep copy per test."""
    import copy

    return copy.deepcopy(TINY_PARAMS)


@pytest.fixture(scope="session")
def tiny_config() -> Config:
    """Random-init timm `test_resnet` (levels 1, 2: 32 and 48 channels at strides 4 and 8), 64 px, batch 4,
    coreset ratio 0.25, 32-dim patch embeddings. Frozen, so one instance serves the session.

    Why test_resnet rather than mobilenetv2_050: with random weights, mobilenetv2_050 separated the
    bright-square images from good ones for only 4 of 5 initialisations (one gave defect/good score
    ratio 0.83); test_resnet separated them for 20 of 20 (worst ratio 2.5), and runs ~5x faster.
    threads 1: on two shared cores, multi-threaded tiny tensor ops ran up to 8x slower than one thread.
    """
    return validate(TINY_PARAMS, source="tiny_config")


@pytest.fixture(scope="session")
def tiny_config_for() -> Callable[[str], Config]:
    """Factory: tiny_config_for(method) -> tiny_config with detector.method = method and that method's
    section from TINY_METHOD_PARAMS (if any)."""

    def make(method: str) -> Config:
        import copy

        raw = copy.deepcopy(TINY_PARAMS)
        raw["detector"]["method"] = method
        if method in TINY_METHOD_PARAMS:
            raw["detector"][method] = copy.deepcopy(TINY_METHOD_PARAMS[method])
        return validate(raw, source=f"tiny_config_for({method!r})")

    return make


@pytest.fixture(scope="session")
def make_line() -> Callable[..., Path]:
    """Factory: make_line(root, n_train=8, n_good_test=3, n_defect=3) -> root (for module-scoped lines)."""
    return write_line


@pytest.fixture
def tiny_line(tmp_path: Path) -> Path:
    """A product line on disk: 8 good train images, 3 good and 3 defective (bright square) test images."""
    return write_line(tmp_path / "line")


@pytest.fixture(scope="session")
def textures() -> Callable[..., torch.Tensor]:
    """Factory: textures(seeds, defect=False) -> (N, 3, 64, 64) float in [0, 1]."""

    def make(seeds, defect: bool = False) -> torch.Tensor:
        return to_tensor([with_square(texture(s))[0] if defect else texture(s) for s in seeds])

    return make
