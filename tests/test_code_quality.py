"""The type, lint and layer checks, run with the tests so that CI fails on any of them.

They run the tools of the environment the tests run in (the README's venv), each on the
paths and settings pyproject.toml gives it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


@pytest.mark.parametrize("command", [
    [str(BIN / "ruff"), "check", "ipdc", "tests", "bench"],
    [sys.executable, "-m", "mypy"],
    [str(BIN / "lint-imports")],
], ids=["ruff", "mypy", "import-linter"])
def test_check_is_clean(command: list[str]) -> None:
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, f"{' '.join(command)} found problems:\n{done.stdout}\n{done.stderr}"
