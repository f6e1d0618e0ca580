"""Exported PatchCore (ONNX on onnxruntime, OpenVINO IR) against the native scoring path: speed and parity.

    .venv/bin/python bench/export.py                          # cookie, 256 px, 2 threads
    .venv/bin/python bench/export.py --data ../shared/datasets/pcb --size 256 --repeats 5 --json export.json

One PatchCore (params.yaml's settings: mobilenetv2_100 packaged weights, layers 2 and 3, coreset 0.1, index
auto) is fitted on DATA/train/good (calibration_fraction of it held out for the threshold), saved, and
exported with `components.export.export_model`. Then on DATA/test, decoded once (so decoding is in no time):
- parity: every test image scored by the native model with an exact (flat) index, by the native model as
  configured (HNSW above 1024 bank entries) and by each export; the largest image-score difference (relative),
  the largest map difference (relative to that image's map peak) and the fraction of equal decisions;
- speed: ms per image at batch 1 (the first 16 test images one by one) and batch 32 (the first 32 at once),
  the median of --repeats rounds; in each round every runtime runs once, in turn, so machine load hits all
  alike. One untimed call per runtime and batch shape first (graph building, allocator warm-up).
Same thread count everywhere: torch (detector.patchcore.threads), faiss, onnxruntime intra-op threads,
OpenVINO INFERENCE_NUM_THREADS. OpenVINO runs in float32 (components.export.OPENVINO_CONFIG).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from mdtable import table

ROOT = Path(__file__).resolve().parents[1]
COOKIE = ROOT.parent / "shared" / "datasets" / "cookie"


def _fit(data: Path, size: int, threads: int):
    from components.config import load_config
    from components.training import fit_line

    cfg = load_config(ROOT / "params.yaml", [f"data.image_size=[{size}, {size}]", "data.batch_size=32",
                                             f"detector.patchcore.threads={threads}"])
    t0 = time.perf_counter()
    result = fit_line(cfg, data)
    print(f"fitted on {result.n_fit} images ({result.n_calibration} calibration) in {time.perf_counter() - t0:.1f} s",
          file=sys.stderr)
    return result.detector, result.split


def _runtimes(det, out: Path, threads: int) -> dict:
    """name -> object with .score(images) -> ScoreBatch."""
    from components.export import ExportedModel, parity_reference

    runtimes = {"native (index as configured)": det, "native (exact index)": parity_reference(det)}
    for fmt in ExportedModel.formats_in(out):
        runtimes[{"onnx": "onnxruntime", "openvino": "openvino"}[fmt]] = ExportedModel.load(out, fmt, threads)
    return runtimes


def _time(runtimes: dict, images, repeats: int) -> dict[str, dict[str, float]]:
    """Median ms / image at batch 1 (first 16 images) and batch 32 (first 32), interleaved per round."""
    b1, b32 = [images[i:i + 1] for i in range(min(16, len(images)))], images[:32]
    for model in runtimes.values():  # untimed: graphs per shape, allocator
        model.score(b1[0])
        model.score(b32)
    times = {name: {"b1": [], "b32": []} for name in runtimes}
    for _ in range(repeats):
        for name, model in runtimes.items():
            t = time.perf_counter()
            for one in b1:
                model.score(one)
            times[name]["b1"].append(1000 * (time.perf_counter() - t) / len(b1))
            t = time.perf_counter()
            model.score(b32)
            times[name]["b32"].append(1000 * (time.perf_counter() - t) / len(b32))
    return {name: {k: statistics.median(v) for k, v in t.items()} for name, t in times.items()}


COLUMNS = [("runtime", "runtime", "s"), ("b1", "ms/img b1", ".1f"), ("b32", "ms/img b32", ".1f"),
           ("speed", "b32 speed-up vs native", ".2f"), ("s_exact", "score rel diff vs exact", ".1e"),
           ("m_exact", "map rel diff vs exact", ".1e"), ("agree", "decisions equal % (exact)", ".1f"),
           ("s_default", "score rel diff vs configured", ".1e"), ("m_default", "map rel diff vs configured", ".1e"),
           ("agree_default", "decisions equal % (configured)", ".1f")]


def _rows(timing: dict, report) -> list[dict]:
    """One row per runtime: times, speed-up at batch 32 over native as configured, parity figures."""
    rows = []
    base = timing["native (index as configured)"]["b32"]
    for name, t in timing.items():
        exact, default = report.formats.get(name, {}), report.versus_native_default.get(name, {})
        rows.append({"runtime": name, "b1": t["b1"], "b32": t["b32"], "speed": base / t["b32"],
                     "s_exact": exact.get("score_max_rel_diff"), "m_exact": exact.get("map_max_rel_diff"),
                     "agree": 100 * exact["decision_agreement"] if exact else None,
                     "s_default": default.get("score_max_rel_diff"), "m_default": default.get("map_max_rel_diff"),
                     "agree_default": 100 * default["decision_agreement"] if default else None})
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=COOKIE)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import torch

    import components  # noqa: F401  (torchvision shim before timm)
    from components.data import iter_batches
    from components.export import ParityTolerance, export_model, openvino_missing, parity
    from components.training import preprocess_for

    torch.set_num_threads(args.threads)
    det, split = _fit(args.data, args.size, args.threads)
    images = torch.cat([b.images for b in iter_batches(split.test, preprocess_for(det.cfg.data), 32)])
    with tempfile.TemporaryDirectory() as tmp:
        formats = ("onnx", "openvino") if openvino_missing() is None else ("onnx",)
        t0 = time.perf_counter()
        out = export_model(det, Path(tmp) / "export", formats)
        export_s = time.perf_counter() - t0
        runtimes = _runtimes(det, out, args.threads)
        exported = {k: v for k, v in runtimes.items() if not k.startswith("native")}
        batches = [images[i:i + 32] for i in range(0, len(images), 32)]
        report = parity(runtimes["native (exact index)"], exported, batches, det.threshold_, ParityTolerance(), det)
        timing = _time(runtimes, images, args.repeats)
    rows = _rows(timing, report)
    print(f"\n{args.data.name}, {args.size} px, {len(images)} test images, bank {det.memory_bank_.shape} "
          f"({det.index_report_.kind if det.index_report_ else '?'}), {args.threads} threads, "
          f"{platform.processor() or platform.machine()}; export written in {export_s:.1f} s; parity gate "
          f"(vs exact): {'PASSED' if report.passed else report.reasons}\n")
    print(table(rows, COLUMNS))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "parity": report.to_dict(), "export_s": export_s}, indent=2))


if __name__ == "__main__":
    main()
