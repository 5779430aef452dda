"""The command-line tools' flags: each of dhel-train, dhel-eval and dhel-compile defines, and
lists in its help, its own flags and none of the others'."""

from __future__ import annotations

import re
import subprocess
import sys

from dhel_jax import main

TRAIN_ONLY = ("config", "distributed")
EVAL_ONLY = ("step", "protocol", "out_dir", "data_dir", "paper_epochs", "baselines")
SHARED = ("workdir", "cpu_devices")
COMPILE_ONLY = ("topology", "out", "platform", "geometry")
ENTRY_POINTS = {
    "dhel-train": "train_main",
    "dhel-eval": "eval_main",
    "dhel-compile": "compile_main",
}


def _start(tool: str, *args: str) -> subprocess.Popen:
    """``tool ARGS`` through its console-script function, with ``sys.argv[0]`` the tool's name
    (as the installed script has; the scripts need not be on PATH)."""
    code = f"import sys; sys.argv[0] = {tool!r}; from dhel_jax import main; main.{ENTRY_POINTS[tool]}()"
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _listed(text: str) -> set[str]:
    """The flags a help text describes (lines ``  --name:`` or ``  --[no]name:``)."""
    return set(re.findall(r"^\s+(?:-\S+,)?--(?:\[no\])?(\w+):", text, flags=re.MULTILINE))


def test_each_tool_lists_only_its_own_flags():
    own = {
        "dhel-train": {*TRAIN_ONLY, *SHARED},
        "dhel-eval": {*EVAL_ONLY, *SHARED},
        "dhel-compile": {"config", *COMPILE_ONLY},
    }
    other = {
        "dhel-train": {*EVAL_ONLY, *COMPILE_ONLY},
        "dhel-eval": {*TRAIN_ONLY, *COMPILE_ONLY},
        "dhel-compile": {*EVAL_ONLY, *SHARED, "distributed"},
    }
    # Started together: each is a Python start-up (~2 s), not a computation.
    procs = {
        (tool, option): _start(tool, option)
        for tool in ENTRY_POINTS
        for option in ("--help", "--helpfull")
    }
    procs["eval_config"] = _start("dhel-eval", "--workdir=run", "--config=configs/cifar10.py")
    out = {key: proc.communicate(timeout=120) for key, proc in procs.items()}
    for (tool, option), (stdout, stderr) in ((k, v) for k, v in out.items() if k != "eval_config"):
        assert procs[tool, option].returncode == 1, stderr  # absl's status after help
        listed = _listed(stdout)
        if option == "--help":
            # The short help: exactly the tool's flags.
            assert listed == own[tool], (tool, option, stdout)
        else:
            # The full help adds absl's own flags (logging, debugging), none of the other tool's.
            assert own[tool] <= listed and not listed & other[tool], (tool, option, stdout)
    # dhel-eval takes the config from the checkpoint; --config gets a pointed message.
    stdout, stderr = out["eval_config"]
    assert procs["eval_config"].returncode == main.EXIT_USAGE, stderr
    line = stderr.strip().splitlines()[-1]
    assert line.startswith("dhel-eval: error: ") and "--config is for dhel-train" in line, line
