"""A demo product line in MVTec layout, built from scikit-image's bundled textures with synthetic defects.

Good parts are random crops (with flips) of one texture; defective parts carry one of three defects, drawn
by this module together with its ground-truth mask (255 = defect):

- ``scratch``: a thin, slightly curved line, brighter or darker than the surface;
- ``blob``: a soft elliptical stain;
- ``missing``: a rectangular piece replaced by a flat fill (a chipped or missing patch).

Everything is seeded, and PNG bytes depend only on the arguments, so the DVC hash of a rebuilt line is
stable. Nothing is downloaded: the textures ship inside scikit-image.

    root = build_demo_line(Path(".defectops/demo/brick"), texture="brick", n_train=12, seed=0)
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

logger = logging.getLogger(__name__)

TEXTURES = ("brick", "grass", "gravel")
DEFECTS = ("scratch", "blob", "missing")


@dataclass(frozen=True)
class DemoSpec:
    texture: str = "brick"
    n_train: int = 20
    n_test_good: int = 8
    n_per_defect: int = 4
    size: int = 160  # crop side in pixels; the backbone's image_size resizes it
    seed: int = 0


def load_texture(name: str) -> np.ndarray:
    """One bundled scikit-image texture as float32 (H, W) in [0, 1]."""
    if name not in TEXTURES:
        raise ValueError(f"unknown demo texture {name!r}; choose one of {', '.join(TEXTURES)}")
    import skimage.data

    return getattr(skimage.data, name)().astype(np.float32) / 255.0


def random_crop(texture: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A (size, size) crop at a random place, randomly flipped. texture (H, W) -> (size, size)."""
    h, w = texture.shape
    if size > min(h, w):
        raise ValueError(f"crop size {size} exceeds the texture's {h}x{w}")
    top, left = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
    crop = texture[top: top + size, left: left + size]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    if rng.random() < 0.5:
        crop = crop[::-1, :]
    return np.ascontiguousarray(crop)


def scratch(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A thin curved line. image (S, S) -> (image, mask (S, S) bool)."""
    s = image.shape[0]
    t = np.linspace(0.0, 1.0, 4 * s)
    start = rng.uniform(0.15 * s, 0.85 * s, 2)
    angle = rng.uniform(0, np.pi)
    length = rng.uniform(0.35, 0.6) * s
    bend = rng.uniform(-0.08, 0.08) * s
    direction = np.array([np.cos(angle), np.sin(angle)])
    normal = np.array([-direction[1], direction[0]])
    pts = start + np.outer(t - 0.5, direction) * length + np.outer(np.sin(np.pi * t), normal) * bend
    mask = np.zeros_like(image, dtype=bool)
    rows, cols = np.clip(pts[:, 0].round().astype(int), 0, s - 1), np.clip(pts[:, 1].round().astype(int), 0, s - 1)
    mask[rows, cols] = True
    mask = ndimage.binary_dilation(mask, iterations=int(rng.integers(1, 3)))
    value = 0.95 if image[mask].mean() < 0.5 else 0.05
    out = image.copy()
    out[mask] = value
    return out, mask


def blob(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A soft elliptical stain. image (S, S) -> (image, mask (S, S) bool)."""
    s = image.shape[0]
    cy, cx = rng.uniform(0.25 * s, 0.75 * s, 2)
    ry, rx = rng.uniform(0.06 * s, 0.14 * s, 2)
    yy, xx = np.mgrid[0:s, 0:s]
    inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
    weight = np.clip(1.2 - inside, 0.0, 1.0)
    mask = inside <= 1.0
    stain = 0.9 if image[mask].mean() < 0.5 else 0.1
    return (1.0 - weight) * image + weight * stain, mask


def missing(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A rectangular piece replaced by a flat fill. image (S, S) -> (image, mask (S, S) bool)."""
    s = image.shape[0]
    h, w = (rng.uniform(0.12, 0.25, 2) * s).astype(int)
    top, left = int(rng.integers(0, s - h)), int(rng.integers(0, s - w))
    mask = np.zeros_like(image, dtype=bool)
    mask[top: top + h, left: left + w] = True
    out = image.copy()
    out[mask] = float(np.clip(image.mean() + rng.choice([-0.35, 0.35]), 0.0, 1.0))
    return out, mask


_DEFECT_FN = {"scratch": scratch, "blob": blob, "missing": missing}


def _to_rgb(gray: np.ndarray) -> np.ndarray:
    """(S, S) in [0, 1] -> uint8 (S, S, 3), slightly tinted so that the three channels differ."""
    tint = np.array([1.0, 0.93, 0.82], dtype=np.float32)
    return (np.clip(gray[..., None] * tint, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _save(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")


def build_demo_line(out: Path, spec: DemoSpec = DemoSpec()) -> Path:
    """Write train/good, test/{good, scratch, blob, missing} and ground_truth/<defect> under `out`
    (replacing it) plus `demo.json` describing how it was made. Returns `out`."""
    if min(spec.n_train, spec.n_test_good, spec.n_per_defect) < 1:
        raise ValueError(f"demo line needs at least one image of each kind, got {spec}")
    texture = load_texture(spec.texture)
    rng = np.random.default_rng(spec.seed)
    out = Path(out)
    tmp = out.with_name(f".{out.name}.building")
    shutil.rmtree(tmp, ignore_errors=True)
    for i in range(spec.n_train):
        _save(_to_rgb(random_crop(texture, spec.size, rng)), tmp / "train" / "good" / f"{i:03d}.png")
    for i in range(spec.n_test_good):
        _save(_to_rgb(random_crop(texture, spec.size, rng)), tmp / "test" / "good" / f"{i:03d}.png")
    for defect in DEFECTS:
        for i in range(spec.n_per_defect):
            image, mask = _DEFECT_FN[defect](random_crop(texture, spec.size, rng), rng)
            _save(_to_rgb(image), tmp / "test" / defect / f"{i:03d}.png")
            _save(mask.astype(np.uint8) * 255, tmp / "ground_truth" / defect / f"{i:03d}_mask.png")
    (tmp / "demo.json").write_text(json.dumps({"source": f"skimage.data.{spec.texture}",
                                               **spec.__dict__}, indent=2, sort_keys=True))
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    logger.info("demo line %s: %d train, %d good and %d defective test images", out, spec.n_train,
                spec.n_test_good, spec.n_per_defect * len(DEFECTS))
    return out
