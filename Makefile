# Two entry points for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: setup test lint demo bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Reinstall when the project metadata or pinned versions change.
$(STAMP): $(PY) pyproject.toml constraints.txt
	$(PIP) install --quiet -c constraints.txt -e ".[dev,tensorboard]"
	touch $(STAMP)

setup: $(STAMP)

lint: setup
	$(VENV)/bin/ruff check .

test: setup lint
	HYPOTHESIS_PROFILE=ci $(PY) -m pytest -q

demo: setup
	$(PY) -m polyak train ddpg --env Pendulum-v1 --preset zoo --total-steps 20000 --seed 0 --run-dir runs/demo

# Benchmarks compare against the anchor packages installed from the registry.
# timm goes in without dependencies: its torchvision does not import beside this torch build,
# and the benchmark only loads timm/utils/model_ema.py (see docs/performance.md).
bench: setup
	$(PIP) install --quiet -c constraints.txt -e ".[bench]"
	$(PIP) install --quiet --no-deps -c constraints.txt timm
	$(PY) benchmarks/bench_ema.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info
