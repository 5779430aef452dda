"""The markdown report of benchmarks/accelerator_check.py (docs/accelerators.md explains it)."""

from __future__ import annotations

from typing import Any


def _fmt(x: Any, spec: str = ".3g") -> str:
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, (int, float)):
        return format(x, spec)
    return str(x)


def _gib(x: Any) -> str:
    return "n/a" if x is None else f"{x / 2**30:.2f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join(r) + " |" for r in rows]


def markdown(report: dict[str, Any], sections_order: tuple[str, ...]) -> str:
    meta, sections = report["meta"], report["sections"]
    dev = meta["device"]
    lines = [
        "# Accelerator check",
        "",
        f"{dev['local_devices']} x {dev['device_kind']} ({dev['backend']}), jax {meta['jax']}, "
        f"{meta['started']}, {meta['wall_s']:.0f} s{' (--tiny)' if meta['tiny'] else ''}; "
        f"peak FLOP/s: {dev['peak_source']}.",
        "",
    ]
    for name in sections_order:
        sec = sections.get(name)
        if sec is None:
            continue
        lines.append(f"## {name}: {sec['status']}")
        if sec["status"] != "ok":
            lines += ["", sec.get("reason", ""), ""]
            if "rows" not in sec:
                continue
        lines.append("")
        if name == "correctness":
            bad = [r for r in sec["rows"] if not r["ok"]]
            lines.append(
                f"{len(sec['rows']) - len(bad)} of {len(sec['rows'])} checks within tolerance. "
                f"Losses force: {sec['precision']['losses_force']}. Gram max error: "
                f"{sec['precision']['forced_precision_gram_max_abs_error']:.1e} at the losses' "
                f"precision, {sec['precision']['default_precision_gram_max_abs_error']:.1e} at "
                "the backend's default."
            )
            lines.append("")
            lines += _table(
                ["check", "error", "tolerance", "ok"],
                [
                    [r["check"], f"{r['error']:.1e}", f"{r['tolerance']:.0e}", _fmt(r["ok"])]
                    for r in sec["rows"]
                    if not r["ok"] or r["check"].startswith(("dhel", "unit-row", "wasserstein"))
                ],
            )
        elif name == "losses":
            lines += _table(
                ["loss", "M", "mode", "ms", "planned GiB", "peak GiB", "TFLOP/s", "% peak f32"],
                [
                    [
                        r["loss"],
                        str(r["m"]),
                        r["mode"] + (f" B={r['block_size']}" if r["block_size"] else ""),
                        _fmt(r.get("median_s") and r["median_s"] * 1e3, ".2f")
                        if r.get("status") == "ok"
                        else r.get("status", ""),
                        _gib(r.get("planned_bytes")),
                        _gib(r.get("peak_bytes")),
                        _fmt(r.get("tflops_per_s"), ".2f"),
                        _fmt(r.get("fraction_of_peak") and 100 * r["fraction_of_peak"], ".1f"),
                    ]
                    for r in sec["rows"]
                ],
            )
        elif name == "train_step":
            lines += _table(
                [
                    "model",
                    "dtype",
                    "batch",
                    "img/s",
                    "MFU %",
                    "TFLOP/s",
                    "host img/s",
                    "fed img/s (prefetch 2)",
                    "data-bound",
                ],
                [
                    [
                        r["model"],
                        r["dtype"],
                        str(r["batch"]),
                        _fmt(r.get("images_per_s"), ".0f") if "error" not in r else r["error"],
                        _fmt(r.get("mfu") and 100 * r["mfu"], ".1f"),
                        _fmt(r.get("tflops_per_s"), ".2f"),
                        _fmt(r.get("host_images_per_s"), ".0f"),
                        _fmt(r.get("fed_images_per_s"), ".0f"),
                        _fmt(r.get("data_bound")),
                    ]
                    for r in sec["rows"]
                ],
            )
            lines += [
                "",
                f"Prefetch: dhel-train {sec['prefetch']['dhel-train']}; this check "
                f"{sec['prefetch']['this check']}.",
            ]
            estimates = [r for r in sec["rows"] if "compiler_estimate" in r]
            if estimates:
                lines += ["", "The compiler's estimate (its cost model, not a measurement):", ""]
                lines += [
                    f"* {r['dtype']}, batch {r['batch']}: {r['compiler_estimate']['line']}"
                    for r in estimates
                ]
        elif name == "learning":
            run = sec["run"]
            lines.append(
                f"{run['model']} {run['dtype']}, batch {run['batch']}, {run['steps_done']} steps "
                f"({run['epochs']:.1f} epochs) in {run['train_s']:.0f} s (+{run['compile_s']:.0f}"
                f" s compile), evaluation {run['eval_s']:.0f} s."
            )
            lines.append("")
            lines += _table(
                ["encoder", "linear %", "kNN %"],
                [
                    [r["encoder"], f"{100 * r['linear']:.2f}", f"{100 * r['knn']:.2f}"]
                    for r in sec["rows"]
                ],
            )
        lines.append("")
    return "\n".join(lines)
