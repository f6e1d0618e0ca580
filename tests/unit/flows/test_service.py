"""The inference service (flows/service/) on a real uvicorn server, serving a tiny fitted PatchCore from a
saved folder (LocalSource; the registry-backed path is tests/e2e/test_serving.py): scoring raw and
multipart uploads, every kind of bad input answered 4xx with one message, micro-batching, the decision
record, feedback behind the token, export of reviewed false alarms, a hot swap without failed requests."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import sqlite3
import struct
import threading
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image

from components.config import validate
from components.detector import load_detector
from components.thresholds import Threshold
from components.training import fit_line
from flows.cli import main
from flows.service.app import create_app, local_runtime
from flows.service.scoring import normalise
from tests.conftest import TINY_PARAMS, texture, with_square, write_line
from tests.serving_server import serve, wait_ready

TOKEN = "unit-test-token-0123456789"
AUTH = {"authorization": f"Bearer {TOKEN}"}
SERVICE = {"batch_window_ms": 30, "max_batch": 16, "max_request_bytes": 2_000_000, "max_images_per_request": 4,
           "poll_s": 3600, "keep_images": "all"}


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A small PNG whose header claims width x height (the CRC fixed, so only the size check can refuse it)."""
    data = bytearray(png(texture(0)))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("service")
    line = write_line(root / "line")
    raw = {**json.loads(json.dumps(TINY_PARAMS)), "lines": {"tiny": {"data": str(line)}}, "service": SERVICE,
           "services": {"root": str(root / "services")}}
    cfg = validate(raw)
    model = fit_line(cfg, line).detector.save(root / "model")
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    return cfg, root, model, params


@pytest.fixture(scope="module")
def server(fitted):
    cfg, root, model, _ = fitted
    runtime = local_runtime(cfg, root / "services", TOKEN, {"tiny": model})
    with serve(create_app(runtime)) as base:
        wait_ready(base)
        yield base, runtime


def score(base: str, body: bytes, headers: dict | None = None, **kw) -> httpx.Response:
    return httpx.post(f"{base}/v1/lines/tiny/score", content=body,
                      headers={"content-type": "image/png", **(headers or {})}, timeout=30, **kw)


def test_batches_run_in_power_of_two_shapes():
    from flows.service.batching import chunk_sizes

    assert chunk_sizes(13) == [8, 4, 1] and chunk_sizes(16) == [16] and chunk_sizes(1) == [1]
    assert all(sum(chunk_sizes(n)) == n for n in range(1, 70))


def test_normalised_score_puts_the_threshold_at_one_half():
    assert normalise(2.0, 2.0) == 0.5
    assert normalise(1.0, 2.0) == 0.25 and normalise(9.0, 2.0) == 1.0 and normalise(-1.0, 2.0) == 0.0
    assert normalise(-0.5, -0.5) == 0.5 and normalise(3.0, None) is None


def test_scores_raw_and_multipart_uploads_in_order(server):
    base, runtime = server
    good, bad = png(texture(1001)), png(with_square(texture(2001))[0])
    raw = score(base, bad, params={"name": "part-7.png"})
    assert raw.status_code == 200, raw.text
    (row,) = raw.json()["results"]
    assert row["image"] == "part-7.png" and row["image_sha256"] == hashlib.sha256(bad).hexdigest()
    assert row["model"]["version"].startswith("local-") and row["latency_ms"] > 0
    assert row["decision"] == "defective" and row["normalised_score"] > 0.5
    assert row["threshold"] == pytest.approx(runtime.table.get("tiny").threshold.image)
    multi = httpx.post(f"{base}/v1/lines/tiny/score", timeout=30, files=[
        ("image", ("good.png", good, "image/png")), ("image", ("bad.png", bad, "image/png"))])
    assert multi.status_code == 200, multi.text
    rows = multi.json()["results"]
    assert [r["image"] for r in rows] == ["good.png", "bad.png"]
    assert rows[1]["score"] == pytest.approx(row["score"], rel=1e-5) and rows[0]["score"] < rows[1]["score"]


