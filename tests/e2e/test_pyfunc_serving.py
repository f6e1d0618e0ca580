"""The registered pyfunc outside this repository: loaded by `mlflow.pyfunc.load_model` in a fresh process that
cannot import the repo (it runs on the code logged with the model), and served by `mlflow models serve` with
the default environment manager (virtualenv: a fresh venv built from the model's pinned requirements).
Images go in as bytes (base64 over HTTP); the S3 endpoint comes from the loading environment, not from the
model (it was registered with a wrong one)."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
from PIL import Image

from flows import registry, tracking
from infra.process import find_free_ports, http_ok
from infra.services import env_for_clients
from infra.storage import ObjectStore
from tests.e2e.tiny_line import unique_name, upload, version_tags

WRONG_ENDPOINT = "http://127.0.0.1:9"  # what the model is registered with: nothing listens there

# Run in a fresh interpreter: drop the editable install's finder and the repo from sys.path, prove that
# `components` is not importable, then load the registered model and score base64 text and raw bytes.
LOADER = textwrap.dedent("""
    import base64, importlib.util, json, sys
    sys.meta_path = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")]
    sys.path_hooks = [h for h in sys.path_hooks if "editable" not in getattr(h, "__module__", "")]
    sys.path = [p for p in sys.path if p not in ("", ".", REPO, REPO + "/")]
    sys.path_importer_cache.clear()
    assert importlib.util.find_spec("components") is None and importlib.util.find_spec("flows") is None
    import mlflow, pandas as pd
    from mlflow.exceptions import MlflowException
    model = mlflow.pyfunc.load_model(URI)
    images = [open(p, "rb").read() for p in PATHS]
    b64 = model.predict(pd.DataFrame({"image": [base64.b64encode(b).decode() for b in images]}))
    raw = model.predict(pd.DataFrame({"image": images}), params={"heatmap": True})
    errors = []
    for bad in ({"image": [base64.b64encode(b"not an image").decode()]}, {"image_path": ["/no/such.png"]},
                {"image": ["%%% not base64"]}, {"picture": [b"x"]}):
        try:
            model.predict(pd.DataFrame(bad))
            errors.append(None)
        except MlflowException as exc:
            errors.append(exc.message)
    import components
    print(json.dumps({"b64": b64.to_dict("list"), "raw": raw.to_dict("list"), "errors": errors,
                      "components": components.__file__}))
""")


@pytest.fixture(scope="module")
def registered(object_store, tiny, tmp_path_factory):
    """A version registered in a SQLite registry under tmp, its bank on the session's SeaweedFS, and the
    client environment a loading process gets (endpoint and keys of the running store)."""
    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    previous = dict(tracking._state)
    with pytest.MonkeyPatch.context() as mp:  # mlflow.set_*_uri also export MLFLOW_*_URI: restored after
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("MLFLOW_REGISTRY_URI", uri)
        tracking.configure(uri, root=root)
        try:
            store = ObjectStore(object_store.s3_endpoint, object_store.bucket, object_store.access_key,
                                object_store.secret_key)
            bank = upload(store, tiny.model_dir)
            run_id = tracking.start_run("tiny", "register")
            name = unique_name()
            version = registry.register_version(run_id, name, bank, WRONG_ENDPOINT, version_tags(tiny))
            tracking.end_run(run_id)
            model_dir = Path(mlflow.artifacts.download_artifacts(registry.model_uri(name, version),
                                                                 dst_path=str(root / "dl")))
        finally:  # flows.tracking back to the session's server, if a test module had configured one
            if previous["uri"]:
                tracking.configure(previous["uri"], root=previous["root"])
            else:
                tracking._state.update(previous)
    env = {**os.environ, **env_for_clients(object_store), "MLFLOW_TRACKING_URI": uri, "MLFLOW_REGISTRY_URI": uri,
           "TMPDIR": str(root)}
    env.pop("PYTHONPATH", None)
    return {"uri": f"models:/{name}/{version}", "env": env, "root": root, "model_dir": model_dir}


def _expected(tiny) -> tuple[list[str], np.ndarray]:
    paths = [str(s.path) for s in tiny.fit.split.test]
    return paths, np.array([r.score for r in tiny.result.records])


def test_logged_model_carries_code_and_pinned_requirements(registered):
    model_dir = registered["model_dir"]
    mlmodel = (model_dir / "MLmodel").read_text()
    assert WRONG_ENDPOINT not in mlmodel and "endpoint" not in mlmodel
    assert (model_dir / "code" / "components" / "detector.py").is_file()
    assert (model_dir / "code" / "flows" / "pyfunc_model.py").is_file()
    assert (model_dir / "code" / "infra" / "storage.py").is_file()  # the bank is fetched with it
    requirements = (model_dir / "requirements.txt").read_text().split()
    pins = dict(r.split("==") for r in requirements if "==" in r)
    assert pins["torch"] == "2.13.0" and pins["torchvision"] == "0.28.0", requirements
    assert all("==" in r for r in requirements if not r.startswith("-")), requirements


def test_load_model_outside_the_repo_scores_bytes(registered, tiny):
    paths, expected = _expected(tiny)
    script = f"REPO = {str(Path.cwd().resolve())!r}\nURI = {registered['uri']!r}\nPATHS = {paths!r}\n" + LOADER
    proc = subprocess.run([sys.executable, "-P", "-c", script], env=registered["env"], cwd=registered["root"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["components"].startswith(str(registered["root"])), out["components"]  # the model's own code
    for key in ("b64", "raw"):
        np.testing.assert_allclose(out[key]["score"], expected, rtol=1e-4, atol=1e-5)
        threshold = tiny.fit.detector.threshold_.image
        assert out[key]["decision"] == ["defective" if s > threshold else "good" for s in out[key]["score"]]
        assert all(0.0 <= v <= 1.0 for v in out[key]["normalised_score"])
    assert out["b64"]["heatmap"] == [None] * len(paths)
    with Image.open(io.BytesIO(base64.b64decode(out["raw"]["heatmap"][0]))) as im:
        assert im.format == "PNG" and im.size == (64, 64)
    not_image, no_file, not_b64, no_column = out["errors"]
    assert "row 0 ('image' bytes): not a readable image" in not_image
    assert "row 0 (/no/such.png): cannot read file" in no_file
    assert "row 0: 'image' is text but not valid base64" in not_b64
    assert "'image'" in no_column and "'image_path'" in no_column, no_column
    assert not any("Traceback" in e for e in out["errors"])


def test_an_older_models_endpoint_yields_to_the_environment(object_store, store, tiny, tmp_path):
    """Versions registered before the endpoint left the model config still carry one: the loading
    environment's DEFECTOPS_S3_ENDPOINT wins; the recorded one is only a fallback when it is unset."""
    from flows.pyfunc_model import fetch_detector

    bank = upload(store, tiny.model_dir)
    legacy = {"bank_uri": bank.uri, "bank_sha256": bank.sha256, "endpoint": WRONG_ENDPOINT}
    env = env_for_clients(object_store)
    det = fetch_detector(legacy, tmp_path / "env-wins", env=env)
    assert det.threshold_.image == pytest.approx(tiny.fit.detector.threshold_.image)
    fallback = {**legacy, "endpoint": object_store.s3_endpoint}
    assert fetch_detector(fallback, tmp_path / "fallback", env={k: v for k, v in env.items()
                                                                  if k != "DEFECTOPS_S3_ENDPOINT"}) is not None


