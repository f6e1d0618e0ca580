"""The inference service against calling the detector in-process: throughput and p50/p99 latency.

A PatchCore is fitted on a real line (default /work/shared/datasets/cookie, read in place; params.yaml's
settings) and saved once to --model-dir (reused when it is already there). Then, on the line's test images
(their file bytes, cycled):

- in-process, batch 1: for each image, decode + preprocess + `detector.score` one at a time (latency = that
  call);
- in-process, batch 32: decode + preprocess 32 images and score them in one call (latency = the batch call);
- service, 1 / 4 / 16 clients: `defectops api --model LINE=DIR` runs as its own process (as `defectops up`
  runs it); each client posts one raw image/png per request and waits for the answer (JSON with score and
  decision; the decision is recorded in SQLite and the image kept, as in production defaults); latency is
  the client's round trip.

Decoding is timed on both sides: the service must decode too. Clients run in this process (one thread and
one keep-alive http.client connection each) on the same machine, so they take CPU from the server: the
service rows are a lower bound.

    .venv/bin/python bench/serving.py                                  # cookie, 192 requests per row
    .venv/bin/python bench/serving.py --requests 64 --clients 1 4      # quicker
    .venv/bin/python bench/serving.py --json serving.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mdtable import table  # noqa: E402

import components  # noqa: E402,F401  (makes torchvision, and so timm, importable)
from components.config import load_config  # noqa: E402
from components.data import decode_image  # noqa: E402
from components.detector import load_detector  # noqa: E402
from components.training import fit_line, preprocess_for  # noqa: E402


def fitted_model(data: Path, params: Path, out: Path) -> Path:
    if (out / "manifest.json").is_file():
        return out
    cfg = load_config(params)
    t0 = time.perf_counter()
    result = fit_line(cfg, data)
    result.detector.save(out)
    print(f"fitted on {result.n_fit} images of {data} in {time.perf_counter() - t0:.1f} s -> {out}", file=sys.stderr)
    return out


def test_images(data: Path) -> list[bytes]:
    files = sorted(p for p in (data / "test").rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp"))
    return [f.read_bytes() for f in files]


def stats(latencies_s: list[float], images: int, wall_s: float) -> dict:
    ms = np.array(latencies_s) * 1000.0
    return {"images": images, "throughput": images / wall_s, "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99))}


def in_process(model: Path, images: list[bytes], n: int, batch: int) -> dict:
    import torch

    det = load_detector(model)
    pre = preprocess_for(det.cfg.data)

    def run(chunk: list[bytes]) -> None:
        det.score(torch.stack([pre.image(decode_image(b, "bench")) for b in chunk]))

    run(images[:batch])  # warm-up
    latencies, t0, done = [], time.perf_counter(), 0
    while done < n:
        chunk = [images[(done + i) % len(images)] for i in range(batch)]
        t = time.perf_counter()
        run(chunk)
        latencies.append(time.perf_counter() - t)
        done += batch
    return {"mode": "in-process", "concurrency": f"batch {batch}", **stats(latencies, done, time.perf_counter() - t0)}


def _clients(port: int, path: str, images: list[bytes], n: int, clients: int) -> tuple[list[float], float]:
    """`clients` threads, each with one keep-alive connection (the standard library's http.client: the
    leanest client at hand, so that the rows measure the service rather than the client), posting one
    raw image/png per request and waiting for the answer."""
    import http.client
    import itertools
    import threading

    latencies: list[float] = []
    lock = threading.Lock()

    def client(todo) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        try:
            while True:
                with lock:
                    i = next(todo, None)
                if i is None:
                    return
                t = time.perf_counter()
                conn.request("POST", path, body=images[i % len(images)], headers={"content-type": "image/png"})
                response = conn.getresponse()
                body = response.read()
                elapsed = time.perf_counter() - t
                if response.status != 200:
                    raise RuntimeError(f"service answered {response.status}: {body[:200]!r}")
                with lock:
                    latencies.append(elapsed)
        finally:
            conn.close()

    def run(todo) -> float:
        threads = [threading.Thread(target=client, args=(todo,)) for _ in range(clients)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return time.perf_counter() - t0

    run(iter(range(2 * clients)))  # untimed: connections opened, the first batches formed
    latencies.clear()
    wall = run(itertools.islice(itertools.count(), n))
    if len(latencies) != n:
        raise RuntimeError(f"{n - len(latencies)} of {n} requests failed (see the service log)")
    return latencies, wall


def start_service(model: Path, params: Path, workdir: Path, line: str, port: int) -> subprocess.Popen:
    import httpx

    exe = Path(sys.executable).parent / "defectops"
    argv = [str(exe), "api", "--config", str(params), "--model", f"{line}={model}", "--root", str(workdir),
            "--port", str(port)]
    env = {**os.environ, "DEFECTOPS_SERVICE_TOKEN": "bench-token-0123456789abcdef"}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=open(workdir / "api.log", "wb"))
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    proc.terminate()
    raise RuntimeError(f"the service did not become ready; log: {workdir / 'api.log'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("/work/shared/datasets/cookie"))
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "defectops-bench-serving")
    parser.add_argument("--requests", type=int, default=192, help="images per row")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--port", type=int, default=18765)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    model = fitted_model(args.data, args.params, args.model_dir)
    images = test_images(args.data)
    rows = [in_process(model, images, args.requests, 1), in_process(model, images, args.requests, 32)]
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        proc = start_service(model, args.params, Path(tmp), "line", args.port)
        try:
            for c in args.clients:
                latencies, wall = _clients(args.port, "/v1/lines/line/score", images, args.requests, c)
                rows.append({"mode": "service", "concurrency": f"{c} client{'s' if c > 1 else ''}",
                             **stats(latencies, len(latencies), wall)})
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    print(table(rows, [("mode", "mode", "s"), ("concurrency", "batch / clients", "s"), ("images", "images", "d"),
                       ("throughput", "images/s", ".1f"), ("p50_ms", "p50 ms", ".1f"), ("p99_ms", "p99 ms", ".1f")]))
    by = {r["concurrency"]: r for r in rows}
    if "16 clients" in by:
        print(f"\nthroughput 16 clients / in-process batch 32: {by['16 clients']['throughput'] / by['batch 32']['throughput']:.2f} (goal >= 0.8)")
    if "1 client" in by:
        print(f"p99 1 client / in-process batch 1 p99: {by['1 client']['p99_ms'] / by['batch 1']['p99_ms']:.2f} (goal <= 1.3)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
