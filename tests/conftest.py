"""Test-suite set-up: 8 simulated CPU devices, quiet TensorFlow, no network.

XLA_FLAGS must be set before JAX initialises its backends, so it is set here,
before any test module imports jax. Single-device tests are unaffected: an
un-sharded computation runs on device 0 as usual. Tests that need float64 use
``with jax.enable_x64(True):`` locally.
"""

import os

# XLA:CPU aborts the process when a cross-device collective waits 40 s for its peers, which
# a loaded 2-core machine running 8 simulated devices can exceed; give them 10 minutes.
for _flag in (
    "--xla_force_host_platform_device_count=8",
    "--xla_cpu_collective_call_terminate_timeout_seconds=600",
):
    if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Tests never download: TFDS must use local or mocked data.
os.environ.setdefault("TFDS_DISABLE_GCS", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def rng() -> np.random.Generator:
    """A fixed-seed NumPy generator (tests are deterministic)."""
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def eight_devices():
    """The 8 simulated CPU devices."""
    devices = jax.devices()
    assert len(devices) == 8, f"expected 8 simulated CPU devices, got {devices}"
    return devices
