# Every target that needs Python first makes sure .venv exists and holds the
# project with its dev extra (re-installed when pyproject.toml changes).
PY      := .venv/bin/python
STAMP   := .venv/.installed
RUN     ?= runs/fashion_mnist_dhel
CONFIG  ?= configs/fashion_mnist.py
PYTEST_ARGS ?= -n 2

.PHONY: setup data test run train eval bench accel-check lint notebooks clean

setup: $(STAMP) data

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
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
	.venv/bin/dhel-train --config $(CONFIG) --workdir $(RUN)

eval: setup
	.venv/bin/dhel-eval --workdir $(RUN) --baselines

bench: setup
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) benchmarks/bench_losses.py
	$(PY) benchmarks/bench_data.py

# Correctness, speed, MFU and learning on whatever backend JAX finds, from a plain source
# checkout (no install, no TFDS/grain/ml_collections): docs/accelerators.md. With .venv if
# there is one, else the system python3 (an accelerator host's preinstalled stack).
ACCEL_PY    = $(if $(wildcard $(PY)),$(PY),python3)
ACCEL_ARGS ?=
accel-check:
	PYTHONPATH=. $(ACCEL_PY) benchmarks/accelerator_check.py $(ACCEL_ARGS)

lint: setup
	.venv/bin/ruff check dhel_jax tests benchmarks configs
	.venv/bin/ruff format --check dhel_jax tests benchmarks configs
	.venv/bin/mypy

clean:
	rm -rf .venv build *.egg-info .pytest_cache

notebooks: setup
	$(PY) -m pip install -q jupyterlab
	.venv/bin/jupyter lab notebooks/
