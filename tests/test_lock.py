"""The locks (requirements.txt, requirements-dev.txt) must pin exactly what the loose ranges allow.

`make run`, `make test` and a Space install from the locks; the `.in` files say what the code
supports. A range edited without `make lock`, or a lock edited by hand, fails here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
LOCKS = {"requirements.in": "requirements.txt", "requirements-dev.in": "requirements-dev.txt"}


def _lines(path: Path) -> list[str]:
    """Requirement lines without comments, options (`-c`, `-r`) or blanks."""
    lines = (line.split(" #", 1)[0].split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("-")]


def _pins(lock: Path) -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for line in _lines(lock):
        requirement = Requirement(line)
        specifiers = list(requirement.specifier)
        assert len(specifiers) == 1 and specifiers[0].operator == "==", f"{lock.name}: not an exact pin: {line}"
        assert not requirement.extras, f"{lock.name}: extras are installed as their own pins: {line}"
        pins[canonicalize_name(requirement.name)] = Version(specifiers[0].version)
    return pins


@pytest.mark.parametrize("loose", sorted(LOCKS))
def test_every_loose_requirement_is_pinned_inside_its_range(loose: str) -> None:
    pins = _pins(ROOT / LOCKS[loose])
    for line in _lines(ROOT / loose):
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{loose} names {requirement.name}, which {LOCKS[loose]} does not pin: run `make lock`"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"{LOCKS[loose]} pins {name}=={pins[name]} outside {loose}'s {requirement.specifier}: run `make lock`"
        )


def test_the_dev_lock_never_moves_a_runtime_pin() -> None:
    runtime, dev = _pins(ROOT / "requirements.txt"), _pins(ROOT / "requirements-dev.txt")
    moved = {name: (runtime[name], dev[name]) for name in runtime.keys() & dev.keys() if runtime[name] != dev[name]}
    assert not moved, f"requirements-dev.txt pins runtime packages differently: {moved}"


def test_packages_read_as_files_are_pinned_exactly() -> None:
    assert _pins(ROOT / "requirements-nodeps.txt")


def test_the_runtime_lock_names_public_torch() -> None:
    """A local build label (`+cpu`) would make the lock uninstallable where only PyPI serves torch."""
    torch = _pins(ROOT / "requirements.txt")["torch"]
    assert torch.local is None and str(torch) == "2.13.0"
