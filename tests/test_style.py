"""The tree is clean under the project's ruff configuration (pyproject.toml: the diffusers style at 119 columns)."""

import os
import shutil
import subprocess
import sys

import pytest


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ruff():
    """ruff from this interpreter's environment (the `test` extra installs it)."""
    candidate = os.path.join(os.path.dirname(sys.executable), "ruff")
    found = candidate if os.path.exists(candidate) else shutil.which("ruff")
    if found is None:
        pytest.fail("ruff is not installed: install the project's `test` extra (pip install -e '.[test]').")
    return found


@pytest.mark.parametrize("command", [["check", "."], ["format", "--check", "."]], ids=["check", "format"])
def test_ruff_is_clean(command):
    result = subprocess.run([_ruff(), *command], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, f"ruff {' '.join(command)} found problems:\n{result.stdout}{result.stderr}"
