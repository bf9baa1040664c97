"""pyproject.toml states compatible ranges; constraints.txt holds the exact, tested versions.

Exact pins in pyproject would make ctssl impossible to install beside lightly, MONAI or a site's own
stack; `make setup`, CI and the image get reproducible versions from constraints.txt instead.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _requirements() -> list[Requirement]:
    reqs = PROJECT["dependencies"] + [r for rs in PROJECT.get("optional-dependencies", {}).values() for r in rs]
    return [Requirement(r) for r in reqs]


def _constraints() -> dict[str, str]:
    pins = {}
    for n, line in enumerate((REPO / "constraints.txt").read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line)
        assert m, f"constraints.txt:{n}: not a `name==version` pin: {line!r}"
        pins[canonicalize_name(m.group(1))] = m.group(2)
    return pins


def test_pyproject_has_no_exact_pins() -> None:
    pinned = [str(r) for r in _requirements() if any(s.operator in ("==", "===") for s in r.specifier)]
    assert pinned == [], f"exact pins belong in constraints.txt, not pyproject.toml: {pinned}"


def test_every_dependency_is_pinned_in_constraints_within_its_range() -> None:
    pins = _constraints()
    missing = [r.name for r in _requirements() if canonicalize_name(r.name) not in pins]
    assert missing == [], f"not in constraints.txt: {missing}"
    outside = [f"{r} (constraints: {pins[canonicalize_name(r.name)]})" for r in _requirements()
               if not r.specifier.contains(pins[canonicalize_name(r.name)], prereleases=True)]
    assert outside == [], f"constraints.txt pins outside pyproject's range: {outside}"


def test_constraints_keep_the_local_torch_builds_and_not_ctssl_itself() -> None:
    pins = _constraints()
    assert "ctssl" not in pins
    assert {"torch", "torchvision"} <= pins.keys()


def test_python_311_is_required_and_newer_pythons_are_not_excluded() -> None:
    spec = SpecifierSet(PROJECT["requires-python"])
    assert "3.11" in spec and "3.10" not in spec
    assert "3.12" in spec and "3.13" in spec


def test_setup_and_image_install_through_the_constraints() -> None:
    makefile = (REPO / "Makefile").read_text()
    stamp = re.search(r"^\$\(STAMP\):(.*)$", makefile, re.M).group(1).split()
    assert {"pyproject.toml", "constraints.txt"} <= set(stamp)
    assert "pip install --quiet -c constraints.txt -e '.[test]'" in makefile
    dockerfile = (REPO / "infra" / "Dockerfile").read_text()
    assert re.search(r"^COPY .*\bconstraints\.txt\b", dockerfile, re.M)
    assert "pip install --no-cache-dir -c constraints.txt ." in dockerfile
    assert "!constraints.txt" in (REPO / "infra" / "Dockerfile.dockerignore").read_text().splitlines()
