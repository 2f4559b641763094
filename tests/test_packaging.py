"""Packaging conventions: compatible ranges in the metadata, the exact tested builds in constraints.txt
(which `make install`, and so CI, installs with), project URLs and authors."""

from __future__ import annotations

import tomllib
from packaging.requirements import Requirement

from tests.helpers import REPO

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _constraints() -> dict[str, str]:
    lines = (REPO / "constraints.txt").read_text().splitlines()
    pins = [Requirement(ln) for ln in lines if ln.strip() and not ln.startswith("#")]
    return {r.name: str(r.specifier) for r in pins}


def test_metadata_has_ranges_and_constraints_the_exact_builds() -> None:
    deps = {r.name: r for r in map(Requirement, PYPROJECT["dependencies"])}
    pins = _constraints()
    assert pins == {"torch": "==2.14.1", "torchvision": "==0.29.1"}
    for name, pin in pins.items():
        spec = deps[name].specifier
        assert "==" not in str(spec), f"{name}: exact pin in pyproject.toml"
        assert spec.contains(pin.removeprefix("==")), f"{name}: the tested build is outside the range {spec}"


def test_make_install_uses_the_constraints_and_ci_uses_make_install() -> None:
    make = (REPO / "Makefile").read_text()
    assert "-c constraints.txt" in make and "constraints.txt" in make.split("$(VENV)/.installed:")[1].splitlines()[0]
    assert "make install" in (REPO / ".github/workflows/retrain.yml").read_text()


def test_project_urls_and_authors() -> None:
    assert {"Homepage", "Repository", "Issues"} <= set(PYPROJECT["urls"])
    assert all(u.startswith("https://") for u in PYPROJECT["urls"].values())
    assert PYPROJECT["authors"] and PYPROJECT["authors"][0]["name"]
