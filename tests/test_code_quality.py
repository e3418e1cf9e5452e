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


@pytest.mark.parametrize("script", sorted(p.name for p in (REPO / "bench").glob("*.py")
                                          if "__main__" in p.read_text()))
def test_bench_script_starts(script: str) -> None:
    """Every benchmark imports what it uses (bench/sandbox.py once imported helpers that
    bench/latency.py no longer had, which no lint sees across the scripts' sys.path). Without
    the bench extras (CI installs test and tf only), a script that needs them says so."""
    done = subprocess.run([sys.executable, str(REPO / "bench" / script), "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=120, check=False)
    if done.returncode == 0:
        assert "usage:" in done.stdout
    else:
        assert done.stderr.startswith("missing benchmark dependencies: ") and "[bench]" in done.stderr, done.stderr
