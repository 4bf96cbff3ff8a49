"""Dependencies that fit (issue 28 item 6): the server imports nothing from the `train` extra or from packages
pyproject.toml does not declare, and `make serve` installs only when pyproject.toml changed."""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions

import pytest
from conftest import REPO

PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
BROUGHT_BY = {"triton": "torch"}  # the CUDA torch wheel's own dependency: the fused kernels import it on CUDA only


def names(requirements: list[str]) -> set[str]:
    return {r.split("==")[0].split("[")[0].strip().lower().replace("_", "-") for r in requirements}


def server_imports() -> set[str]:
    """Top-level modules imported anywhere in app/ outside the trainer (lazy imports included)."""
    found = set()
    for path in (REPO / "app").rglob("*.py"):
        if "trainer" in path.relative_to(REPO / "app").parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return found - set(sys.stdlib_module_names) - {"app", "__future__"}


def test_the_server_needs_only_its_declared_dependencies():
    dists = packages_distributions()
    needed = {d.lower().replace("_", "-") for m in server_imports() for d in dists.get(m, [m])
              if m not in BROUGHT_BY} | set(BROUGHT_BY.values())
    assert needed <= names(PROJECT["dependencies"]), needed - names(PROJECT["dependencies"])
    train = names(PROJECT["optional-dependencies"]["train"])
    assert not needed & train and not train & names(PROJECT["dependencies"])
    assert not {"rich", "accelerate"} & names(PROJECT["dependencies"])  # imported by nothing


def test_importing_the_server_loads_no_training_package():
    # not scipy: diffusers' schedulers import it when it is installed (an optional dependency of theirs, which
    # sentence-transformers requires anyway)
    code = ("import sys, app.__main__, app.api.main; "
            "print(sorted({'mlxtend', 'sklearn', 'rich', 'accelerate'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_make_serve_installs_once_per_pyproject(tmp_path):
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(REPO / name, tmp_path)

    def dry(target):
        return subprocess.run(["make", "-n", target], cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    assert "pip install -q -e ." in dry("serve")  # a fresh clone installs
    (tmp_path / ".venv/bin").mkdir(parents=True)
    (tmp_path / ".venv/bin/python").touch()
    subprocess.run(["touch", "-d", "+1 second", str(tmp_path / ".venv/.installed")], check=True)
    assert "pip" not in dry("serve")  # an installed one starts at once
    assert "'.[train,test]'" in dry("test")
    subprocess.run(["touch", "-d", "+2 seconds", str(tmp_path / "pyproject.toml")], check=True)
    assert "pip install -q -e ." in dry("serve")  # a changed pyproject.toml installs again
