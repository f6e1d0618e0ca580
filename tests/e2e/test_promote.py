"""flows.promote.apply_gate against a real MLflow registry: first version promoted on the floors, a worse
one leaves @champion alone (reasons recorded), a better one takes it, a champion measured on other data is
re-evaluated, and a failing re-evaluation moves no alias. Metrics are chosen by the test (the gate's inputs);
the registered versions are real pyfunc models on a real bank."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime

import mlflow
import pytest

from components.config import PromotionConfig
from flows import registry, tracking
from flows.promote import apply_gate
from tests.e2e.tiny_line import unique_name, upload, version_tags

pytestmark = [pytest.mark.services, pytest.mark.slow]

CFG = PromotionConfig(image_auroc_tolerance=0.01, aupro_tolerance=0.02, latency_budget_ms=1000.0,
                      min_image_auroc=0.6, min_aupro=0.1, max_false_reject_rate=None,
                      max_escape_rate=None)  # operating point: unit tests
PINNED = "a" * 64


@pytest.fixture(scope="module")
def bank(env, tiny):
    return upload(env[1], tiny.model_dir)


@pytest.fixture
def register(env, tiny, bank):
    """register(name, metrics, eval_hash) -> (version, run_id): a finished run with one new version."""
    state, _ = env

    def make(name: str, metrics: dict, eval_hash: str = PINNED) -> tuple[str, str]:
        run_id = tracking.start_run("tiny", "gate")
        tracking.log_metrics(run_id, metrics)
        version = registry.register_version(run_id, name, bank, state.s3_endpoint,
                                            version_tags(tiny, metrics, eval_hash))
        return version, run_id

    return make


def _aliases(name: str) -> dict[str, str | None]:
    return {a: registry.version_for_alias(name, a) for a in ("champion", "challenger")}


def _recorded(name: str, version: str, run_id: str) -> tuple[dict, dict, dict]:
    tags = registry.get_version(name, version)["tags"]
    run_tags = tracking.get_run(run_id)["tags"]
    promotion = mlflow.artifacts.load_dict(f"runs:/{run_id}/promotion.json")
    return tags, run_tags, promotion


def test_gate_sequence_moves_champion_only_when_no_worse(register):
    name = unique_name()
    good = {"image_auroc": 0.80, "aupro": 0.50, "ms_per_image": 20.0}

    v1, run1 = register(name, good)
    decision = apply_gate(name, v1, good, PINNED, CFG)
    assert decision.promote is True and any("no champion" in r for r in decision.reasons)
    assert _aliases(name) == {"champion": v1, "challenger": v1}
    tags, run_tags, promotion = _recorded(name, v1, run1)
    assert tags["promotion.decision"] == run_tags["promotion.decision"] == "promoted"
    assert json.loads(tags["promotion.reasons"]) == decision.reasons
    assert datetime.fromisoformat(tags["promotion.time"]).tzinfo == UTC
    assert tags["promotion.champion_before"] == "none"
    assert promotion["promote"] is True and promotion["champion_before"] is None

    worse = {"image_auroc": 0.78, "aupro": 0.50, "ms_per_image": 20.0}  # 0.78 < 0.80 - 0.01
    v2, run2 = register(name, worse)
    decision = apply_gate(name, v2, worse, PINNED, CFG)
    assert decision.promote is False
    assert _aliases(name) == {"champion": v1, "challenger": v2}
    tags, run_tags, promotion = _recorded(name, v2, run2)
    assert tags["promotion.decision"] == run_tags["promotion.decision"] == "rejected"
    failed = [r for r in json.loads(tags["promotion.reasons"]) if r.endswith("fail")]
    assert len(failed) == 1 and failed[0].startswith("image_auroc 0.7800 < 0.7900")
    assert tags["promotion.champion_before"] == v1
    assert promotion["champion_metrics"]["image_auroc"] == pytest.approx(0.80)
    assert promotion["champion_reevaluated"] is False

    better = {"image_auroc": 0.85, "aupro": 0.49, "ms_per_image": 25.0}  # aupro within tolerance
    v3, _ = register(name, better)
    assert apply_gate(name, v3, better, PINNED, CFG).promote is True
    assert _aliases(name) == {"champion": v3, "challenger": v3}

    slow = {"image_auroc": 0.95, "aupro": 0.60, "ms_per_image": 1500.0}
    v4, _ = register(name, slow)
    decision = apply_gate(name, v4, slow, PINNED, CFG)
    assert decision.promote is False and any(r.startswith("ms_per_image") and r.endswith("fail")
                                             for r in decision.reasons)
    assert _aliases(name) == {"champion": v3, "challenger": v4}


def test_champion_on_other_data_is_reevaluated(register):
    name = unique_name()
    first = {"image_auroc": 0.90, "aupro": 0.70, "ms_per_image": 10.0}
    v1, _ = register(name, first, eval_hash="0" * 64)
    assert apply_gate(name, v1, first, "0" * 64, CFG, reevaluate=None).promote is True

    calls = []

    def reevaluate(champion: dict) -> dict:
        calls.append(champion["version"])
        return {"image_auroc": 0.70, "aupro": 0.40, "ms_per_image": 12.0}  # the champion on the new data

    candidate = {"image_auroc": 0.75, "aupro": 0.45, "ms_per_image": 11.0}  # worse than 0.90 recorded
    v2, run2 = register(name, candidate)
    decision = apply_gate(name, v2, candidate, PINNED, CFG, reevaluate=reevaluate)
    assert calls == [v1]
    assert decision.promote is True, decision.reasons
    assert any("re-evaluated" in r for r in decision.reasons)
    assert _aliases(name)["champion"] == v2
    promotion = mlflow.artifacts.load_dict(f"runs:/{run2}/promotion.json")
    assert promotion["champion_reevaluated"] is True
    assert promotion["champion_metrics"]["image_auroc"] == pytest.approx(0.70)

    # Same pinned data: the recorded metrics are used, nothing is re-evaluated.
    v3, _ = register(name, candidate)
    apply_gate(name, v3, candidate, PINNED, CFG, reevaluate=reevaluate)
    assert calls == [v1]

    # Different data and no way to re-evaluate: not comparable, not promoted.
    v4, _ = register(name, candidate, eval_hash="f" * 64)
    decision = apply_gate(name, v4, candidate, "f" * 64, CFG, reevaluate=None)
    assert decision.promote is False and "cannot be compared" in decision.reasons[0]
    assert _aliases(name) == {"champion": v3, "challenger": v4}


def test_failed_reevaluation_moves_no_alias_and_records_nothing(register):
    name = unique_name()
    metrics = {"image_auroc": 0.9, "aupro": 0.7, "ms_per_image": 10.0}
    v1, _ = register(name, metrics, eval_hash="0" * 64)
    apply_gate(name, v1, metrics, "0" * 64, CFG)
    v2, run2 = register(name, metrics)

    def broken(champion: dict) -> dict:
        raise RuntimeError("object store down")

    with pytest.raises(RuntimeError, match="object store down"):
        apply_gate(name, v2, metrics, PINNED, CFG, reevaluate=broken)
    assert _aliases(name) == {"champion": v1, "challenger": v1}
    assert "promotion.decision" not in registry.get_version(name, v2)["tags"]
    assert "promotion.decision" not in tracking.get_run(run2)["tags"]


def test_nan_metric_is_never_promoted(register):
    name = unique_name()
    metrics = {"image_auroc": 0.9, "aupro": math.nan, "ms_per_image": 10.0}  # e.g. a line without masks
    v1, _ = register(name, metrics)
    decision = apply_gate(name, v1, metrics, PINNED, CFG)
    assert decision.promote is False
    assert _aliases(name) == {"champion": None, "challenger": v1}
    assert json.loads(registry.get_version(name, v1)["tags"]["promotion.reasons"]) == decision.reasons
