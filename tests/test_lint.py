"""ruff and mypy pass on the tree (issue 28 item 5): the CI gate, with the versions pinned in the test extra."""
from __future__ import annotations

import subprocess
import sys

from conftest import REPO


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=900)


def test_ruff_check_passes():
    out = run("ruff", "check", "app", "tests", "bench", "scripts")
    assert out.returncode == 0, out.stdout + out.stderr


def test_mypy_passes_on_app():
    out = run("mypy")  # files, plugins and strictness from [tool.mypy] in pyproject.toml
    assert out.returncode == 0, out.stdout + out.stderr
