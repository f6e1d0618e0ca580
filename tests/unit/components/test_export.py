"""Export of PatchCore's scoring path (components/patchcore/export.py, components/export.py) and the
`defectops export` command: the torch graph, ONNX (onnxruntime) and OpenVINO IR against the native
detector, the parity report and its refusals, tampered exports, methods that do not export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from components.config import Config, ConfigError, validate
from components.detector import ArtifactError, ScoreBatch, create_detector
from components.export import (
    ExportedModel,
    NotExportableError,
    ParityTolerance,
    export_model,
    openvino_missing,
    parity,
    parity_reference,
)
from components.patchcore import PatchCore
from components.patchcore.export import exact_reference, scoring_graph, support_table
from components.thresholds import calibrate
from flows.cli import main
from tests.conftest import TINY_PARAMS, texture, to_tensor, with_square

OPENVINO = pytest.mark.skipif(openvino_missing() is not None, reason=f"{openvino_missing()}")


def _cfg(**patchcore) -> Config:
    raw = json.loads(json.dumps(TINY_PARAMS))
    raw["detector"]["patchcore"].update(patchcore)
    return validate(raw)


def _test_images() -> torch.Tensor:
    """(5, 3, 64, 64): three good textures, two with a bright square."""
    return to_tensor([texture(100 + s) for s in range(3)] + [with_square(texture(200 + s))[0] for s in range(2)])


@pytest.fixture(scope="module")
def fitted() -> PatchCore:
    """Tiny PatchCore (test_resnet, 64 px, bank 512 x 32) with an HNSW index and a threshold."""
    det = PatchCore(_cfg(index="hnsw")).fit(to_tensor([texture(s) for s in range(8)]))
    good = det.score(to_tensor([texture(50 + s) for s in range(4)]))
    det.threshold_ = calibrate(good.image_scores, good.anomaly_maps, 0.25)
    return det


@pytest.fixture(scope="module")
def exported(fitted, tmp_path_factory) -> Path:
    formats = ("onnx", "openvino") if openvino_missing() is None else ("onnx",)
    return export_model(fitted, tmp_path_factory.mktemp("export") / "out", formats, block=100)


def _close(got, ref, rtol: float = 1e-5) -> None:
    np.testing.assert_allclose(got.image_scores, ref.image_scores, rtol=rtol, atol=0)
    peak = np.abs(ref.anomaly_maps).max()
    np.testing.assert_allclose(got.anomaly_maps, ref.anomaly_maps, rtol=0, atol=rtol * peak)


@pytest.mark.parametrize("image_score", ["reweighted", "max"])
def test_graph_equals_native_exact_search(image_score: str) -> None:
    """Blocks of 100 over a bank of 512 (a partial last block): the torch graph scores like the native
    detector with a flat index, maps at the input size."""
    det = PatchCore(_cfg(index="flat", image_score=image_score)).fit(to_tensor([texture(s) for s in range(8)]))
    images = _test_images()
    with torch.no_grad():
        scores, maps = scoring_graph(det, block=100)(images)
    assert scores.shape == (5,) and maps.shape == (5, 64, 64)
    _close(ScoreBatch(scores.numpy(), maps.numpy()), det.score(images))


def test_support_table_is_the_native_neighbour_search(fitted) -> None:
    """Each bank entry's own index first, k columns, the same as the native flat search of that entry."""
    table = support_table(fitted.memory_bank_, 3)
    assert table.shape == (len(fitted.memory_bank_), 3)
    assert (table[:, 0] == np.arange(len(table))).all()


def test_onnx_export_scores_like_native_at_any_batch(fitted, exported) -> None:
    onnx = ExportedModel.load(exported, "onnx", threads=1)
    ref = exact_reference(fitted)
    images = _test_images()
    _close(onnx.score(images), ref.score(images))
    _close(onnx.score(images[:1]), ref.score(images[:1]))  # dynamic batch
    assert onnx.threshold_ == fitted.threshold_
    meta = json.loads((exported / "export.json").read_text())
    assert meta["input"]["shape"] == ["batch", 3, 64, 64] and meta["bank_size"] == len(fitted.memory_bank_)
    with pytest.raises(ValueError, match=r"takes images \(B, 3, 64, 64\)"):
        onnx.score(torch.zeros(1, 3, 32, 32))


