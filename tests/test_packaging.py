"""pyproject.toml's dependency ranges and the stacks .ci/run pins (``.ci/constraints-*.txt``)
agree: the lowest leg pins the lower bounds of the training stack, and every pin of either leg
lies inside the ranges users install from, so CI tests stacks that users can get."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = {name: ROOT / ".ci" / f"constraints-{name}.txt" for name in ("lowest", "newest")}
# The extras each leg installs (with the core dependencies); dev includes train and notebooks.
LEG_EXTRAS = {
    "lowest": ("train", "notebooks", "dev"),
    "newest": ("train", "notebooks", "dev", "tpu"),
}


def _ranges(extras: tuple[str, ...]) -> dict[str, list[SpecifierSet]]:
    """Every range pyproject.toml gives a package, in the core dependencies and these extras."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    lines = list(project["dependencies"])
    for extra in extras:
        lines += project["optional-dependencies"][extra]
    ranges: dict[str, list[SpecifierSet]] = {}
    for line in lines:
        req = Requirement(line)
        if req.name != "dhel-jax":
            ranges.setdefault(canonicalize_name(req.name), []).append(req.specifier)
    return ranges


def _pins(path: Path) -> dict[str, Version]:
    pins = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier  # one exact pin a line
            assert spec.operator == "==", line
            pins[canonicalize_name(req.name)] = Version(spec.version)
    return pins


@pytest.mark.parametrize("leg", sorted(CONSTRAINTS))
def test_every_pin_of_a_ci_leg_is_inside_pyprojects_ranges(leg):
    ranges = _ranges(LEG_EXTRAS[leg])
    pins = _pins(CONSTRAINTS[leg])
    assert {"jax", "jaxlib", "flax", "orbax-checkpoint"} <= set(pins)
    outside = [
        f"{name}=={version} outside {spec}"
        for name, version in pins.items()
        for spec in ranges.get(name, [])
        if version not in spec
    ]
    assert not outside


def test_lowest_leg_pins_the_lower_bounds_of_the_train_extra():
    ranges = _ranges(("train",))
    for name, version in _pins(CONSTRAINTS["lowest"]).items():
        lower = [Version(s.version) for spec in ranges[name] for s in spec if s.operator == ">="]
        assert version == max(lower), (name, version, lower)
