"""Side by side: our PatchCore against anomalib 2.7's, on the same data, backbone, weights, size and threads.

Needs the benchmark environment (anomalib is installed only there, never as a dependency of the package):

    make bench-env
    .venv-bench/bin/python bench/speed.py                                   # cookie (all train), pcb (50)
    .venv-bench/bin/python bench/speed.py --seeds 0 1 2 --json speed.json   # run-to-run spread
    .venv-bench/bin/python bench/speed.py --lines cookie --max-train 5 --max-test 16 --seeds 0  # smoke test

What is compared, per line: fit seconds (features + coreset), coreset seconds, inference ms per image at
batch 1 and batch 32, peak RSS, image AUROC, pixel AUROC, AUPRO; then the ratio ours / anomalib. Also the
ratio of each implementation's inference time to the backbone's forward alone (the same timm
`features_only` forward, input normalisation included, on the same tensors), interleaved with the
inference calls so machine load hits both alike; and to the forward each implementation actually runs
(ours: the frozen graph with batch norm folded, `backbone.inference_graph`), i.e. its own overhead.

How it is kept fair:
- one child process per (implementation, line, seed), so peak RSS (ru_maxrss) is that run's alone; the two
  implementations alternate per line and seed (ours first on even seeds, anomalib first on odd ones);
- the same images, decoded once per child by our data pipeline (256 x 256 bilinear resize, [0, 1]); both
  get the same decoded tensors for fit and for inference, so decoding is excluded from every time;
- anomalib runs as its torch model (`PatchcoreModel`, what its Lightning module wraps), layers = our
  `backbone.layers`, with our packaged ImageNet weights copied into its timm extractor by state_dict (no
  download; HF_HUB_OFFLINE=1) and the ImageNet normalisation its pre-processor would apply;
- same coreset ratio, 2 threads (OMP_NUM_THREADS, torch.set_num_threads, faiss); glibc's
  MALLOC_MMAP_THRESHOLD_ lowered for anomalib's fit only (its coreset otherwise grows RSS by hundreds of MB
  per second, as in docs/patchcore.md's bar). Ours fits with glibc's default: with the lowered threshold every
  large temporary is a fresh mmap, and our backbone forward alone took 4.5x longer (146 against 32 ms at
  batch 1). Before inference is timed, both processes get the same allocator settings (`_inference_allocator`:
  mmap threshold 32 MiB, trim threshold 64 MiB);
- the metrics of both come from components.metrics.evaluate on our image/mask pairs (paired by name;
  anomalib's own data module pairs by sort order, which breaks on names such as anomaly-1 / anomaly-10_mask);
- seeds: ours `detector.patchcore.seed`; anomalib's coreset draws from torch's and numpy's global RNGs,
  seeded with the same value.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from mdtable import markdown

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ROOT.parent / "shared" / "datasets"
MAX_TRAIN = {"pcb": 50}
IMPLS = ("ours", "anomalib")
METRICS = ("fit_s", "coreset_s", "ms_b1", "ms_b32", "peak_rss_mb", "image_auroc", "pixel_auroc", "aupro")


# ------------------------------------------------------------------------------------------ child side
def _setup(threads: int, seed: int):
    import numpy as np
    import torch

    sys.path.insert(0, str(ROOT))
    import components.torchvision_compat  # noqa: F401  (before timm/torchvision/anomalib)

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    np.random.seed(seed)
    return torch


def _config(line: str, threads: int, seed: int, sets: list[str]):
    from components.config import load_config

    return load_config(
        ROOT / "params.yaml",
        [
            "data.calibration_fraction=0",
            "data.batch_size=32",
            f"detector.patchcore.threads={threads}",
            f"detector.patchcore.seed={seed}",
            *sets,
        ],
    )


def _decoded(samples, cfg, batch_size: int, with_masks: bool = False) -> list:
    from components.data import iter_batches
    from components.training import preprocess_for

    return list(
        iter_batches(
            samples,
            preprocess_for(cfg.data),
            batch_size,
            with_masks=with_masks,
            max_pixels=cfg.data.max_image_pixels,
        )
    )


class Ours:
    """Our detector behind three calls: fit(batches) -> coreset seconds, infer(x), backbone(x)."""

    def __init__(self, cfg) -> None:
        from components.detector import create_detector

        self.det = create_detector(cfg)
        self.det.feature_key()  # builds the backbone now, as Anomalib.__init__ does: fit times exclude it

    def fit(self, batches: list) -> float:
        self.det.fit([b.images for b in batches])
        return float(self.det.fit_stats_["coreset_s"])

    def infer(self, x):
        out = self.det.score(x)
        return out.image_scores, out.anomaly_maps

    def backbone(self, x):
        """The reference: timm's features_only forward as built (eager), what anomalib runs too."""
        import torch

        with torch.inference_mode():
            return self.det.embedder_.extractor(x)

    def own_backbone(self, x):
        """The forward our inference actually runs (the frozen, BN-folded graph with backbone.inference_graph)."""
        import torch

        with torch.inference_mode():
            emb = self.det.embedder_
            return emb.extractor.frozen(x) if emb.graph else emb.extractor(x)


