"""The install leaves the user's environment safe: current requests/urllib3, torchattacks' stale pin only."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


def test_pyproject_never_declares_torchattacks_and_floors_requests():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    every = list(meta["dependencies"]) + [d for extra in meta.get("optional-dependencies", {}).values()
                                          for d in extra]
    names = {re.split(r"[<>=~!\[; ]", d, maxsplit=1)[0].lower() for d in every}
    assert "torchattacks" not in names  # its requests~=2.25.1 pin would reach the resolver
    core = {re.split(r"[<>=~!\[; ]", d, maxsplit=1)[0].lower(): d for d in meta["dependencies"]}
    for imported in ("numpy", "pillow", "torch", "timm", "safetensors"):
        assert imported in core, f"{imported} is imported by the toolkit but not declared"
    assert core["requests"].replace(" ", "") == "requests>=2.32.4"
    assert core["urllib3"].replace(" ", "").startswith("urllib3>=2")


def test_installed_requests_and_urllib3_are_current():
    try:
        requests_v, urllib3_v = version("requests"), version("urllib3")
    except PackageNotFoundError as err:  # pragma: no cover - both are declared dependencies
        pytest.fail(f"not installed: {err}")
    assert _version_tuple(requests_v) >= (2, 32, 4), requests_v
    assert _version_tuple(urllib3_v)[0] >= 2, urllib3_v


def test_pip_check_reports_only_torchattacks_stale_pin():
    out = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=120)
    lines = [line for line in (out.stdout + out.stderr).splitlines() if line.strip()
             and not line.startswith(("WARNING", "No broken requirements"))]
    # `pip check` names the package whose requirement is broken first; only torchattacks may appear
    assert all(line.lower().startswith("torchattacks ") for line in lines), lines


def test_torchattacks_is_importable_for_the_registry():
    import torchattacks

    assert hasattr(torchattacks, "PGD")


def test_no_source_file_is_hidden_from_git_by_an_ignore_rule():
    """A package whose folder matches an ignore pattern (``data/``) works here and is missing from
    every clean checkout: each source and test file must be one git would commit."""
    if subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--git-dir"], capture_output=True).returncode:
        pytest.skip("not a git checkout")
    sources = [p.relative_to(ROOT).as_posix() for top in ("transfer_analysis", "distill", "tests", "experiments")
               for p in (ROOT / top).rglob("*.py") if "__pycache__" not in p.parts]
    assert sources
    ignored = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "--no-index", "--stdin"],
                             input="\n".join(sources), capture_output=True, text=True).stdout.split()
    assert ignored == [], f"ignored by .gitignore, so never committed: {ignored}"
