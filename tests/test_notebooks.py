"""The notebooks in notebooks/: each runs top to bottom with FAST=1, and is committed clean.

Every ``notebooks/*.ipynb`` is picked up automatically. Each is executed with nbclient in a fresh
kernel of the interpreter running the tests, with the repository root on the kernel's
PYTHONPATH (so it works whether or not dhel_jax is pip-installed), from a scratch working
directory, with FAST=1 and matplotlib's inline backend (Colab's: every figure is really drawn to
a PNG, so drawing errors surface too, and no GUI is needed). Any cell error fails the test.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

import dhel_jax

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
# Seconds per cell and per notebook; a FAST run of any notebook takes well under a minute.
CELL_TIMEOUT_S = 240
NOTEBOOK_TIMEOUT_S = 300
# Committed notebooks may keep small PNGs, nothing else.
MAX_IMAGE_BYTES = 60_000

_FORCED_DEVICES = "--xla_force_host_platform_device_count=8"


def test_notebooks_are_found():
    assert len(NOTEBOOKS) >= 3, f"expected the notebooks in {ROOT / 'notebooks'}, found {NOTEBOOKS}"


def _kernel_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    )
    env["FAST"] = "1"
    env["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    # conftest.py simulates 8 CPU devices for the sharding tests; a notebook user has one.
    xla_flags = env.get("XLA_FLAGS", "").replace(_FORCED_DEVICES, "").strip()
    if xla_flags:
        env["XLA_FLAGS"] = xla_flags
    else:
        env.pop("XLA_FLAGS", None)
    return env


def _kernel_manager() -> KernelManager:
    # An empty search path leaves only ipykernel's built-in "python3" spec, which launches
    # sys.executable: the notebooks run on the interpreter (and venv) running the tests, never
    # on another "python3" kernel that happens to be installed for the user.
    specs = KernelSpecManager(kernel_dirs=[])
    return KernelManager(kernel_name="python3", kernel_spec_manager=specs)


@pytest.mark.timeout(NOTEBOOK_TIMEOUT_S)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_top_to_bottom(path: Path, tmp_path: Path):
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        km=_kernel_manager(),
        timeout=CELL_TIMEOUT_S,
        allow_errors=False,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute(env=_kernel_env())  # raises CellExecutionError on the first failing cell
    executed = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert all(cell.execution_count is not None for cell in executed)
    # Every notebook shows its results: at least one figure and one printed table.
    outputs = [out for cell in executed for out in cell.outputs]
    assert any("image/png" in out.get("data", {}) for out in outputs), "no figure was drawn"
    assert any(out.output_type == "stream" and out.name == "stdout" for out in outputs)


def _code_cells(path: Path) -> list[nbformat.NotebookNode]:
    return [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_without_outputs(path: Path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        assert "execution" not in cell.metadata, f"cell {i} keeps execution timings"
        if cell.cell_type != "code":
            continue
        assert cell.execution_count is None, f"cell {i} keeps an execution count"
        for out in cell.outputs:
            assert out.output_type == "display_data", f"cell {i} keeps a {out.output_type} output"
            kinds = set(out.get("data", {})) - {"text/plain"}
            assert kinds <= {"image/png"}, f"cell {i} keeps {sorted(kinds)}"
            size = len(out["data"].get("image/png", ""))
            assert size <= MAX_IMAGE_BYTES, f"cell {i} keeps a {size}-byte image"
    assert "widgets" not in nb.metadata, "widget state is output too"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_starts_with_the_colab_setup_cell(path: Path):
    first = _code_cells(path)[0].source
    assert 'find_spec("google.colab")' in first
    assert "pip" in first and "DHEL_JAX_SOURCE" in first
    assert re.search(r"^FAST = .*os\.environ\.get\(\"FAST\"", first, re.MULTILINE), first
    # The set-up cell is the only one that may install anything.
    for cell in _code_cells(path)[1:]:
        assert "pip" not in cell.source and "google.colab" not in cell.source


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_uses_only_the_public_api(path: Path):
    # __all__, plus the training stack's submodules (dhel_jax.models, dhel_jax.train, ...) that
    # the package loads on first attribute access and documents as public.
    public = {*dhel_jax.__all__, *dhel_jax._LAZY_SUBMODULES, "__version__"}
    for cell in _code_cells(path):
        assert not re.search(r"^\s*from dhel_jax\b", cell.source, re.MULTILINE), cell.source
        assert not re.search(r"^\s*import dhel_jax\.", cell.source, re.MULTILINE), cell.source
        for name in re.findall(r"\bdhel_jax\.(\w+)", cell.source):
            assert name in public, f"dhel_jax.{name} is not public"