BAD_INPUTS = {
    "not an image": (b"GIF89a not really", "image/png", 400, "body: not a PNG, JPEG, BMP or TIFF"),
    "truncated": (png(texture(3))[:150], "image/png", 400, "body: cannot decode image"),
    "empty": (b"", "image/png", 400, "body: empty"),
    "too many pixels": (png_declaring(20000, 20000), "image/png", 413, "exceeds the limit of 40000000 pixels"),
    "too many bytes": (b"\x89PNG\r\n\x1a\n" + bytes(2_100_000), "image/png", 413, "max_request_bytes"),
    "wrong type": (b"hello", "text/plain", 415, "content-type 'text/plain'"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gets_a_4xx_with_one_clear_message(server, case):
    base, _ = server
    body, ctype, status, message = BAD_INPUTS[case]
    response = httpx.post(f"{base}/v1/lines/tiny/score", content=body, headers={"content-type": ctype}, timeout=30)
    assert response.status_code == status, response.text
    assert list(response.json()) == ["error"] and message in response.json()["error"]
    assert "Traceback" not in response.text and "File \"" not in response.text


def test_bad_requests_name_the_problem(server):
    base, _ = server
    files = [("image", (f"{i}.png", png(texture(i)), "image/png")) for i in range(5)]
    too_many = httpx.post(f"{base}/v1/lines/tiny/score", files=files, timeout=30)
    assert too_many.status_code == 413 and "Maximum number of files is 4" in too_many.json()["error"]
    no_file = httpx.post(f"{base}/v1/lines/tiny/score", data={"note": "x"},
                         files=[("other", ("", b"", "text/plain"))], timeout=30)
    assert no_file.status_code in (400, 413)
    one_bad = httpx.post(f"{base}/v1/lines/tiny/score", timeout=30, files=[
        ("image", ("fine.png", png(texture(1)), "image/png")), ("image", ("broken.png", b"\x89PNG\r\n\x1a\nxx", "image/png"))])
    assert one_bad.status_code == 400 and one_bad.json()["error"].startswith("broken.png: ")
    assert score(base, png(texture(1)), params={"alias": "nightly"}).status_code == 404
    unknown = httpx.post(f"{base}/v1/lines/nope/score", content=png(texture(1)),
                         headers={"content-type": "image/png"}, timeout=30)
    assert unknown.status_code == 404 and "line 'nope' is not served" in unknown.json()["error"]
    challenger = score(base, png(texture(1)), params={"alias": "challenger"})
    assert challenger.status_code == 404 and "no @challenger" in challenger.json()["error"]


def test_overlay_png_and_views(server):
    base, _ = server
    image = png(with_square(texture(2002))[0])
    response = score(base, image, headers={"accept": "image/png"})
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(response.content)).size == (64, 64)
    assert response.headers["x-defectops-decision"] == "defective"
    views = score(base, image, params={"views": "true"}).json()["results"][0]
    for key in ("input_png", "heatmap_png", "overlay_png"):
        assert Image.open(io.BytesIO(base64.b64decode(views[key]))).size == (64, 64)


def test_concurrent_requests_share_forward_passes(server):
    base, runtime = server
    before = runtime.metrics.batch.collect()[0].samples

    async def burst():
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*(client.post(f"{base}/v1/lines/tiny/score", content=png(texture(50 + i)),
                                                      headers={"content-type": "image/png"}) for i in range(10)))

    responses = asyncio.run(burst())
    assert all(r.status_code == 200 for r in responses)
    after = runtime.metrics.batch.collect()[0].samples
    value = lambda samples, name: next(s.value for s in samples if s.name == name)  # noqa: E731
    images = value(after, "defectops_batch_size_sum") - value(before, "defectops_batch_size_sum")
    passes = value(after, "defectops_batch_size_count") - value(before, "defectops_batch_size_count")
    assert images == 10 and passes < 10, (images, passes)


