"""Compressed memory banks: exact (flat) against faiss IVF and IVF-PQ indexes over the same PatchCore bank.

For each line, fit once (all train images, as bench/accuracy.py; pcb's first 50), then for each index
setting rebuild the index over that same bank and evaluate. Prints per line and setting: index bytes (as
faiss serialises it), search ms per image (nearest-bank search of one image's patches, backbone excluded),
score ms per image (everything), image AUROC, pixel AUROC, AUPRO, and their differences to flat.

    .venv/bin/python bench/index.py                                  # cookie and pcb, default settings
    .venv/bin/python bench/index.py --lines cookie --settings flat ivf:64 ivfpq:64:16

A setting is `flat`, `ivf:NLIST` or `ivfpq:NLIST:M` (M sub-quantizers of 8 bits; nprobe = NLIST / 8, as
components/knn.py sets it). The image score's reweighting reads the float32 bank, which a saved model keeps
beside any index (bank.safetensors), so the index bytes are the search structure only.
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
MAX_TRAIN = {"pcb": 50}
SETTINGS = ("flat", "ivf:16", "ivf:64", "ivfpq:16:16", "ivfpq:64:16", "ivfpq:64:32", "ivfpq:64:8")


def parse_setting(text: str) -> tuple[str, int, int]:
    parts = text.split(":")
    kind = parts[0]
    nlist = int(parts[1]) if len(parts) > 1 else 1
    m = int(parts[2]) if len(parts) > 2 else 16
    if kind not in ("flat", "ivf", "ivfpq"):
        raise SystemExit(f"unknown setting {text!r}: flat, ivf:NLIST or ivfpq:NLIST:M")
    return kind, nlist, m


def search_ms(det, images, index) -> float:
    """Mean ms per image of the nearest-bank search alone (embeddings computed beforehand)."""
    import torch

    from components import knn

    with torch.inference_mode():
        flats = [det.embedder_(x).reshape(-1, det.memory_bank_.shape[1]).numpy() for x in images]
    knn.knn_distances(index, flats[0], 1)
    t = time.perf_counter()
    for flat in flats:
        knn.knn_distances(index, flat, 1)
    return 1000 * (time.perf_counter() - t) / len(flats)


def run_line(line: str, settings: list[str], sets: list[str], threads: int, max_train: int | None) -> list[dict]:
    import torch

    from components import knn
    from components.config import load_config
    from components.data import iter_batches, scan_line
    from components.evaluation import evaluate_split
    from components.training import fit_line, preprocess_for

    torch.set_num_threads(threads)
    cfg = load_config(ROOT / "params.yaml", ["data.calibration_fraction=0",
                                              f"detector.patchcore.threads={threads}", *sets])
    t0 = time.perf_counter()
    det = fit_line(cfg, DATASETS / line, max_train).detector
    fit_s = time.perf_counter() - t0
    split = scan_line(DATASETS / line)
    probe = [b.images for b in iter_batches(split.test[:20], preprocess_for(cfg.data), 1)]
    rows = []
    for setting in settings:
        kind, nlist, m = parse_setting(setting)
        det.index_ = knn.build_index(det.memory_bank_, kind, nlist, m, cfg.detector.patchcore.seed)
        result = evaluate_split(det, split, cfg)
        o = result.report.overall
        rows.append({"line": line, "setting": setting, "bank": len(det.memory_bank_),
                     "index_bytes": knn.index_nbytes(det.index_), "search_ms": search_ms(det, probe, det.index_),
                     "score_ms": result.ms_per_image, "image_auroc": o["image_auroc"],
                     "pixel_auroc": o["pixel_auroc"], "aupro": o["aupro"], "fit_s": fit_s})
        print(f"done {line} {setting}", file=sys.stderr, flush=True)
    flat = next((r for r in rows if r["setting"] == "flat"), None)
    for r in rows:
        for key in ("image_auroc", "pixel_auroc", "aupro"):
            r[f"d_{key}"] = None if flat is None else r[key] - flat[key]
        r["bytes_vs_flat"] = None if flat is None else r["index_bytes"] / flat["index_bytes"]
    return rows


def print_table(rows: list[dict]) -> None:
    cols = [("line", "s"), ("setting", "s"), ("bank", "d"), ("index_bytes", ",d"), ("bytes_vs_flat", ".3f"),
            ("search_ms", ".2f"), ("score_ms", ".1f"), ("image_auroc", ".3f"), ("pixel_auroc", ".3f"),
            ("aupro", ".3f"), ("d_image_auroc", "+.3f"), ("d_pixel_auroc", "+.3f"), ("d_aupro", "+.3f")]
    print(table(rows, [(c, c, s) for c, s in cols]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", nargs="*", default=["cookie", "pcb"])
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS))
    parser.add_argument("--set", dest="sets", action="append", default=[], help="params override key=value")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-train", type=int, default=None, help="override the per-line train cap")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    for s in args.settings:
        parse_setting(s)
    rows = []
    for line in args.lines:
        cap = args.max_train if args.max_train is not None else MAX_TRAIN.get(line)
        rows += run_line(line, args.settings, args.sets, args.threads, cap)
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    import components  # noqa: F401  (makes torchvision, and so timm, importable)

    main()