class Anomalib:
    """anomalib's PatchcoreModel with our packaged weights loaded by state_dict (nothing downloaded)."""

    def __init__(self, cfg) -> None:
        import torch
        from anomalib.models.image.patchcore.torch_model import PatchcoreModel

        from components.backbones import build_extractor

        extractor, _ = build_extractor(cfg.backbone)
        p = cfg.detector.patchcore
        self.ratio = p.coreset_ratio
        self.model = PatchcoreModel(
            layers=list(cfg.backbone.layers),
            backbone=cfg.backbone.name,
            pre_trained=False,
            num_neighbors=p.num_neighbors,
        )
        self.model.feature_extractor.feature_extractor.load_state_dict(
            extractor.body.state_dict(), strict=True
        )
        self.mean, self.std = extractor.mean.clone(), extractor.std.clone()
        self.no_grad = torch.no_grad
        self.inference_mode = torch.inference_mode

    def _norm(self, x):
        return (x - self.mean) / self.std

    def fit(self, batches: list) -> float:
        self.model.train()
        with self.no_grad():
            for b in batches:
                self.model(self._norm(b.images))
            t = time.perf_counter()
            self.model.subsample_embedding(self.ratio)
            coreset_s = time.perf_counter() - t
        self.model.eval()
        return coreset_s

    def infer(self, x):
        with self.inference_mode():
            out = self.model(self._norm(x))
        return out.pred_score.reshape(-1).numpy(), out.anomaly_map.reshape(x.shape[0], *x.shape[-2:]).numpy()

    def backbone(self, x):
        with self.inference_mode():
            return self.model.feature_extractor(self._norm(x))

    own_backbone = backbone  # anomalib runs the eager timm forward


