"""XLA:CPU options for training and evaluation on a CPU-only host.

Needs nothing but the standard library, and starts no JAX backend: XLA reads ``XLA_FLAGS``
once, when JAX's first computation starts it, so :func:`use_cpu_xla_flags` must run before that
(``dhel-train`` and ``dhel-eval`` call it first thing; notebooks and scripts that train
in-process can too).
"""

from __future__ import annotations

import glob
import importlib.metadata
import importlib.util
import os

#: XLA options that dhel-train and dhel-eval add on CPU-only hosts: route convolutions,
#: matmuls and reductions to YNNPACK (XLA:CPU's default sends only reductions there, and
#: ``=dot`` alone sends the reductions back to a slow reduce-window path). Measured in
#: benchmarks/README.md ("Training step"); tests/test_train.py checks that a train step with
#: them equals one without them within float32 round-off. The second waits 10 minutes, not 40 s,
#: for the devices of a CPU split to meet at a collective (BatchNorm statistics re-estimated
#: over 2 devices): on a busy host one device can fall that far behind, and XLA then aborts.
CPU_XLA_FLAGS = {
    "--xla_cpu_experimental_ynn_fusion_type": "dot,reduce",
    "--xla_cpu_collective_call_terminate_timeout_seconds": "600",
}
# The jaxlib minor series whose XLA was checked to accept both flags with these values (jaxlib
# 0.10.2, 0.11.2, 0.12.0.1 and 0.12.1): an XLA that does not know a flag (or a value) in
# XLA_FLAGS aborts at start-up, so on any other series none is added. Add a series only after
# checking it; tests/test_train.py runs a train step with the flags on the jaxlib installed.
_CPU_FLAGS_JAXLIB_SERIES = frozenset({(0, 10), (0, 11), (0, 12)})

_GPU_PLUGINS = (
    "jax_cuda12_plugin",
    "jax_cuda13_plugin",
    "jax_rocm6_plugin",
    "jax_rocm7_plugin",
)


# Cloud TPU chips on the PCI bus: Google's vendor id and the device ids of TPU v3 to TPU7x (the
# table JAX itself reads).
_GOOGLE_PCI_VENDOR = "0x1ae0"
_TPU_PCI_DEVICES = frozenset({"0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076"})


def tpu_chips_present(pci_devices: str = "/sys/bus/pci/devices") -> bool:
    """Whether a TPU chip sits on this host's PCI bus (read from sysfs, before any JAX backend
    starts; ``False`` where sysfs is absent)."""
    for vendor in glob.glob(os.path.join(pci_devices, "*", "vendor")):
        try:
            with open(vendor) as f:
                if f.read().strip() != _GOOGLE_PCI_VENDOR:
                    continue
            with open(os.path.join(os.path.dirname(vendor), "device")) as f:
                if f.read().strip() in _TPU_PCI_DEVICES:
                    return True
        except OSError:
            continue
    return False


def accelerator_installed() -> bool:
    """Whether JAX will start an accelerator backend: ``JAX_PLATFORMS`` names a non-CPU one,
    or (unset) a CUDA or ROCm plugin is installed, or libtpu is and a TPU chip is on the PCI
    bus. libtpu without a chip (installed for ``dhel-compile`` on a CPU host) leaves JAX on the
    CPU, which then gets the CPU flags."""
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.split(",")[0].strip() not in ("cpu", "")
    if any(importlib.util.find_spec(name) is not None for name in _GPU_PLUGINS):
        return True
    return importlib.util.find_spec("libtpu") is not None and tpu_chips_present()


def cpu_xla_flags(xla_flags: str, jaxlib_version: str | None = None) -> list[str]:
    """The :data:`CPU_XLA_FLAGS` to append to ``xla_flags`` (the user's ``XLA_FLAGS``): each
    one the user does not already set, and none on a jaxlib outside the validated series."""
    if jaxlib_version is None:
        try:
            jaxlib_version = importlib.metadata.version("jaxlib")
        except importlib.metadata.PackageNotFoundError:
            return []
    if _minor_series(jaxlib_version) not in _CPU_FLAGS_JAXLIB_SERIES:
        return []
    return [f"{name}={value}" for name, value in CPU_XLA_FLAGS.items() if name not in xla_flags]


def _minor_series(version: str) -> tuple[int, int] | None:
    """``(major, minor)`` of a version string such as ``0.12.0.1``; None if it has none."""
    parts = version.split(".")
    if len(parts) < 2 or not (parts[0].isdigit() and parts[1].isdigit()):
        return None
    return int(parts[0]), int(parts[1])


def use_cpu_xla_flags() -> list[str]:
    """Adds :data:`CPU_XLA_FLAGS` to ``XLA_FLAGS`` as ``dhel-train`` does, for code that trains
    in-process (a notebook, a script): only on a CPU-only host, never over a flag already set,
    and only on the validated jaxlib series. Call it before JAX's first computation, which is
    when XLA reads ``XLA_FLAGS``. Returns the flags it added."""
    if accelerator_installed():
        return []
    xla_flags = os.environ.get("XLA_FLAGS", "")
    added = cpu_xla_flags(xla_flags)
    if added:
        os.environ["XLA_FLAGS"] = " ".join([xla_flags, *added]).strip()
    return added
