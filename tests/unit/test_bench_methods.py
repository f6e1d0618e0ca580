"""bench/methods.py --quoted: one table of all five methods at the resolution each line is quoted at."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def load_methods():
    """bench/ is not a package: load the script (and its sibling imports) from its folder."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        spec = importlib.util.spec_from_file_location("bench_methods", ROOT / "bench" / "methods.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "bench"))
    return module


bm = load_methods()


def run(line: str, method: str, variant: str, seed: int, auroc: float) -> dict:
    return {"line": line, "method": method, "variant": variant, "seed": seed, "n_train": 10,
            "image_auroc": auroc, "pixel_auroc": 0.9, "aupro": 0.8, "fit_s": 1.0, "ms_b1": 2.0, "load": 1.0,
            "image_size": "8x8", "sets": []}


def test_quoted_rows_take_each_lines_declared_variant_only(tmp_path, monkeypatch):
    monkeypatch.setattr(bm, "QUOTED", {"cookie": ("a", "default", "lat_a"), "pcb": ("b", "640px", "lat_b")})
    (tmp_path / "a.json").write_text(json.dumps({"runs": [
        run("cookie", "patchcore", "default", 0, 1.0), run("cookie", "patchcore", "default", 1, 0.8),
        run("cookie", "students", "other", 0, 0.1), run("pcb", "patchcore", "default", 0, 0.2)]}))
    (tmp_path / "b.json").write_text(json.dumps({"runs": [
        run("pcb", "patchcore", "640px", 0, 0.9), run("cookie", "patchcore", "640px", 0, 0.3)]}))

    summary = bm.summarise(bm.quoted_rows(tmp_path))

    assert [(r["line"], r["method"], r["variant"], r["seeds"]) for r in summary] == [
        ("cookie", "patchcore", "default", [0, 1]), ("pcb", "patchcore", "640px", [0])]
    assert abs(summary[0]["image_auroc"] - 0.9) < 1e-12 and summary[0]["image_auroc_sd"] > 0

    # quiet costs: each line from its own latency file (the other line's rows there are ignored); none -> "-"
    (tmp_path / "lat_a.json").write_text(json.dumps([{"method": "patchcore", "line": "cookie", "ms_b1": 8.4},
                                                     {"method": "patchcore", "line": "pcb", "ms_b1": 999.0}]))
    quiet = bm.quiet_ms(tmp_path)
    assert quiet == {("cookie", "patchcore"): 8.4}
    lines = bm.render(summary, quiet).splitlines()
    assert "quiet ms/image" in lines[0] and "| 8 " in lines[2] and "| - " in lines[3]


def test_the_quoted_table_in_the_repo_matches_the_runs_it_quotes():
    """docs/results/methods_quoted.md is rewritten by `bench/methods.py --quoted` after the runs change."""
    text = (ROOT / "docs" / "results" / "methods_quoted.md").read_text()
    assert bm.render(bm.summarise(bm.quoted_rows()), bm.quiet_ms()) in text