@OPENVINO
def test_openvino_export_scores_like_native(fitted, exported) -> None:
    ov = ExportedModel.load(exported, "openvino", threads=1)
    images = _test_images()
    _close(ov.score(images), exact_reference(fitted).score(images))


def test_parity_report_passes_against_exact_and_records_the_native_index(fitted, exported) -> None:
    models = {fmt: ExportedModel.load(exported, fmt, 1) for fmt in ExportedModel.formats_in(exported)}
    batches = [_test_images()[:3], _test_images()[3:]]
    report = parity(exact_reference(fitted), models, batches, fitted.threshold_, ParityTolerance(), fitted)
    assert report.passed, report.reasons
    for fmt in models:
        assert report.formats[fmt]["n_images"] == 5 and report.formats[fmt]["score_max_rel_diff"] < 1e-5
        assert report.versus_native_default[fmt]["n_images"] == 5


def test_parity_refuses_and_says_why(fitted, exported) -> None:
    """Against another model (a bank of a tenth the size) the export is far off: refused, each check named."""
    other = PatchCore(_cfg(index="flat", coreset_ratio=0.025)).fit(to_tensor([texture(s) for s in range(8)]))
    onnx = {"onnx": ExportedModel.load(exported, "onnx", 1)}
    report = parity(other, onnx, [_test_images()], fitted.threshold_, ParityTolerance(score_rtol=1e-4))
    assert not report.passed
    assert any(r.startswith("onnx: image scores differ by up to") for r in report.reasons), report.reasons
    assert any(r.startswith("onnx: anomaly maps differ by up to") for r in report.reasons), report.reasons


def test_tampered_export_is_refused(fitted, tmp_path) -> None:
    out = export_model(fitted, tmp_path / "e", ("onnx",))
    data = bytearray((out / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (out / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"model\.onnx: sha256 mismatch"):
        ExportedModel.load(out, "onnx")
    with pytest.raises(ArtifactError, match="no 'openvino' export here"):
        ExportedModel.load(export_model(fitted, tmp_path / "f", ("onnx",)), "openvino")


def test_students_export_runs_image_by_image(tiny_config_for, tmp_path) -> None:
    """Students is traced at batch 1 (its native scoring loops over images); the export loops likewise."""
    det = create_detector(tiny_config_for("students")).fit(to_tensor([texture(s) for s in range(4)]))
    out = export_model(det, tmp_path / "students", ("onnx",))
    onnx = ExportedModel.load(out, "onnx", threads=1)
    assert onnx.fixed_batch == 1
    images = _test_images()
    _close(onnx.score(images), det.score(images))
    assert parity(parity_reference(det), {"onnx": onnx}, [images], None).formats["onnx"]["n_images"] == 5


def test_what_does_not_export(tiny_config_for, tmp_path) -> None:
    with pytest.raises(NotExportableError, match="transformaly: no export"):
        export_model(create_detector(tiny_config_for("transformaly")), tmp_path / "s")
    tiled = PatchCore(_cfg(tile_size=[32, 32], tile_overlap=0)).fit(to_tensor([texture(s) for s in range(4)]))
    with pytest.raises(NotExportableError, match="larger than tile_size"):
        export_model(tiled, tmp_path / "t")
    with pytest.raises(ValueError, match="unknown export format"):
        export_model(tiled, tmp_path / "u", ("tflite",))
    assert not (tmp_path / "t").exists() and not (tmp_path / "u").exists()
    with pytest.raises(ConfigError, match="export.formats"):
        validate({**TINY_PARAMS, "export": {"formats": ["tflite"]}})


def test_export_command_with_parity(tmp_path, tiny_config: Config, make_line, capsys) -> None:
    line = make_line(tmp_path / "line")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_config.model_dump(mode="json", exclude={"services", "lines"})))
    model, out = tmp_path / "model", tmp_path / "export"
    assert main(["fit", "--data", str(line), "--out", str(model), "--config", str(params), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["export", "--model", str(model), "--out", str(out), "--data", str(line), "--format", "onnx"]) == 0
    text = capsys.readouterr().out
    assert "parity: PASSED" in text and "onnx" in text
    assert ExportedModel.formats_in(out) == ["onnx"]
    assert main(["export", "--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
    assert "nowhere" in capsys.readouterr().err
