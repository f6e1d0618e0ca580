"""Tests for components.report (overlays, metric rows) and flows.progress (progress bars)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image
from rich.console import Console

from components.metrics import ScoredSample, evaluate
from components.report import jet, metric_rows, normalise_map, outline, overlay, save_png
from flows.progress import progress_bars


def test_jet_endpoints_and_clipping() -> None:
    values = np.array([[-1.0, 0.0, 0.5, 1.0, 2.0]])
    rgb = jet(values)
    assert rgb.shape == (1, 5, 3) and rgb.dtype == np.uint8
    assert rgb[0, 1].tolist() == [0, 0, 128]  # dark blue
    assert rgb[0, 3].tolist() == [128, 0, 0]  # dark red
    assert rgb[0, 2].tolist() == [128, 255, 128]  # middle: green dominates
    assert rgb[0, 0].tolist() == rgb[0, 1].tolist() and rgb[0, 4].tolist() == rgb[0, 3].tolist()


def test_normalise_map() -> None:
    amap = np.array([[0.0, 1.0], [2.0, 4.0]])
    np.testing.assert_allclose(normalise_map(amap, 2.0), amap / 4.0)  # the threshold sits at mid-scale
    np.testing.assert_allclose(normalise_map(amap, None), amap / 4.0)
    np.testing.assert_allclose(normalise_map(amap + 1, None), amap / 4.0)  # min-max
    assert not normalise_map(np.full((2, 2), 3.0), None).any()


def test_outline_is_the_boundary() -> None:
    region = np.zeros((12, 12), dtype=bool)
    region[2:10, 2:10] = True
    edge = outline(region)
    assert edge[2, 5] and edge[3, 5] and not edge[4, 5]  # two pixels wide
    assert not edge[5:7, 5:7].any() and not edge[~region].any()
    assert edge.sum() == 64 - 16


def test_overlay_marks_flagged_regions_and_ground_truth(tmp_path: Path) -> None:
    image = np.full((32, 32, 3), 100, dtype=np.uint8)
    amap = np.zeros((32, 32), dtype=np.float32)
    amap[4:14, 4:14] = 5.0
    mask = np.zeros((32, 32), dtype=bool)
    mask[18:28, 18:28] = True
    out = overlay(image, amap, pixel_threshold=1.0, mask=mask)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert out[4, 8].tolist() == [255, 255, 255]  # flagged outline
    assert out[18, 22].tolist() == [0, 255, 0]  # ground-truth outline
    assert out[9, 9].tolist() != [255, 255, 255]  # interior: heat, not outline
    plain = overlay(image, amap)
    assert not (plain == 255).all(axis=2).any()
    path = save_png(out, tmp_path / "deep" / "x.png")
    np.testing.assert_array_equal(np.asarray(Image.open(path)), out)


def test_metric_rows_formats_and_marks_undefined() -> None:
    rng = np.random.default_rng(0)
    mask = np.zeros((8, 8), dtype=bool)
    mask[2:4, 2:4] = True
    records = [ScoredSample(f"g{i}", "good", 0, float(i), rng.random((8, 8)).astype(np.float32)) for i in range(3)]
    records += [ScoredSample("d0", "crack", 1, 10.0, rng.random((8, 8)).astype(np.float32), mask),
                ScoredSample("d1", "dent", 1, 1.5, rng.random((8, 8)).astype(np.float32), None)]
    header, rows = metric_rows(evaluate(records))
    assert header[:2] == ["scope", "images"] and "image_auroc" in header and "aupro" in header
    by_scope = {row[0]: dict(zip(header, row, strict=True)) for row in rows}
    assert set(by_scope) == {"overall", "crack", "dent"}
    assert by_scope["crack"]["image_auroc"] == "1.000"
    assert by_scope["dent"]["image_auroc"] == "0.667"  # 1.5 beats 2 of the 3 good scores
    assert by_scope["dent"]["pixel_auroc"] == "-"  # no mask: undefined, not a number
    assert by_scope["overall"]["images"] == "5"


def test_progress_bars() -> None:
    with progress_bars(enabled=False) as progress:
        assert progress is None
    buffer = io.StringIO()
    console = Console(file=buffer, width=100, force_terminal=False)
    with progress_bars(console) as progress:
        progress("features", 3, 10)
        progress("features", 10, 10)
        progress("coreset", 5, None)
        progress("custom-stage", 1, 2)
    text = buffer.getvalue()
    assert "feature extraction" in text and "10/10" in text
    assert "greedy coreset" in text and "custom-stage" in text
