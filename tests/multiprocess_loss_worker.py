"""One process of tests/test_sharding.py::test_two_processes_equal_single_process.

Usage: python multiprocess_loss_worker.py PROCESS_ID PORT OUT_DIR. Each process
has 2 CPU devices; together they form a 4-device ('data',) mesh.
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402


def main(process_id: int, port: int, out_dir: str) -> None:
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except Exception as err:  # noqa: BLE001 - older/newer jaxlibs name this differently
        print("CPU_COLLECTIVES_UNAVAILABLE", err, flush=True)
        return
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)
    from jax.experimental import multihost_utils

    from dhel_jax import losses, parallel

    assert jax.process_count() == 2 and jax.device_count() == 4, (
        jax.process_count(),
        jax.devices(),
    )
    rng = np.random.default_rng(123)
    z1 = rng.normal(size=(64, 32)).astype(np.float32)
    z2 = (z1 + 0.5 * rng.normal(size=z1.shape)).astype(np.float32)
    if process_id == 0:
        np.savez(os.path.join(out_dir, "batch.npz"), z1=z1, z2=z2)

    mesh = parallel.data_mesh()
    sharding = parallel.batch_sharding(mesh)
    g1_global = jax.make_array_from_callback(z1.shape, sharding, lambda idx: z1[idx])
    g2_global = jax.make_array_from_callback(z2.shape, sharding, lambda idx: z2[idx])
    for name, loss_fn in losses.LOSSES.items():
        fn = jax.jit(jax.value_and_grad(parallel.sharded_loss(loss_fn, mesh), argnums=(0, 1)))
        loss, (g1, g2) = fn(g1_global, g2_global)
        g1 = multihost_utils.process_allgather(g1, tiled=True)
        g2 = multihost_utils.process_allgather(g2, tiled=True)
        if process_id == 0:
            np.savez(os.path.join(out_dir, f"{name}.npz"), loss=np.asarray(loss), g1=g1, g2=g2)
    multihost_utils.sync_global_devices("done")
    print("worker", process_id, "ok", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
