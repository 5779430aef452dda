# Every target that needs Python first makes sure $(VENV) exists and holds the project with
# $(EXTRAS) (re-installed when pyproject.toml or the constraints file changes). By default:
# .venv, made by python3, with the dev extra; on a machine whose python3 is 3.11 that is jax
# 0.10.2 (README, "Tested stacks"). .ci/run also runs `make test` on the newest stack with
#   PYTHON=<a Python 3.12> VENV=.venv312 EXTRAS=dev,tpu CONSTRAINTS=.ci/constraints-newest.txt
PYTHON  ?= python3
VENV    ?= .venv
EXTRAS  ?= dev
CONSTRAINTS ?=
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
RUN     ?= runs/fashion_mnist_dhel
CONFIG  ?= configs/fashion_mnist.py
PYTEST_ARGS ?= -n 2

.PHONY: setup data test run train eval bench accel-check lint notebooks clean

setup: $(STAMP) data

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[$(EXTRAS)]' $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
	touch $(STAMP)

# Debian's copy of Fashion-MNIST: the offline source of the embedded default.
data:
	@if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -q && apt-get install -y -q dataset-fashion-mnist; \
	  else echo "note: install Debian's dataset-fashion-mnist (as root) for offline Fashion-MNIST"; fi; \
	fi

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

run: train eval

train: setup
	$(VENV)/bin/dhel-train --config $(CONFIG) --workdir $(RUN)

eval: setup
	$(VENV)/bin/dhel-eval --workdir $(RUN) --baselines

bench: setup
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) benchmarks/bench_losses.py
	$(PY) benchmarks/bench_data.py

# Correctness, speed, MFU and learning on whatever backend JAX finds, from a plain source
# checkout (no install, no TFDS/grain/ml_collections): docs/accelerators.md. With $(VENV) if
# there is one, else the system python3 (an accelerator host's preinstalled stack).
ACCEL_PY    = $(if $(wildcard $(PY)),$(PY),python3)
ACCEL_ARGS ?=
accel-check:
	PYTHONPATH=. $(ACCEL_PY) benchmarks/accelerator_check.py $(ACCEL_ARGS)

lint: setup
	$(VENV)/bin/ruff check dhel_jax tests benchmarks configs
	$(VENV)/bin/ruff format --check dhel_jax tests benchmarks configs
	$(VENV)/bin/mypy

clean:
	rm -rf .venv .venv312 build *.egg-info .pytest_cache

notebooks: setup
	$(PY) -m pip install -q jupyterlab
	$(VENV)/bin/jupyter lab notebooks/
