"""The inference service against the real registry and object store (SeaweedFS + MLflow started by the
session): @champion served with every sha256 verified, a hot swap when the alias moves with no request
failing, a version whose bank does not match its sha256 refused while the old one keeps serving,
@challenger on request; and `defectops up`'s launcher starting, reporting and stopping the service."""

from __future__ import annotations

import io
import threading
from dataclasses import replace

import httpx
import pytest
from PIL import Image

from components.config import validate
from flows import registry, tracking
from flows.service.app import build, create_app
from infra.storage import StoredObject
from tests.e2e.tiny_line import OVERRIDES, unique_name, upload, version_tags
from tests.serving_server import serve, wait_ready

TOKEN = "e2e-serving-token-0123456789"
AUTH = {"authorization": f"Bearer {TOKEN}"}


def _png(path) -> bytes:
    buf = io.BytesIO()
    Image.open(path).save(buf, format="PNG")
    return buf.getvalue()


def _config(tiny, line: str, root):
    from components.config import load_config

    raw = load_config(None, OVERRIDES).to_dict()
    raw.update(lines={line: {"data": str(tiny.root)}}, services={"root": str(root)},
               service={"poll_s": 3600, "batch_window_ms": 2})
    return validate(raw)


def test_registry_champion_hot_swap_checksum_and_challenger(env, tiny, tmp_path):
    state, store = env
    line = unique_name("svc")
    name = f"defectops-{line}"
    bank = upload(store, tiny.model_dir)
    run_id = tracking.start_run(line, "serving-test")
    v1 = registry.register_version(run_id, name, bank, state.s3_endpoint, version_tags(tiny))
    v2 = registry.register_version(run_id, name, bank, state.s3_endpoint, version_tags(tiny))
    registry.set_alias(name, "champion", v1)
    image = _png(next((tiny.root / "test" / "spot").iterdir()))
    runtime = build(_config(tiny, line, tmp_path / "root"), tmp_path / "root", TOKEN)
    with serve(create_app(runtime)) as base:
        assert wait_ready(base)["lines"][line]["champion"]["version"] == v1
        url = f"{base}/v1/lines/{line}/score"
        first = httpx.post(url, content=image, headers={"content-type": "image/png"}, timeout=60).json()["results"][0]
        assert first["model"] == {"name": name, "version": v1}

        statuses, stop = [], threading.Event()

        def hammer():
            with httpx.Client(timeout=60) as client:
                while not stop.is_set():
                    statuses.append(client.post(url, content=image, headers={"content-type": "image/png"}).status_code)

        threads = [threading.Thread(target=hammer) for _ in range(2)]
        for t in threads:
            t.start()
        registry.set_alias(name, "champion", v2)
        changes = httpx.post(f"{base}/v1/reload", headers=AUTH, timeout=120).json()["changes"]
        stop.set()
        for t in threads:
            t.join()
        assert changes == [f"{line}@champion: {v1} -> {v2}"]
        assert statuses and set(statuses) == {200}, statuses
        after = httpx.post(url, content=image, headers={"content-type": "image/png"}, timeout=60).json()["results"][0]
        assert after["model"]["version"] == v2 and after["score"] == pytest.approx(first["score"], rel=1e-5)

        tampered = StoredObject(bank.uri, bank.key, "0" * 64, bank.size)  # the registry claims another sha256
        v3 = registry.register_version(run_id, name, tampered, state.s3_endpoint, version_tags(tiny))
        registry.set_alias(name, "champion", v3)
        assert httpx.post(f"{base}/v1/reload", headers=AUTH, timeout=120).json()["changes"] == []
        champion = httpx.get(f"{base}/v1/lines").json()["lines"][line]["champion"]
        assert champion["version"] == v2 and "sha256" in champion["last_error"].lower(), champion
        still = httpx.post(url, content=image, headers={"content-type": "image/png"}, timeout=60)
        assert still.json()["results"][0]["model"]["version"] == v2

        registry.set_alias(name, "challenger", v1)
        challenger = httpx.post(url, params={"alias": "challenger"}, content=image,
                                headers={"content-type": "image/png"}, timeout=120).json()["results"][0]
        assert challenger["model"]["version"] == v1 and challenger["alias"] == "challenger"
    tracking.end_run(run_id)
    # the services are shared by the session: a version whose bank cannot be read would make `gc` (rightly)
    # refuse to delete anything in a later test
    tracking.client().delete_model_version(name, v3)


def test_launcher_starts_reports_and_stops_the_service(env, tmp_path):
    """infra.api_service as `defectops up` / `status` / `down` use it (a real `defectops api` process)."""
    from infra.api_service import api_status, start_api
    from infra.process import find_free_ports
    from infra.services import ServicesConfig, env_for_clients, stop

    state, _ = env
    root = tmp_path / "root"
    params = tmp_path / "params.yaml"
    params.write_text(f"services: {{root: {root}}}\nlines: {{}}\n")
    cfg = ServicesConfig(root=root, services=("seaweedfs", "mlflow"))
    port = find_free_ports("127.0.0.1", 1)[0]
    started = start_api(cfg, params, env_for_clients(state), port=port, timeout_s=120)
    assert started.healthy and api_status(root).healthy
    ready = httpx.get(f"{started.url}/readyz", timeout=10)
    assert ready.status_code == 503 and "no lines to serve" in ready.json()["reasons"][0]
    assert "api" in stop(replace(cfg, services=("mlflow",)))  # stops the api only: no mlflow record here
    assert api_status(root) is None
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{started.url}/healthz", timeout=2)
