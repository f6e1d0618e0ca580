"""Issue 15, goal 4: does the drift check (components/drift.py, as the monitor runs it) fire within one window
on a shifted batch and stay quiet on unshifted windows of the same size?

Per line: fit with params.yaml (crossfit calibration: the reference is the model's own calibration record),
then score the line's test/good images (never used to fit or calibrate) as they are and shifted (brightness
x factor, or a Gaussian blur). Each window is `monitoring.window` decisions drawn with replacement from one
of these pools (cookie has only 14 good test images, so its windows repeat images: a bootstrap, not new
parts); every window is checked with monitoring.alpha. Reports the alarm rate over --repeats windows:
the false-alarm rate for the unshifted pool, the detection rate for each shift; and, per pool, one check
of a window holding each image exactly once (windows = 1 rows). Resampling a small pool into windows of 50
overstates the false-alarm rate: the KS tests then compare the pool's own empirical distribution, 50 times
over, with the reference. The demo line draws fresh parts for every window (no resampling).

    nice -n 19 .venv/bin/python bench/drift.py --json docs/results/drift.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import mdtable  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageFilter  # noqa: E402

from components.config import load_config  # noqa: E402
from components.data import load_image, scan_line  # noqa: E402
from components.drift import drift_check  # noqa: E402
from components.training import brightness_contrast, centroid_distances, fit_line, preprocess_for  # noqa: E402

DATA = ROOT.parent / "shared" / "datasets"
SHIFTS = {"none": None, "brightness x1.1": ("brightness", 1.1), "brightness x1.2": ("brightness", 1.2),
          "brightness x1.3": ("brightness", 1.3),
          "brightness x0.8": ("brightness", 0.8), "blur sigma 2": ("blur", 2.0)}


def shifted(arr: np.ndarray, shift: tuple[str, float] | None) -> np.ndarray:
    """uint8 (H, W, 3) -> the same image under `shift` (as a camera would deliver it)."""
    if shift is None:
        return arr
    kind, amount = shift
    if kind == "brightness":
        return np.clip(arr.astype(np.float32) * amount + 0.5, 0, 255).astype(np.uint8)
    return np.asarray(Image.fromarray(arr).filter(ImageFilter.GaussianBlur(amount)))


def score_pool(detector, paths: list[Path], cfg, shift) -> dict[str, np.ndarray]:
    pre = preprocess_for(cfg.data)
    images = torch.stack([pre.image(shifted(load_image(p), shift)) for p in paths])
    scores = np.concatenate([detector.score(images[i:i + cfg.data.batch_size]).image_scores
                             for i in range(0, len(paths), cfg.data.batch_size)])
    b, c = brightness_contrast(images)
    d = centroid_distances(images, detector.calibration_["centroid"])
    return {"scores": scores, "brightness": np.array(b), "contrast": np.array(c), "centroid_distance": np.array(d)}


def run_line(cfg, line: str, repeats: int, seed: int) -> list[dict]:
    mon = cfg.monitoring
    det = fit_line(cfg, DATA / line).detector
    t, ref = det.threshold_, det.calibration_
    good = [s.path for s in scan_line(DATA / line).test if s.label == 0]
    rows = []
    for name, shift in SHIFTS.items():
        pool = score_pool(det, good, cfg, shift)
        rng = np.random.default_rng(seed)
        alarms, by_test = 0, {}
        for _ in range(repeats):
            idx = rng.integers(0, len(good), mon.window)
            window = {"scores": pool["scores"][idx], "rejected": pool["scores"][idx] > t.image,
                      "brightness": pool["brightness"][idx].tolist(), "contrast": pool["contrast"][idx].tolist(),
                      "centroid_distance": pool["centroid_distance"][idx].tolist()}
            check = drift_check(ref, window, t.image, t.false_reject_rate, mon.alpha, mon.psi_max)
            alarms += check["drift"]
            for test, values in check["tests"].items():
                by_test[test] = by_test.get(test, 0) + (values["p_value"] < check["level"])
        whole = {"scores": pool["scores"], "rejected": pool["scores"] > t.image,  # each image once
                 "brightness": pool["brightness"].tolist(), "contrast": pool["contrast"].tolist(),
                 "centroid_distance": pool["centroid_distance"].tolist()}
        once = drift_check(ref, whole, t.image, t.false_reject_rate, mon.alpha, mon.psi_max)
        rows.append({"line": line, "shift": name, "pool": len(good), "window": len(good), "repeats": 1,
                     "alarm_rate": float(once["drift"]), "pool_reject_rate": float((pool["scores"] > t.image).mean()),
                     "by_test": {k: float(v["p_value"] < once["level"]) for k, v in once["tests"].items()},
                     "p_values": {k: v["p_value"] for k, v in once["tests"].items()}, "distinct": True})
        rows.append({"line": line, "shift": name, "pool": len(good), "window": mon.window, "repeats": repeats,
                     "alarm_rate": alarms / repeats, "pool_reject_rate": float((pool["scores"] > t.image).mean()),
                     "by_test": {k: v / repeats for k, v in by_test.items()},
                     "mean_brightness": float(pool["brightness"].mean())})
        print(f"{line} {name}: alarms {alarms}/{repeats}", file=sys.stderr, flush=True)
    return rows


def run_demo_line(cfg, repeats: int, seed: int, work: Path) -> list[dict]:
    """The demo line (as `make demo-drift` builds it, 128 px): every window holds NEW good parts (fresh
    crops of the texture), so its false-alarm rate is not a bootstrap."""
    from flows.demo_data import DemoSpec, _to_rgb, build_demo_line, load_texture, random_crop

    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"image_size": (128, 128)})})
    mon, pre = cfg.monitoring, preprocess_for(cfg.data)
    det = fit_line(cfg, build_demo_line(work / "demo-line", DemoSpec(n_train=20, seed=1))).detector
    t, ref, texture = det.threshold_, det.calibration_, load_texture("brick")
    rows = []
    for name, shift in {k: v for k, v in SHIFTS.items() if k in ("none", "brightness x1.1", "brightness x1.3")}.items():
        rng, alarms, rejected = np.random.default_rng(seed), 0, 0
        for _ in range(repeats):
            parts = [shifted(_to_rgb(random_crop(texture, 160, rng)), shift) for _ in range(mon.window)]
            images = torch.stack([pre.image(p) for p in parts])
            scores = det.score(images).image_scores
            b, c = brightness_contrast(images)
            window = {"scores": scores, "rejected": scores > t.image, "brightness": b, "contrast": c,
                      "centroid_distance": centroid_distances(images, ref["centroid"])}
            alarms += drift_check(ref, window, t.image, t.false_reject_rate, mon.alpha, mon.psi_max)["drift"]
            rejected += int((scores > t.image).sum())
        rows.append({"line": "demo (fresh parts)", "shift": name, "pool": repeats * mon.window, "window": mon.window,
                     "repeats": repeats, "alarm_rate": alarms / repeats,
                     "pool_reject_rate": rejected / (repeats * mon.window), "by_test": {}})
        print(f"demo {name}: alarms {alarms}/{repeats}", file=sys.stderr, flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--line", action="append", choices=["cookie", "pcb", "demo"])
    ap.add_argument("--demo-repeats", type=int, default=100, help="windows of fresh demo parts per batch kind")
    ap.add_argument("--repeats", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    t0, rows = time.perf_counter(), []
    cfg = load_config(ROOT / "params.yaml")  # read once: the whole run uses one configuration
    for line in args.line or ["cookie", "pcb", "demo"]:
        if line == "demo":
            import tempfile

            with tempfile.TemporaryDirectory() as work:
                rows += run_demo_line(cfg, args.demo_repeats, args.seed, Path(work))
        else:
            rows += run_line(cfg, line, args.repeats, args.seed)
        if args.json:  # after every line: a later failure keeps what was measured
            args.json.write_text(json.dumps(rows, indent=2))
    for r in rows:
        r["tests"] = ", ".join(f"{k} {v:.2f}" for k, v in r["by_test"].items())
    print(mdtable.table(rows, [("line", "line", "s"), ("shift", "batch", "s"), ("pool", "good images", "d"),
                               ("window", "window", "d"), ("repeats", "windows", "d"),
                               ("alarm_rate", "alarm rate", ".3f"), ("pool_reject_rate", "rejected in pool", ".3f"),
                               ("tests", "alarm rate per test", "s")]))
    print(f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
