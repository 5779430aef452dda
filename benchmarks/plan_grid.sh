#!/usr/bin/env bash
# docs/accelerators.md's table "Estimates for the paper configs": every paper config (CIFAR-10,
# CIFAR-100 and STL-10 with ResNet-18, ImageNet-100 with ResNet-50) at its batch of 256, in
# float32 and bfloat16, compiled by dhel-compile for v5e:2x4, v5p:2x2x1 and v6e:2x4, plus
# ImageNet-100 bfloat16 on v5e:2x4 at B = 1024 and 1536; then the table's rows.
#   bash benchmarks/plan_grid.sh OUT_DIR [DHEL_COMPILE]
# DHEL_COMPILE defaults to dhel-compile on the PATH; the table is printed by the python beside
# it, or by $PYTHON when set.
# Needs libtpu (pip install 'dhel-jax[tpu]'), no TPU. One compile at a time: each takes one to
# several minutes on 2 cores. A plan already in OUT_DIR is kept, so an interrupted grid resumes.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:?usage: bash benchmarks/plan_grid.sh OUT_DIR [DHEL_COMPILE]}"
COMPILE="${2:-dhel-compile}"
PYTHON="${PYTHON:-$(dirname "$(command -v "$COMPILE")")/python}"
mkdir -p "$OUT"

plan() {  # config dtype topology batch
  local name="$OUT/$1_$2_${3/:/-}_b$4"
  [ -s "$name.json" ] && return
  echo "$(date +%T) $1 $2 $3 B=$4 (load $(cut -d' ' -f1-3 /proc/loadavg))" >&2
  "$COMPILE" --config "configs/$1.py" --topology "$3" --config.model.dtype="$2" \
    --config.batch_size="$4" --out "$name.json" > "$name.log" 2>&1
  local status=$?
  # 1: the step does not fit the chip; its plan is still written (fits: false).
  [ $status -le 1 ] || { echo "failed ($status): $name.log" >&2; tail -3 "$name.log" >&2; }
}

for config in cifar10 cifar100 stl10 imagenet100; do
  for dtype in bfloat16 float32; do
    for topology in v5e:2x4 v5p:2x2x1 v6e:2x4; do
      plan "$config" "$dtype" "$topology" 256
    done
  done
done
plan imagenet100 bfloat16 v5e:2x4 1024
plan imagenet100 bfloat16 v5e:2x4 1536
"$PYTHON" benchmarks/plan_table.py "$OUT"/*.json
