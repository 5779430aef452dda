"""Tests for dhel_jax.train and the dhel-train entry point (dhel_jax.main).

Everything trains ResNet-tiny on 16x16 views of ``tfds.testing.mock_data`` Fashion-MNIST
(64 records, batch 16). Compiled steps go to a persistent XLA cache shared with the subprocesses,
so a program compiled once (e.g. by run A of the resume test) is not compiled again.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from absl import flags

from dhel_jax import checkpointing, cpu, losses, main, parallel, train, train_config
from tests import train_worker
from tests.helpers import hash_tree, parse_train_command, truncate_state_arrays
from tests.train_worker import COMPILER_OPTIONS, MOCK_EXAMPLES, fixed_batch, tiny_config

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("train_worker.py")
CONFIGS = sorted((ROOT / "configs").glob("*.py"))


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """A persistent XLA cache for this module and its subprocesses."""
    path = str(tmp_path_factory.mktemp("xla_cache"))
    keys = {
        "jax_compilation_cache_dir": path,
        "jax_persistent_cache_min_compile_time_secs": 0.0,
        "jax_persistent_cache_min_entry_size_bytes": 0,
    }
    old = {k: getattr(jax.config, k) for k in keys}
    for k, v in keys.items():
        jax.config.update(k, v)
    yield path
    for k, v in old.items():
        jax.config.update(k, v)


@pytest.fixture
def mocked():
    with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
        yield


def _env(cache_dir: str, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT)
    env["JAX_COMPILATION_CACHE_DIR"] = cache_dir
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    env.update(extra)
    return env


def _leaves(tree) -> dict[str, np.ndarray]:
    return {
        jax.tree_util.keystr(path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def _metrics(workdir: Path) -> list[dict]:
    return [
        json.loads(line)
        for line in (workdir / train.METRICS_FILENAME).read_text().split("\n")
        if line
    ]


# ----------------------------------------------------------------------------------------------
# Configuration.


def test_loss_config_holds_every_hyperparameter_of_every_loss_as_none():
    expected = {
        "tau": float,
        "symmetric": bool,
        "sigma": float,
        "include_augs": bool,
        "kernel": str,
        "t": float,
        "gamma": float,
        "alpha": float,
        "lam": float,
        "block_size": int,
    }
    assert train_config.loss_config_fields() == expected
    loss = train_config.default_config().loss
    assert set(loss) == {"name", *expected}
    assert all(loss[k] is None for k in expected)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_config_file_validates_with_every_loss(path):
    spec = importlib.util.spec_from_file_location(f"configs_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for loss in (None, *losses.LOSSES):
        config = module.get_config(loss)
        train_config.validate_config(config, device_count=8, process_count=1)
        assert config.loss.name == (loss or "dhel")


def _bad(**changes):
    config = tiny_config()
    for key, value in changes.items():
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        (
            {"loss.name": "nce"},
            r"config.loss.name: unknown loss 'nce'; accepted losses are 'info_nce'",
        ),
        (
            {"loss.name": "kcl", "loss.tau": 0.2},
            r"config.loss.tau is set but loss 'kcl' takes kernel, t, gamma, block_size",
        ),
        ({"loss.name": "kcl", "loss.kernel": "cauchy"}, r"unknown kernel 'cauchy'.*'gaussian'"),
        ({"loss.tau": -1.0}, r"tau must be > 0"),
        ({"dataset": "mnist"}, r"config.dataset: Unknown dataset 'mnist'; accepted names"),
        ({"model.name": "resnet101"}, r"config.model.name: unknown value 'resnet101'.*'resnet18'"),
        ({"model.stem": "vit"}, r"config.model.stem: unknown value 'vit'"),
        ({"optimizer.name": "lamb"}, r"config.optimizer.name: unknown optimizer 'lamb'.*'lars'"),
        ({"batch_size": 12}, r"batch_size = 12 does not split evenly over the 8 devices.*16"),
        ({"augment.flip_prob": 1.5}, r"config.augment: .*flip_prob must be a probability"),
        ({"optimizer.base_lr": 0.0}, r"config.optimizer.base_lr must be a finite number > 0"),
        ({"log_every_steps": 0}, r"config.log_every_steps must be an integer >= 1"),
    ],
)
def test_bad_config_values_fail_clearly(changes, match):
    with pytest.raises(ValueError, match=match):
        train_config.validate_config(_bad(**changes), device_count=8, process_count=1)


def test_bad_config_fails_before_any_data_or_workdir(tmp_path):
    workdir = tmp_path / "run"
    with pytest.raises(ValueError, match="unknown loss"):
        train.train_and_evaluate(_bad(**{"loss.name": "nope"}), str(workdir))
    assert not workdir.exists()


def test_cli_overrides_are_typed_and_unknown_fields_rejected(capsys):
    cfg = str(ROOT / "configs" / "fashion_mnist.py")
    config = parse_train_command(
        f"--config={cfg}", "--config.loss.tau=0.2", "--config.batch_size=128"
    )
    assert config.loss.tau == 0.2 and config.batch_size == 128
    assert config.loss.sigma is None
    assert parse_train_command(f"--config={ROOT / 'configs' / 'cifar10.py'}:kcl").loss.name == "kcl"
    for bad, message in (
        ("--config.loss.foo=1", "--config.loss.foo=1: config.loss has no field 'foo'"),
        ("--config.optimiser.name=sgd", "config has no field 'optimiser'"),
        ("--config.batch_size=many", "--config.batch_size=many: invalid literal for int"),
        ("--config.loss.tau=hot", "--config.loss.tau=hot: could not convert"),
    ):
        with pytest.raises(SystemExit):
            parse_train_command(f"--config={cfg}", bad)
        assert message in capsys.readouterr().err


def test_cpu_device_count_divides_the_batch():
    assert main.cpu_device_count(256, "auto", cores=2) == 2
    assert main.cpu_device_count(256, "auto", cores=16) == 16
    assert main.cpu_device_count(96, "auto", cores=5) == 4
    assert main.cpu_device_count(7, "auto", cores=2) == 1
    assert main.cpu_device_count(256, "3") == 3


def test_cpu_backend_options_never_override_user_xla_flags(monkeypatch):
    ynn = "--xla_cpu_experimental_ynn_fusion_type"
    wait = "--xla_cpu_collective_call_terminate_timeout_seconds"
    assert cpu.cpu_xla_flags("", "0.10.2") == [f"{ynn}=dot,reduce", f"{wait}=600"]
    assert cpu.cpu_xla_flags(f"{ynn}=dot", "0.10.2") == [f"{wait}=600"]
    assert cpu.cpu_xla_flags(f"{ynn}=dot {wait}=30", "0.10.2") == []
    both = [f"{ynn}=dot,reduce", f"{wait}=600"]
    for version in ("0.11.2", "0.12.0.1", "0.12.1"):  # every validated series
        assert cpu.cpu_xla_flags("", version) == both
    for version in ("0.9.2", "0.13.0", "1.0.0", "unknown"):  # not validated there: nothing added
        assert cpu.cpu_xla_flags("", version) == []
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    user = f"--xla_force_host_platform_device_count=3 {ynn}=eltwise"
    monkeypatch.setenv("XLA_FLAGS", user)
    main._configure_cpu_backend(256)
    assert os.environ["XLA_FLAGS"] == f"{user} {wait}=600"  # the user's ynn value stays
    main.define_train_flags()  # --cpu_devices, which dhel-eval shares.
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false")
    flags.FLAGS(["dhel-train"])
    try:
        main._configure_cpu_backend(12)
    finally:
        flags.FLAGS.unparse_flags()
    # The default --cpu_devices=1 adds no device split.
    expected = ["--xla_cpu_enable_fast_math=false", *cpu.cpu_xla_flags("")]
    assert os.environ["XLA_FLAGS"] == " ".join(expected)
    want = main.cpu_device_count(12, "auto")
    split = [f"--xla_force_host_platform_device_count={want}"] if want > 1 else []
    # --cpu_devices=auto, or dhel-eval's default when the flag is not given.
    for argv, default in ((["--cpu_devices=auto"], "1"), ([], "auto")):
        monkeypatch.setenv("XLA_FLAGS", "")
        flags.FLAGS(["dhel-train", *argv])
        try:
            main._configure_cpu_backend(12, default_devices=default)
        finally:
            flags.FLAGS.unparse_flags()
        assert os.environ["XLA_FLAGS"] == " ".join([*cpu.cpu_xla_flags(""), *split])
    # An explicit --cpu_devices wins over dhel-eval's default.
    monkeypatch.setenv("XLA_FLAGS", "")
    flags.FLAGS(["dhel-eval", "--cpu_devices=1"])
    try:
        main._configure_cpu_backend(12, default_devices="auto")
    finally:
        flags.FLAGS.unparse_flags()
    assert os.environ["XLA_FLAGS"] == " ".join(cpu.cpu_xla_flags(""))
    # On an accelerator host nothing is added.
    monkeypatch.setenv("JAX_PLATFORMS", "cuda")
    monkeypatch.setenv("XLA_FLAGS", "")
    main._configure_cpu_backend(256)
    assert os.environ["XLA_FLAGS"] == ""


# ----------------------------------------------------------------------------------------------
# The train step.


@pytest.mark.parametrize("name", list(losses.LOSSES))
def test_each_loss_trains_finitely_and_decreases_on_a_fixed_batch(name, eight_devices):
    """20 steps on one batch (fresh augmentations every step): every metric finite (the
    online geometry on steps 10 and 20, NaN on the others), and the loss of the last 5 steps
    below that of the first 5."""
    config = tiny_config()
    config.loss.name = name
    config.geometry_every_steps = 10
    config.optimizer.name = "adamw"
    config.optimizer.base_lr = 0.01
    config.optimizer.lr_scaling = "none"
    config.optimizer.weight_decay = 0.0
    counts = train.StepCounts(num_examples=64, steps_per_epoch=4, total_steps=20, warmup_steps=0)
    setup = train.make_training(
        config, parallel.data_mesh(eight_devices[:1]), counts, compiler_options=COMPILER_OPTIONS
    )
    state = setup.init()
    batch = train.global_batch(fixed_batch(), setup.batch_sharding)
    history = []
    for step in range(1, 21):
        state, metrics = setup.train_step(state, batch)
        host = jax.device_get(metrics)
        assert host.pop("finite"), host
        geometry = {k: host.pop(k) for k in train.GEOMETRY_METRICS}
        assert all(np.isfinite(v) == (step % 10 == 0) for v in geometry.values()), geometry
        assert all(np.isfinite(v) for v in host.values()), host
        history.append(host["loss"])
    assert {"alignment", "energy", "grad_norm", "learning_rate", "probe_accuracy"} <= set(host)
    assert np.mean(history[-5:]) < np.mean(history[:5]), history
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state))
    assert int(state.step) == 20


def test_step_crops_images_in_canvases_by_their_sizes(eight_devices):
    """A batch with ``'size'`` (ImageNet-100's canvases), sharded over 8 devices: sizes that
    cover the whole canvas give the loss of the plain batch (the same crops), smaller sizes
    another loss."""
    setup = train_worker.build_training(eight_devices)
    plain = fixed_batch()
    full = dict(plain, size=np.full((16, 2), 28, np.int32))
    part = dict(plain, size=np.tile(np.int32([[20, 14]]), (16, 1)))
    loss = {}
    for name, batch in (("plain", plain), ("full", full), ("part", part)):
        _, metrics = setup.train_step(setup.init(), train.global_batch(batch, setup.batch_sharding))
        loss[name] = float(metrics["loss"])
    np.testing.assert_allclose(loss["full"], loss["plain"], rtol=1e-5)
    assert abs(loss["part"] - loss["plain"]) > 1e-3, loss


def test_make_train_step_rejects_a_keyword_train_step_does_not_take():
    from dhel_jax import step

    mesh = parallel.data_mesh(jax.devices()[:1])
    with pytest.raises(TypeError, match=r"unknown keyword\(s\) 'loss'; accepted are .*loss_fn"):
        step.make_train_step(mesh, loss=losses.get_loss("dhel"))
    with pytest.raises(TypeError, match="'sharding'"):  # the mesh's; not the caller's to set
        step.make_train_step(mesh, sharding=None)


@pytest.mark.slow
def test_step_on_8_devices_equals_1_device(eight_devices):
    """Same loss, updated parameters, BatchNorm statistics and probe within 1e-5, two steps.

    The views come from per-example keys of (rng, step), so they do not depend on the split;
    this is also what makes dhel-train's CPU split (--cpu_devices) change nothing but round-off.
    """
    results = []
    for devices in (eight_devices, eight_devices[:1]):
        setup = train_worker.build_training(devices)
        state = setup.init()
        batch = train.global_batch(fixed_batch(), setup.batch_sharding)
        losses_ = []
        for _ in range(2):
            if len(devices) == 1:
                train_worker.assert_step_clear_of_kinks(setup, state, fixed_batch())
            state, metrics = setup.train_step(state, batch)
            losses_.append(float(metrics["loss"]))
        results.append((losses_, _leaves(state)))
    (loss8, state8), (loss1, state1) = results
    np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
    assert state8.keys() == state1.keys()
    for key in state8:
        np.testing.assert_allclose(state8[key], state1[key], rtol=1e-5, atol=1e-5, err_msg=key)
    # Two steps really moved the parameters and statistics.
    fresh = _leaves(train_worker.build_training(eight_devices[:1]).init())
    moved = [k for k in fresh if "params" in k and not np.array_equal(fresh[k], state1[k])]
    assert any("batch_stats" in k and not np.array_equal(fresh[k], state1[k]) for k in fresh)
    assert len(moved) > len(fresh) // 4


# ----------------------------------------------------------------------------------------------
# Runs: logging, checkpoints, resume.


@pytest.fixture(scope="module")
def run_a(tmp_path_factory, compilation_cache):
    """Run A: the tiny config's 8 steps, uninterrupted (checkpoints at 4 and 8), given a
    workdir relative to the current directory as on the command line (Orbax itself needs
    absolute paths)."""
    parent = tmp_path_factory.mktemp("cwd")
    seen = []
    cwd = os.getcwd()
    os.chdir(parent)
    try:
        with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
            state = train.train_and_evaluate(
                tiny_config(),
                "run_a",
                hooks=[lambda step, m: seen.append((step, m["loss"]))],
                compiler_options=COMPILER_OPTIONS,
            )
    finally:
        os.chdir(cwd)
    return parent / "run_a", state, seen


def test_run_logs_metrics_tensorboard_config_and_checkpoints(run_a):
    workdir, state, seen = run_a
    assert int(state.step) == 8
    assert [s for s, _ in seen] == list(range(1, 9))
    records = _metrics(workdir)
    assert [r["step"] for r in records] == list(range(1, 9))
    for r in records:
        for key in ("loss", "alignment", "energy", "learning_rate", "grad_norm", "probe_accuracy"):
            assert np.isfinite(r[key]), (key, r)
        assert r["epoch"] == pytest.approx(r["step"] * 16 / 64)
    assert all("images_per_sec" in r for r in records[1:])
    assert [r["loss"] for r in records] == pytest.approx([loss for _, loss in seen])
    # The logged learning rate is the schedule: linear scaling 1.0 * 16 / 256, cosine decay.
    lr = [1.0 * 16 / 256 * (1 + np.cos(np.pi * t / 8)) / 2 for t in range(8)]
    np.testing.assert_allclose([r["learning_rate"] for r in records], lr, rtol=1e-5)
    assert list(workdir.glob("events.out.tfevents.*"))
    saved = json.loads((workdir / "config.json").read_text())
    assert saved == json.loads(json.dumps(tiny_config().to_dict()))
    assert checkpointing.available_steps(workdir) == [4, 8]
    config, variables, step = checkpointing.restore_for_eval(workdir)
    assert step == 8 and config.model.name == "resnet_tiny"
    for key, value in _leaves({"params": state.params, "batch_stats": state.batch_stats}).items():
        np.testing.assert_array_equal(_leaves(variables)[key], value)


def test_resume_after_sigkill_is_exact(run_a, tmp_path, compilation_cache, mocked):
    """Run B is SIGKILLed in a subprocess right after its step-4 checkpoint, then resumed here:
    the final state is bitwise equal to run A's, and every step saw the same batch (same
    per-step losses, same data-iterator state)."""
    workdir_a, state_a, _ = run_a
    workdir = tmp_path / "run_b"
    proc = subprocess.run(
        [sys.executable, str(WORKER), "kill", str(workdir), "4"],
        env=_env(compilation_cache),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert checkpointing.available_steps(workdir) == [4]

    state_b = train.train_and_evaluate(
        tiny_config(), str(workdir), compiler_options=COMPILER_OPTIONS
    )
    leaves_a, leaves_b = _leaves(state_a), _leaves(state_b)
    assert leaves_a.keys() == leaves_b.keys()
    for key in leaves_a:
        np.testing.assert_array_equal(leaves_b[key], leaves_a[key], err_msg=key)
    assert [r["step"] for r in _metrics(workdir)] == list(range(1, 9))
    assert [r["loss"] for r in _metrics(workdir)] == [r["loss"] for r in _metrics(workdir_a)]
    data_a = (workdir_a / "checkpoints" / "8" / "data" / "process_0-of-1.json").read_text()
    data_b = (workdir / "checkpoints" / "8" / "data" / "process_0-of-1.json").read_text()
    assert json.loads(data_a) == json.loads(data_b)


@pytest.mark.slow
def test_sigkill_during_a_save_and_during_a_restore_loses_nothing(
    run_a, tmp_path, compilation_cache, mocked
):
    """SIGKILL as soon as the step-8 save is issued (Orbax still writing it), then SIGKILL 5 ms
    into the restore of the rerun: the step-4 checkpoint survives the first, the killed restore
    changes no byte on disk, and the next rerun ends bitwise equal to run A."""
    workdir_a, state_a, _ = run_a
    workdir = tmp_path / "run_c"
    for mode, *args in (("kill-in-save", "8"), ("kill-in-restore",)):
        before = hash_tree(workdir) if workdir.exists() else None
        proc = subprocess.run(
            [sys.executable, str(WORKER), mode, str(workdir), *args],
            env=_env(compilation_cache),
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
        assert 4 in checkpointing.available_steps(workdir)
        if before is not None:
            assert hash_tree(workdir) == before
    state = train.train_and_evaluate(tiny_config(), str(workdir), compiler_options=COMPILER_OPTIONS)
    leaves_a, leaves = _leaves(state_a), _leaves(state)
    assert leaves_a.keys() == leaves.keys()
    for key in leaves_a:
        np.testing.assert_array_equal(leaves[key], leaves_a[key], err_msg=key)


def test_finished_run_resumes_to_nothing(run_a, tmp_path, mocked):
    """Re-running a finished workdir restores step 8 and trains no further step."""
    workdir = tmp_path / "copy"
    import shutil

    shutil.copytree(run_a[0], workdir)
    state = train.train_and_evaluate(tiny_config(), str(workdir), compiler_options=COMPILER_OPTIONS)
    assert int(state.step) == 8
    assert checkpointing.available_steps(workdir) == [4, 8]


def test_corrupt_or_incompatible_checkpoint_is_reported_and_not_overwritten(
    run_a, tmp_path, mocked
):
    import shutil

    workdir = tmp_path / "corrupt"
    shutil.copytree(run_a[0], workdir)
    wider = tiny_config()
    wider.model.head_out_dim = 12
    before = hash_tree(workdir)
    # The workdir's config.json names the run it holds: another config is refused up front.
    with pytest.raises(
        checkpointing.WorkdirConflictError,
        match=r"holds another run, whose config differs in model\.head_out_dim: 8 there, 12 now",
    ):
        train.train_and_evaluate(wider, str(workdir), compiler_options=COMPILER_OPTIONS)
    assert hash_tree(workdir) == before
    # Without config.json, restoring the checkpoint into the other structure still fails.
    (workdir / checkpointing.CONFIG_FILENAME).unlink()
    before = hash_tree(workdir / "checkpoints")
    with pytest.raises(
        checkpointing.CheckpointError, match=r"(?s)checkpoints/8: .*available steps.*\[4, 8\]"
    ):
        train.train_and_evaluate(wider, str(workdir), compiler_options=COMPILER_OPTIONS)
    assert hash_tree(workdir / "checkpoints") == before

    truncate_state_arrays(workdir, 8, divisor=2)
    before = hash_tree(workdir / "checkpoints")
    with pytest.raises(
        checkpointing.CheckpointError, match=r"(?s)checkpoints/8: .*available steps.*\[4, 8\]"
    ):
        train.train_and_evaluate(tiny_config(), str(workdir), compiler_options=COMPILER_OPTIONS)
    assert hash_tree(workdir / "checkpoints") == before


def test_nan_stops_with_clear_error_and_keeps_last_checkpoint(tmp_path, mocked, monkeypatch):
    """A NaN injected into the loss of step 3 (of 8, checkpoints every 2) raises an error naming
    step 3 and checkpoint 2; nothing at or after step 3 is saved; step 2 stays restorable."""
    calls = {"n": 0}

    def poison() -> np.ndarray:
        calls["n"] += 1
        return np.float32(np.nan if calls["n"] == 3 else 0.0)

    @functools.wraps(losses.dhel)
    def dhel_with_nan(z1, z2, **kwargs):
        loss, aux = losses.dhel(z1, z2, **kwargs)
        nan = jax.pure_callback(poison, jax.ShapeDtypeStruct((), jnp.float32))
        return loss + nan, aux

    monkeypatch.setitem(losses.LOSSES, "dhel", dhel_with_nan)
    config = tiny_config()
    config.checkpoint_every_steps = 2
    workdir = tmp_path / "nan"
    with pytest.raises(
        FloatingPointError, match=r"step 3: loss = nan.*last good checkpoint is step 2"
    ):
        train.train_and_evaluate(config, str(workdir), compiler_options=COMPILER_OPTIONS)
    assert checkpointing.available_steps(workdir) == [2]
    assert not list((workdir / "checkpoints").glob("*tmp*"))
    _, variables, step = checkpointing.restore_for_eval(workdir)
    assert step == 2
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(variables))
    assert [r["step"] for r in _metrics(workdir)] == [1, 2]


def _wait_for(predicate, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"exited early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out")
        time.sleep(0.05)


# dhel-train flags for a tiny model on the Fashion-MNIST config (mocked data in the worker).
TINY_CLI_ARGS = (
    f"--config={ROOT / 'configs' / 'fashion_mnist.py'}",
    "--config.model.name=resnet_tiny",
    "--config.model.num_filters=4",
    "--config.model.head_hidden_dim=16",
    "--config.model.head_out_dim=8",
    "--config.augment.out_size=16",
    "--config.batch_size=16",
)


def test_sigterm_saves_a_checkpoint_and_exits_zero(tmp_path, compilation_cache):
    """dhel-train with command-line overrides; SIGTERM while it trains: it checkpoints the
    current step, exits with status 0, and the checkpoint is restorable."""
    workdir = tmp_path / "term"
    args = [
        f"--workdir={workdir}",
        *TINY_CLI_ARGS,
        "--config.num_epochs=1000",
        "--config.optimizer.warmup_epochs=0",
        "--config.log_every_steps=1",
        "--config.checkpoint_every_steps=100000",
    ]
    proc = subprocess.Popen(
        [sys.executable, str(WORKER), "cli", *args],
        env=_env(
            compilation_cache,
            XLA_FLAGS=os.environ["XLA_FLAGS"] + " --xla_backend_optimization_level=0",
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics_file = workdir / train.METRICS_FILENAME
    _wait_for(lambda: metrics_file.exists() and len(_metrics(workdir)) >= 2, 300, proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    (step,) = checkpointing.available_steps(workdir)
    assert 2 <= step < 4000
    assert _metrics(workdir)[-1]["step"] == step
    config, variables, restored = checkpointing.restore_for_eval(workdir)
    assert restored == step and config.batch_size == 16 and config.model.num_filters == 4
    chex.assert_trees_all_equal_shapes(
        variables["params"]["head"],
        {
            "hidden1": {"kernel": np.zeros((8, 16))},
            "hidden1_bn": {"bias": np.zeros(16), "scale": np.zeros(16)},
            "output": {"bias": np.zeros(8), "kernel": np.zeros((16, 8))},
        },
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_train_like_one(tmp_path, eight_devices, compilation_cache):
    """2 processes x 2 CPU devices (jax.distributed on localhost, each feeding half the batch)
    take 2 steps to the same state as 1 process x 4 devices."""
    port = _free_port()
    env = _env(compilation_cache)
    env.pop("XLA_FLAGS", None)
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), "multiprocess", str(pid), str(port), str(tmp_path)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for pid in range(2)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]

    setup = train_worker.build_training(eight_devices[:4])
    state = setup.init()
    batch = train.global_batch(fixed_batch(), setup.batch_sharding)
    for _ in range(2):
        train_worker.assert_step_clear_of_kinks(setup, state, fixed_batch())
        state, metrics = setup.train_step(state, batch)
    got = np.load(tmp_path / "state.npz")
    np.testing.assert_allclose(got["loss"], metrics["loss"], rtol=1e-5)
    want = _leaves(state)
    assert set(got.files) - {"loss"} == set(want)
    for key, value in want.items():
        np.testing.assert_allclose(got[key], value, rtol=1e-5, atol=1e-6, err_msg=key)


@pytest.mark.slow
def test_cpu_xla_flags_keep_a_train_step_within_float32_round_off(tmp_path):
    """Two train steps with dhel-train's CPU XLA flags and without them (fresh processes: the
    flags are read when XLA starts) give the same loss, parameters and statistics."""
    extra = cpu.cpu_xla_flags("")
    if not extra:
        pytest.skip("this jaxlib is outside the series the CPU flags are validated on")
    results = {}
    for name, xla_flags in (("default", ""), ("dhel", " ".join(extra))):
        # A cache of its own per variant: a shared one could hand one variant the other's program.
        env = _env(str(tmp_path / f"cache_{name}"), XLA_FLAGS=xla_flags)
        out = tmp_path / f"{name}.npz"
        # The run with XLA's defaults also checks that the two steps stay clear of the
        # network's ReLU kinks, where the two variants' round-off could take different sides.
        kinks = ["check-kinks"] if name == "default" else []
        proc = subprocess.run(
            [sys.executable, str(WORKER), "step", str(out), *kinks],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[name] = np.load(out)
    default, dhel = results["default"], results["dhel"]
    assert set(default.files) == set(dhel.files)
    np.testing.assert_allclose(dhel["loss"], default["loss"], rtol=1e-5)
    for key in default.files:
        np.testing.assert_allclose(dhel[key], default[key], rtol=1e-5, atol=1e-5, err_msg=key)


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("--config.optimizer.base_lr=0.0", "config.optimizer.base_lr must be a finite number > 0"),
        # Found only once the dataset's size is known: 10 epochs of warm-up > 3 steps.
        ("--config.num_train_steps=3", "config.optimizer.warmup_epochs = 10"),
    ],
)
def test_cli_config_errors_are_one_line_with_status_2(
    tmp_path, compilation_cache, override, needle
):
    workdir = tmp_path / "run"
    args = [
        f"--config={ROOT / 'configs' / 'cifar10.py'}",
        f"--workdir={workdir}",
        "--config.batch_size=16",
        override,
    ]
    proc = subprocess.run(
        [sys.executable, str(WORKER), "cli", *args],
        env=_env(compilation_cache),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == main.EXIT_USAGE, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("dhel-train: error: ") and needle in last, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not (workdir / "checkpoints").exists()


def _two_step_cli_command(workdir: Path) -> list[str]:
    """``dhel-train`` of the tiny model for 2 steps (one checkpoint) in ``workdir``."""
    return [
        sys.executable,
        str(WORKER),
        "cli",
        f"--workdir={workdir}",
        *TINY_CLI_ARGS,
        "--config.num_train_steps=2",
        "--config.optimizer.warmup_epochs=0",
    ]


def test_cli_corrupt_checkpoint_is_one_line_with_status_1(tmp_path, compilation_cache):
    """Another config in a finished run's --workdir: one error line, status 2. Then a truncated
    array of the latest checkpoint and the same dhel-train command again: one error line,
    status 1. Never a traceback or library noise, and nothing on disk changed."""
    workdir = tmp_path / "run"
    command = _two_step_cli_command(workdir)
    env = _env(compilation_cache)
    first = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]

    # Another run's config in the same --workdir: a config error (status 2), nothing changed.
    before = hash_tree(workdir)
    other = [*command, "--config.model.head_out_dim=12"]
    proc = subprocess.run(other, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == main.EXIT_USAGE, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("dhel-train: error: ") and "holds another run" in lines[-1]
    assert "model.head_out_dim: 8 there, 12 now" in lines[-1], lines[-1]
    assert "Traceback" not in proc.stderr
    assert hash_tree(workdir) == before

    truncate_state_arrays(workdir, 2, divisor=2)
    before = hash_tree(workdir)
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == main.EXIT_FAILURE, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("dhel-train: error: ") and "available steps" in last, last
    assert "Traceback" not in proc.stderr and "Event loop is closed" not in proc.stderr
    assert hash_tree(workdir) == before


def _with_file_size_limit(command: list[str], limit: int) -> list[str]:
    """``command`` under a cap of ``limit`` bytes on every file it writes, a full disk as the
    child sees it (writes past the cap fail with EFBIG; SIGXFSZ is ignored). A Python shim
    sets the limit and execs the command: no ``preexec_fn`` fork of this threaded process."""
    shim = (
        "import os, resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); "
        "os.execv(sys.argv[1], sys.argv[1:])"
    )
    return [sys.executable, "-c", shim, *command]


@pytest.mark.slow
def test_cli_full_disk_is_one_line_with_status_1(tmp_path, compilation_cache):
    """A disk that fills up at the first checkpoint: one error line naming the checkpoint
    directory, status 1, none of Orbax's logged tracebacks, no finalised step; freed, the same
    command resumes and saves. Full again at the start of a rerun: config.json is kept whole."""
    workdir = tmp_path / "run"
    command = _two_step_cli_command(workdir)
    env = _env(compilation_cache)

    def run(limit: int | None) -> subprocess.CompletedProcess:
        argv = command if limit is None else _with_file_size_limit(command, limit)
        return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)

    # The state's metadata file alone is larger than 16 KiB; config.json and the logs are not.
    full = run(16 * 1024)
    assert full.returncode == main.EXIT_FAILURE, full.stderr[-3000:]
    last = full.stderr.strip().splitlines()[-1]
    assert last.startswith("dhel-train: error: cannot write a checkpoint in "), last
    assert f"{workdir}/checkpoints" in last and "disk is full" in last, last
    assert "Traceback" not in full.stderr and "orbax" not in full.stderr.lower()
    assert checkpointing.available_steps(workdir) == []

    freed = run(None)
    assert freed.returncode == 0, freed.stderr[-3000:]
    assert checkpointing.available_steps(workdir) == [2]

    before = hash_tree(workdir)
    again = run(512)
    assert again.returncode == main.EXIT_FAILURE, again.stderr[-3000:]
    last = again.stderr.strip().splitlines()[-1]
    assert last.startswith("dhel-train: error: cannot write ") and "config.json" in last, last
    assert "Traceback" not in again.stderr
    assert hash_tree(workdir) == before


def test_traceback_env_shows_the_traceback(tmp_path, compilation_cache):
    """DHEL_JAX_TRACEBACK=1: the same config error, raised with its traceback."""
    proc = subprocess.run(
        [
            sys.executable,
            str(WORKER),
            "cli",
            f"--config={ROOT / 'configs' / 'cifar10.py'}",
            f"--workdir={tmp_path / 'run'}",
            "--config.optimizer.base_lr=0.0",
        ],
        env=_env(compilation_cache, **{main.TRACEBACK_ENV: "1"}),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 1 and "Traceback" in proc.stderr
    assert "ValueError: " in proc.stderr and "config.optimizer.base_lr" in proc.stderr


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--workdir=/nonexistent/run"], "usage: dhel-train --config"),
        (["--bogus_flag=1"], "bogus_flag"),
    ],
)
def test_cli_usage_errors_are_one_line_with_status_2(tmp_path, args, needle):
    proc = subprocess.run(
        [sys.executable, str(WORKER), "cli", *args],
        env=_env(str(tmp_path)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == main.EXIT_USAGE, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("dhel-train: error: ") and needle in line, line
    assert "Traceback" not in proc.stderr and "FATAL" not in proc.stderr


def test_cli_missing_dataset_is_one_line_with_status_1(tmp_path):
    """ImageNet-100 without its archives (TFDS cannot download it): one line that says where
    the archives go, status 1, no traceback, no checkpoint."""
    workdir = tmp_path / "run"
    code = "import sys; sys.argv[0] = 'dhel-train'; from dhel_jax import main; main.train_main()"
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            f"--workdir={workdir}",
            *TINY_CLI_ARGS,
            "--config.dataset=imagenet100",
            f"--config.data_dir={tmp_path / 'tfds'}",
        ],
        env=_env(str(tmp_path / "cache")),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == main.EXIT_FAILURE, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("dhel-train: error: imagenet100 is not prepared in "), line
    assert "ILSVRC2012_img_train.tar" in line and "downloads/manual" in line, line
    assert "Traceback" not in proc.stderr
    assert checkpointing.available_steps(workdir) == []
