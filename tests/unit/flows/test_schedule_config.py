"""Per-line cron timezone and scheduled inference: validated in params.yaml, turned into deployments
(nothing is sent to a server here; tests/e2e/test_schedules.py serves them)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from components.config import ConfigError, load_config
from flows.schedules import deployment_name, deployments, inference_deployment_name


def _params(tmp_path: Path, **line) -> Path:
    path = tmp_path / "conf" / "params.yaml"
    path.parent.mkdir(parents=True)
    path.write_text(yaml.safe_dump({"lines": {"cookie": {"data": "data/cookie", **line}}}))
    return path


def test_timezone_and_inference_are_read_and_paths_resolved(tmp_path):
    cfg = load_config(_params(tmp_path, timezone="America/New_York",
                              inference={"cron": "*/15 * * * *", "images": ["incoming", "/abs/x.png"]}))
    line = cfg.lines["cookie"]
    assert line.timezone == "America/New_York" and line.inference.cron == "*/15 * * * *"
    assert line.inference.images == [tmp_path / "conf" / "incoming", Path("/abs/x.png")]
    assert load_config(_params(tmp_path / "b")).lines["cookie"].timezone == "UTC"
    assert load_config(_params(tmp_path / "c")).lines["cookie"].inference is None


@pytest.mark.parametrize(("line", "match"), [
    ({"timezone": "Mars/Olympus"}, r"lines\.cookie\.timezone: .*unknown timezone 'Mars/Olympus'"),
    ({"inference": {"cron": "0 * * * *", "images": []}}, r"lines\.cookie\.inference\.images"),
    ({"inference": {"images": ["x"]}}, r"lines\.cookie\.inference\.cron"),
])
def test_bad_schedule_settings_name_the_key(tmp_path, line, match):
    with pytest.raises(ConfigError, match=match):
        load_config(_params(tmp_path, **line))


def test_deployments_carry_the_lines_timezone_and_the_inference_schedule(tmp_path):
    params = _params(tmp_path, cron="0 3 * * *", timezone="Europe/Berlin",
                     inference={"cron": "30 6 * * 1-5", "images": ["incoming"]})
    retrain, inference, monitor = deployments(params)
    assert monitor.name == "monitor-cookie" and monitor.entrypoint == "flows.monitor.monitor"
    assert [(s.schedule.cron, s.schedule.timezone) for s in monitor.schedules] == [("*/15 * * * *", "Europe/Berlin")]
    assert retrain.name == deployment_name("cookie") and inference.name == inference_deployment_name("cookie")
    assert [(s.schedule.cron, s.schedule.timezone) for s in retrain.schedules] == [("0 3 * * *", "Europe/Berlin")]
    assert [(s.schedule.cron, s.schedule.timezone) for s in inference.schedules] == [("30 6 * * 1-5", "Europe/Berlin")]
    assert inference.entrypoint == "flows.inference.inference"
    assert inference.parameters == {"product_line": "cookie", "images": [str(tmp_path / "conf" / "incoming")],
                                    "params_path": str(params.resolve())}
    with pytest.raises(ConfigError, match=r"lines\.cookie\.inference\.cron = '61 \* \* \* \*'"):
        deployments(_params(tmp_path / "bad", inference={"cron": "61 * * * *", "images": ["x"]}))
