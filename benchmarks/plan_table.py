"""Markdown rows of docs/accelerators.md's planning table from ``dhel-compile --out`` files.

    dhel-compile --config configs/cifar10.py --topology v5e:2x4 --out plans/c10_f32_v5e.json
    python benchmarks/plan_table.py plans/*.json

(``benchmarks/plan_grid.sh`` compiles the whole grid of the docs and calls this.) Rows are
sorted by dataset, dtype, batch and slice.

One row per plan: config, dtype, batch, slice, fits, temporaries and total per chip, the
compiler's estimate of the step, images/s, MFU and chip-hours of the run (the plan's
``total_steps``). Estimates come from the TPU compiler's cost model, not from a TPU; "(roofline)"
marks a step time raised to the chip's roofline bound (``dhel_jax.plan.estimate``).
"""

from __future__ import annotations

import json
import sys

_GIB = 2**30


def row(plan: dict) -> str:
    m, e = plan["memory"], plan["estimate"]

    def fmt(value, spec: str, scale: float = 1.0) -> str:
        return "n/a" if value is None else format(value * scale, spec)

    fits = {True: "yes", False: "**no**", None: "?"}[m["fits"]]
    # The cost model's time was below the chip's roofline bound, which is shown instead.
    bound = " (roofline)" if e.get("roofline_limited") else ""
    return (
        f"| {plan['dataset']} {plan['model']} | {plan['dtype']} | {plan['batch_size']} "
        f"({plan['batch_per_device']}/chip) | {plan['topology']} | {fits} | "
        f"{fmt(m['temp_bytes'], '.2f', 1 / _GIB)} | {fmt(m['total_bytes'], '.2f', 1 / _GIB)} | "
        f"{fmt(e['step_seconds'], '.1f', 1e3)}{bound} | {fmt(e['images_per_second'], ',.0f')} | "
        f"{fmt(e['mfu'], '.1f', 100)} | {fmt(e.get('chip_hours'), ',.1f')} |"
    )


HEADER = (
    "| config | dtype | batch | slice | fits | temporaries GiB/chip | total GiB/chip | "
    "est. ms/step | est. images/s | est. MFU % | est. chip-hours |\n"
    "|---|---|---:|---|---|---:|---:|---:|---:|---:|---:|"
)


def main(paths: list[str]) -> None:
    plans = []
    for path in paths:
        with open(path) as f:
            plans.append(json.load(f))
    plans.sort(key=lambda p: (p["dataset"], p["dtype"], p["batch_size"], p["topology"]))
    print(HEADER)
    for plan in plans:
        print(row(plan))


if __name__ == "__main__":
    main(sys.argv[1:])
