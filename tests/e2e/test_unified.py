"""The unified retrain flow end to end against the real local services: ONE Dinomaly model (tiny random
backbone, CNN-variant encoder, a few iterations) trained on two demo lines is registered once, gated per line
and served for both lines through `lines.<line>.serve_from`, each with its own threshold; its per-step
training losses are in the MLflow run."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
import yaml

from flows import registry, tracking
from flows.cli import main
from flows.demo_data import DemoSpec, build_demo_line
from flows.inference import inference
from flows.lineage import lineage
from flows.retrain import model_name, retrain
from flows.unified import retrain_unified, unified_name
from flows.versioning import read_dvc_file
from infra.services import env_for_clients
from infra.storage import ObjectStore
from tests.e2e._pipeline import TEST_PROMOTION, session

ITERATIONS = 8
# tests/conftest.py TINY_METHOD_PARAMS["dinomaly"], with checkpoints on
DINOMALY = {"encoder": "cnn-variant", "cnn_layers": [1, 2, 3], "cnn_token_level": 1, "decoder_depth": 2,
            "num_groups": 2, "iterations": ITERATIONS, "warmup_steps": 1, "batch_size": 4, "mining_ramp": 0.5,
            "smoothing_sigma": 2.0, "seed": 0, "device": "cpu", "threads": 1, "checkpoint_every": 4}
LINES = {"uni-brick": "brick", "uni-grass": "grass"}


def _params(tmp: Path) -> Path:
    lines = {}
    for line, texture in LINES.items():
        data = build_demo_line(tmp / line, DemoSpec(texture=texture, n_train=6, n_test_good=3, n_per_defect=1,
                                                    size=96, seed=1))
        lines[line] = {"data": str(data), "serve_from": unified_name("plant")}
    # a line that points at the unified model but is not trained into it
    lines["uni-other"] = {"data": str(tmp / "uni-brick"), "serve_from": unified_name("plant")}
    raw = {"data": {"image_size": [64, 64], "batch_size": 4, "calibration_fraction": 0.34},
           "backbone": {"name": "test_resnet", "layers": [1, 2], "weights": "random"},
           "detector": {"method": "patchcore", "dinomaly": DINOMALY},
           # floors at 0: a random tiny backbone after 8 steps is not judged on accuracy here, only wiring
           "promotion": {**TEST_PROMOTION, "min_image_auroc": 0.0},
           "evaluation": {"worst_misses": 2},
           "services": {"root": str(tmp / "root")}, "lines": lines}
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.mark.slow  # 150 s / 50 s: the default suite stays near 14 min on 2 cores (make test-all runs it)
def test_retrain_unified_serves_every_line(services, tmp_path, capsys):
    params = _params(tmp_path)
    name = unified_name("plant")
    with session(params, env_for_clients(services)):
        result = retrain_unified("plant", sorted(LINES), str(params))
        assert (result["version"], result["promoted"], result["champion"]) == ("1", True, "1"), result["reasons"]
        assert result["lines"] == sorted(LINES) and [v["version"] for v in registry.list_versions(name)] == ["1"]
        assert result["encoder_kind"] == "cnn-variant" and result["paper_encoder"] is False
        for line in LINES:
            assert result["reasons_by_line"][line] and any("image_auroc" in r for r in result["reasons_by_line"][line])

        tags = registry.get_version(name, "1")["tags"]
        assert json.loads(tags["lines"]) == sorted(LINES) and tags["paper_encoder"] == "false"
        assert tags["promotion.decision"] == "promoted" and tags["method"] == "dinomaly"
        assert not [k for k in registry.REQUIRED_VERSION_TAGS if k not in tags]
        for line in LINES:
            md5 = read_dvc_file(tmp_path / "root" / "data-registry" / "lines" / f"{line}.dvc")["md5"]
            assert tags[f"data.{line}.dvc_data_hash"] == md5 == result["data"][line]["dvc_md5"]
            assert float(tags[f"metrics.{line}.image_auroc"]) == result["line_metrics"][line]["image_auroc"]
        means = [result["line_metrics"][line]["image_auroc"] for line in LINES]
        assert float(tags["metrics.image_auroc"]) == pytest.approx(sum(means) / len(means))

        run = tracking.get_run(result["run_id"])
        assert run["status"] == "FINISHED" and all(f"{line}.image_auroc" in run["metrics"] for line in LINES)
        history = mlflow.MlflowClient(services.mlflow_uri).get_metric_history(result["run_id"], "train.loss")
        assert sorted(m.step for m in history) == list(range(1, ITERATIONS + 1))
        assert run["metrics"]["train.steps_logged"] == ITERATIONS

        store = ObjectStore(services.s3_endpoint, services.bucket, services.access_key, services.secret_key)
        detector, _ = registry.load_version(name, "@champion", tmp_path / "champion")
        for line in LINES:
            served = inference(line, [str(tmp_path / line / "test")], str(params))
            assert (served["model_name"], served["version"]) == (name, "1")
            n = len(list((tmp_path / line / "test").rglob("*.png")))
            assert served["counts"]["n_images"] == n
            results = store.get_dir(served["results_uri"], tmp_path / f"results-{line}", served["results_sha256"])
            threshold = json.loads((results / "predictions.json").read_text())["threshold"]
            assert threshold == detector.line_thresholds_[line].to_dict()
            for row in served["predictions"]:
                expected = "defective" if row["score"] > threshold["image"] else "good"
                assert row["decision"] == expected

        with pytest.raises(Exception, match="not trained on line 'uni-other'"):
            inference("uni-other", [str(tmp_path / "uni-brick" / "test")], str(params))

        info = lineage(name, "@champion", store)
        assert info["bank"]["verified"] is True and not info["missing_tags"]

        # the CLI, second time on the same data: gated per line against version 1's recorded metrics
        capsys.readouterr()
        assert main(["retrain-unified", "plant", "--line", "uni-brick", "--line", "uni-grass",
                     "--config", str(params)]) == 0
        printed = " ".join(capsys.readouterr().out.split())
        assert f"{name} version 2" in printed and "mean" in printed
        tags = registry.get_version(name, "2")["tags"]
        reasons = json.loads(tags["promotion.reasons"])
        assert tags["promotion.champion_before"] == "1"
        assert sorted(r.split(":")[0] for r in reasons if "evaluated on the same pinned data" in r) == sorted(LINES)
        # same data, config and seed: the same network, so the same AUROC/AUPRO per line: promoted
        assert tags["promotion.decision"] == "promoted", reasons
        assert registry.version_for_alias(name, "champion") == "2"


@pytest.mark.slow  # 150 s / 50 s: the default suite stays near 14 min on 2 cores (make test-all runs it)
def test_retrain_logs_dinomaly_train_steps(services, tmp_path):
    """The per-line retrain flow forwards log_step to Dinomaly: train.* per step in the run; the checkpoint
    folder under services.root/checkpoints is used and removed once the model is saved."""
    params = _params(tmp_path)
    with session(params, env_for_clients(services)):
        result = retrain("uni-brick", str(params), ["detector.method=dinomaly"])
    assert result["version"] == "1"
    client = mlflow.MlflowClient(services.mlflow_uri)
    for key in ("train.loss", "train.lr", "train.loss_group0"):
        assert sorted(m.step for m in client.get_metric_history(result["run_id"], key)) == \
            list(range(1, ITERATIONS + 1)), key
    folder = tmp_path / "root" / "checkpoints" / model_name("uni-brick")
    assert folder.is_dir() and not any(folder.iterdir())
