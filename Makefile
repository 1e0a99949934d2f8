# Two entry points for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: setup test test-compat lint demo bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Reinstall when the project metadata or pinned versions change.
$(STAMP): $(PY) pyproject.toml constraints.txt
	$(PIP) install --quiet -c constraints.txt -e ".[dev,tensorboard]"
	touch $(STAMP)

setup: $(STAMP)

lint: setup
	$(VENV)/bin/ruff check .

# The suite, then the numerics tests again with AVX-512 dispatch off (NumPy and PyTorch pick
# other SIMD kernels there): their expected bits must hold on either kind of x86 CPU.
NO_AVX512 := NPY_DISABLE_CPU_FEATURES="X86_V4 AVX512_ICL AVX512_SPR" ATEN_CPU_CAPABILITY=avx2
define run_tests
	HYPOTHESIS_PROFILE=ci $(1) -m pytest -q
	$(NO_AVX512) HYPOTHESIS_PROFILE=ci $(1) -m pytest -q -m numerics
endef

test: setup lint
	$(call run_tests,$(PY))

# The suite on another torch release, in its own venv: make test-compat TORCH=2.4.0
TORCH ?=
COMPAT_VENV := .venv-torch-$(TORCH)
test-compat:
	@test -n "$(TORCH)" || { echo "usage: make test-compat TORCH=X.Y.Z"; exit 2; }
	test -x $(COMPAT_VENV)/bin/python || $(PYTHON) -m venv $(COMPAT_VENV)
	grep -v '^torch==' constraints.txt > $(COMPAT_VENV)/constraints.txt
	$(COMPAT_VENV)/bin/python -m pip install --quiet -c $(COMPAT_VENV)/constraints.txt \
		"torch==$(TORCH)" -e ".[dev,tensorboard]"
	$(call run_tests,$(COMPAT_VENV)/bin/python)

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
	rm -rf $(VENV) .venv-torch-* build dist src/*.egg-info
