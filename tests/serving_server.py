"""Run a FastAPI app on a real uvicorn server in a background thread (a real socket, its lifespan run), for
the inference-service tests and the browser test.

    with serve(create_app(runtime)) as base_url:
        httpx.get(f"{base_url}/healthz")
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import uvicorn

from infra.process import find_free_ports


@contextmanager
def serve(app, ready_path: str = "/healthz", timeout_s: float = 60.0) -> Iterator[str]:
    port = find_free_ports("127.0.0.1", 1)[0]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           access_log=False))
    thread = threading.Thread(target=server.run, name="test-uvicorn", daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(base + ready_path, timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline or not thread.is_alive():
            server.should_exit = True
            raise RuntimeError(f"test server on port {port} did not answer {ready_path} in {timeout_s} s")
        time.sleep(0.05)
    try:
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def wait_ready(base: str, timeout_s: float = 60.0) -> dict:
    """Poll /readyz until 200; returns its body (AssertionError with the last body otherwise)."""
    deadline = time.monotonic() + timeout_s
    body: dict = {}
    while time.monotonic() < deadline:
        response = httpx.get(base + "/readyz", timeout=5)
        body = response.json()
        if response.status_code == 200:
            return body
        time.sleep(0.1)
    raise AssertionError(f"not ready after {timeout_s} s: {body}")
