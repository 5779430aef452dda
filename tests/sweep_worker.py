"""Subprocess side of tests/test_sweep.py: ``dhel-train`` / ``dhel-eval`` on mocked data.

    python sweep_worker.py dhel-train ARG...
    python sweep_worker.py dhel-eval ARG...

runs the console script (``dhel_jax.sweep.run_tool``, as the default launcher does) under
``tfds.testing.mock_data`` (64 records per split), the train step compiled at XLA optimisation
level 0 as in tests/train_worker.py. With ``SWEEP_TEST_KILL=<workdir>:<step>`` in the
environment, the training of that workdir SIGKILLs itself as soon as the checkpoint of that
step is complete on disk (a preempted machine that got no notice).
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import time


def main(tool: str, args: list[str]) -> None:
    import tensorflow_datasets as tfds

    from dhel_jax import checkpointing, sweep, train
    from tests.train_worker import COMPILER_OPTIONS, MOCK_EXAMPLES

    hooks = []
    target, _, step = os.environ.get("SWEEP_TEST_KILL", "").rpartition(":")
    workdir = args[args.index("--workdir") + 1]
    if tool == "dhel-train" and target and os.path.abspath(target) == os.path.abspath(workdir):

        def kill_after_checkpoint(done: int, metrics) -> None:
            del metrics
            if done == int(step):
                while int(step) not in checkpointing.available_steps(workdir):
                    time.sleep(0.01)
                os.kill(os.getpid(), signal.SIGKILL)

        hooks.append(kill_after_checkpoint)
    # dhel_jax.main calls train.train_and_evaluate by attribute at run time.
    train.train_and_evaluate = functools.partial(
        train.train_and_evaluate, hooks=hooks, compiler_options=COMPILER_OPTIONS
    )
    sys.argv = [tool, *args]
    with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
        sweep.run_tool(tool)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main(sys.argv[1], sys.argv[2:])
