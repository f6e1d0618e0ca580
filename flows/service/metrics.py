"""Prometheus metrics of the inference service (prometheus-client), in a registry of its own per app:

- defectops_request_seconds{endpoint, status}: request latency histogram;
- defectops_decisions_total{line, alias, decision}: decisions made;
- defectops_normalised_score{line, alias}: histogram of normalised scores (the threshold is 0.5);
- defectops_batch_size: images per forward pass (micro-batching at work);
- defectops_rejected_total{reason}: requests refused (bad image, too large, unsupported type...);
- defectops_model_info{line, alias, version}: 1 for the version served now;
- defectops_model_swaps_total{line, alias}: hot swaps after an alias moved.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from flows.service.models import Served

__all__ = ["CONTENT_TYPE_LATEST", "ServiceMetrics"]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_SCORE_BUCKETS = tuple(i / 20 for i in range(1, 21))
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.latency = Histogram("defectops_request_seconds", "Request latency", ("endpoint", "status"),
                                 buckets=_LATENCY_BUCKETS, registry=r)
        self.decisions = Counter("defectops_decisions", "Decisions made", ("line", "alias", "decision"), registry=r)
        self.scores = Histogram("defectops_normalised_score", "Normalised image scores (threshold = 0.5)",
                                ("line", "alias"), buckets=_SCORE_BUCKETS, registry=r)
        self.batch = Histogram("defectops_batch_size", "Images per forward pass", buckets=_BATCH_BUCKETS, registry=r)
        self.rejected = Counter("defectops_rejected", "Requests refused", ("reason",), registry=r)
        self.model = Gauge("defectops_model_info", "Model version served (1)", ("line", "alias", "version"), registry=r)
        self.swaps = Counter("defectops_model_swaps", "Hot swaps after an alias moved", ("line", "alias"), registry=r)

    def swapped(self, old: Served | None, new: Served) -> None:
        if old is not None:
            try:
                self.model.remove(old.line, old.alias, old.version)
            except KeyError:
                pass
            self.swaps.labels(new.line, new.alias).inc()
        self.model.labels(new.line, new.alias, new.version).set(1)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