def _inference_allocator() -> None:
    """glibc settings for the timed inference of both implementations (after their fits): mmap threshold
    32 MiB (the top of glibc's dynamic range) and trim threshold 64 MiB, so large temporaries are reused
    from the heap instead of being mapped and returned to the system on every call. With anomalib's lowered
    fit threshold the eager forward took 121 ms at batch 1, raising only the mmap threshold 83 ms, both 28 ms;
    in a default process both raised took 20 against 26 ms."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    libc.mallopt(m_mmap_threshold, 32 << 20)
    libc.mallopt(m_trim_threshold, 64 << 20)


def _interleaved(impl, xs: list, repeats: int) -> tuple[float, float, float]:
    """Median ms per image of impl.infer, impl.backbone and impl.own_backbone over xs (each (B, 3, H, W)),
    alternating."""
    calls = (impl.infer, impl.backbone, impl.own_backbone)
    for call in calls:
        call(xs[0])
    times: tuple[list, ...] = ([], [], [])
    for _ in range(repeats):
        for x in xs:
            for call, out in zip(calls, times, strict=True):
                t = time.perf_counter()
                call(x)
                out.append((time.perf_counter() - t) / x.shape[0])
    return tuple(1000 * statistics.median(t) for t in times)


def _timings(impl, test_batches: list, n_b1: int, repeats_b32: int) -> dict:
    import torch

    images = torch.cat([b.images for b in test_batches])
    b1 = [images[i : i + 1].clone() for i in range(min(n_b1, len(images)))]
    b32 = images[torch.arange(32) % len(images)].contiguous()  # the first 32 test images (cycled if fewer)
    ms_b1, bb_b1, own_b1 = _interleaved(impl, b1, 1)
    ms_b32, bb_b32, own_b32 = _interleaved(impl, [b32], repeats_b32)
    return {
        "ms_b1": ms_b1,
        "backbone_ms_b1": bb_b1,
        "own_backbone_ms_b1": own_b1,
        "ms_b32": ms_b32,
        "backbone_ms_b32": bb_b32,
        "own_backbone_ms_b32": own_b32,
        "vs_backbone_b1": ms_b1 / bb_b1,
        "vs_backbone_b32": ms_b32 / bb_b32,
        "vs_own_backbone_b1": ms_b1 / own_b1,
        "vs_own_backbone_b32": ms_b32 / own_b32,
    }


def _accuracy(impl, test_batches: list, fpr_limit: float) -> dict:
    from components.metrics import ScoredSample, evaluate

    records = []
    for batch in test_batches:
        scores, maps = impl.infer(batch.images)
        for i, s in enumerate(batch.samples):
            mask = batch.masks[i] if (s.label == 1 and batch.has_mask[i]) else None
            records.append(ScoredSample(s.name, s.defect_type, s.label, float(scores[i]), maps[i], mask))
    o = evaluate(records, fpr_limit=fpr_limit).overall
    return {
        "image_auroc": o["image_auroc"],
        "pixel_auroc": o["pixel_auroc"],
        "aupro": o["aupro"],
        "n_test": len(records),
    }


def run_child(impl_name: str, line: str, seed: int, args) -> dict:
    """Fit, time, evaluate one implementation on one line in this process; returns the row."""
    _setup(args.threads, seed)
    from components.data import scan_line

    cfg = _config(line, args.threads, seed, args.sets)
    split = scan_line(DATASETS / line)
    cap = args.max_train if args.max_train is not None else MAX_TRAIN.get(line)
    train = _decoded(split.train[:cap] if cap else split.train, cfg, 32)
    test = _decoded(_spread(split.test, args.max_test), cfg, 32, with_masks=True)
    impl = (Ours if impl_name == "ours" else Anomalib)(cfg)
    t = time.perf_counter()
    coreset_s = impl.fit(train)
    row = {
        "impl": impl_name,
        "line": line,
        "seed": seed,
        "n_train": sum(len(b.samples) for b in train),
        "fit_s": time.perf_counter() - t,
        "coreset_s": coreset_s,
    }
    _inference_allocator()
    row.update(_timings(impl, test, args.n_b1, args.repeats_b32))
    row.update(_accuracy(impl, test, cfg.evaluation.aupro_fpr_limit))
    row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return row


def _spread(samples: tuple, count: int | None) -> tuple:
    """`count` samples evenly spaced over the (type-sorted) list, so every defect type and good are in."""
    if not count or count >= len(samples):
        return samples
    picks = sorted({round(i * (len(samples) - 1) / max(count - 1, 1)) for i in range(count)})
    return tuple(samples[i] for i in picks)


# ----------------------------------------------------------------------------------------- parent side
def child_env(threads: int, impl: str) -> dict:
    lowered = {"MALLOC_MMAP_THRESHOLD_": "131072"} if impl == "anomalib" else {}
    return {
        **os.environ,
        **lowered,
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        "TQDM_DISABLE": "1",  # anomalib's coreset progress bar
    }


def run_all(args) -> list[dict]:
    lines = args.lines or sorted(p.name for p in DATASETS.iterdir() if (p / "train").is_dir())
    rows = []
    for line in lines:
        for seed in args.seeds:
            for impl in IMPLS if seed % 2 == 0 else IMPLS[::-1]:
                cmd = [sys.executable, __file__, "--worker", impl, line, str(seed), *_forwarded(args)]
                t = time.perf_counter()
                proc = subprocess.run(
                    cmd, capture_output=True, text=True, env=child_env(args.threads, impl), cwd=ROOT
                )
                if proc.returncode != 0:
                    print(f"{impl} {line} seed {seed} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
                    continue
                rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
                print(
                    f"done {impl} {line} seed {seed} in {time.perf_counter() - t:.0f} s: {json.dumps(rows[-1])}",
                    file=sys.stderr,
                    flush=True,
                )
    return rows


def _forwarded(args) -> list[str]:
    out = ["--threads", str(args.threads), "--n-b1", str(args.n_b1), "--repeats-b32", str(args.repeats_b32)]
    out += [f"--set={s}" for s in args.sets]
    for flag, value in (("--max-train", args.max_train), ("--max-test", args.max_test)):
        if value is not None:
            out += [flag, str(value)]
    return out


def summarise(rows: list[dict]) -> list[dict]:
    """Per line: the mean (and sample sd over seeds) of each figure for ours and anomalib, then the ratio."""
    extra = ("backbone_ms_b1", "backbone_ms_b32", "own_backbone_ms_b1", "own_backbone_ms_b32", "vs_backbone_b1",
             "vs_backbone_b32", "vs_own_backbone_b1", "vs_own_backbone_b32", "n_train")
    out = []
    for line in dict.fromkeys(r["line"] for r in rows):
        means = {}
        for impl in IMPLS:
            mine = [r for r in rows if r["line"] == line and r["impl"] == impl]
            if not mine:
                continue
            entry = {"line": line, "impl": impl, "runs": len(mine)}
            for key in (*METRICS, *extra):
                values = [r[key] for r in mine if r.get(key) is not None]
                entry[key] = statistics.fmean(values) if values else None
                entry[f"{key}_sd"] = statistics.stdev(values) if len(values) > 1 else None
            means[impl] = entry
            out.append(entry)
        if len(means) == 2:
            ratio = {"line": line, "impl": "ratio", "runs": None}
            for key in (*METRICS, "vs_backbone_b1", "vs_backbone_b32", "vs_own_backbone_b1", "vs_own_backbone_b32"):
                a, b = means["ours"][key], means["anomalib"][key]
                ratio[key] = a / b if a is not None and b else None
            out.append(ratio)
    return out


COLUMNS = [
    ("line", "line", "s"),
    ("impl", "impl", "s"),
    ("runs", "runs", "d"),
    ("n_train", "train", ".0f"),
    ("fit_s", "fit s", ".2f"),
    ("coreset_s", "coreset s", ".2f"),
    ("ms_b1", "ms/img b1", ".1f"),
    ("ms_b32", "ms/img b32", ".1f"),
    ("peak_rss_mb", "peak RSS MB", ".0f"),
    ("image_auroc", "img AUROC", ".3f"),
    ("pixel_auroc", "px AUROC", ".3f"),
    ("aupro", "AUPRO", ".3f"),
    ("backbone_ms_b1", "backbone ms b1", ".1f"),
    ("backbone_ms_b32", "backbone ms b32", ".1f"),
    ("vs_backbone_b1", "inf/backbone b1", ".2f"),
    ("vs_backbone_b32", "inf/backbone b32", ".2f"),
    ("own_backbone_ms_b1", "own fwd ms b1", ".1f"),
    ("own_backbone_ms_b32", "own fwd ms b32", ".1f"),
    ("vs_own_backbone_b1", "inf/own fwd b1", ".2f"),
    ("vs_own_backbone_b32", "inf/own fwd b32", ".2f"),
]


def cell(entry: dict, key: str, spec: str) -> str:
    value = entry.get(key)
    if value is None:
        return "-"
    if entry["impl"] == "ratio" and isinstance(value, float):
        spec = ".3f" if key in ("image_auroc", "pixel_auroc", "aupro") else ".2f"
    text = format(value, spec)
    sd = entry.get(f"{key}_sd")
    return f"{text} ± {format(sd, spec)}" if sd is not None and entry["impl"] != "ratio" else text


def print_table(summary: list[dict]) -> None:
    print(markdown([[h for _, h, _ in COLUMNS]] + [[cell(e, k, f) for k, _, f in COLUMNS] for e in summary]))
    print(
        "ratio = ours / anomalib (means over runs; ± = sample sd over seeds). inf/backbone = inference ms "
        "over timm's eager features_only forward alone (the reference both run) on the same tensors, "
        "interleaved. own fwd = the forward the implementation's inference runs (ours: the frozen, BN-folded "
        "graph of backbone.inference_graph; anomalib: the eager forward); inf/own fwd = the overhead over it."
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--lines", nargs="*", default=None, help="default: every folder in ../shared/datasets"
    )
    parser.add_argument("--seeds", nargs="*", type=int, default=[0])
    parser.add_argument("--set", dest="sets", action="append", default=[], help="params override key=value")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-train", type=int, default=None, help="default: all (pcb: 50)")
    parser.add_argument("--max-test", type=int, default=None, help="default: every test image")
    parser.add_argument("--n-b1", type=int, default=20, help="test images timed one by one")
    parser.add_argument("--repeats-b32", type=int, default=3, help="timed passes of the batch of 32")
    parser.add_argument("--json", type=Path, default=None, help="also write rows and summary as JSON")
    parser.add_argument("--worker", nargs=3, metavar=("IMPL", "LINE", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        impl, line, seed = args.worker
        print(json.dumps(run_child(impl, line, int(seed), args)))
        return
    load_before = os.getloadavg()
    rows = run_all(args)
    summary = summarise(rows)
    print_table(summary)
    print(f"load average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f} (1 min)")
    if args.json:
        args.json.write_text(
            json.dumps(
                {"rows": rows, "summary": summary, "load_before": load_before, "load_after": os.getloadavg()},
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
