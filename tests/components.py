"""Tests that need a real component (a Slurm controller, a PostgreSQL server, headless Chromium, the
repository's git history) ask for it here. Outside CI a missing component skips the test with its
reason; under CI (``CI=true``, which ``.ci/run`` sets) it fails the test in one line naming the
component, so a CI machine where an install half worked cannot pass green with the component untested."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

__all__ = ["in_ci", "require", "require_commit"]


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def require(component: str, missing: str = "", how: str = "") -> None:
    """Nothing if ``missing`` is empty; else skip (or, under CI, fail) naming ``component``, what is
    missing and how to get it."""
    if not missing:
        return
    line = f"{component}: {missing}" + (f"; {how}" if how else "")
    if in_ci():
        pytest.fail(f"CI needs {line}", pytrace=False)
    pytest.skip(line)


def require_commit(commit: str, what: str) -> None:
    """The repository's history must hold ``commit`` (a shallow clone has none of it)."""
    found = subprocess.run(["git", "cat-file", "-e", f"{commit}^{{commit}}"], cwd=ROOT, capture_output=True).returncode == 0
    require("git history", "" if found else f"commit {commit[:12]} ({what}) is not in this checkout",
            "clone with history (not --depth 1), or `git fetch --unshallow`")
