"""Images/second of the pretraining step, side by side with an equivalent PyTorch eager step.

Usage (from the repository root, with the project importable and torch installed)::

    PYTHONPATH=. python benchmarks/bench_train.py [--models resnet18_cifar,cpu_default]
        [--devices 1,2] [--rounds 5] [--steps-per-round 2] [--torch-threads N]
        [--torch-layouts nchw,channels_last] [--skip-model-step] [--out PATH]

Models (both with the DHEL loss at tau = 0.3 and SGD with momentum 0.9 and weight decay):

* ``resnet18_cifar``: ``configs/cifar10.py``'s ResNet-18 (CIFAR stem, head 512-512-128) at
  batch 128 of 32x32x3 images;
* ``cpu_default``: ``configs/fashion_mnist.py``'s model, views and batch size.

Contenders, each in its own process (XLA's device count is fixed at start-up, and PyTorch's
OpenMP threads would compete with XLA's in one process):

* ``jax full step, N dev``: ``dhel_jax.train``'s jitted step (uint8 batch -> on-device two-view
  augmentation -> encoder -> head -> loss -> gradients -> update) with the batch sharded over
  N XLA host devices (``--xla_force_host_platform_device_count=N``); online probe off;
* ``jax model step, N dev``: the same step without the augmentation (pre-made float views), the
  like-for-like comparison with PyTorch, whose augmentation runs in DataLoader workers;
* ``torch eager, nchw | channels_last``: the same architecture, loss and optimiser written from
  docs/spec.md: forward on the 2B views, DHEL, ``backward()``, ``SGD.step()``.

Two views count as two images: images/second = 2 B / (seconds per step). Every contender is
started and warmed up (compiled) first, one at a time; then each of ``--rounds`` rounds runs
every contender for ``--steps-per-round`` steps, in rotating order, so that the load of a shared
machine hits all of them alike. The median and the best step time are reported (on a shared
machine the best is the least disturbed). Results go to ``--out``
(default ``benchmarks/out/bench_train.json``) and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("resnet18_cifar", "cpu_default")


# ----------------------------------------------------------------------------------------------
# Model settings shared by both frameworks.


def bench_config(model: str):
    """The training config of ``model`` (SGD, DHEL, no online probe)."""
    sys.path.insert(0, str(ROOT))
    import importlib.util

    name = {"resnet18_cifar": "cifar10", "cpu_default": "fashion_mnist"}[model]
    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("dhel")
    if model == "resnet18_cifar":
        config.batch_size = 128
    config.optimizer.name = "sgd"
    config.optimizer.base_lr = 0.1
    config.optimizer.warmup_epochs = 0.0
    config.online_probe.enabled = False
    return config


def _arch(config) -> dict[str, Any]:
    from dhel_jax import data, models, train

    info = data.get_dataset_info(config.dataset)
    encoder = models.MODELS[config.model.name]()
    width = config.model.num_filters or encoder.num_filters
    return {
        "stage_sizes": tuple(encoder.stage_sizes),
        "width": width,
        "channels": info.image_shape[-1],
        "image_side": info.image_shape[0],
        "view": train.view_size(config),
        "hidden": config.model.head_hidden_dim,
        "out": config.model.head_out_dim,
        "batch": config.batch_size,
    }


# ----------------------------------------------------------------------------------------------
# Workers.


def serve(step) -> None:
    """Worker protocol: 2 warm-up steps, print READY; then for each line ``n`` on stdin, time
    ``n`` steps and print their durations (JSON list)."""
    for _ in range(2):
        step()
    print("READY", flush=True)
    for line in sys.stdin:
        times = []
        for _ in range(int(line)):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        print(json.dumps(times), flush=True)


def jax_step(model: str, augment: bool):
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from dhel_jax import parallel, train, train_config

    config = bench_config(model)
    arch = _arch(config)
    b = arch["batch"]
    mesh = parallel.data_mesh()
    counts = train.StepCounts(
        num_examples=100 * b, steps_per_epoch=100, total_steps=1000, warmup_steps=0
    )
    setup = train.make_training(config, mesh, counts)
    state = setup.init()
    rng = np.random.default_rng(0)
    shape = (arch["image_side"], arch["image_side"], arch["channels"])
    host = {
        "image": rng.integers(0, 256, (b, *shape), dtype=np.uint8),
        "label": rng.integers(0, 10, b).astype(np.int32),
    }
    batch = train.global_batch(host, setup.batch_sharding)
    if augment:

        def step():
            nonlocal state
            state, metrics = setup.train_step(state, batch)
            metrics["loss"].block_until_ready()

    else:
        # The same computation minus the augmentation, on pre-made views (interleaved pairs).
        loss_fn = train_config.loss_from_config(config.loss)
        tx = optax.chain(
            optax.add_decayed_weights(config.optimizer.weight_decay),
            optax.sgd(0.1, momentum=config.optimizer.momentum),
        )
        opt_state = jax.jit(tx.init)(state.params)
        views = jax.device_put(
            jnp.asarray(
                rng.normal(size=(2 * b, arch["view"], arch["view"], arch["channels"])), jnp.float32
            ),
            setup.batch_sharding,
        )

        @jax.jit
        def model_step(params, batch_stats, opt_state, x):
            def objective(p):
                out, mutated = setup.model.apply(
                    {"params": p, "batch_stats": batch_stats},
                    x,
                    train=True,
                    mutable=["batch_stats"],
                )
                z = out["projections"].reshape((b, 2, -1))
                return loss_fn(z[:, 0], z[:, 1]), mutated["batch_stats"]

            (loss, stats), grads = jax.value_and_grad(objective, has_aux=True)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), stats, opt_state, loss

        params, stats = state.params, state.batch_stats

        def step():
            nonlocal params, stats, opt_state
            params, stats, opt_state, loss = model_step(params, stats, opt_state, views)
            loss.block_until_ready()

    return step


def torch_step(model: str, channels_last: bool, threads: int):
    import torch
    from torch import nn
    from torch.nn import functional as F

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = bench_config(model)
    arch = _arch(config)
    b, width = arch["batch"], arch["width"]

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.proj = None
            if stride != 1 or cin != cout:
                self.proj = nn.Sequential(
                    nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
                )

        def forward(self, x):
            y = F.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            return F.relu(y + (x if self.proj is None else self.proj(x)))

    class Net(nn.Module):
        """ResNet with the CIFAR stem (3x3 conv, no max-pool) and the SimCLR projection head."""

        def __init__(self):
            super().__init__()
            layers = [
                nn.Conv2d(arch["channels"], width, 3, 1, 1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(),
            ]
            cin = width
            for i, blocks in enumerate(arch["stage_sizes"]):
                for j in range(blocks):
                    cout = width * 2**i
                    layers.append(Block(cin, cout, 2 if i > 0 and j == 0 else 1))
                    cin = cout
            self.encoder = nn.Sequential(*layers)
            self.head = nn.Sequential(
                nn.Linear(cin, arch["hidden"], bias=False),
                nn.BatchNorm1d(arch["hidden"]),
                nn.ReLU(),
                nn.Linear(arch["hidden"], arch["out"]),
            )

        def forward(self, x):
            h = self.encoder(x).mean(dim=(2, 3))
            return self.head(h)

    def dhel(z1, z2, tau: float = 0.3):
        """docs/spec.md dhel (include_augs=True): -u.v/tau + LSE(u.u/tau) + LSE(v.v/tau), j != i."""
        u, v = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
        eye = torch.eye(u.shape[0], dtype=torch.bool)
        pos = (u * v).sum(1) / tau
        lse_u = torch.logsumexp((u @ u.T / tau).masked_fill(eye, float("-inf")), 1)
        lse_v = torch.logsumexp((v @ v.T / tau).masked_fill(eye, float("-inf")), 1)
        return (-pos + lse_u + lse_v).mean()

    net = Net()
    x = torch.randn(2 * b, arch["channels"], arch["view"], arch["view"])
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(
        net.parameters(),
        lr=0.1,
        momentum=config.optimizer.momentum,
        weight_decay=config.optimizer.weight_decay,
    )

    def step():
        opt.zero_grad(set_to_none=True)
        z = net(x)
        loss = dhel(z[0::2], z[1::2])
        loss.backward()
        opt.step()

    return step


# ----------------------------------------------------------------------------------------------
# Orchestration.


class _Worker:
    """A contender in its own process, warmed up and waiting for its turn."""

    def __init__(self, name: str, args: list[str], env: dict[str, str]):
        self.name = name
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", *args],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.times: list[float] = []

    def wait_ready(self) -> None:
        line = self.proc.stdout.readline()
        if line.strip() != "READY":
            raise RuntimeError(f"{self.name}: worker failed to start (exit {self.proc.poll()})")

    def run(self, steps: int) -> None:
        self.proc.stdin.write(f"{steps}\n")
        self.proc.stdin.flush()
        self.times += json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--devices", default=f"1,{os.cpu_count()}")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps-per-round", type=int, default=2)
    parser.add_argument("--torch-threads", type=int, default=os.cpu_count())
    parser.add_argument("--torch-layouts", default="nchw,channels_last")
    parser.add_argument("--skip-model-step", action="store_true")
    parser.add_argument(
        "--default-xla-flags",
        action="store_true",
        help="run jax with XLA:CPU's default options instead of those dhel-train sets",
    )
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "bench_train.json"))
    parser.add_argument("--worker", nargs="*")
    args = parser.parse_args()

    if args.worker is not None:
        kind, model, option = args.worker
        if kind == "torch":
            serve(torch_step(model, option == "channels_last", int(os.environ["TORCH_THREADS"])))
        else:
            serve(jax_step(model, augment=kind == "jax_full"))
        return

    sys.path.insert(0, str(ROOT))
    from dhel_jax.cpu import cpu_xla_flags

    base_env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    base_env["PYTHONPATH"] = str(ROOT)
    base_env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    results: dict[str, Any] = {
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "processor": platform.processor(),
            "loadavg_start": os.getloadavg(),
        },
        "xla_flags": "" if args.default_xla_flags else " ".join(cpu_xla_flags("")),
        "rounds": args.rounds,
        "steps_per_round": args.steps_per_round,
        "runs": [],
    }
    print(f"load average at start: {os.getloadavg()}", flush=True)
    for model in args.models.split(","):
        batch = bench_config(model).batch_size
        workers = []
        for n in [int(d) for d in args.devices.split(",")]:
            # The XLA:CPU options dhel-train sets (dhel_jax.cpu.CPU_XLA_FLAGS), unless
            # --default-xla-flags asks for the compiler's defaults.
            extra = [] if args.default_xla_flags else cpu_xla_flags("")
            xla_flags = " ".join([f"--xla_force_host_platform_device_count={n}", *extra])
            env = dict(base_env, XLA_FLAGS=xla_flags)
            kinds = ["full"] if args.skip_model_step else ["full", "model"]
            for kind in kinds:
                workers.append(
                    _Worker(f"jax {kind} step, {n} dev", [f"jax_{kind}", model, "-"], env)
                )
                # Compile one at a time: concurrent compilations slow each other down.
                workers[-1].wait_ready()
        env = dict(base_env, TORCH_THREADS=str(args.torch_threads))
        for layout in [x for x in args.torch_layouts.split(",") if x]:
            workers.append(_Worker(f"torch eager, {layout}", ["torch", model, layout], env))
            workers[-1].wait_ready()
        for r in range(args.rounds):
            for w in workers[r % len(workers) :] + workers[: r % len(workers)]:
                w.run(args.steps_per_round)
        for w in workers:
            w.close()
            median, best = statistics.median(w.times), min(w.times)
            run = {
                "model": model,
                "contender": w.name,
                "batch": batch,
                "seconds_per_step": median,
                "images_per_sec": 2 * batch / median,
                "best_seconds_per_step": best,
                "best_images_per_sec": 2 * batch / best,
                "times": w.times,
            }
            results["runs"].append(run)
            print(
                f"{model:15s} {w.name:24s} median {median:7.3f} s/step {2 * batch / median:8.1f} "
                f"img/s | best {best:7.3f} s/step {2 * batch / best:8.1f} img/s",
                flush=True,
            )
    results["machine"]["loadavg_end"] = os.getloadavg()
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(results, indent=2))
    print(f"load average at end: {os.getloadavg()}; results in {out_path}")


if __name__ == "__main__":
    main()
