#!/usr/bin/env bash
# The CPU train step (bench_train.py's cpu_default model, 1 device, full step) on the two ends of
# the tested JAX range, each with dhel_jax.cpu's XLA flags and with XLA's defaults, alternated,
# two passes: benchmarks/README.md, "The step on jax 0.10.2 and 0.12".
#   bash benchmarks/bench_stacks.sh PYTHON_FOR_0.10.2 PYTHON_FOR_0.12   (the two venvs' pythons)
set -euo pipefail
cd "$(dirname "$0")/.."
PY_LOW="${1:-.venv/bin/python}"
PY_NEW="${2:-.venv312/bin/python}"
mkdir -p benchmarks/out
ARGS=(benchmarks/bench_train.py --models cpu_default --devices 1 --rounds 3 --steps-per-round 2 --torch-layouts "" --skip-model-step)
for pass in 1 2; do
  for py in "$PY_LOW" "$PY_NEW"; do
    name=$("$py" -c 'import jax; print(jax.__version__)')
    for flags in dhel default; do
      extra=(); [ $flags = default ] && extra=(--default-xla-flags)
      echo "=== pass $pass jax $name flags $flags $(date +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
      $py "${ARGS[@]}" "${extra[@]}" --out "benchmarks/out/bench_stacks_${name}_${flags}_${pass}.json" 2>&1 | grep -E "median|load average"
    done
  done
done
