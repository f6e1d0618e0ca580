"""The promotion gate: a challenger takes `@champion` only if it is no worse than the champion on the
same pinned evaluation data (beyond the tolerances in params.yaml), within the latency budget, and its own
operating point (false-reject and escape rates at its threshold) is within promotion.max_false_reject_rate
and promotion.max_escape_rate (`operating_point_checks`).

`decide` is pure (metrics in, decision out). `apply_gate` reads the champion from the registry,
re-evaluates it when it was measured on other data, records the decision on the version and in its run,
then moves the aliases: `@challenger` always, `@champion` only when promoted.

    decision = apply_gate("defectops-cookie", "4", result.metrics(), eval_hash, cfg.promotion, reevaluate)

A metric that is missing or not a number never passes a check.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from components.config import PromotionConfig
from flows import registry, tracking
from infra import faults
from infra.locks import LockTimeout, acquire

logger = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
GATED_METRICS = ("image_auroc", "aupro", "ms_per_image")
OPERATING_METRICS = ("false_reject_rate", "false_reject_rate_upper", "escape_rate", "escape_rate_upper")
Reevaluate = Callable[[dict[str, Any]], Mapping[str, float]]
"""reevaluate(champion_version_info) -> the champion's metrics on the candidate's pinned data."""


@dataclass(frozen=True)
class Decision:
    promote: bool
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"promote": self.promote, "reasons": list(self.reasons)}


def _number(metrics: Mapping[str, Any] | None, key: str) -> float:
    """metrics[key] as a float; nan when missing, None, not a number or not parseable."""
    value = (metrics or {}).get(key)
    if isinstance(value, bool) or value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _at_least(name: str, value: float, required: float, how: str) -> tuple[bool, str]:
    if math.isnan(value) or math.isnan(required):
        which = "candidate" if math.isnan(value) else "reference"
        return False, f"{name}: {which} value is missing or not a number ({how}): fail"
    ok = value >= required
    return ok, f"{name} {value:.4f} {'>=' if ok else '<'} {required:.4f} ({how}): {'pass' if ok else 'fail'}"


def _within_budget(value: float, budget: float) -> tuple[bool, str]:
    if math.isnan(value):
        return False, "ms_per_image: candidate value is missing or not a number: fail"
    ok = value <= budget
    return ok, (f"ms_per_image {value:.2f} {'<=' if ok else '>'} latency budget {budget:.2f}: "
                f"{'pass' if ok else 'fail'}")


def decide(candidate: Mapping[str, Any], champion: Mapping[str, Any] | None, cfg: PromotionConfig) -> Decision:
    """Pure gate. candidate/champion: metric dicts with image_auroc, aupro, ms_per_image (measured on the
    same pinned data). No champion: the absolute floors apply (min_image_auroc, min_aupro) and the latency
    budget. With a champion: image_auroc >= champion - tolerance, aupro >= champion - tolerance, and
    ms_per_image <= budget. Every check is listed in `reasons`, passed or failed."""
    auroc, aupro = _number(candidate, "image_auroc"), _number(candidate, "aupro")
    # A pinned test split with no pixel ground truth at all (n_masked == 0) has no AUPRO to gate on: that
    # check is skipped and says so. Otherwise a missing or NaN AUPRO fails, like any other metric.
    no_masks = _number(candidate, "n_masked") == 0
    if champion is None:
        checks = [(True, "no champion yet: absolute floors apply"),
                  _at_least("image_auroc", auroc, cfg.min_image_auroc, "floor")]
        if not no_masks:
            checks.append(_at_least("aupro", aupro, cfg.min_aupro, "floor"))
    else:
        champ_auroc, champ_aupro = _number(champion, "image_auroc"), _number(champion, "aupro")
        checks = [
            _at_least("image_auroc", auroc, champ_auroc - cfg.image_auroc_tolerance,
                      f"champion {champ_auroc:.4f} - tolerance {cfg.image_auroc_tolerance:g}")]
        if not no_masks:
            checks.append(_at_least("aupro", aupro, champ_aupro - cfg.aupro_tolerance,
                                    f"champion {champ_aupro:.4f} - tolerance {cfg.aupro_tolerance:g}"))
    if no_masks:
        checks.append((True, "aupro: the pinned test data has no defect masks: not gated"))
    checks.append(_within_budget(_number(candidate, "ms_per_image"), cfg.latency_budget_ms))
    checks += operating_point_checks(candidate, cfg)
    return Decision(all(ok for ok, _ in checks), [reason for _, reason in checks])


def operating_point_checks(candidate: Mapping[str, Any], cfg: PromotionConfig) -> list[tuple[bool, str]]:
    """The candidate's operating point on the pinned test data, at its own threshold (issue 15):
    false_reject_rate (good images rejected) <= promotion.max_false_reject_rate and escape_rate (defective
    images passed) <= promotion.max_escape_rate; a bound set to None is not gated (and says so). Each
    reason carries the counts and the 95 % Clopper-Pearson interval; a missing rate fails."""
    checks = []
    for key, bound, counts in (("false_reject_rate", cfg.max_false_reject_rate, ("n_false_rejects", "n_good")),
                               ("escape_rate", cfg.max_escape_rate, ("n_escapes", "n_defective"))):
        setting = f"promotion.max_{key}"
        if bound is None:
            checks.append((True, f"{key}: {setting} is null: not gated"))
            continue
        value = _number(candidate, key)
        if math.isnan(value):
            checks.append((False, f"{key}: candidate value is missing or not a number (the model has no "
                                  f"threshold, or no such test images): fail"))
            continue
        low, high = _number(candidate, f"{key}_lower"), _number(candidate, f"{key}_upper")
        hits, total = _number(candidate, counts[0]), _number(candidate, counts[1])
        detail = f"{int(hits)}/{int(total)} images, " if not (math.isnan(hits) or math.isnan(total)) else ""
        ok = value <= bound
        checks.append((ok, f"{key} {value:.4f} ({detail}95% CI {low:.3f}-{high:.3f}) {'<=' if ok else '>'} "
                           f"{setting} {bound:g}: {'pass' if ok else 'fail'}"))
    return checks


def metrics_from_tags(tags: Mapping[str, str]) -> dict[str, float]:
    """{"metrics.image_auroc": "0.91", ...} -> {"image_auroc": 0.91, ...} (unparseable values -> nan)."""
    return {key[len("metrics."):]: _number(tags, key) for key in tags if key.startswith("metrics.")}


def _champion_metrics(model_name: str, champion: dict[str, Any], eval_data_hash: str,
                      reevaluate: Reevaluate | None) -> tuple[dict[str, float] | None, list[str], bool]:
    """The champion's metrics on `eval_data_hash`: its recorded ones when measured on the same data,
    otherwise `reevaluate(champion)`. Returns (metrics or None if impossible, notes, reevaluated)."""
    recorded_on = champion["tags"].get("eval_data_hash", "")
    label = f"{model_name} version {champion['version']}"
    if recorded_on == eval_data_hash:
        return metrics_from_tags(champion["tags"]), [f"champion is {label}, evaluated on the same pinned "
                                                      f"data {eval_data_hash[:12]}"], False
    note = (f"champion {label} was evaluated on data {recorded_on[:12] or '(unknown)'}, the candidate on "
            f"{eval_data_hash[:12]}")
    if reevaluate is None:
        return None, [note + ": no re-evaluation available, the two cannot be compared: fail"], False
    logger.info("%s: re-evaluating the champion on the pinned data", note)
    measured = dict(reevaluate(champion))
    metrics = {k: _number(measured, k) for k in GATED_METRICS}
    return metrics, [note + ": champion re-evaluated on the candidate's pinned data"], True


def apply_gate(model_name: str, version: str, candidate_metrics: Mapping[str, Any], eval_data_hash: str,
               cfg: PromotionConfig, reevaluate: Reevaluate | None = None) -> Decision:
    """Gate `version` of `model_name` against the current `@champion`, record the decision, move aliases.

    `reevaluate(champion_version_info)` is called only when the champion's `eval_data_hash` tag differs
    from `eval_data_hash`. The decision goes to the version's tags (promotion.decision / .reasons (JSON
    list) / .time / .champion_before), to its run's tags and to the run's `promotion.json`; then
    `@challenger` is set on `version` and `@champion` moves to it only when promoted. An exception (for
    example from `reevaluate`) propagates before any alias has moved. The whole gate runs under the
    model's promotion lock (`gate_lock`), so concurrent retrains of one line are serialised.
    """
    faults.reached("promote")
    with gate_lock(model_name):
        return _gate_locked(model_name, str(version), candidate_metrics, eval_data_hash, cfg, reevaluate)


def gate_lock_path(model_name: str) -> Path:
    """<services root>/locks/<model name>.gate.lock (the root tracking.configure was given)."""
    return tracking.services_root() / "locks" / f"{model_name}.gate.lock"


@contextmanager
def gate_lock(model_name: str, timeout_s: float = 900.0) -> Iterator[str]:
    """The promotion lock of `model_name`: a flock'd file on the services root (infra.locks), so the gates of
    one model run one after the other among the processes sharing that root, and a gate killed mid-way
    (even with SIGKILL) never leaves it held. RegistryError naming the holder after `timeout_s`."""
    try:
        held = acquire(gate_lock_path(model_name), timeout_s)
    except LockTimeout as exc:
        raise tracking.RegistryError(f"{model_name}: promotion gate lock {exc}") from None
    try:
        yield held.holder
    finally:
        held.release()


def _gate_locked(model_name: str, version: str, candidate_metrics: Mapping[str, Any], eval_data_hash: str,
                 cfg: PromotionConfig, reevaluate: Reevaluate | None) -> Decision:
    """apply_gate's body, run while holding the model's promotion lock: the champion it reads is the one it
    replaces, so two concurrent gates decide one after the other (compare-and-set on @champion)."""
    candidate = registry.get_version(model_name, version)
    champion_version = registry.version_for_alias(model_name, CHAMPION)
    champion = champ_metrics = None
    notes: list[str] = []
    reevaluated = False
    if champion_version is not None and champion_version != version:
        champion = registry.get_version(model_name, champion_version)
        champ_metrics, notes, reevaluated = _champion_metrics(model_name, champion, eval_data_hash, reevaluate)
    if champion is not None and champ_metrics is None:
        decision = Decision(False, notes)
    else:
        gated = decide(candidate_metrics, champ_metrics, cfg)
        decision = Decision(gated.promote, notes + gated.reasons)
    now = datetime.now(UTC).isoformat(timespec="seconds")
    record_decision(model_name, candidate, decision, now, {
        "champion_before": champion_version, "champion_metrics": champ_metrics,
        "champion_reevaluated": reevaluated, "eval_data_hash": eval_data_hash,
        "candidate_metrics": {k: _number(candidate_metrics, k) for k in GATED_METRICS + OPERATING_METRICS},
        "config": cfg.model_dump(mode="json")})
    registry.set_alias(model_name, CHALLENGER, version)
    if decision.promote:
        registry.set_alias(model_name, CHAMPION, version)
    logger.info("%s version %s: %s (%s)", model_name, version, "promoted" if decision.promote else "rejected",
                "; ".join(decision.reasons))
    return decision


def record_decision(model_name: str, candidate: dict[str, Any], decision: Decision, when: str,
                    details: dict[str, Any]) -> None:
    """Tags on the version and its run (decision, reasons, time, champion before) and promotion.json with
    `details` (which must hold `champion_before`)."""
    # The decision goes last (tags are written one by one): a process killed half-way leaves no decision
    # without its reasons, and the version stays `promotion.decision=pending` (set at registration).
    tags = {"promotion.reasons": json.dumps(decision.reasons), "promotion.time": when,
            "promotion.champion_before": details["champion_before"] or "none",
            "promotion.decision": "promoted" if decision.promote else "rejected"}
    registry.set_version_tags(model_name, candidate["version"], tags)
    if candidate.get("run_id"):
        tracking.set_run_tags(candidate["run_id"], tags)
        payload = {"model": model_name, "version": candidate["version"], "time": when,
                   **decision.to_dict(), **details}
        tracking.log_dict(candidate["run_id"], _json_safe(payload), "promotion.json")


def _json_safe(value: Any) -> Any:
    """nan -> None, recursively, so promotion.json is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value
