"""The test environment is the pinned one: every package in constraints.txt is installed at its pinned version.

The README's commands and .ci/run install with ``-c constraints.txt``, so a machine that kept older installs and a
fresh one resolve the same versions; this test turns a silent drift (a package installed by hand, an install without
the constraints) into a failure that names each package. ``bash .ci/latest`` runs the suite on the newest releases
instead, without this test.
"""

from __future__ import annotations

import importlib.metadata

from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from tests.conftest import REPO_ROOT

CONSTRAINTS = REPO_ROOT / "constraints.txt"


def pinned_versions() -> dict[str, str]:
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep, f"constraints.txt: {line!r}: expected NAME==VERSION"
            pins[canonicalize_name(name)] = version
    return pins


def test_constraints_pin_the_libraries_the_design_names():
    pins = pinned_versions()
    for name in (
        "torch",
        "transformers",
        "tokenizers",
        "accelerate",
        "deepspeed",
        "peft",
        "trl",
        "datasets",
        "openai",
        "pytest",
    ):
        assert name in pins, f"constraints.txt does not pin {name}"


def test_installed_versions_match_constraints():
    drift = []
    for name, version in sorted(pinned_versions().items()):
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            drift.append(f"{name}: pinned {version}, not installed")
            continue
        # '==2.13.0' admits the local build '2.13.0+cpu' (PEP 440), so one file serves CPU and CUDA machines.
        if not SpecifierSet(f"=={version}").contains(installed, prereleases=True):
            drift.append(f"{name}: pinned {version}, installed {installed}")
    assert not drift, (
        "installed versions differ from constraints.txt (install with "
        "'pip install -c constraints.txt ...', or regenerate it with 'bash .ci/latest --write'):\n  "
        + "\n  ".join(drift)
    )


def test_ci_runs_exactly_the_readme_test_command():
    root = CONSTRAINTS.parent
    readme = (root / "README.md").read_text()
    command = readme.split("Tests (exactly what CI runs")[1].split("```bash\n")[1].split("\n```")[0].strip()
    ci_lines = [line for line in (root / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert command in ci_lines, f".ci/run does not run the README's test command {command!r}"
    assert "-c constraints.txt" in command
