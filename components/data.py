"""MVTec-layout reader, image loading and validation, and the geometric transforms fed to the backbone.

A product line is a folder in MVTec AD layout::

    <root>/train/good/*                     good images only (the fit set)
    <root>/test/<type>/*                    `good` plus one folder per defect type
    <root>/ground_truth/<type>/<stem>_mask.<ext>   binary masks, paired with test images by name stem

Masks are paired with images by stem, never by sort order (`anomaly-10_mask.png` sorts before
`anomaly-1_mask.png` while `anomaly-1.png` sorts before `anomaly-10.png`). Every file is decoded with
Pillow and converted to RGB uint8 (H, W, 3); bad files raise `DataError` naming the file and the reason.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
import struct
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from itertools import islice
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MASK_SUFFIX = "_mask"
# Only the decoders our extensions need (JPEG also yields MPO camera files): a file named .png that holds,
# say, EPS must never reach Ghostscript.
_PIL_FORMATS = ("PNG", "JPEG", "BMP", "TIFF")
# What a corrupt file can raise inside Pillow (MemoryError and KeyboardInterrupt are left alone).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, KeyError, TypeError)


class DataError(ValueError):
    """A user's data problem: `.path` is the offending file or folder, `.reason` says what is wrong."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason


class ImageTooLargeError(DataError):
    """An image whose declared width x height exceeds the pixel limit (found before decoding)."""


# ----------------------------------------------------------------------------------------------- decoding

