"""Failures on the output side and the probe's other CLI findings (issue 16, Low): a read-only or full
output, `--json` at a folder, `--out` at a file, a symlink loop in the data, colliding output names, counts
given as 0 / negative / booleans, `lineage --json -`, `retrain` with an unknown line or a bad `--set`,
and the gate lock broken by compare-and-delete. Each bad case: exit 2, one line, nothing half-written.
"""

from __future__ import annotations

import os
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from components.prediction import unique_names
from flows.cli import main
from tests.conftest import write_line
from tests.reliability.test_bad_input import base, run_cli  # noqa: F401 - the module fixture `base`


def one_line_exit_2(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err and err.startswith("error:") and err.count("error:") == 1, err
    assert all(n in err for n in needles), (needles, err)


@contextmanager
def tmpfs(path: Path, options: str):
    """A tmpfs mounted at `path` (root only; skipped elsewhere)."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], capture_output=True)


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.is_dir() else []


def test_fit_into_a_read_only_folder_fails_before_computing(base, tmp_path, capsys, record):  # noqa: F811
    with tmpfs(tmp_path / "ro", "ro,size=64k") as ro:
        code, err = run_cli(capsys, "fit", "--data", str(base["line"]), "--out", str(ro / "model"),
                            "--config", str(base["params"]))
        out = capsys.readouterr().out
        record("bad input", "fit --out on a read-only file system: refused before fitting")
        one_line_exit_2(code, err, str(ro / "model"))
        assert "fitted" not in out and _listing(ro) == []


def test_predict_on_a_full_disk_leaves_nothing(base, tmp_path, capsys, record):  # noqa: F811
    images = sorted((base["line"] / "test").rglob("*.png"))
    with tmpfs(tmp_path / "full", "size=16k") as full:
        code, err = run_cli(capsys, "predict", "--model", str(base["model"]), *map(str, images),
                            "--out", str(full / "pred"))
        record("bad input", "predict --out on a full disk (16 KiB tmpfs): one line, nothing half-written")
        one_line_exit_2(code, err, "No space left on device")
        assert _listing(full) == []


def test_json_at_a_folder_and_out_at_a_file(base, tmp_path, capsys, record):  # noqa: F811
    folder = tmp_path / "metrics-folder"
    folder.mkdir()
    code, err = run_cli(capsys, "evaluate", "--model", str(base["model"]), "--data", str(base["line"]),
                        "--json", str(folder))
    one_line_exit_2(code, err, str(folder), "is a folder")
    assert _listing(folder) == [] and not list(tmp_path.glob(".*tmp"))
    a_file = tmp_path / "a-file"
    a_file.write_text("keep me")
    image = next((base["line"] / "test").rglob("*.png"))
    code2, err2 = run_cli(capsys, "predict", "--model", str(base["model"]), str(image), "--out", str(a_file))
    code3, err3 = run_cli(capsys, "fit", "--data", str(base["line"]), "--out", str(a_file),
                          "--config", str(base["params"]))
    record("bad input", "--json at a folder, --out at a file (predict, fit): one line, nothing written")
    one_line_exit_2(code2, err2, str(a_file), "not a folder")
    one_line_exit_2(code3, err3, str(a_file), "not a folder")
    assert a_file.read_text() == "keep me"


def test_symlink_loop_in_the_data(base, tmp_path, capsys, record):  # noqa: F811
    line = write_line(tmp_path / "line")
    (line / "train/good/loop.png").symlink_to(line / "train/good/loop.png")
    code, err = run_cli(capsys, "fit", "--data", str(line), "--out", str(tmp_path / "model"),
                        "--config", str(base["params"]))
    record("bad input", "a symlink loop in the train data: one line")
    one_line_exit_2(code, err, "loop.png")
    assert not (tmp_path / "model").exists()


def test_output_names_never_collide(base, tmp_path, capsys, record):  # noqa: F811
    src = next((base["line"] / "test").rglob("*.png"))
    files = [tmp_path / "col/a/x.png", tmp_path / "col/b/x.png", tmp_path / "col/x-1.png", tmp_path / "col/x-1.jpg"]
    for f in files:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(src.read_bytes())
    names = unique_names(files)
    code, err = run_cli(capsys, "predict", "--model", str(base["model"]), *map(str, files),
                        "--out", str(tmp_path / "pred"))
    overlays = sorted((tmp_path / "pred").glob("*_overlay.png"))
    record("bad input", "images whose names collide (a/x, b/x, x-1): one overlay each")
    assert len(set(names)) == len(files), names
    assert code == 0, err
    assert len(overlays) == len(files), overlays


@pytest.mark.parametrize("args", [("--max-train", "0"), ("--max-train", "-3"), ("--set", "data.batch_size=true"),
                                  ("--set", "data.batch_size=false")])
def test_counts_must_be_positive_integers(args, base, tmp_path, capsys, record):  # noqa: F811
    code, err = run_cli(capsys, "fit", "--data", str(base["line"]), "--out", str(tmp_path / "m"),
                        "--config", str(base["params"]), *args)
    record("bad input", f"fit {' '.join(args)}: refused")
    assert code == 2, err
    assert "Traceback" not in err and not (tmp_path / "m").exists()


def _run(capsys, *args: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main(list(args))
    return code, " ".join(capsys.readouterr().err.split())


def test_retrain_refuses_an_unknown_line_or_bad_set_in_one_line(base, tmp_path, capsys, record):  # noqa: F811
    raw = yaml.safe_load(base["params"].read_text())
    raw["lines"] = {"known": {"data": str(base["line"])}}
    raw["services"] = {"root": str(tmp_path / "root")}
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    code, err = _run(capsys, "retrain", "nope", "--config", str(params))
    code2, err2 = _run(capsys, "retrain", "known", "--config", str(params), "--set", "data.batch_size=-1")
    code3, err3 = _run(capsys, "retrain", "known", "--config", str(params), "--set", "no.such.key=1")
    record("bad input", "retrain: unknown line, out-of-range and unknown --set: one line, no flow run")
    one_line_exit_2(code, err, "unknown product line 'nope'")
    one_line_exit_2(code2, err2, "data.batch_size")
    one_line_exit_2(code3, err3, "no")
    assert not (tmp_path / "root").exists()  # no services started, no flow run, nothing written
    code, err = _run(capsys, "retrain-unified", "plant", "--line", "nope", "--config", str(params))
    code2, err2 = _run(capsys, "retrain-unified", "plant", "--config", str(params), "--set", "data.batch_size=-1")
    code3, err3 = _run(capsys, "retrain-unified", "bad/name", "--config", str(params))
    one_line_exit_2(code, err, "unknown product line(s) ['nope']")
    one_line_exit_2(code2, err2, "data.batch_size")
    one_line_exit_2(code3, err3, "unified model name 'bad/name'")
    assert not (tmp_path / "root").exists()


def test_json_dash_is_standard_output(tmp_path, monkeypatch, capsys, record):
    from flows.ops_cli import write_json

    monkeypatch.chdir(tmp_path)
    write_json(Path("-"), {"a": 1})
    record("bad input", "--json - writes to standard output, not a file named '-'")
    assert '"a": 1' in capsys.readouterr().out and not (tmp_path / "-").exists()