def test_health_readiness_and_metrics(server):
    base, _ = server
    assert httpx.get(f"{base}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{base}/readyz").json()
    assert ready["ready"] and ready["lines"]["tiny"]["champion"]["version"].startswith("local-")
    score(base, png(texture(7)))
    text = httpx.get(f"{base}/metrics").text
    for name in ("defectops_request_seconds_bucket", "defectops_decisions_total", "defectops_normalised_score_bucket",
                 "defectops_model_info"):
        assert name in text
    assert 'line="tiny"' in text


def test_decisions_feedback_review_and_export(server, fitted):
    base, runtime = server
    cfg, root, _, params = fitted
    image = png(with_square(texture(2003))[0])
    decision_id = score(base, image, params={"name": "flagged.png"}).json()["results"][0]["decision_id"]
    db = root / "services" / "serving" / "decisions.sqlite"
    with sqlite3.connect(db) as reader:  # another reader, as the monitoring would be
        assert reader.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        row = reader.execute("SELECT line, model_version, decision, image_sha256, image_kept FROM decisions "
                             "WHERE id = ?", (decision_id,)).fetchone()
    assert row[0] == "tiny" and row[2] == "defective" and row[3] == hashlib.sha256(image).hexdigest() and row[4] == 1
    url = f"{base}/v1/decisions/{decision_id}/feedback"
    assert httpx.post(url, json={"label": "false_alarm"}).status_code == 401
    assert httpx.post(url, json={"label": "false_alarm"}, headers={"authorization": "Bearer wrong"}).status_code == 403
    bad_label = httpx.post(url, json={"label": "meh"}, headers=AUTH)
    assert bad_label.status_code == 400 and "false_alarm" in bad_label.json()["error"]
    assert httpx.post(f"{base}/v1/decisions/999999/feedback", json={"label": "false_alarm"},
                      headers=AUTH).status_code == 404
    feedback_id = httpx.post(url, json={"label": "false_alarm", "note": "dust"}, headers=AUTH).json()["feedback_id"]
    recent = httpx.get(f"{base}/v1/decisions", params={"line": "tiny"}).json()["decisions"]
    assert recent[0]["id"] == decision_id and recent[0]["feedback"] == "false_alarm"
    assert httpx.get(f"{base}/v1/decisions/{decision_id}/image").content == image
    assert httpx.post(f"{base}/v1/lines/tiny/export-false-alarms", headers=AUTH).json()["exported"] == []  # pending
    review = httpx.post(f"{base}/v1/feedback/{feedback_id}/review", json={"verdict": "accepted"}, headers=AUTH)
    assert review.status_code == 200, review.text
    exported = httpx.post(f"{base}/v1/lines/tiny/export-false-alarms", headers=AUTH).json()
    dest = Path(exported["exported"][0])
    assert dest.parent == cfg.lines["tiny"].data / "train" / "good" and dest.read_bytes() == image
    again = httpx.post(f"{base}/v1/feedback/{feedback_id}/review", json={"verdict": "rejected"}, headers=AUTH)
    assert again.status_code == 409 and "already exported" in again.json()["error"]
    dest.unlink()  # leave the line as it was


def test_review_export_cli_rechecks_the_kept_image(server, fitted, capsys):
    base, runtime = server
    cfg, root, _, params = fitted
    image = png(with_square(texture(2004))[0])
    decision_id = score(base, image).json()["results"][0]["decision_id"]
    fid = runtime.store.add_feedback(decision_id, "false_alarm")
    runtime.store.review(fid, "accepted")
    kept = runtime.store.image_path(hashlib.sha256(image).hexdigest(), ".png")
    kept.write_bytes(image[:-1] + b"\x00")  # tampered
    assert main(["review-export", "tiny", "--config", str(params)]) == 0
    out = " ".join(capsys.readouterr().out.split())  # the console wraps long paths at its width
    assert "does not match its sha256" in out and "0 false alarm(s) exported" in out
    kept.write_bytes(image)
    assert main(["review-export", "tiny", "--config", str(params)]) == 0
    dest = cfg.lines["tiny"].data / "train" / "good" / f"review-{hashlib.sha256(image).hexdigest()[:16]}.png"
    assert dest.read_bytes() == image
    dest.unlink()


