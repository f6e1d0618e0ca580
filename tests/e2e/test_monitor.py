"""The drift monitor flow against real SeaweedFS + MLflow (+ Prefect's temporary server): a registered tiny
champion, decisions recorded in the real decision store (the service's table is the contract), one check of
new good parts (no drift) and one of the same parts under a lighting change (drift, alert, MLflow run)."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from skimage import data as skdata

from flows import registry, tracking
from flows.service.decisions import Decision, DecisionStore
from tests.e2e.tiny_line import OVERRIDES, SIZE, upload, version_tags

pytestmark = [pytest.mark.services, pytest.mark.slow]
LINE = "tinymon"


def _parts(n: int, seed: int, factor: float) -> list[np.ndarray]:
    rng, texture = np.random.default_rng(seed), skdata.brick()
    out = []
    for _ in range(n):
        y, x = rng.integers(0, texture.shape[0] - SIZE), rng.integers(0, texture.shape[1] - SIZE)
        crop = np.repeat(texture[y:y + SIZE, x:x + SIZE, None], 3, axis=2).astype(np.float32) * factor
        out.append(np.clip(crop + 0.5, 0, 255).astype(np.uint8))
    return out


def _record(store: DecisionStore, detector, parts: list[np.ndarray], version: str, name: str) -> None:
    images = torch.stack([torch.from_numpy(p).permute(2, 0, 1).float() / 255.0 for p in parts])
    scores = detector.score(images).image_scores
    rows, kept = [], []
    for part, score in zip(parts, scores, strict=True):
        buf = io.BytesIO()
        Image.fromarray(part).save(buf, format="PNG")
        data = buf.getvalue()
        sha = hashlib.sha256(data).hexdigest()
        store.keep_image(data, sha, ".png")
        decision = "defective" if score > detector.threshold_.image else "good"
        rows.append(Decision(LINE, "champion", name, version, float(score), None, detector.threshold_.image,
                             decision, sha, "part.png", 1.0))
        kept.append(".png")
    store.record(rows, kept)


def test_monitor_flags_a_lighting_change_but_not_new_good_parts(env, tiny, tmp_path: Path) -> None:
    from flows.monitor import monitor

    state, store = env
    det = tiny.fit.detector
    assert det.calibration_ and len(det.calibration_["image_scores"]) == 8  # crossfit: every train image
    name = f"defectops-{LINE}"
    bank = upload(store, tiny.model_dir)
    run_id = tracking.start_run("tiny", "monitor-e2e")
    version = registry.register_version(run_id, name, bank, state.s3_endpoint, version_tags(tiny))
    tracking.end_run(run_id)
    registry.set_alias(name, "champion", version)
    root = tmp_path / "svc"
    raw = {"services": {"root": str(root)}, "monitoring": {"window": 30, "min_window": 20, "retrain": False},
           "lines": {LINE: {"data": str(tiny.root)}}}
    for text in OVERRIDES:  # the tiny model's own settings (monitor reads data.* from the model anyway)
        key, _, value = text.partition("=")
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))

    decisions = DecisionStore(root / "serving")
    try:
        assert monitor(LINE, str(params))["status"].startswith("0 decisions")  # nothing recorded yet
        _record(decisions, det, _parts(30, 1, 1.0), version, name)
        calm = monitor(LINE, str(params))
        assert calm["drift"] is False and calm["n_window"] == 30, calm["reasons"]
        assert monitor(LINE, str(params))["status"] == "no new decisions since the last check"
        _record(decisions, det, _parts(30, 2, 0.6), version, name)
        shifted = monitor(LINE, str(params))
    finally:
        decisions.close()
    assert shifted["drift"] is True and shifted["alerted"] is True
    assert any(r.startswith("brightness_ks") for r in shifted["reasons"]), shifted["reasons"]
    run = tracking.get_run(shifted["run_id"])
    assert run["tags"]["kind"] == "monitor" and run["tags"]["drift"] == "true"
    assert run["metrics"]["drift"] == 1.0 and "score_ks.p_value" in run["metrics"]