def _post(url: str, body: bytes, content_type: str) -> tuple[int, str]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=120) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.mark.slow
def test_mlflow_models_serve_with_the_default_env_manager(registered, tiny, tmp_path):
    """`mlflow models serve` as a user runs it (no --env-manager: virtualenv), in a fresh MLFLOW_ENV_ROOT,
    so the environment is built from the model's requirements; then image bytes are posted to it."""
    port = find_free_ports("127.0.0.1", 1)[0]
    env = {**registered["env"], "MLFLOW_ENV_ROOT": str(tmp_path / "envs")}
    log = (tmp_path / "serve.log").open("wb")
    mlflow_bin = str(Path(sys.executable).parent / "mlflow")
    proc = subprocess.Popen([mlflow_bin, "models", "serve", "-m", registered["uri"], "-h", "127.0.0.1", "-p",
                             str(port)], env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        t0 = time.monotonic()
        while not http_ok(f"{url}/ping"):
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-5000:]
            assert time.monotonic() - t0 < 1200, "not serving after 20 min:\n" + (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(2)
        print(f"mlflow models serve (virtualenv built from the model's requirements): ready in "
              f"{time.monotonic() - t0:.0f} s")
        _check_built_env(tmp_path / "envs")
        _check_invocations(url, tiny)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
        log.close()
        shutil.rmtree(tmp_path / "envs", ignore_errors=True)  # 1.5 GB


def _check_built_env(envs: Path) -> None:
    [python] = list(envs.glob("*/bin/python"))
    code = "import torch, importlib.metadata as m; print(torch.__version__, " \
           "[d.metadata['Name'] for d in m.distributions() if d.metadata['Name'].startswith('nvidia')])"
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[0] == "2.13.0+cpu" and out.stdout.strip().endswith("[]"), out.stdout


def _check_invocations(url: str, tiny) -> None:
    paths, expected = _expected(tiny)
    b64 = [base64.b64encode(Path(p).read_bytes()).decode() for p in paths]
    body = {"dataframe_split": {"columns": ["image"], "data": [[b] for b in b64]}, "params": {"heatmap": True}}
    status, text = _post(f"{url}/invocations", json.dumps(body).encode(), "application/json")
    assert status == 200, text[-3000:]
    rows = json.loads(text)["predictions"]
    np.testing.assert_allclose([r["score"] for r in rows], expected, rtol=1e-4, atol=1e-5)
    assert {r["decision"] for r in rows} <= {"defective", "good"}
    with Image.open(io.BytesIO(base64.b64decode(rows[0]["heatmap"]))) as im:
        assert im.format == "PNG"

    for column, value, message in (("image", base64.b64encode(b"GIF89a broken").decode(), "not a readable image"),
                                   ("image", "%%% not base64", "Failed to convert column image"),
                                   ("image_path", "/no/such.png", "row 0 (/no/such.png): cannot read file")):
        bad = {"dataframe_split": {"columns": [column], "data": [[value]]}}
        status, text = _post(f"{url}/invocations", json.dumps(bad).encode(), "application/json")
        print(f"{column}={value[:20]!r}: HTTP {status} {text}")
        assert status == 400 and message in text, text[-2000:]
        assert json.loads(text)["error_code"] in ("INVALID_PARAMETER_VALUE", "BAD_REQUEST")  # ours, MLflow's
        assert "Traceback" not in text and "stack_trace" not in text, text
    status, text = _post(f"{url}/invocations", Path(paths[0]).read_bytes(), "image/png")
    assert status == 415, text  # MLflow's scoring server takes JSON, CSV or parquet only (docs/serving-mlflow.md)