def test_hot_swap_keeps_every_request(fitted, tmp_path):
    cfg, root, model, _ = fitted
    folder = tmp_path / "serving-model"
    load_detector(model).save(folder)
    runtime = local_runtime(cfg, tmp_path / "services", TOKEN, {"tiny": folder})
    with serve(create_app(runtime)) as base:
        first = wait_ready(base)["lines"]["tiny"]["champion"]["version"]
        statuses, versions, stop = [], set(), threading.Event()

        def hammer():
            with httpx.Client(timeout=60) as client:
                while not stop.is_set():
                    r = client.post(f"{base}/v1/lines/tiny/score", content=png(texture(9)),
                                    headers={"content-type": "image/png"})
                    statuses.append(r.status_code)
                    if r.status_code == 200:
                        versions.add(r.json()["results"][0]["model"]["version"])

        threads = [threading.Thread(target=hammer) for _ in range(3)]
        for t in threads:
            t.start()
        det = load_detector(folder)  # a new version: the same model with another threshold
        det.threshold_ = Threshold(det.threshold_.image * 2, det.threshold_.pixel, 0.01, det.threshold_.n_calibration)
        staged = det.save(tmp_path / "staged")
        folder.rename(tmp_path / "old")
        staged.rename(folder)
        assert httpx.post(f"{base}/v1/reload").status_code == 401
        changes = httpx.post(f"{base}/v1/reload", headers=AUTH, timeout=60).json()["changes"]
        after = score(base, png(texture(9))).json()["results"][0]
        stop.set()
        for t in threads:
            t.join()
    assert changes and after["model"]["version"] != first
    assert after["threshold"] == pytest.approx(det.threshold_.image)
    assert statuses and set(statuses) == {200}, statuses
    assert first in versions


def test_torch_work_stays_on_one_thread(fitted, tmp_path):
    """Loads run in a thread that ends with them, and every forward pass (plain, with views, as an overlay,
    after a reload) on the one scoring thread: a second long-lived torch thread halves libgomp's speed on a
    small machine (flows/service/models.py)."""
    from flows.service.models import LocalSource

    cfg, _, model, _ = fitted
    loaders: list[threading.Thread] = []

    class Recording(LocalSource):
        def load(self, line, alias, version):
            loaders.append(threading.current_thread())
            return super().load(line, alias, version)

    scorers: set[int] = set()
    runtime = local_runtime(cfg, tmp_path / "services", TOKEN, {"tiny": model})
    runtime.table.source = runtime.source = Recording({"tiny": model})
    with serve(create_app(runtime)) as base:
        wait_ready(base)
        detector = runtime.table.get("tiny").detector
        plain = detector.score
        detector.score = lambda images: scorers.add(threading.get_ident()) or plain(images)
        image = png(with_square(texture(77))[0])
        assert score(base, image).status_code == 200
        assert score(base, image, params={"views": "true"}).status_code == 200
        assert score(base, image, headers={"accept": "image/png"}).status_code == 200
        assert httpx.post(f"{base}/v1/reload", headers=AUTH, timeout=60).status_code == 200
    assert loaders and all(not t.is_alive() and t is not threading.main_thread() for t in loaders)
    assert len(scorers) == 1 and threading.get_ident() not in scorers


def test_a_body_that_breaks_after_its_header_fails_alone(server):
    """The pixels are decoded on the scoring thread, in the batch: a PNG whose header reads but whose data is
    cut gets its own 400, and the images batched with it are scored."""
    base, _ = server
    broken = png(texture(3))[:150]

    async def burst():
        async with httpx.AsyncClient(timeout=60) as client:
            bodies = [png(texture(90 + i)) for i in range(5)] + [broken]
            return await asyncio.gather(*(client.post(f"{base}/v1/lines/tiny/score", content=b,
                                                      headers={"content-type": "image/png"}) for b in bodies))

    responses = asyncio.run(burst())
    assert [r.status_code for r in responses] == [200] * 5 + [400], [r.text for r in responses]
    assert "cannot decode image" in responses[-1].json()["error"]


