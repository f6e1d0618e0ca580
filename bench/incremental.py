"""Incremental update against a full refit: fit PatchCore on the first half of a line's train images,
`update` it with the second half (only those are extracted), and compare with a fit on all of them.

Prints per model (first half only, first half + update, full refit): train images, bank size, seconds
(fit, update, or fit), image AUROC, pixel AUROC, AUPRO on the line's test split.

    .venv/bin/python bench/incremental.py                       # cookie, 256 px, coreset 10 %, 2 threads
    .venv/bin/python bench/incremental.py --line pcb --max-train 50 --set detector.patchcore.coreset_ratio=0.05

"Halves" follow the natural name order (the first half is fitted, the second added), no calibration
hold-out (as bench/accuracy.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from mdtable import table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATASETS = ROOT.parent / "shared" / "datasets"


def run(line: str, sets: list[str], threads: int, max_train: int | None) -> list[dict]:
    import torch

    from components.config import load_config
    from components.data import scan_line
    from components.evaluation import evaluate_split
    from components.patchcore import PatchCore
    from components.training import image_stream

    torch.set_num_threads(threads)
    cfg = load_config(ROOT / "params.yaml", ["data.calibration_fraction=0",
                                              f"detector.patchcore.threads={threads}", *sets])
    split = scan_line(DATASETS / line)
    train = split.train[:max_train] if max_train else split.train
    half = len(train) // 2
    first, second = train[:half], train[half:]

    def measure(name: str, det, seconds: float, n_train: int) -> dict:
        o = evaluate_split(det, split, cfg).report.overall
        print(f"done {name}", file=sys.stderr, flush=True)
        return {"line": line, "model": name, "train_images": n_train, "bank": len(det.memory_bank_),
                "seconds": seconds, "image_auroc": o["image_auroc"], "pixel_auroc": o["pixel_auroc"],
                "aupro": o["aupro"]}

    rows = []
    t = time.perf_counter()
    det = PatchCore(cfg).fit(image_stream(first, cfg.data))
    rows.append(measure("first half (fit)", det, time.perf_counter() - t, len(first)))
    t = time.perf_counter()
    det.update(image_stream(second, cfg.data), lineage={"images": [s.path.name for s in second]})
    rows.append(measure("first half + update", det, time.perf_counter() - t, len(train)))
    t = time.perf_counter()
    full = PatchCore(cfg).fit(image_stream(train, cfg.data))
    rows.append(measure("full refit", full, time.perf_counter() - t, len(train)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--line", default="cookie")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="params override key=value")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-train", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rows = run(args.line, args.sets, args.threads, args.max_train)
    cols = [("model", "s"), ("train_images", "d"), ("bank", "d"), ("seconds", ".1f"), ("image_auroc", ".3f"),
            ("pixel_auroc", ".3f"), ("aupro", ".3f")]
    print(f"line {args.line}; seconds: fit, update (new images only) or full refit")
    print(table(rows, [(c, c, s) for c, s in cols]))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    import components  # noqa: F401  (makes torchvision, and so timm, importable)

    main()
