"""Layering and public-API guards: the library core imports with only jax, numpy and optax, the
train step (``dhel_jax.step``) with only jax, flax, optax and dm_pix, and no module of dhel_jax
reaches into JAX internals (they change without notice between releases).
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Private JAX modules and aval fields that are not public API.
_PRIVATE_JAX = re.compile(
    r"jax\._src|from\s+jax\s+import\s+_src|jax\.interpreters|jaxlib\.|manual_axis_type"
    r"|hardware_utils|\.aval\b"
)


def test_no_private_jax_api_in_the_library():
    hits = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in sorted((ROOT / "dhel_jax").glob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if _PRIVATE_JAX.search(line)
    ]
    assert not hits, "private JAX API used:\n" + "\n".join(hits)


@pytest.mark.parametrize(
    "line", ["from jax._src import core", "aval.manual_axis_type", "import jaxlib.xla_client"]
)
def test_private_jax_pattern_catches(line):
    assert _PRIVATE_JAX.search(line)


# Run in a fresh interpreter: the training stack and the test-only packages raise ImportError,
# as in an environment that installed only the core (jax, numpy, optax and what they need:
# optax imports absl).
_CORE_ONLY = textwrap.dedent(
    """
    import importlib.abc
    import sys

    BLOCKED = {
        "flax", "tensorflow", "tensorflow_datasets", "grain", "ml_collections", "orbax",
        "chex", "dm_pix", "array_record", "tensorboardX", "matplotlib", "cv2",
        "sklearn", "torch", "tqdm", "etils",
    }

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"blocked in the core-only test: {name}")
            return None

    sys.meta_path.insert(0, Block())

    import jax.numpy as jnp
    import numpy as np

    import dhel_jax
    from dhel_jax import kernels, losses, metrics, pairwise, probes

    rng = np.random.default_rng(0)
    z1 = jnp.asarray(rng.normal(size=(16, 4)), jnp.float32)
    z2 = z1 + 0.1
    for name in ("dhel", "kcl"):
        value = float(losses.get_loss(name)(z1, z2))
        assert np.isfinite(value), (name, value)
    assert np.isfinite(float(metrics.uniformity(pairwise.l2_normalize(z1))))
    assert kernels.get_kernel("gaussian", 2.0).name == "gaussian"
    assert callable(dhel_jax.dhel) and callable(probes.knn_accuracy)
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    assert not leaked, leaked
    print("core-only ok")
    """
)


def _run_fresh(code: str) -> str:
    """Runs ``code`` in a fresh interpreter on the CPU; returns its stdout."""
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def test_losses_and_metrics_import_with_core_dependencies_only():
    assert "core-only ok" in _run_fresh(_CORE_ONLY)


# The data and run stack (configs, input pipeline, checkpoints, logging) is absent, as on an
# accelerator host: an entry of None in sys.modules makes its import raise ImportError.
_STEP_ONLY = textwrap.dedent(
    """
    import sys

    ABSENT = (
        "ml_collections", "grain", "orbax", "tensorflow", "tensorflow_datasets",
        "array_record", "tensorboardX", "tqdm",
    )
    for name in ABSENT:
        sys.modules[name] = None

    import jax
    import jax.numpy as jnp

    from dhel_jax import losses, models, optimizers, parallel, step

    model = models.get_model("resnet_tiny", head_hidden_dim=16, head_out_dim=8)
    tx = optimizers.make_optimizer("sgd", learning_rate=0.1, weight_decay=0.0)
    state = jax.eval_shape(
        lambda: step.create_train_state(
            jax.random.key(0), model=model, tx=tx, probe_tx=tx, image_shape=(8, 8, 3),
            num_classes=10,
        )
    )
    train_step = step.make_train_step(
        parallel.data_mesh(jax.devices()[:1]),
        model=model,
        tx=tx,
        loss_fn=losses.get_loss("dhel"),
        learning_rate_fn=lambda count: 0.1,
        view_kwargs={"out_size": 8},
        probe_tx=tx,
        geometry_every_steps=2,
    )
    batch = {
        "image": jax.ShapeDtypeStruct((4, 8, 8, 3), jnp.uint8),
        "label": jax.ShapeDtypeStruct((4,), jnp.int32),
    }
    _, metrics = jax.eval_shape(train_step, state, batch)
    assert {"loss", "probe_accuracy", "finite", *step.GEOMETRY_METRICS} <= set(metrics)
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in ABSENT and sys.modules[m])
    assert not leaked, leaked
    print("step-only ok")
    """
)


def test_the_step_imports_and_traces_without_the_data_and_run_stack():
    assert "step-only ok" in _run_fresh(_STEP_ONLY)


def _pci_device(bus: Path, name: str, vendor: str, dev: str) -> None:
    (bus / name).mkdir()
    (bus / name / "vendor").write_text(vendor + "\n")
    (bus / name / "device").write_text(dev + "\n")


def test_tpu_detection_reads_the_pci_bus(tmp_path):
    """dhel-train's multi-process auto-detection finds a TPU chip from sysfs alone."""
    from dhel_jax import cpu

    assert not cpu.tpu_chips_present(str(tmp_path))
    _pci_device(tmp_path, "0000:00:04.0", "0x1ae0", "0x0042")  # a Google gVNIC: not a TPU
    _pci_device(tmp_path, "0000:00:05.0", "0x10de", "0x0063")  # another vendor's 0x0063
    assert not cpu.tpu_chips_present(str(tmp_path))
    _pci_device(tmp_path, "0000:00:06.0", "0x1ae0", "0x0063")  # TPU v5e
    assert cpu.tpu_chips_present(str(tmp_path))
    assert not cpu.tpu_chips_present(str(tmp_path / "absent"))


def test_libtpu_without_a_tpu_chip_leaves_the_host_a_cpu_host(tmp_path, monkeypatch):
    """libtpu installed for dhel-compile on a CPU host: JAX stays on the CPU, so the CPU flags
    and device split apply; with a chip on the bus (or a GPU plugin) they do not."""
    import importlib.util

    from dhel_jax import cpu

    installed: set[str] = set()
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args):
        if name in installed:
            return object()
        if name == "libtpu" or name in cpu._GPU_PLUGINS:
            return None
        return real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    real_chips_present = cpu.tpu_chips_present
    monkeypatch.setattr(cpu, "tpu_chips_present", lambda: real_chips_present(str(tmp_path)))
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    assert not cpu.accelerator_installed()
    installed.add("libtpu")
    assert not cpu.accelerator_installed()
    monkeypatch.setenv("XLA_FLAGS", "")
    assert cpu.use_cpu_xla_flags() == cpu.cpu_xla_flags("") != []
    _pci_device(tmp_path, "0000:00:06.0", "0x1ae0", "0x0063")  # TPU v5e
    assert cpu.accelerator_installed()
    assert cpu.use_cpu_xla_flags() == []
    installed.clear()
    assert not cpu.accelerator_installed()
    installed.add("jax_cuda12_plugin")
    assert cpu.accelerator_installed()
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert not cpu.accelerator_installed()
