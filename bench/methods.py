"""All five detectors on cookie and pcb, several seeds, ONE table: image AUROC, pixel AUROC, AUPRO (mean ± sd
over seeds), fit seconds and batch-1 ms per image at the resolution used (issue 18).

Each (method, line, seed) runs in its own child process (bench/accuracy.py's worker: fit on the line's train
images, no threshold calibration (holdout with fraction 0: fit s is the detector's fit alone), evaluate on its whole test split, time 20 test images at batch 1). Seeds are
`detector.<method>.seed` (Uninformed Students' teacher keeps `teacher_seed`: one cached teacher per backbone).
Rows are appended to the JSON after every run, so an interrupted bench keeps what it measured; `--table-only`
rewrites the markdown from that JSON.

    nice -n 19 .venv/bin/python bench/methods.py --seeds 0 1 2 --threads 2
    .venv/bin/python bench/methods.py --table-only
    .venv/bin/python bench/methods.py --quoted     # docs/results/methods_quoted.{md,json}, see QUOTED

`--quoted` writes the one table of all five methods at the resolution each line needs (QUOTED: cookie at the
256 px defaults, pcb at its native 640 px for every method), from the rows the runs above wrote.

Per-method overrides: `--set METHOD:key=value` (e.g. `--set transformaly:detector.transformaly.student_mode=train`)
applies to that method only; `--set key=value` to all. The load average (`os.getloadavg`) is recorded beside
each row: times measured on a loaded machine are pessimistic; accuracy is unaffected.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from child import NO_CALIBRATION, run_worker, scoped_sets
from mdtable import markdown

ROOT = Path(__file__).resolve().parents[1]
ACCURACY = str(Path(__file__).resolve().parent / "accuracy.py")
DATASETS = ROOT.parent / "shared" / "datasets"
METHODS = ("patchcore", "dinomaly", "students", "divide_assemble", "transformaly")
LINES = ("cookie", "pcb")
RESULTS = ROOT / "docs" / "results"
# line -> (results file, variant) quoted for every method of that line. Declared, not picked per method from
# test results: cookie's defects are visible at 256 px (PatchCore 1.000 there), pcb's are a few pixels wide at
# 256 px, so pcb is quoted at its native 640 x 640 (`data.resize: none`) for all five methods, better or worse.
# The third name: bench/latency.py's results at that resolution (the quiet machine's ms per image).
QUOTED = {"cookie": ("methods", "default", "latency"), "pcb": ("methods_options", "640px", "latency_pcb640")}
NOTES = {
    "dinomaly": "CNN variant (no DINOv2 weights offline)",
    "students": "teacher distilled offline (no ImageNet patches)",
    "divide_assemble": "CPU-sized",
    "transformaly": "CNN variant (no ViT weights offline); map not the paper's",
}


def method_sets(method: str, sets: list[str]) -> list[str]:
    """The overrides of one method's runs: `detector.method=<method>`, the global ones, its own (METHOD:k=v)."""
    # no threshold calibration, so fit s is the detector's fit alone (accuracy.py's worker applies it too;
    # named here so that each row's recorded `sets` say it)
    return [f"detector.method={method}", *NO_CALIBRATION, *scoped_sets(method, sets, METHODS)]


def working_size(sets: list[str], line: str) -> str:
    """The resolution the method works at: data.image_size (the line's own size with data.resize none), or
    divide_assemble's own image_size when set."""
    sys.path.insert(0, str(ROOT))
    from components.config import load_config

    cfg = load_config(ROOT / "params.yaml", sets)
    h, w = cfg.data.image_size
    if cfg.data.resize == "none":
        from PIL import Image

        with Image.open(next(iter(sorted((DATASETS / line / "test").rglob("*.png"))))) as first:
            w, h = first.size
    own = getattr(getattr(cfg.detector, cfg.detector.method), "image_size", None)
    return f"{h}x{w}" + (f" ({own} inside)" if isinstance(own, int) and own not in (0, h) else "")


def summarise(rows: list[dict]) -> list[dict]:
    """Rows of one (method, line, seed) each -> one row per (method, line): mean and sd over seeds."""
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r.get("variant", "default"), r["line"]), []).append(r)
    out = []
    for (method, variant, line), rs in groups.items():
        row = {"method": method, "variant": variant, "line": line, "sets": rs[0].get("sets"), "seeds": sorted(r["seed"] for r in rs), "n_train": rs[0]["n_train"],
               "image_size": rs[0].get("image_size"), "load": statistics.mean(r["load"] for r in rs)}
        for key in ("image_auroc", "pixel_auroc", "aupro", "fit_s", "ms_b1"):
            vals = [r[key] for r in rs if r.get(key) is not None]
            row[key] = statistics.mean(vals) if vals else None
            row[key + "_sd"] = statistics.stdev(vals) if len(vals) > 1 else None
        out.append(row)
    order = {m: i for i, m in enumerate(METHODS)}
    return sorted(out, key=lambda r: (r["line"], order.get(r["method"], 99), r["variant"] != "default",
                                      r["variant"]))


