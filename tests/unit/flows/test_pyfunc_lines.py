"""The registered pyfunc serves a unified (multi-line) model with each row's own line threshold."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from components.dinomaly import fit_unified
from flows.pyfunc_model import predict_frame
from tests.conftest import write_line
from tests.unit.components.test_dinomaly import tiny_cfg


def test_line_column_selects_each_lines_threshold(tmp_path: Path) -> None:
    roots = {"alpha": write_line(tmp_path / "alpha"), "beta": write_line(tmp_path / "beta", n_train=6)}
    det = fit_unified(tiny_cfg(), roots).detector
    images = sorted((tmp_path / "alpha" / "test").rglob("*.png"))[:3]
    frame = pd.DataFrame({"image_path": [*map(str, images), *map(str, images)],
                          "line": ["alpha"] * 3 + ["beta"] * 3})
    out = predict_frame(det, frame)
    assert list(out["image_path"]) == list(frame["image_path"])
    expected = [det.line_thresholds_["alpha"].image] * 3 + [det.line_thresholds_["beta"].image] * 3
    assert np.allclose(out["threshold"], expected)
    assert np.allclose(out["score"][:3], out["score"][3:])  # same network, same images
    assert set(out["decision"]) <= {"defective", "good"}
    no_line = predict_frame(det, frame[["image_path"]])  # a unified model has no single threshold
    assert no_line["decision"].isna().all()
    with pytest.raises(ValueError, match="gamma"):
        predict_frame(det, pd.DataFrame({"image_path": [str(images[0])], "line": ["gamma"]}))
