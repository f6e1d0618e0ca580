"""Nearest-bank search: exact (flat) against the `auto` index (HNSW with a recall check) and fixed faiss
indexes, over the same PatchCore banks, for accuracy and for inference cost against the backbone.

For each line, fit once (all train images unless --max-train; no calibration hold-out, as anomalib), then
for each bank size (`--banks`: a prefix of the greedy pick order is itself the greedy coreset of that size;
default: the fitted bank) and each index setting, index that bank and evaluate the whole test split.

    .venv/bin/python bench/index.py                                         # cookie, pcb at 256 px
    .venv/bin/python bench/index.py --lines pcb --size 640 --set data.resize=none --banks 10000 30000 100000
    .venv/bin/python bench/index.py --lines cookie --settings flat auto hnsw:16 ivf:64 ivfpq:64:16

A setting is `flat`, `auto` (what `index: auto` builds: exact up to flat_max_bank entries, else HNSW whose
efSearch is raised until recall@1 >= index_recall on good patches outside the bank), `hnsw:EF`, `ivf:NLIST`
or `ivfpq:NLIST:M`. Per row: index bytes, search breadth, probe recall, search ms per image (the patches
of one image, embeddings computed beforehand), inference ms per image at batch 1 and 32 (PatchCore.score
on decoded tensors: embedding, search, maps, image score) against two forwards at the same batch: `fwd`,
the frozen backbone graph alone, and `net`, the frozen network graph inference runs (backbone + patch
pooling), with the ratios (child.interleaved); then image AUROC / pixel AUROC / AUPRO with their
differences to flat on the same bank.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from child import NO_CALIBRATION, interleaved
from mdtable import table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATASETS = ROOT.parent / "shared" / "datasets"
SETTINGS = ("flat", "auto", "hnsw:16", "ivf:64", "ivfpq:64:16")


def parse_setting(text: str) -> tuple[str, int, int]:
    """-> (kind, first number (efSearch or nlist), PQ sub-quantizers)."""
    parts = text.split(":")
    kind = parts[0]
    if kind not in ("flat", "auto", "hnsw", "ivf", "ivfpq"):
        raise SystemExit(f"unknown setting {text!r}: flat, auto, hnsw:EF, ivf:NLIST or ivfpq:NLIST:M")
    first = int(parts[1]) if len(parts) > 1 else 16
    m = int(parts[2]) if len(parts) > 2 else 16
    return kind, first, m


def build(setting: str, bank, probes, params):
    """-> (index, breadth, probe recall) for one setting over bank (M, D)."""
    from components import knn

    kind, first, m = parse_setting(setting)
    if kind == "auto":
        index, report = knn.choose_index(bank, "auto", probes, params.index_recall, params.flat_max_bank,
                                         params.hnsw_m, params.ivf_lists, params.pq_subquantizers, params.seed)
        return index, report.breadth, report.recall
    index = knn.build_index(bank, kind, first, m, params.seed, params.hnsw_m)
    if kind == "hnsw":
        knn.set_breadth(index, first)
    recall = knn.search_quality(index, probes, knn.exact_distances(bank, probes))["recall"] if kind != "flat" else 1.0
    return index, knn.get_breadth(index), recall


def probe_patches(det, split, cfg, bank):
    """Good patches outside the bank: the embeddings of 4 train images, minus rows equal to a bank row."""
    import faiss
    import numpy as np
    import torch

    from components.data import iter_batches
    from components.training import preprocess_for

    batch = next(iter(iter_batches(split.train[:4], preprocess_for(cfg.data), 4))).images
    with torch.inference_mode():
        rows = det.embedder_(batch).reshape(-1, bank.shape[1]).numpy()
    dist, _ = faiss.knn(np.ascontiguousarray(rows), bank, 1)
    return np.ascontiguousarray(rows[dist[:, 0] > 1e-6][:2048])


def timings(det, images: list, batch: int, repeats: int = 5) -> dict:
    """ms per image of the frozen backbone forward and of PatchCore.score (child.interleaved)."""
    import torch

    stacked = torch.cat(images[:batch]) if batch > 1 else images[0]
    backbone, network, score = interleaved(det, stacked, repeats)
    n = stacked.shape[0]
    return {"fwd_ms": 1000 * backbone / n, "net_ms": 1000 * network / n, "score_ms": 1000 * score / n}


def search_ms(det, images, index) -> float:
    """Median ms per image of the nearest-bank search alone (embeddings computed beforehand)."""
    import torch

    from components import knn

    with torch.inference_mode():
        flats = [det.embedder_(x).reshape(-1, det.memory_bank_.shape[1]).numpy() for x in images[:10]]
    knn.knn_distances(index, flats[0], 1)
    times = []
    for flat in flats:
        t = time.perf_counter()
        knn.knn_distances(index, flat, 1)
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def run_line(line: str, settings: list[str], sets: list[str], threads: int, max_train: int | None,
             banks: list[int] | None) -> list[dict]:
    import numpy as np
    import torch

    from components import knn
    from components.config import load_config
    from components.data import iter_batches, scan_line
    from components.evaluation import evaluate_split
    from components.training import fit_line, preprocess_for

    torch.set_num_threads(threads)
    knn.set_threads(threads)
    cfg = load_config(ROOT / "params.yaml", [*NO_CALIBRATION, f"detector.patchcore.threads={threads}",
                                              "data.batch_size=8", *sets])
    t0 = time.perf_counter()
    det = fit_line(cfg, DATASETS / line, max_train).detector
    fit_s = time.perf_counter() - t0
    print(f"fitted {line}: {det.fit_stats_}", file=sys.stderr, flush=True)
    full = det.memory_bank_
    split = scan_line(DATASETS / line)
    images = [b.images for b in iter_batches(split.test[:32], preprocess_for(cfg.data), 1)]
    rows = []
    for size in banks or [len(full)]:
        bank = np.ascontiguousarray(full[: min(size, len(full))])
        probes = probe_patches(det, split, cfg, bank)
        for setting in settings:
            det.memory_bank_ = bank
            det.index_, breadth, recall = build(setting, bank, probes, cfg.detector.patchcore)
            o = evaluate_split(det, split, cfg).report.overall
            b1, b32 = timings(det, images, 1), timings(det, images, 32, repeats=3)
            rows.append({"line": line, "setting": setting, "kind": knn.index_kind(det.index_), "bank": len(bank),
                         "breadth": breadth, "recall": recall, "index_bytes": knn.index_nbytes(det.index_),
                         "search_ms": search_ms(det, images, det.index_),
                         "fwd_b1": b1["fwd_ms"], "net_b1": b1["net_ms"], "ms_b1": b1["score_ms"],
                         "ratio_b1": b1["score_ms"] / b1["fwd_ms"], "net_ratio_b1": b1["score_ms"] / b1["net_ms"],
                         "fwd_b32": b32["fwd_ms"], "net_b32": b32["net_ms"], "ms_b32": b32["score_ms"],
                         "ratio_b32": b32["score_ms"] / b32["fwd_ms"], "net_ratio_b32": b32["score_ms"] / b32["net_ms"],
                         "image_auroc": o["image_auroc"],
                         "pixel_auroc": o["pixel_auroc"], "aupro": o["aupro"], "fit_s": fit_s,
                         "grid": "x".join(map(str, det.grid_))})
            print(f"done {line} bank {len(bank)} {setting}: {rows[-1]}", file=sys.stderr, flush=True)
    for r in rows:
        flat = next((f for f in rows if f["setting"] == "flat" and f["bank"] == r["bank"]), None)
        for key in ("image_auroc", "pixel_auroc", "aupro"):
            r[f"d_{key}"] = None if flat is None else r[key] - flat[key]
    return rows


def print_table(rows: list[dict]) -> None:
    cols = [("line", "s"), ("grid", "s"), ("bank", "d"), ("setting", "s"), ("kind", "s"), ("breadth", "d"),
            ("recall", ".3f"), ("index_bytes", ",d"), ("search_ms", ".2f"), ("fwd_b1", ".1f"), ("net_b1", ".1f"),
            ("ms_b1", ".1f"), ("ratio_b1", ".2f"), ("net_ratio_b1", ".2f"), ("fwd_b32", ".1f"), ("net_b32", ".1f"),
            ("ms_b32", ".1f"), ("ratio_b32", ".2f"), ("net_ratio_b32", ".2f"),
            ("image_auroc", ".3f"), ("pixel_auroc", ".3f"), ("aupro", ".3f"), ("d_image_auroc", "+.3f"),
            ("d_pixel_auroc", "+.3f"), ("d_aupro", "+.3f")]
    print(table(rows, [(c, c, s) for c, s in cols]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", nargs="*", default=["cookie", "pcb"])
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS))
    parser.add_argument("--set", dest="sets", action="append", default=[], help="params override key=value")
    parser.add_argument("--banks", nargs="*", type=int, default=None, help="bank sizes (greedy prefixes)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-train", type=int, default=None, help="train images per line (default: all)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    for s in args.settings:
        parse_setting(s)
    rows = []
    for line in args.lines:
        rows += run_line(line, args.settings, args.sets, args.threads, args.max_train, args.banks)
    print(f"settings: {' '.join(args.sets) or 'params.yaml defaults'}; {args.threads} threads")
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    import components  # noqa: F401  (makes torchvision, and so timm, importable)

    main()