def fmt(row: dict, key: str, spec: str) -> str:
    if row.get(key) is None:
        return "-"
    sd = row.get(key + "_sd")
    return format(row[key], spec) + ("" if sd is None else " ± " + format(sd, spec))


def render(summary: list[dict], quiet: dict[tuple[str, str], float] | None = None) -> str:
    """The table; `quiet` ((line, method) -> ms) adds a column of quiet-machine costs (bench/latency.py)."""
    head = ["line", "method", "variant", "seeds", "train", "px", "image AUROC", "pixel AUROC", "AUPRO", "fit s",
            "ms/image (b1)", "load"]
    cells = [[*head, *(["quiet ms/image"] if quiet is not None else []), "note"]]
    for r in summary:
        row = [r["line"], r["method"], r["variant"], ",".join(map(str, r["seeds"])), str(r["n_train"]),
               str(r.get("image_size") or "-"), fmt(r, "image_auroc", ".3f"), fmt(r, "pixel_auroc", ".3f"),
               fmt(r, "aupro", ".3f"), fmt(r, "fit_s", ".0f"), fmt(r, "ms_b1", ".0f"), f"{r['load']:.1f}"]
        if quiet is not None:
            ms = quiet.get((r["line"], r["method"]))
            row.append("-" if ms is None else f"{ms:.0f}")
        cells.append([*row, NOTES.get(r["method"], "")])
    return markdown(cells)


def quoted_rows(results: Path = RESULTS) -> list[dict]:
    """The runs QUOTED names (every method, every seed), read from their results files."""
    rows = []
    for line, (name, variant, _) in QUOTED.items():
        runs = json.loads((results / f"{name}.json").read_text())["runs"]
        rows += [r for r in runs if r["line"] == line and r.get("variant", "default") == variant]
    return rows


def quiet_ms(results: Path = RESULTS) -> dict[tuple[str, str], float]:
    """(line, method) -> bench/latency.py's median batch-1 ms per image on the quiet machine, where measured."""
    out = {}
    for line, (_, _, name) in QUOTED.items():
        path = results / f"{name}.json"
        if path.is_file():
            out.update({(line, r["method"]): r["ms_b1"] for r in json.loads(path.read_text())
                        if r["line"] == line})
    return out


def write_runs(out: Path, rows: list[dict]) -> list[dict]:
    """OUT.json: the runs and their summary (returned)."""
    summary = summarise(rows)
    out.with_suffix(".json").write_text(json.dumps({"runs": rows, "summary": summary}, indent=2))
    return summary


def write_table(out: Path, rows: list[dict], quiet: dict[tuple[str, str], float] | None = None) -> str:
    """OUT.json (runs and summary) and OUT.md (the table); returns the table."""
    text = render(write_runs(out, rows), quiet)
    out.with_suffix(".md").write_text(f"<!-- written by bench/methods.py; do not edit -->\n\n{text}\n")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument("--lines", nargs="*", default=list(LINES))
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--set", dest="sets", action="append", default=[], help="key=value or METHOD:key=value")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backbone", default="mobilenetv2_100")
    parser.add_argument("--out", type=Path, default=RESULTS / "methods")
    parser.add_argument("--table-only", action="store_true", help="rewrite OUT.md from OUT.json")
    parser.add_argument("--variant", default="default", help="label of this configuration (rows keyed by it)")
    parser.add_argument("--quoted", action="store_true",
                        help="write docs/results/methods_quoted.{md,json} from the runs QUOTED names; run nothing")
    args = parser.parse_args()
    if args.quoted:
        print(write_table(RESULTS / "methods_quoted", quoted_rows(), quiet_ms()))
        return
    json_path = args.out.with_suffix(".json")
    rows = json.loads(json_path.read_text())["runs"] if json_path.is_file() else []
    if not args.table_only:
        for seed in args.seeds:  # seed-major: a bench cut short still has every method at seed 0
            for method in args.methods:
                for line in args.lines:
                    sets = [*method_sets(method, args.sets), f"detector.{method}.seed={seed}"]
                    load = os.getloadavg()[0]
                    t0 = time.time()
                    row = run_worker(ACCURACY, [line, args.backbone], args.threads, [f"--set={s}" for s in sets],
                                     f"{method}/{line}/seed {seed}")
                    if row is None:
                        continue
                    row.update(variant=args.variant, seed=seed, image_size=working_size(sets, line), load=(load + os.getloadavg()[0]) / 2, sets=sets, started=t0)
                    if json_path.is_file():  # another bench may have written it meanwhile: keep its rows
                        rows = json.loads(json_path.read_text())["runs"]
                    rows = [r for r in rows if (r["method"], r.get("variant", "default"), r["line"], r["seed"])
                            != (method, args.variant, line, seed)]
                    rows.append(row)
                    write_runs(args.out, rows)
                    print(f"done {method}/{line}/seed {seed}: image AUROC {row['image_auroc']:.3f}, "
                          f"fit {row['fit_s']:.0f} s", file=sys.stderr, flush=True)
    print(write_table(args.out, rows))


if __name__ == "__main__":
    main()
