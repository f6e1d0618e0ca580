"""`defectops fit / evaluate / predict` run in-process on the tiny line: outputs, exit codes, user errors."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from components.config import Config
from components.detector import load_detector
from flows.cli import main


@pytest.fixture
def params_file(tmp_path: Path, tiny_config: Config) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(tiny_config.model_dump(mode="json", exclude={"services", "lines"})))
    return path


@pytest.fixture(scope="module")
def fitted_line(tmp_path_factory: pytest.TempPathFactory, tiny_config: Config, make_line) -> tuple[Path, Path, Path]:
    """(line, params file, model dir) after one `defectops fit`, shared by the tests that only read them."""
    root = tmp_path_factory.mktemp("cli")
    line = make_line(root / "line")
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_config.model_dump(mode="json", exclude={"services", "lines"})))
    model = root / "model"
    assert main(["fit", "--data", str(line), "--out", str(model), "--config", str(params), "--quiet"]) == 0
    return line, params, model


def error_lines(capsys: pytest.CaptureFixture) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.strip()]


def listing(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


# ------------------------------------------------------------------------------------------ happy path
def test_fit_writes_a_model_with_manifest_and_threshold(fitted_line) -> None:
    line, _params, model = fitted_line
    assert (model / "manifest.json").is_file()
    manifest = json.loads((model / "manifest.json").read_text())
    assert manifest["method"] == "patchcore"
    assert {"bank.safetensors", "backbone.safetensors", "metadata.json", "threshold.json"} <= set(manifest["files"])
    det = load_detector(model)
    assert det.threshold_ is not None and det.threshold_.n_calibration == 8  # crossfit: all 8 train images
    assert det.cfg.backbone.name == "test_resnet"
    assert sorted(p.name for p in model.parent.iterdir() if p.name.startswith(".")) == []


def test_fit_with_overrides_and_max_train(tmp_path: Path, tiny_line: Path, params_file: Path, capsys) -> None:
    model = tmp_path / "m2"
    code = main(["fit", "--data", str(tiny_line), "--out", str(model), "--config", str(params_file), "--quiet",
                 "--set", "detector.patchcore.coreset_ratio=0.5", "--set", "data.calibration_fraction=0",
                 "--set", "threshold.calibration=holdout", "--max-train", "4"])
    assert code == 0
    det = load_detector(model)
    assert det.cfg.detector.patchcore.coreset_ratio == 0.5
    assert det.memory_bank_.shape[0] == 4 * 16 * 16 // 2
    assert det.threshold_ is None
    out = capsys.readouterr().out
    assert "fitted patchcore" in out and "saved to" in out and "…" not in out


def test_evaluate_writes_metrics(fitted_line, tmp_path: Path, capsys) -> None:
    line, _params, model = fitted_line
    json_out = tmp_path / "reports" / "evaluation.json"
    assert main(["evaluate", "--model", str(model), "--data", str(line), "--json", str(json_out), "--quiet"]) == 0
    payload = json.loads(json_out.read_text())
    assert payload["model"] == str(model)
    overall = payload["overall"]
    # 3 good textures vs 3 bright squares: perfectly separable with the tiny random backbone
    assert overall["image_auroc"] == 1.0
    assert overall["pixel_auroc"] > 0.95
    assert payload["ms_per_image"] > 0
    assert "square" in payload["per_defect"]
    printed = capsys.readouterr().out
    assert "auroc" in printed and "1.000" in printed
    assert "…" not in printed  # at 80 columns headers fold rather than all reading "image…"
    assert listing(tmp_path) == ["reports", "reports/evaluation.json"]


def test_predict_writes_csv_json_and_overlays(fitted_line, tmp_path: Path) -> None:
    line, _params, model = fitted_line
    out = tmp_path / "pred"
    good = line / "test" / "good"
    bad = line / "test" / "square" / "000.png"
    assert main(["predict", "--model", str(model), str(good), str(bad), "--out", str(out), "--quiet"]) == 0
    with open(out / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [Path(r["image"]).name for r in rows] == ["000.png", "001.png", "002.png", "000.png"]
    assert [r["overlay"] for r in rows] == ["000_overlay.png", "001_overlay.png", "002_overlay.png",
                                            "000-1_overlay.png"]
    scores = [float(r["score"]) for r in rows]
    assert scores[3] > max(scores[:3])
    assert rows[3]["decision"] == "defective"
    for row in rows:
        overlay = np.asarray(Image.open(out / row["overlay"]))
        assert overlay.shape == (64, 64, 3) and overlay.dtype == np.uint8
    meta = json.loads((out / "predictions.json").read_text())
    assert meta["threshold"]["image"] > 0 and len(meta["predictions"]) == 4
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # staging folder gone


# ------------------------------------------------------------------------------------------ user errors
def assert_user_error(capsys, *needles: str) -> str:
    lines = error_lines(capsys)
    assert lines, "no error message"
    assert lines[0].startswith("error:"), lines
    text = "\n".join(lines)
    for needle in needles:
        assert needle in text, (needle, text)
    return text


def test_missing_data_dir(tmp_path: Path, params_file: Path, capsys) -> None:
    missing = tmp_path / "no_such_line"
    model = tmp_path / "model"
    code = main(["fit", "--data", str(missing), "--out", str(model), "--config", str(params_file), "--quiet"])
    assert code == 2
    text = assert_user_error(capsys, str(missing), "not found")
    assert len(text.splitlines()) == 1
    assert not model.exists()
    assert listing(tmp_path) == ["params.yaml"]


def test_corrupt_train_image(tmp_path: Path, tiny_line: Path, params_file: Path, capsys) -> None:
    bad = tiny_line / "train" / "good" / "004.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    model = tmp_path / "model"
    code = main(["fit", "--data", str(tiny_line), "--out", str(model), "--config", str(params_file), "--quiet"])
    assert code == 2
    text = assert_user_error(capsys, str(bad))
    assert len(text.splitlines()) == 1
    assert not model.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_bad_set_key(tmp_path: Path, tiny_line: Path, params_file: Path, capsys) -> None:
    model = tmp_path / "model"
    code = main(["fit", "--data", str(tiny_line), "--out", str(model), "--config", str(params_file), "--quiet",
                 "--set", "detector.patchcore.coreset_rate=0.2"])
    assert code == 2
    text = assert_user_error(capsys, str(params_file), "detector.patchcore.coreset_rate")
    assert len(text.splitlines()) == 2  # the file, then one line per invalid key
    assert not model.exists()


def test_unknown_backbone_is_a_user_error(tmp_path: Path, tiny_line: Path, params_file: Path, capsys) -> None:
    model = tmp_path / "model"
    code = main(["fit", "--data", str(tiny_line), "--out", str(model), "--config", str(params_file), "--quiet",
                 "--set", "backbone.name=resnet_typo"])
    assert code == 2
    assert_user_error(capsys, "resnet_typo")
    assert not model.exists()


def test_fit_refuses_to_overwrite_a_user_folder(tmp_path: Path, tiny_line: Path, params_file: Path,
                                                 capsys) -> None:
    target = tmp_path / "documents"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    code = main(["fit", "--data", str(tiny_line), "--out", str(target), "--config", str(params_file), "--quiet"])
    assert code == 2
    assert_user_error(capsys, str(target), "refusing")
    assert listing(target) == ["notes.txt"]


@pytest.mark.parametrize("command", ["evaluate", "predict"])
def test_model_dir_missing(command: str, tmp_path: Path, tiny_line: Path, capsys) -> None:
    model = tmp_path / "no_model"
    out = tmp_path / "out"
    args = {"evaluate": ["evaluate", "--model", str(model), "--data", str(tiny_line),
                         "--json", str(tmp_path / "e.json")],
            "predict": ["predict", "--model", str(model), str(tiny_line / "test"), "--out", str(out)]}[command]
    assert main([*args, "--quiet"]) == 2
    text = assert_user_error(capsys, str(model / "manifest.json"), "not a saved defectops model")
    assert len(text.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["line"]


def test_evaluate_missing_data_dir(fitted_line, tmp_path: Path, capsys) -> None:
    _line, _params, model = fitted_line
    json_out = tmp_path / "e.json"
    missing = tmp_path / "nope"
    assert main(["evaluate", "--model", str(model), "--data", str(missing), "--json", str(json_out),
                 "--quiet"]) == 2
    assert_user_error(capsys, str(missing))
    assert not json_out.exists()


def test_predict_corrupt_image_leaves_nothing(fitted_line, tmp_path: Path, capsys) -> None:
    line, _params, model = fitted_line
    images = tmp_path / "images"
    shutil.copytree(line / "test" / "good", images)
    (images / "zz_broken.png").write_bytes(b"not an image at all")
    out = tmp_path / "pred"
    assert main(["predict", "--model", str(model), str(images), "--out", str(out), "--quiet"]) == 2
    assert_user_error(capsys, str(images / "zz_broken.png"))
    assert not out.exists()
    # an existing output folder keeps exactly what it had
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(["predict", "--model", str(model), str(images), "--out", str(out), "--quiet"]) == 2
    capsys.readouterr()
    assert listing(out) == ["keep.txt"]


def test_predict_missing_input(fitted_line, tmp_path: Path, capsys) -> None:
    _line, _params, model = fitted_line
    out = tmp_path / "pred"
    missing = tmp_path / "missing.png"
    assert main(["predict", "--model", str(model), str(missing), "--out", str(out), "--quiet"]) == 2
    assert_user_error(capsys, str(missing), "no such file")
    assert not out.exists()


def test_usage_errors_exit_2_without_traceback(capsys) -> None:
    """typer >= 0.29 raises its vendored click exceptions: they must still be usage errors, not tracebacks."""
    assert main(["fit"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Missing option '--data'" in err
    assert main(["no-such-command"]) == 2
    assert "No such command" in capsys.readouterr().err
    assert main(["fit", "--data", "x", "--out", "y", "--max-train", "many"]) == 2
    assert "--max-train" in capsys.readouterr().err
    assert main(["--help"]) == 0
    assert "fit" in capsys.readouterr().out


def test_main_registers_pipeline_commands_once() -> None:
    from flows import cli

    main(["--help"])
    before = len(cli.app.registered_commands)
    main(["--help"])
    assert len(cli.app.registered_commands) == before