def _is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _open_decoded(path: Path, max_pixels: int) -> Image.Image:
    """Open, check the declared size, decode fully (truncation raises) and apply EXIF orientation."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise DataError(path, f"cannot read file: {exc.strerror or exc}") from None
    if not path.is_file():
        raise DataError(path, "not a regular file")
    if size == 0:
        raise DataError(path, "file is empty (0 bytes)")
    return _decode(path, path, max_pixels)


def _decode(source: Path | io.BytesIO, path: Path, max_pixels: int) -> Image.Image:
    """Open `source` (a file, or bytes named `path` in errors) as _open_decoded does after its file checks."""
    try:
        with Image.open(source, formats=_PIL_FORMATS) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise ImageTooLargeError(path, f"declared size {w}x{h} exceeds the limit of {max_pixels} pixels")
            im.load()  # decodes everything: a truncated file raises here (LOAD_TRUNCATED_IMAGES stays off)
            ImageOps.exif_transpose(im, in_place=True)
            return im
    except DataError:
        raise
    except Image.DecompressionBombError as exc:  # Pillow's own hard limit (2 x Image.MAX_IMAGE_PIXELS)
        raise ImageTooLargeError(path, f"declared size exceeds the limit of {max_pixels} pixels ({exc})") from None
    except Image.UnidentifiedImageError:
        raise DataError(path, f"not a readable image (formats tried: {', '.join(_PIL_FORMATS)})") from None
    except PermissionError as exc:
        raise DataError(path, f"cannot read file: {exc.strerror}") from None
    except _DECODE_ERRORS as exc:
        raise DataError(path, f"cannot decode image: {type(exc).__name__}: {exc}") from None


def _scale_to_uint8(arr: np.ndarray, bits: int) -> np.ndarray:
    """Map integers in [0, 2**bits - 1] linearly onto [0, 255] with rounding."""
    top = float(2**bits - 1)
    return np.clip(np.rint(arr.astype(np.float64) * (255.0 / top)), 0, 255).astype(np.uint8)


def _numeric_to_gray(im: Image.Image, path: Path) -> np.ndarray:
    """Mode I;16*, I or F -> uint8 (H, W), scaled by the bit depth (Pillow's convert would clip at 255).

    I;16 is 16-bit by declaration. Mode I (32-bit container) is read as 16-bit when its values fit, which
    is what Pillow decodes 16-bit PGM/TIFF variants into. F is taken as [0, 1] when its values fit there,
    else [0, 255], else [0, 65535]. Per-image min-max stretching is never used: it would make the same
    grey level differ between images.
    """
    arr = np.asarray(im)
    if im.mode.startswith("I;16"):
        return _scale_to_uint8(arr, 16)
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if lo < 0 or not np.isfinite([lo, hi]).all():
        raise DataError(path, f"mode {im.mode} image with values in [{lo:g}, {hi:g}]: negative or not finite")
    if im.mode == "I":
        return _scale_to_uint8(arr, 16 if hi <= 65535 else 31)  # 31: the largest non-negative int32
    for top in (1.0, 255.0, 65535.0):  # mode F
        if hi <= top:
            return np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8)
    raise DataError(path, f"mode F image with values up to {hi:g}: no known range")


def _to_rgb_array(im: Image.Image, path: Path) -> np.ndarray:
    """Any Pillow mode -> uint8 (H, W, 3); alpha is dropped (not composited)."""
    if im.mode.startswith("I") or im.mode == "F":
        return np.repeat(_numeric_to_gray(im, path)[:, :, None], 3, axis=2)
    if im.mode in ("P", "PA"):  # palette transparency goes through RGBA, then alpha is dropped
        im = im.convert("RGBA")
    if im.mode != "RGB":
        try:
            im = im.convert("RGB")
        except ValueError:  # e.g. premultiplied La / RGBa
            try:
                im = im.convert("RGBA").convert("RGB")
            except ValueError as exc:
                raise DataError(path, f"unsupported image mode {im.mode}: {exc}") from None
    return np.array(im, dtype=np.uint8)  # a writable copy


def load_image(path: str | Path, max_pixels: int = 100_000_000) -> np.ndarray:
    """Decode one image file to RGB uint8 (H, W, 3), EXIF orientation applied.

    Raises DataError for an empty, truncated, unreadable or non-image file, or one whose declared size
    exceeds `max_pixels` (checked before decoding).
    """
    path = Path(path)
    im = _open_decoded(path, max_pixels)
    arr = _to_rgb_array(im, path)
    im.close()
    return arr


def decode_image(data: bytes, name: str | Path, max_pixels: int = 100_000_000) -> np.ndarray:
    """Decode image bytes (an upload) to RGB uint8 (H, W, 3) exactly as `load_image` decodes a file.

    `name` stands for the bytes in errors: DataError(name, reason) for empty, truncated, unreadable or
    non-image bytes, or a declared size over `max_pixels` (checked before decoding).
    """
    path = Path(str(name))
    if not data:
        raise DataError(path, "empty (0 bytes)")
    im = _decode(io.BytesIO(data), path, max_pixels)
    arr = _to_rgb_array(im, path)
    im.close()
    return arr


def image_shape(data: bytes, name: str | Path, max_pixels: int = 100_000_000) -> tuple[int, int]:
    """(H, W) that `decode_image` will return for these bytes, read from the header without decoding the
    pixels (EXIF orientation applied where it precedes the pixels; a PNG's eXIf chunk after them is only
    seen by decode_image). DataError(name, reason) for empty or non-image bytes, or a declared size over
    `max_pixels`; a body truncated after the header is only found by `decode_image`."""
    path = Path(str(name))
    if not data:
        raise DataError(path, "empty (0 bytes)")
    try:
        with Image.open(io.BytesIO(data), formats=_PIL_FORMATS) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise ImageTooLargeError(path, f"declared size {w}x{h} exceeds the limit of {max_pixels} pixels")
            if im.format == "PNG":  # Pillow's PNG getexif() decodes the pixels to find a late eXIf chunk
                exif = Image.Exif()
                if im.info.get("exif"):
                    exif.load(im.info["exif"])
            else:
                exif = im.getexif()
            turned = exif.get(0x0112) in (5, 6, 7, 8)  # EXIF orientations that swap width and height
    except DataError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(path, f"declared size exceeds the limit of {max_pixels} pixels ({exc})") from None
    except Image.UnidentifiedImageError:
        raise DataError(path, f"not a readable image (formats tried: {', '.join(_PIL_FORMATS)})") from None
    except _DECODE_ERRORS as exc:
        raise DataError(path, f"cannot read image header: {type(exc).__name__}: {exc}") from None
    return (w, h) if turned else (h, w)


def _mask_levels(im: Image.Image) -> np.ndarray:
    """A mask image -> its raw grey levels (H, W) without rescaling."""
    if im.mode == "1" or im.mode.startswith("I") or im.mode in ("L", "F"):
        return np.asarray(im)
    if im.mode in ("LA", "La"):
        return np.asarray(im.getchannel(0))
    if im.mode in ("P", "PA"):
        im = im.convert("RGBA")
    return np.asarray(im.convert("RGB").convert("L"))


def load_mask(path: str | Path, expected_hw: tuple[int, int], image_path: str | Path | None = None,
              max_pixels: int = 100_000_000) -> np.ndarray:
    """Decode a binary mask to bool (H, W); True = defect.

    The mask must hold 0 and at most one nonzero level (255, 1, ...), and its size must equal the
    image's `expected_hw` (H, W).
    """
    path = Path(path)
    im = _open_decoded(path, max_pixels)
    w, h = im.size
    if (h, w) != tuple(expected_hw):
        where = f" (image: {image_path})" if image_path is not None else ""
        raise DataError(path, f"mask size {w}x{h} differs from image size {expected_hw[1]}x{expected_hw[0]}{where}")
    levels = _mask_levels(im)
    im.close()
    values = np.unique(levels)
    nonzero = values[values != 0]
    if len(nonzero) > 1:
        shown = ", ".join(f"{v:g}" for v in values[:8].tolist()) + (", ..." if len(values) > 8 else "")
        raise DataError(path, f"mask is not binary: values {shown} ({len(values)} levels); "
                              "expected 0 and one nonzero level such as 255")
    return levels != 0


# ----------------------------------------------------------------------------------------------- scanning

@dataclass(frozen=True)
class Sample:
    """One image of a line: label 0 = good, 1 = defective; `mask_path` None when no pixel ground truth."""

    path: Path
    defect_type: str
    label: int
    mask_path: Path | None = None

    @property
    def name(self) -> str:
        return self.path.stem


@dataclass(frozen=True)
class LineSplit:
    """A scanned product line: train (good only) and test samples, in natural name order."""

    root: Path
    train: tuple[Sample, ...]
    test: tuple[Sample, ...]

    @property
    def defect_types(self) -> tuple[str, ...]:
        """The test folders other than `good`, sorted."""
        return tuple(sorted({s.defect_type for s in self.test if s.label == 1}))

    def digest(self) -> str:
        """sha256 over every sample's and mask's path relative to root and its bytes, in sorted order."""
        files = {s.path for s in (*self.train, *self.test)} | {
            s.mask_path for s in self.test if s.mask_path is not None}
        rels = sorted((p.relative_to(self.root).as_posix(), p) for p in files)
        h = hashlib.sha256()
        for rel, p in rels:
            h.update(rel.encode() + b"\0" + p.stat().st_size.to_bytes(8, "little"))
            with p.open("rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
        return h.hexdigest()


def natural_key(name: str) -> tuple[list[str | int], str]:
    """Sort key so that `anomaly-2` < `anomaly-10` (display order only; pairing is by stem)."""
    parts: list[str | int] = [int(t) if i % 2 else t.lower() for i, t in enumerate(re.split(r"(\d+)", name))]
    return parts, name


def _inside(path: Path, root_resolved: Path) -> None:
    """Refuse a path (symlink or not) that resolves outside the line's root."""
    target = path.resolve()
    if not target.is_relative_to(root_resolved):
        raise DataError(path, f"resolves outside the product line root {root_resolved} (to {target})")


def _list_images(folder: Path, root_resolved: Path) -> list[Path]:
    """Image files of one folder in natural order; other entries are skipped with a debug log."""
    _inside(folder, root_resolved)
    found = []
    for p in folder.iterdir():
        if p.name.startswith(".") or not _is_image_file(p):  # .DS_Store, AppleDouble `._x.png`, notes
            logger.debug("ignoring %s: not an image file", p)
            continue
        _inside(p, root_resolved)
        if not p.is_file():
            raise DataError(p, "has an image extension but is not a regular file (broken link or folder)")
        found.append(p)
    return sorted(found, key=lambda p: natural_key(p.name))


def _subfolders(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")),
                  key=lambda p: natural_key(p.name))


def _by_stem(paths: Iterable[Path], what: str) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for p in paths:
        if p.stem in out:
            raise DataError(p, f"two {what} share the name stem {p.stem!r} ({out[p.stem].name}): pairing is ambiguous")
        out[p.stem] = p
    return out


def _masks_by_stem(folder: Path, root_resolved: Path) -> dict[str, Path]:
    """ground_truth/<type>: `<stem>_mask.<ext>` -> {stem: path}; other names are ignored with a warning."""
    out: dict[str, Path] = {}
    for p in _list_images(folder, root_resolved):
        if not p.stem.endswith(MASK_SUFFIX):
            logger.warning("ignoring %s: mask names must be <image stem>%s.<ext>", p, MASK_SUFFIX)
            continue
        stem = p.stem[: -len(MASK_SUFFIX)]
        if stem in out:
            raise DataError(p, f"a second mask for image stem {stem!r} (also {out[stem].name}): pairing is ambiguous")
        out[stem] = p
    return out


def _scan_type(root: Path, root_resolved: Path, folder: Path) -> list[Sample]:
    """One test/<type> folder -> samples; masks are paired with images by name stem."""
    dtype = folder.name
    images = _list_images(folder, root_resolved)
    if not images:
        logger.warning("%s holds no image files", folder)
    if dtype == "good":
        return [Sample(p, dtype, 0, None) for p in images]
    by_stem = _by_stem(images, "images")
    gt = root / "ground_truth" / dtype
    if gt.is_dir():
        masks = _masks_by_stem(gt, root_resolved)
        for stem in sorted(set(by_stem) - set(masks), key=natural_key):
            logger.warning("%s has no mask %s/%s%s.<ext>: image-level metrics only", by_stem[stem], gt, stem, MASK_SUFFIX)
        for stem in sorted(set(masks) - set(by_stem), key=natural_key):
            logger.warning("%s has no image %s/%s.<ext>: ignored", masks[stem], folder, stem)
    else:
        masks = {}
        if images:
            shown = ", ".join(p.name for p in images[:5]) + (", ..." if len(images) > 5 else "")
            logger.warning("%s missing: %d defective images have no mask (image-level metrics only): %s",
                           gt, len(images), shown)
    return [Sample(p, dtype, 1, masks.get(p.stem)) for p in images]


def scan_line(root: str | Path, require_test: bool = True) -> LineSplit:
    """Read a product line in MVTec layout; raises DataError naming the path for a malformed layout."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "product line folder not found (expected <root>/train/good, <root>/test/<type>)")
    root_resolved = root.resolve()
    train_dir = root / "train" / "good"
    if not train_dir.is_dir():
        raise DataError(train_dir, "missing: the good training images go in <root>/train/good")
    train = tuple(Sample(p, "good", 0, None) for p in _list_images(train_dir, root_resolved))
    if not train:
        raise DataError(train_dir, f"no image files (extensions {', '.join(IMAGE_EXTENSIONS)})")
    test_dir = root / "test"
    test: list[Sample] = []
    if test_dir.is_dir():
        _inside(test_dir, root_resolved)
        for folder in _subfolders(test_dir):
            test.extend(_scan_type(root, root_resolved, folder))
        if require_test and not test:
            raise DataError(test_dir, "no test images (expected <root>/test/<type>/<image>)")
    elif require_test:
        raise DataError(test_dir, "missing: test images go in <root>/test/good and <root>/test/<defect type>")
    gt_dir = root / "ground_truth"
    if gt_dir.is_dir():
        for folder in _subfolders(gt_dir):
            if not (test_dir / folder.name).is_dir():
                logger.warning("%s has no matching test/%s folder: its masks are ignored", folder, folder.name)
    return LineSplit(root, train, tuple(test))


# ------------------------------------------------------------------------------------------- transforms

RESIZE_MODES = ("resize", "shorter", "aspect", "none")


def _crop_bound(image_size: tuple[int, int], resize: str) -> tuple[int, int] | None:
    """The largest crop (H, W) every resized image holds, whatever its size; None for resize "none"."""
    if resize == "resize":
        return image_size
    if resize == "none":
        return None
    s = image_size[0] if resize == "shorter" else min(image_size)
    return s, s


@dataclass(frozen=True)
class Preprocess:
    """Geometry only (no mean/std: the backbone owns normalisation). Sizes are (H, W).

    resize="resize": plain resize to image_size, then centre crop to crop_size if given.
    resize="shorter": shorter side to image_size[0] keeping aspect, then centre crop to crop_size or
    image_size.
    resize="aspect": one scale factor bringing the shorter side to min(image_size), keeping the aspect
    ratio (768 x 576 at image_size (256, 256) -> 341 x 256), then centre crop to crop_size if given.
    resize="none": native resolution, then centre crop to crop_size if given (an image smaller than the
    crop raises ValueError from `output_shape`).
    Images are resized bilinearly with antialiasing, masks by nearest-exact (pixel-centre aligned like
    the bilinear resize), so both get the same geometric transform. With aspect or none and no crop the
    output size depends on the input's: `output_hw` is None and `output_shape(h, w)` gives it.
    """

    image_size: tuple[int, int]
    resize: str = "resize"
    crop_size: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {', '.join(RESIZE_MODES)}, got {self.resize!r}")
        for name in ("image_size", "crop_size"):
            size = getattr(self, name)
            if size is not None:
                if len(size) != 2 or min(size) < 1:
                    raise ValueError(f"{name} must be two positive ints (H, W), got {size!r}")
                object.__setattr__(self, name, (int(size[0]), int(size[1])))  # YAML lists -> hashable tuple
        bound = _crop_bound(self.image_size, self.resize)
        if self.output_hw is not None and bound is not None and any(
                c > b for c, b in zip(self.output_hw, bound, strict=True)):
            raise ValueError(f"crop {self.output_hw} does not fit in the resized image {bound}")

    @property
    def output_hw(self) -> tuple[int, int] | None:
        """The output size (H, W) whatever the input, or None when it follows the input (aspect, none)."""
        if self.crop_size is not None:
            return self.crop_size
        return self.image_size if self.resize in ("resize", "shorter") else None

    def output_shape(self, h: int, w: int) -> tuple[int, int]:
        """The output size (H, W) for an (h, w) input; ValueError when the crop does not fit (mode none)."""
        rh, rw = self._resized_hw(h, w)
        if self.output_hw is None:
            return rh, rw
        ch, cw = self.output_hw
        if ch > rh or cw > rw:
            raise ValueError(f"image {rh}x{rw} (H x W) after resize {self.resize!r} is smaller than "
                             f"crop_size {ch}x{cw}")
        return ch, cw

    def _resized_hw(self, h: int, w: int) -> tuple[int, int]:
        if self.resize == "resize":
            return self.image_size
        if self.resize == "none":
            return h, w
        s = self.image_size[0] if self.resize == "shorter" else min(self.image_size)
        return (s, max(s, round(w * s / h))) if h <= w else (max(s, round(h * s / w)), s)

    def _apply(self, x: torch.Tensor, mode: str) -> torch.Tensor:
        """(1, C, H, W) float -> (C, h, w): resize then centre crop."""
        h, w = x.shape[-2:]
        (rh, rw), (ch, cw) = self._resized_hw(h, w), self.output_shape(h, w)
        if (rh, rw) != (h, w):
            kwargs = {"align_corners": False, "antialias": True} if mode == "bilinear" else {}
            x = F.interpolate(x, size=(rh, rw), mode=mode, **kwargs)
        top, left = (rh - ch) // 2, (rw - cw) // 2
        return x[0, :, top: top + ch, left: left + cw]

    def image(self, arr: np.ndarray) -> torch.Tensor:
        """uint8 (H, W, 3) -> float32 (3, h, w) in [0, 1]."""
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
            raise ValueError(f"expected uint8 (H, W, 3), got {arr.dtype} {arr.shape}")
        x = torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0).float().div_(255.0)
        return self._apply(x, "bilinear").clamp_(0.0, 1.0).contiguous()

    def mask(self, arr: np.ndarray) -> np.ndarray:
        """bool (H, W) -> bool (h, w)."""
        if arr.ndim != 2:
            raise ValueError(f"expected a (H, W) mask, got {arr.shape}")
        x = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.uint8))[None, None].float()
        return (self._apply(x, "nearest-exact")[0] > 0.5).numpy()


# ---------------------------------------------------------------------------------------------- batching

@dataclass(frozen=True)
class Batch:
    """images (B, 3, h, w) float in [0, 1]; masks (B, h, w) bool when asked for; has_mask (B,) bool is
    False for a defective sample without ground truth (its mask is all False and must not be scored)."""

    images: torch.Tensor
    samples: tuple[Sample, ...]
    masks: np.ndarray | None
    has_mask: np.ndarray


def _load_item(sample: Sample, preprocess: Preprocess, with_masks: bool, max_pixels: int):
    arr = load_image(sample.path, max_pixels)
    try:
        preprocess.output_shape(*arr.shape[:2])
    except ValueError as exc:  # resize "none": an image smaller than crop_size
        raise DataError(sample.path, f"{exc}; use a smaller data.crop_size or another data.resize") from None
    image = preprocess.image(arr)
    if not with_masks:
        return image, None
    if sample.label == 1 and sample.mask_path is not None:
        mask = preprocess.mask(load_mask(sample.mask_path, arr.shape[:2], sample.path, max_pixels))
    else:
        mask = np.zeros(tuple(image.shape[-2:]), dtype=bool)
    return image, mask


def _check_shapes(items: list, samples: list[Sample], first: tuple[Path, tuple[int, int]] | None
                  ) -> tuple[Path, tuple[int, int]]:
    """DataError for the first item whose preprocessed size differs from the stream's first image's
    (torch.stack needs one size; with resize aspect or none it follows each file's own size).
    Returns the reference (path, (H, W)): `first`, or the first item's when `first` is None."""
    for (image, _), sample in zip(items, samples, strict=True):
        hw = (int(image.shape[-2]), int(image.shape[-1]))
        if first is None:
            first = (sample.path, hw)
        elif hw != first[1]:
            raise DataError(sample.path, f"preprocessed to {hw[0]}x{hw[1]} (H x W) but the first image of this "
                                         f"set ({first[0]}) gives {first[1][0]}x{first[1][1]}: images of "
                                         "different sizes cannot be batched; use data.resize: resize or a "
                                         "data.crop_size")
    return first


def _make_batch(items: list, samples: list[Sample], with_masks: bool) -> Batch:
    has_mask = np.array([s.label == 0 or s.mask_path is not None for s in samples], dtype=bool)
    masks = np.stack([m for _, m in items]) if with_masks else None
    return Batch(torch.stack([im for im, _ in items]), tuple(samples), masks, has_mask)


def iter_batches(samples: Iterable[Sample], preprocess: Preprocess, batch_size: int, with_masks: bool = False,
                 *, workers: int = 2, max_pixels: int = 100_000_000) -> Iterator[Batch]:
    """Stream batches in sample order; `workers` threads decode up to 2 batches ahead of the consumer
    (0 = decode in the caller's thread). Stopping the iteration early cancels the pending decodes.
    Every image must preprocess to the first one's size (else DataError naming the file and both sizes)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    load = partial(_load_item, preprocess=preprocess, with_masks=with_masks, max_pixels=max_pixels)
    pool = ThreadPoolExecutor(workers, thread_name_prefix="defectops-decode") if workers > 0 else None
    pending: deque[tuple[Sample, Future | None]] = deque()
    it = iter(samples)
    first: tuple[Path, tuple[int, int]] | None = None
    try:
        while True:
            for s in islice(it, 2 * batch_size - len(pending)):
                pending.append((s, pool.submit(load, s) if pool else None))
            if not pending:
                return
            take = [pending.popleft() for _ in range(min(batch_size, len(pending)))]
            items = [f.result() if f is not None else load(s) for s, f in take]
            first = _check_shapes(items, [s for s, _ in take], first)
            yield _make_batch(items, [s for s, _ in take], with_masks)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def split_calibration(samples: Sequence[Sample], fraction: float, seed: int) -> tuple[tuple[Sample, ...], tuple[Sample, ...]]:
    """Hold out round(fraction * N) samples (at least 1 on each side when N >= 2) for calibration.

    Deterministic: samples are ranked by sha256(seed, type/name), so the choice does not depend on input
    order and adding an image leaves the others' ranks alone (unlike a shuffle). Both keep the input order.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"calibration fraction must be in [0, 1), got {fraction}")
    samples = tuple(samples)
    if fraction == 0.0 or not samples:
        return samples, ()
    if len(samples) < 2:
        raise ValueError("need at least 2 samples to hold out a calibration set (or use fraction 0)")
    k = min(max(round(fraction * len(samples)), 1), len(samples) - 1)
    ranks = sorted(range(len(samples)), key=lambda i: hashlib.sha256(
        f"{seed}:{samples[i].defect_type}/{samples[i].path.name}".encode()).digest())
    held = set(ranks[:k])
    return (tuple(s for i, s in enumerate(samples) if i not in held),
            tuple(s for i, s in enumerate(samples) if i in held))


def expand_images(paths: Iterable[str | Path]) -> list[Path]:
    """Image files to score: files as given, folders searched recursively for image files (sorted).
    DataError for a path that does not exist, a folder without images, or nothing at all."""
    out: list[Path] = []
    for item in paths:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if _is_image_file(p) and p.is_file())
            if not found:
                raise DataError(path, "folder holds no image files")
            out.extend(found)
        elif path.is_file():
            out.append(path)
        else:
            raise DataError(path, "no such file or folder")
    if not out:
        raise DataError(Path("."), "no images given to score")
    return out
