"""Tests for components.data: bad files built in tmp_path, plus a few batches of the real lines."""

from __future__ import annotations

import itertools
import logging
import os
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.ndimage import binary_dilation

from components.data import (
    DataError,
    LineSplit,
    Preprocess,
    Sample,
    iter_batches,
    load_image,
    load_mask,
    scan_line,
    split_calibration,
)

DATASETS = Path(__file__).resolve().parents[4] / "shared" / "datasets"
if not DATASETS.is_dir():
    DATASETS = Path("/work/shared/datasets")


def rgb(h: int = 24, w: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def save(arr: np.ndarray, path: Path, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (Image.fromarray(arr).convert(mode) if mode else Image.fromarray(arr)).save(path)
    return path


def png_header_only(path: Path, w: int, h: int) -> Path:
    """A PNG with a valid IHDR declaring w x h and no pixel data: cheap decompression-bomb stand-in."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


def make_line(root: Path, n_defect: int = 2, masks: bool = True) -> Path:
    """train/good x3, test/good x1, test/crack x n_defect; mask k marks the top 2k rows (its area names it)."""
    for i in range(3):
        save(rgb(seed=i), root / "train" / "good" / f"{i:03d}.png")
    save(rgb(seed=10), root / "test" / "good" / "000.png")
    for k in range(1, n_defect + 1):
        save(rgb(seed=20 + k), root / "test" / "crack" / f"anomaly-{k}.png")
        if masks:
            m = np.zeros((24, 32), np.uint8)
            m[: 2 * k] = 255
            save(m, root / "ground_truth" / "crack" / f"anomaly-{k}_mask.png")
    return root


# ------------------------------------------------------------------------------------------ load_image

def test_data_error_carries_path_and_reason(tmp_path):
    err = DataError(tmp_path / "a.png", "broken")
    assert isinstance(err, ValueError)
    assert err.path == tmp_path / "a.png" and err.reason == "broken"
    assert str(err) == f"{tmp_path / 'a.png'}: broken"


def test_zero_byte_file(tmp_path):
    p = tmp_path / "empty.png"
    p.touch()
    with pytest.raises(DataError, match="empty") as exc:
        load_image(p)
    assert exc.value.path == p


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="cannot read file"):
        load_image(tmp_path / "nope.png")


@pytest.mark.parametrize("ext", [".png", ".jpg"])
def test_truncated_image_is_detected(tmp_path, ext):
    full = save(rgb(200, 300), tmp_path / f"full{ext}")
    data = full.read_bytes()
    cut = tmp_path / f"cut{ext}"
    cut.write_bytes(data[: len(data) // 2])
    assert load_image(full).shape == (200, 300, 3)
    with pytest.raises(DataError, match="truncated") as exc:
        load_image(cut)
    assert exc.value.path == cut


def test_text_file_named_png(tmp_path):
    p = tmp_path / "notes.png"
    p.write_text("this is not an image\n")
    with pytest.raises(DataError, match="not a readable image") as exc:
        load_image(p)
    assert exc.value.path == p


def test_declared_size_checked_before_decoding(tmp_path):
    # No pixel data at all: decoding would fail as truncated, so the size error proves the order.
    p = png_header_only(tmp_path / "bomb.png", 3000, 3000)
    with pytest.raises(DataError) as exc:
        load_image(p, max_pixels=1_000_000)
    assert exc.value.reason == "declared size 3000x3000 exceeds the limit of 1000000 pixels"


def test_huge_declared_size_refused(tmp_path):
    p = png_header_only(tmp_path / "bomb.png", 100_000, 100_000)
    with pytest.raises(DataError, match="exceeds the limit"):
        load_image(p)


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 1000, 32768, 65535]], dtype=np.uint16)
    p = tmp_path / "g16.png"
    Image.fromarray(values).save(p)
    assert Image.open(p).mode.startswith("I")
    out = load_image(p)
    expected = np.rint(values * 255.0 / 65535).astype(np.uint8)  # 0, 1, 4, 128, 255
    assert out.dtype == np.uint8 and out.shape == (1, 5, 3)
    np.testing.assert_array_equal(out[..., 0], expected)
    np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_palette_png_with_transparency(tmp_path):
    im = Image.new("P", (4, 2))
    im.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    im.putdata([0, 1, 0, 1, 1, 1, 0, 0])
    p = tmp_path / "pal.png"
    im.save(p, transparency=1)
    out = load_image(p)
    assert out.shape == (2, 4, 3)
    np.testing.assert_array_equal(out[0, 0], [255, 0, 0])
    np.testing.assert_array_equal(out[0, 1], [0, 255, 0])  # transparent pixel keeps its colour, alpha dropped


def test_cmyk_jpeg(tmp_path):
    p = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 8), (0, 255, 255, 0)).save(p)  # pure red in CMYK
    assert Image.open(p).mode == "CMYK"
    out = load_image(p)
    assert out.shape == (8, 16, 3) and out.dtype == np.uint8
    assert out[..., 0].min() > 230 and out[..., 1:].max() < 25


@pytest.mark.parametrize("mode", ["1", "L", "LA", "RGBA", "RGB"])
def test_modes_become_rgb(tmp_path, mode):
    arr = rgb(6, 5)
    src = Image.fromarray(arr).convert(mode)
    p = tmp_path / f"{mode}.png"
    src.save(p)
    out = load_image(p)
    assert out.shape == (6, 5, 3) and out.dtype == np.uint8
    reference = np.asarray(src.convert("L" if mode in ("1", "L", "LA") else "RGB"))
    if reference.ndim == 2:
        reference = np.repeat(reference[..., None], 3, axis=2)
    np.testing.assert_array_equal(out, reference)


def test_float_tiff_unit_range(tmp_path):
    p = tmp_path / "f.tif"
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), "F").save(p)
    np.testing.assert_array_equal(load_image(p)[0, :, 1], [0, 128, 255])


def test_exif_orientation_is_applied(tmp_path):
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :8] = (255, 0, 0)  # a red band on the left
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    p = tmp_path / "rot.jpg"
    im.save(p, exif=exif)
    out = load_image(p)
    assert out.shape == (40, 20, 3)
    assert out[:6, :, 0].mean() > 200 and out[-6:, :, 0].mean() < 30  # left band is now at the top


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(tmp_path):
    p = save(rgb(), tmp_path / "locked.png")
    p.chmod(0)
    with pytest.raises(DataError, match="cannot read"):
        load_image(p)


# ------------------------------------------------------------------------------------------- load_mask

@pytest.mark.parametrize("level", [255, 1])
def test_binary_mask(tmp_path, level):
    m = np.zeros((6, 8), np.uint8)
    m[2:4, 3:] = level
    out = load_mask(save(m, tmp_path / "m.png"), (6, 8))
    assert out.dtype == bool and out.sum() == 10 and out[2, 3] and not out[0, 0]


def test_non_binary_mask(tmp_path):
    m = np.zeros((6, 8), np.uint8)
    m[0, 0], m[1, 1] = 128, 255
    with pytest.raises(DataError, match=r"mask is not binary: values 0, 128, 255"):
        load_mask(save(m, tmp_path / "m.png"), (6, 8))


def test_mask_size_mismatch(tmp_path):
    p = save(np.zeros((20, 10), np.uint8), tmp_path / "m.png")
    with pytest.raises(DataError, match=r"mask size 10x20 differs from image size 20x10 \(image: .*x\.png\)"):
        load_mask(p, (10, 20), image_path=tmp_path / "x.png")


# ------------------------------------------------------------------------------------------- scan_line

def test_scan_pairs_masks_by_stem_not_sort_order(tmp_path):
    root = make_line(tmp_path / "line", n_defect=10)
    split = scan_line(root)
    defect = [s for s in split.test if s.label == 1]
    assert [s.name for s in defect] == [f"anomaly-{k}" for k in range(1, 11)]  # natural order
    # sorted() of the mask files starts with anomaly-10_mask.png: sort-order pairing would be wrong
    assert sorted(p.name for p in (root / "ground_truth" / "crack").iterdir())[0] == "anomaly-10_mask.png"
    for s in defect:
        assert s.mask_path.name == f"{s.name}_mask.png"
        k = int(s.name.split("-")[1])
        assert load_mask(s.mask_path, (24, 32)).sum() == 32 * 2 * k
    assert split.defect_types == ("crack",)
    assert [s.label for s in split.test] == [1] * 10 + [0]
    assert len(split.train) == 3 and all(s.label == 0 and s.mask_path is None for s in split.train)


def test_missing_mask_and_orphan_mask_warn(tmp_path, caplog):
    root = make_line(tmp_path / "line", n_defect=3)
    (root / "ground_truth" / "crack" / "anomaly-2_mask.png").unlink()
    save(np.zeros((24, 32), np.uint8), root / "ground_truth" / "crack" / "ghost_mask.png")
    with caplog.at_level(logging.WARNING, logger="components.data"):
        split = scan_line(root)
    by_name = {s.name: s for s in split.test}
    assert by_name["anomaly-2"].mask_path is None and by_name["anomaly-1"].mask_path is not None
    text = caplog.text
    assert "anomaly-2.png has no mask" in text
    assert "ghost_mask.png has no image" in text


def test_missing_ground_truth_folder_warns_once(tmp_path, caplog):
    root = make_line(tmp_path / "line", masks=False)
    with caplog.at_level(logging.WARNING, logger="components.data"):
        split = scan_line(root)
    assert all(s.mask_path is None for s in split.test)
    assert len(caplog.records) == 1 and "anomaly-1.png" in caplog.text


def test_layout_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        scan_line(tmp_path / "absent")
    root = make_line(tmp_path / "line")
    for p in (root / "train" / "good").iterdir():
        p.unlink()
    (root / "train" / "good" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="no image files") as exc:
        scan_line(root)
    assert exc.value.path == root / "train" / "good"


def test_missing_test_folder(tmp_path):
    root = make_line(tmp_path / "line")
    for p in sorted((root / "test").rglob("*"), reverse=True):
        p.rmdir() if p.is_dir() else p.unlink()
    (root / "test").rmdir()
    with pytest.raises(DataError, match="missing") as exc:
        scan_line(root)
    assert exc.value.path == root / "test"
    assert scan_line(root, require_test=False).test == ()


def test_non_image_files_are_ignored(tmp_path):
    root = make_line(tmp_path / "line")
    (root / "train" / "good" / ".DS_Store").write_bytes(b"\0\1")
    (root / "train" / "good" / "._000.png").write_bytes(b"AppleDouble")
    (root / "train" / "good" / "notes.txt").write_text("x")
    (root / "test" / "crack" / "Thumbs.db").write_bytes(b"x")
    split = scan_line(root)
    assert [s.path.name for s in split.train] == ["000.png", "001.png", "002.png"]
    assert len(split.test) == 3


def test_undecodable_image_fails_at_load_time(tmp_path):
    root = make_line(tmp_path / "line")
    bad = root / "train" / "good" / "999.PNG"  # upper-case extension counts as an image
    bad.write_text("oops")
    split = scan_line(root)
    assert split.train[-1].path == bad
    with pytest.raises(DataError, match="999.PNG"):
        list(iter_batches(split.train, Preprocess((16, 16)), batch_size=2))


def test_symlink_outside_root_is_refused(tmp_path):
    outside = save(rgb(), tmp_path / "elsewhere" / "x.png")
    root = make_line(tmp_path / "line")
    link = root / "train" / "good" / "link.png"
    link.symlink_to(outside)
    with pytest.raises(DataError, match="outside") as exc:
        scan_line(root)
    assert exc.value.path == link
    link.unlink()
    (root / "test" / "bent").symlink_to(outside.parent, target_is_directory=True)
    with pytest.raises(DataError, match="outside"):
        scan_line(root)


def test_symlink_inside_root_is_allowed(tmp_path):
    root = make_line(tmp_path / "line")
    (root / "train" / "good" / "again.png").symlink_to(root / "train" / "good" / "000.png")
    assert len(scan_line(root).train) == 4


def test_digest_is_stable_and_sensitive(tmp_path):
    root = make_line(tmp_path / "line")
    d1 = scan_line(root).digest()
    (root / "train" / "good" / ".DS_Store").write_bytes(b"noise")
    assert scan_line(root).digest() == d1  # ignored files do not count
    assert len(d1) == 64
    copy = make_line(tmp_path / "copy")  # same bytes and relative paths elsewhere -> same digest
    assert scan_line(copy).digest() == d1
    mask = root / "ground_truth" / "crack" / "anomaly-1_mask.png"
    data = bytearray(mask.read_bytes())
    save(np.full((24, 32), 255, np.uint8), mask)
    assert scan_line(root).digest() != d1
    mask.write_bytes(bytes(data))
    assert scan_line(root).digest() == d1
    (root / "train" / "good" / "002.png").rename(root / "train" / "good" / "003.png")
    assert scan_line(root).digest() != d1


# ------------------------------------------------------------------------------------ Preprocess, batches

def test_preprocess_resize_and_crop_shapes():
    arr = rgb(30, 40)
    assert Preprocess((16, 20)).image(arr).shape == (3, 16, 20)
    assert Preprocess((16, 16), crop_size=(12, 10)).image(arr).shape == (3, 12, 10)
    short = Preprocess((16, 16), resize="shorter")  # 30x40 -> 16x21 -> crop 16x16
    out = short.image(arr)
    assert out.shape == (3, 16, 16) and out.dtype == torch.float32
    assert 0.0 <= out.min() and out.max() <= 1.0
    assert Preprocess((20, 20), "shorter", crop_size=(16, 12)).image(rgb(50, 30)).shape == (3, 16, 12)
    with pytest.raises(ValueError):
        Preprocess((16, 16), resize="stretch")
    with pytest.raises(ValueError):
        Preprocess((16, 16), crop_size=(20, 8))


def test_preprocess_aspect_keeps_the_ratio():
    cookie = Preprocess((256, 256), "aspect")
    assert cookie.output_hw is None
    assert cookie.output_shape(768, 576) == (341, 256) and cookie.output_shape(576, 768) == (256, 341)
    assert Preprocess((256, 300), "aspect").output_shape(768, 576) == (341, 256)  # min(image_size)
    portrait = Preprocess((32, 32), "aspect").image(rgb(96, 72))  # 72 * 32 / 96 = 42.7 -> 43
    assert portrait.shape == (3, 43, 32) and portrait.dtype == torch.float32
    assert Preprocess((32, 40), "aspect").image(rgb(72, 96)).shape == (3, 32, 43)
    cropped = Preprocess((32, 32), "aspect", crop_size=(32, 24))
    assert cropped.output_hw == (32, 24) and cropped.image(rgb(96, 72)).shape == (3, 32, 24)
    torch.testing.assert_close(cropped.image(rgb(96, 72)), portrait[:, 5:37, 4:28], rtol=0, atol=0)
    same = rgb(32, 48)  # shorter side already at the size: untouched
    assert torch.equal(Preprocess((32, 32), "aspect").image(same),
                       torch.from_numpy(same).permute(2, 0, 1).float() / 255.0)
    with pytest.raises(ValueError, match="does not fit"):
        Preprocess((32, 64), "aspect", crop_size=(40, 24))  # the shorter side may be 32


def test_preprocess_none_keeps_the_native_size():
    arr = rgb(30, 40)
    native = Preprocess((16, 16), "none")
    assert native.output_hw is None and native.output_shape(30, 40) == (30, 40)
    assert torch.equal(native.image(arr), torch.from_numpy(arr).permute(2, 0, 1).float() / 255.0)
    crop = Preprocess((16, 16), "none", crop_size=(20, 30))
    assert torch.equal(crop.image(arr), native.image(arr)[:, 5:25, 5:35])
    with pytest.raises(ValueError, match="smaller than crop_size"):
        crop.output_shape(18, 40)


def test_native_image_smaller_than_the_crop_names_the_file(tmp_path):
    root = make_line(tmp_path / "line")  # 24 x 32 images
    split = scan_line(root)
    with pytest.raises(DataError, match="smaller than crop_size") as info:
        list(iter_batches(split.train, Preprocess((8, 8), "none", crop_size=(28, 28)), batch_size=2, workers=0))
    assert info.value.path == split.train[0].path


@pytest.mark.parametrize("pre", [Preprocess((32, 32)), Preprocess((32, 32), "shorter"),
                                 Preprocess((40, 40), "shorter", crop_size=(32, 24)),
                                 Preprocess((32, 32), "aspect"), Preprocess((40, 48), "aspect", crop_size=(32, 24)),
                                 Preprocess((32, 32), "none"), Preprocess((8, 8), "none", crop_size=(40, 64))])
def test_preprocess_image_and_mask_share_geometry(pre):
    arr = np.zeros((60, 90, 3), np.uint8)
    mask = np.zeros((60, 90), bool)
    arr[20:40, 40:60] = 255
    mask[20:40, 40:60] = True
    img, m = pre.image(arr), pre.mask(mask)
    assert m.shape == tuple(img.shape[1:]) and m.dtype == bool
    bright = img[0].numpy() > 0.5
    assert m.sum() > 0 and (bright ^ m).sum() <= 0.15 * m.sum()


def test_iter_batches_small_line_with_masks(tmp_path):
    root = make_line(tmp_path / "line", n_defect=3)
    (root / "ground_truth" / "crack" / "anomaly-3_mask.png").unlink()
    split = scan_line(root)
    pre = Preprocess((12, 16))
    batches = list(iter_batches(split.test, pre, batch_size=3, with_masks=True))
    assert [len(b.samples) for b in batches] == [3, 1]
    assert batches[0].images.shape == (3, 3, 12, 16)
    assert batches[0].masks.shape == (3, 12, 16)
    np.testing.assert_array_equal(batches[0].has_mask, [True, True, False])
    assert not batches[0].masks[2].any() and not batches[1].masks.any()  # unmasked defect, good
    assert batches[0].masks[1].sum() > batches[0].masks[0].sum() > 0
    seq = list(iter_batches(split.test, pre, batch_size=3, with_masks=True, workers=0))
    for a, b in zip(batches, seq, strict=True):
        assert torch.equal(a.images, b.images) and np.array_equal(a.masks, b.masks) and a.samples == b.samples
    assert all(b.masks is None for b in iter_batches(split.test, pre, batch_size=2))


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("batch_size", [1, 2, 8])
def test_mixed_sizes_raise_one_clear_error(tmp_path, workers, batch_size):
    """aspect / none keep each file's own size: a line mixing camera sizes fails with a DataError naming the
    file and both sizes (not torch.stack's error); resize, or a crop, makes one size again."""
    root = make_line(tmp_path / "line", n_defect=1)  # 24 x 32 images
    odd = save(rgb(40, 32, seed=9), root / "train" / "good" / "002.png")  # the 3rd train image, 40 x 32
    split = scan_line(root)
    with pytest.raises(DataError) as info:
        list(iter_batches(split.train, Preprocess((16, 16), "aspect"), batch_size, workers=workers))
    assert info.value.path == odd
    message = str(info.value)
    assert "preprocessed to 20x16" in message and "gives 16x21" in message and "000.png" in message
    assert "data.resize: resize" in message and "crop_size" in message
    for pre in (Preprocess((16, 16)), Preprocess((16, 16), "aspect", crop_size=(16, 16)),
                Preprocess((16, 16), "none", crop_size=(24, 32))):
        sizes = {tuple(b.images.shape[-2:]) for b in iter_batches(split.train, pre, batch_size, workers=workers)}
        assert sizes == {pre.output_hw}


def test_fit_line_on_mixed_sizes_names_the_file(tmp_path, tiny_config):
    from components.training import fit_line

    root = make_line(tmp_path / "line", n_defect=1)
    odd = save(rgb(40, 32, seed=9), root / "train" / "good" / "001.png")
    data = tiny_config.data.model_copy(update={"resize": "aspect", "calibration_fraction": 0.0})
    cfg = tiny_config.model_copy(update={"data": data})  # all 3 images in the fit stream
    with pytest.raises(DataError, match="data.resize: resize") as info:
        fit_line(cfg, root)
    assert info.value.path == odd


def test_iter_batches_masks_follow_the_native_size(tmp_path):
    root = make_line(tmp_path / "line", n_defect=2)
    split = scan_line(root)
    batch = next(iter_batches(split.test, Preprocess((8, 8), "none"), batch_size=3, with_masks=True))
    assert batch.images.shape == (3, 3, 24, 32) and batch.masks.shape == (3, 24, 32)
    assert [s.name for s in batch.samples] == ["anomaly-1", "anomaly-2", "000"]
    assert batch.masks[0][:2].all() and batch.masks[1][:4].all() and not batch.masks[2].any()
    assert batch.masks[0].sum() == 2 * 32 and batch.masks[1].sum() == 4 * 32


def test_iter_batches_streams_and_stops_cleanly(tmp_path):
    root = make_line(tmp_path / "line")
    for i in range(3, 12):
        save(rgb(seed=i), root / "train" / "good" / f"{i:03d}.png")
    split = scan_line(root)
    pulled = []

    def lazy():
        for s in split.train:
            pulled.append(s)
            yield s

    gen = iter_batches(lazy(), Preprocess((8, 8)), batch_size=2)
    first = next(gen)
    assert first.samples == split.train[:2]
    assert len(pulled) <= 4 < len(split.train)  # decodes at most two batches ahead
    gen.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("defectops-decode")]


def test_split_calibration():
    samples = tuple(Sample(Path(f"/x/{i}.png"), "good", 0) for i in range(10))
    fit, cal = split_calibration(samples, 0.2, seed=0)
    assert len(fit) == 8 and len(cal) == 2
    assert set(fit).isdisjoint(cal) and set(fit) | set(cal) == set(samples)
    assert split_calibration(samples, 0.2, seed=0) == (fit, cal)
    assert split_calibration(samples[::-1], 0.2, seed=0)[1] == cal[::-1]  # same choice, input order kept
    assert any(split_calibration(samples, 0.2, seed=s)[1] != cal for s in range(1, 6))
    assert split_calibration(samples, 0.0, seed=0) == (samples, ())
    two = samples[:2]
    assert tuple(map(len, split_calibration(two, 0.01, 0))) == (1, 1)
    assert tuple(map(len, split_calibration(two, 0.99, 0))) == (1, 1)
    with pytest.raises(ValueError):
        split_calibration(samples, 1.0, 0)


# ------------------------------------------------------------------------------------------- real data

@pytest.mark.skipif(not (DATASETS / "pcb").is_dir(), reason="shared datasets not present")
def test_real_pcb_few_batches():
    split = scan_line(DATASETS / "pcb")
    assert (len(split.train), len(split.test), split.defect_types) == (200, 200, ("defect",))
    defect = [s for s in split.test if s.label == 1]
    assert all(s.mask_path is not None and s.mask_path.name == f"{s.name}_mask.png" for s in defect)
    pre = Preprocess((128, 128))
    batches = list(itertools.islice(iter_batches(defect, pre, batch_size=4, with_masks=True), 2))
    assert len(batches) == 2
    for b in batches:
        assert b.images.shape == (4, 3, 128, 128) and b.masks.shape == (4, 128, 128)
        assert b.has_mask.all() and b.masks.any(axis=(1, 2)).all()
        assert torch.equal(b.images[:, 0], b.images[:, 1])  # grayscale PCB replicated to 3 channels
    train = next(iter_batches(split.train, pre, batch_size=4))
    assert train.images.shape == (4, 3, 128, 128) and train.masks is None


@pytest.mark.skipif(not (DATASETS / "cookie").is_dir(), reason="shared datasets not present")
def test_real_cookie_aspect_keeps_the_shape():
    defect = next(s for s in scan_line(DATASETS / "cookie").test if s.label == 1)
    b = next(iter_batches([defect], Preprocess((256, 256), "aspect"), batch_size=1, with_masks=True))
    assert b.images.shape == (1, 3, 341, 256) and b.masks.shape == (1, 341, 256) and b.masks.any()


@pytest.mark.skipif(not (DATASETS / "cookie").is_dir(), reason="shared datasets not present")
def test_real_cookie_one_batch():
    split = scan_line(DATASETS / "cookie")
    assert isinstance(split, LineSplit)
    assert (len(split.train), len(split.test), split.defect_types) == (31, 46, ("cracked",))
    defect = [s for s in split.test if s.label == 1]
    assert [s.name for s in defect[:3]] == ["anomaly-1", "anomaly-2", "anomaly-3"]
    pre = Preprocess((224, 224), "shorter")  # 576x768 (W x H) -> 224x298 -> centre crop
    b = next(iter_batches(defect, pre, batch_size=4, with_masks=True))
    assert b.images.shape == (4, 3, 224, 224) and b.masks.shape == (4, 224, 224)
    assert b.masks.any(axis=(1, 2)).all()
    # cracks are darker than the cookie right around them: the masks really belong to these images
    gray = b.images.mean(dim=1).numpy()
    for g, m in zip(gray, b.masks, strict=True):
        ring = binary_dilation(m, iterations=5) & ~m
        assert g[m].mean() < g[ring].mean() - 0.05
