"""The inference service and operator page (`defectops api`): app.py (HTTP API), models.py (which version
serves each line, hot swaps), batching.py (micro-batches), scoring.py (bytes to decisions), decisions.py
(SQLite record, feedback, export of reviewed false alarms), metrics.py (Prometheus), page.py + static/ (the
operator page), cli.py (commands). docs/serving.md describes the endpoints."""