def test_header_shape_matches_the_decode():
    from components.data import DataError, ImageTooLargeError, decode_image, image_shape

    wide = np.zeros((30, 50, 3), np.uint8)
    for fmt in ("PNG", "JPEG", "BMP", "TIFF"):
        buf = io.BytesIO()
        Image.fromarray(wide).save(buf, format=fmt)
        assert image_shape(buf.getvalue(), "x") == decode_image(buf.getvalue(), "x").shape[:2] == (30, 50)
    turned = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: width and height swap on decode
    Image.fromarray(wide).save(turned, format="JPEG", exif=exif)
    assert image_shape(turned.getvalue(), "t.jpg") == decode_image(turned.getvalue(), "t.jpg").shape[:2] == (50, 30)
    with pytest.raises(ImageTooLargeError, match="big.png: declared size 2000x2000 exceeds the limit of 1000000"):
        image_shape(png_declaring(2000, 2000), "big.png", 1_000_000)
    with pytest.raises(DataError, match="junk.png: not a readable image"):
        image_shape(b"\x89PNG\r\n\x1a\nxx", "junk.png")


def test_pictures_convert_without_torch_as_before():
    import torch

    from components.training import to_uint8_image

    image = torch.rand(3, 17, 23) * 1.4 - 0.2
    old = (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)
    assert np.array_equal(to_uint8_image(image), old)


def test_service_settings_are_typed_and_checked(fitted):
    from components.config import Config, ConfigError, ServiceConfig, load_config
    from flows.service.app import served_lines

    repo = load_config(Path(__file__).resolve().parents[3] / "params.yaml")
    assert repo.service == ServiceConfig() and repo.service.host == "127.0.0.1"
    assert Config().digest() == Config(service=ServiceConfig(port=9000)).digest()  # not a model parameter
    with pytest.raises(ConfigError, match="service.host"):
        load_config(None, ["service.host=localhost"])
    with pytest.raises(ConfigError, match="service.keep_images"):
        load_config(None, ["service.keep_images=some"])
    cfg = fitted[0]
    assert served_lines(cfg) == ["tiny"]
    with pytest.raises(ValueError, match=r"service.lines names \['pcb'\]"):
        served_lines(cfg.model_copy(update={"service": ServiceConfig(lines=("pcb",))}))


def test_polling_picks_up_a_new_version(fitted, tmp_path):
    import time

    cfg, _, model, _ = fitted
    folder = tmp_path / "model"
    load_detector(model).save(folder)
    fast = cfg.model_copy(update={"service": cfg.service.model_copy(update={"poll_s": 0.3})})
    with serve(create_app(local_runtime(fast, tmp_path / "services", TOKEN, {"tiny": folder}))) as base:
        first = wait_ready(base)["lines"]["tiny"]["champion"]["version"]
        det = load_detector(folder)
        det.threshold_ = Threshold(det.threshold_.image * 3, det.threshold_.pixel, 0.01, det.threshold_.n_calibration)
        folder.rename(tmp_path / "old")
        det.save(tmp_path / "staged").rename(folder)
        deadline, now = time.monotonic() + 20, first
        while now == first and time.monotonic() < deadline:
            time.sleep(0.2)
            now = httpx.get(f"{base}/v1/lines").json()["lines"]["tiny"]["champion"].get("version", first)
        assert now != first
        assert 'defectops_model_swaps_total{alias="champion",line="tiny"} 1.0' in httpx.get(f"{base}/metrics").text


def test_api_command_names_a_bad_model_option(tmp_path, capsys):
    assert main(["api", "--model", "tiny"]) == 2
    assert "--model 'tiny': expected LINE=MODEL_DIR" in capsys.readouterr().err
    assert main(["api", "--model", f"tiny={tmp_path / 'missing'}"]) == 2
    assert "is not a folder" in capsys.readouterr().err
