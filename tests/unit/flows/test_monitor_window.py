"""Batch inference's decisions land in the service's decision store, and the monitor reads them back as its
window (flows.inference.record_decisions, flows.monitor.recent_window / window_statistics; no services)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from components.config import load_config
from flows.inference import record_decisions
from flows.monitor import recent_window, window_statistics
from flows.service.decisions import DecisionStore


def test_batch_decisions_are_recorded_and_read_back_as_the_window(tmp_path: Path) -> None:
    cfg = load_config(None, [f"services.root={tmp_path / 'root'}", "data.image_size=[32, 32]"])
    rng = np.random.default_rng(0)
    predictions = []
    for i, level in enumerate((40, 200)):
        path = tmp_path / f"part-{i}.png"
        Image.fromarray(np.full((40, 40, 3), level, np.uint8)).save(path)
        predictions.append({"image": str(path), "score": float(rng.random()), "decision": ("good", "defective")[i]})
    assert record_decisions.fn(cfg, "line", "defectops-line", "3", predictions, 0.5) == 2
    store = DecisionStore(tmp_path / "root" / "serving")
    try:
        assert recent_window(store, "line", "4", 10) == []  # another version's decisions are not its window
        rows = recent_window(store, "line", "3", 10)
        assert [r["alias"] for r in rows] == ["batch", "batch"] and [r["decision"] for r in rows] == ["good", "defective"]
        window = window_statistics(store, rows, cfg)
    finally:
        store.close()
    assert window["rejected"] == [False, True] and window["scores"] == [p["score"] for p in predictions]
    assert np.allclose(window["brightness"], [40 / 255, 200 / 255], atol=1e-3)
    assert np.allclose(window["contrast"], [0.0, 0.0], atol=1e-6)
