"""Bad input through the command line: every case exits non-zero with one line naming the offending file and
the reason, and stores nothing (the previous model in --out is byte-for-byte unchanged, no metrics JSON, no
temp folder left). Inputs that are unusual but valid (16-bit, palette, CMYK, EXIF-rotated, mixed grey/RGB,
1x1, names with spaces and non-ASCII characters) are accepted and converted.

Runs `flows.cli.main` in-process (the exit code `defectops` returns) and, once, the real console script.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from components.config import Config
from flows.cli import main
from tests.conftest import texture, with_square, write_line

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# ------------------------------------------------------------------------------------------------ helpers
def tree_digest(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under root ({} when root does not exist)."""
    if not root.exists():
        return {}
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def png_bytes(arr: np.ndarray, **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", **save)
    return buf.getvalue()


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def bomb_png(path: Path, width: int = 20000, height: int = 20000) -> Path:
    """A real 1-bit PNG that decompresses to width x height pixels (400 Mpx) from about 50 KB."""
    row = b"\x00" + b"\x00" * ((width + 7) // 8)
    comp = zlib.compressobj(9)
    data = b"".join(comp.compress(row * 1000) for _ in range(height // 1000)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", data) + _chunk(b"IEND", b""))
    return path


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG signature and IHDR declaring width x height, then nothing (declared size, no pixels)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_config: Config) -> dict[str, Path]:
    """A params file and a previously fitted model (the "previous model" every failed fit must leave alone)."""
    root = tmp_path_factory.mktemp("bad-input")
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_config.model_dump(mode="json", exclude={"services", "lines"})))
    line = write_line(root / "good-line")
    model = root / "previous-model"
    assert main(["fit", "--data", str(line), "--out", str(model), "--config", str(params), "--quiet"]) == 0
    return {"params": params, "model": model, "line": line}


def run_cli(capsys, *args: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main([*args, "--quiet"])
    err = capsys.readouterr().err
    return code, " ".join(err.split())  # rich wraps long lines: compare on normalised whitespace


def assert_refused(code: int, err: str, path: Path, reason: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    assert err.startswith("error:") and str(path) in err and reason in err, err


# ------------------------------------------------------------------------------------------------ fit cases
def _truncated_png(line: Path) -> Path:
    p = line / "train/good/003.png"
    p.write_bytes(p.read_bytes()[:-60])
    return p


def _truncated_jpeg(line: Path) -> Path:
    p = line / "train/good/003.jpg"
    (line / "train/good/003.png").unlink()
    Image.fromarray(texture(3)).save(p, quality=90)
    p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])
    return p


def _zero_bytes(line: Path) -> Path:
    p = line / "train/good/003.png"
    p.write_bytes(b"")
    return p


def _text_named_png(line: Path) -> Path:
    p = line / "train/good/003.png"
    p.write_text("these are not the pixels you are looking for\n")
    return p


def _bomb(line: Path) -> Path:
    return bomb_png(line / "train/good/003.png")


def _declared_huge(line: Path) -> Path:
    return png_header_only(line / "train/good/003.png", 20000, 20000)


def _symlink_outside(line: Path) -> Path:
    outside = line.parent / "outside.png"
    Image.fromarray(texture(99)).save(outside)
    link = line / "train/good/009.png"
    link.symlink_to(outside)
    return link


def _empty_train(line: Path) -> Path:
    folder = line / "train/good"
    for p in folder.iterdir():
        p.unlink()
    return folder


def _missing_train(line: Path) -> Path:
    shutil.rmtree(line / "train")
    return line / "train/good"


FIT_CASES: dict[str, tuple[Callable[[Path], Path], str, list[str]]] = {
    "truncated PNG": (_truncated_png, "cannot decode image", []),
    "truncated JPEG": (_truncated_jpeg, "cannot decode image", []),
    "zero-byte file": (_zero_bytes, "file is empty (0 bytes)", []),
    "text file named .png": (_text_named_png, "not a readable image", []),
    "decompression bomb (400 Mpx in 50 KB)": (_bomb, "exceeds the limit of 25000000 pixels", []),
    "decompression bomb past a raised limit": (_bomb, "exceeds the limit", ["--set", "data.max_image_pixels=1000000000"]),
    "20000x20000 declared size": (_declared_huge, "declared size exceeds the limit of 25000000 pixels", []),
    "10000x9900 declared size (99 Mpx: under the old 100 Mpx default)": (
        lambda line: png_header_only(line / "train/good/003.png", 10000, 9900),
        "10000x9900 exceeds the limit of 25000000 pixels", []),
    "symlink outside the data root": (_symlink_outside, "resolves outside the product line root", []),
    "empty train split": (_empty_train, "no image files", []),
    "missing train split": (_missing_train, "missing", []),
}


@pytest.mark.parametrize("case", list(FIT_CASES))
def test_fit_refuses_bad_train_data(case, base, tmp_path, capsys, record):
    make_bad, reason, extra = FIT_CASES[case]
    line = write_line(tmp_path / "line")
    bad = make_bad(line)
    out = tmp_path / "model"
    shutil.copytree(base["model"], out)
    before = tree_digest(out)
    code, err = run_cli(capsys, "fit", "--data", str(line), "--out", str(out), "--config", str(base["params"]), *extra)
    after = tree_digest(out)
    record("bad input", f"fit: {case}", lost=len(set(before) - set(after)),
           corrupted=sum(before[k] != after.get(k, before[k]) for k in before))
    assert_refused(code, err, bad, reason)
    assert after == before  # the previous model is untouched
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left


# ------------------------------------------------------------------------------------------------ evaluate cases
def _non_binary_mask(line: Path) -> Path:
    p = line / "ground_truth/square/001_mask.png"
    arr = np.zeros((64, 64), np.uint8)
    arr[10:20, 10:20], arr[30:40, 30:40] = 255, 128
    p.write_bytes(png_bytes(arr))
    return p


def _mask_wrong_size(line: Path) -> Path:
    p = line / "ground_truth/square/001_mask.png"
    p.write_bytes(png_bytes(np.zeros((32, 64), np.uint8)))
    return p


def _truncated_test_image(line: Path) -> Path:
    p = line / "test/good/001.png"
    p.write_bytes(p.read_bytes()[:100])
    return p


def _missing_test(line: Path) -> Path:
    shutil.rmtree(line / "test")
    return line / "test"


def _empty_test(line: Path) -> Path:
    for folder in (line / "test").iterdir():
        shutil.rmtree(folder)
    return line / "test"


def _mask_symlink_outside(line: Path) -> Path:
    outside = line.parent / "mask-outside.png"
    outside.write_bytes((line / "ground_truth/square/001_mask.png").read_bytes())
    p = line / "ground_truth/square/001_mask.png"
    p.unlink()
    p.symlink_to(outside)
    return p


EVAL_CASES: dict[str, tuple[Callable[[Path], Path], str]] = {
    "mask not binary": (_non_binary_mask, "mask is not binary"),
    "mask not the image's size": (_mask_wrong_size, "mask size 64x32 differs from image size 64x64"),
    "truncated test image": (_truncated_test_image, "cannot decode image"),
    "missing test split": (_missing_test, "missing"),
    "empty test split": (_empty_test, "no test images"),
    "mask symlink outside the data root": (_mask_symlink_outside, "resolves outside the product line root"),
}


@pytest.mark.parametrize("case", list(EVAL_CASES))
def test_evaluate_refuses_bad_test_data(case, base, tmp_path, capsys, record):
    make_bad, reason = EVAL_CASES[case]
    line = write_line(tmp_path / "line")
    bad = make_bad(line)
    metrics = tmp_path / "out" / "metrics.json"
    before = tree_digest(base["model"])
    code, err = run_cli(capsys, "evaluate", "--model", str(base["model"]), "--data", str(line), "--json", str(metrics))
    record("bad input", f"evaluate: {case}", corrupted=int(tree_digest(base["model"]) != before))
    assert_refused(code, err, bad, reason)
    assert not metrics.parent.exists()  # nothing written
    assert tree_digest(base["model"]) == before


# ------------------------------------------------------------------------------------------------ config cases
CONFIG_CASES = {
    "unknown key": ({"detector": {"patchcore": {"coreset_rate": 0.1}}}, "detector.patchcore.coreset_rate"),
    "wrong type": ({"data": {"batch_size": "sixteen"}}, "data.batch_size"),
    "out of range": ({"detector": {"patchcore": {"coreset_ratio": 1.5}}}, "detector.patchcore.coreset_ratio"),
    "line named ../../x": ({"lines": {"../../x": {"data": "line"}}}, "lines"),
    "line name with a slash": ({"lines": {"a/b": {"data": "line"}}}, "lines"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_bad_params_file(case, base, tmp_path, capsys, record):
    raw, key = CONFIG_CASES[case]
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    out = tmp_path / "model"
    code, err = run_cli(capsys, "fit", "--data", str(base["line"]), "--out", str(out), "--config", str(params))
    record("bad input", f"params.yaml: {case}")
    assert code == 2 and "Traceback" not in err
    assert str(params) in err and key in err, err
    assert not out.exists()


# ------------------------------------------------------------------------------------------------ tolerated input
def _odd_but_valid_line(root: Path) -> Path:
    """The tiny line, with train and test images in every unusual-but-valid form."""
    line = write_line(root, n_train=8)
    good, test_good = line / "train/good", line / "test/good"
    g16 = (texture(1)[..., 0].astype(np.uint16) * 257)
    (good / "001.png").write_bytes(png_bytes(g16))  # 16-bit grey
    Image.fromarray(texture(2)).convert("P", palette=Image.Palette.ADAPTIVE).save(good / "002.png")
    (good / "003.png").unlink()
    Image.fromarray(texture(3)).convert("CMYK").save(good / "003.jpg")
    im = Image.fromarray(texture(4))
    exif = im.getexif()
    exif[0x0112] = 6
    (good / "004.png").unlink()
    im.save(good / "004.jpg", exif=exif)
    Image.fromarray(texture(5)).convert("L").save(good / "005.png")  # grey beside RGB in one line
    Image.fromarray(texture(6)[:1, :1]).save(good / "006.png")  # 1x1
    (good / "007.png").rename(good / "prüfteil 7 (nacht).png")
    (test_good / "002.png").rename(test_good / "gut Ä 2.png")
    image, mask = with_square(texture(2001))
    Image.fromarray(image).save(line / "test/square/fehler ü 1.png")
    Image.fromarray(mask.astype(np.uint8) * 255).save(line / "ground_truth/square/fehler ü 1_mask.png")
    return line


def test_unusual_but_valid_images_are_accepted(base, tmp_path, capsys, record):
    line = _odd_but_valid_line(tmp_path / "line")
    out, metrics = tmp_path / "model", tmp_path / "metrics.json"
    code, err = run_cli(capsys, "fit", "--data", str(line), "--out", str(out), "--config", str(base["params"]))
    assert code == 0, err
    code, err = run_cli(capsys, "evaluate", "--model", str(out), "--data", str(line), "--json", str(metrics))
    record("bad input", "accepted: 16-bit, palette, CMYK, EXIF, mixed grey/RGB, 1x1, spaces, non-ASCII")
    assert code == 0, err
    assert metrics.is_file()


# ------------------------------------------------------------------------------------------------ the real command
def test_console_script_exit_code_and_message(base, tmp_path, record):
    """`defectops fit` as a user runs it: exit 2, one line naming the file, the previous model untouched."""
    line = write_line(tmp_path / "line")
    bad = _truncated_png(line)
    out = tmp_path / "model"
    shutil.copytree(base["model"], out)
    before = tree_digest(out)
    exe = Path(sys.executable).with_name("defectops")
    env = {**os.environ, "COLUMNS": "400", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(exe), "fit", "--data", str(line), "--out", str(out), "--config", str(base["params"]),
                           "--quiet"], capture_output=True, text=True, env=env, timeout=300)
    record("bad input", "console script: truncated PNG", corrupted=int(tree_digest(out) != before))
    assert proc.returncode == 2, proc.stderr
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and str(bad) in lines[0] and "cannot decode image" in lines[0], proc.stderr
    assert tree_digest(out) == before
