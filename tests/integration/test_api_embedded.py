"""The Python API on the embedded default: ``ipdc.connect()`` with no node running starts a
temporary local cluster. The README's example and the two examples under jobs/python/
run as a user runs them, in their own process, and their output is checked against the
same computation done here."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

from tests.helpers import REPO


def run_script(path: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``path`` with an IPDC_HOME where no node runs, from this checkout."""
    env = {**os.environ, "IPDC_HOME": str(tmp_path / "no-node"),
           "PYTHONPATH": os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH"))))}
    done = subprocess.run([sys.executable, str(path), *args], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, f"{path} exited {done.returncode}\n{done.stdout}\n{done.stderr}"
    assert "starting a temporary local cluster of 2 nodes" in done.stderr
    return done


def example(name: str) -> ModuleType:
    """An example's module, imported here to compute its answer independently."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", REPO / "jobs" / "python" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_readme_example_runs_as_written(tmp_path: Path) -> None:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Python API"):]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None
    script = tmp_path / "readme_example.py"
    script.write_text(code.group(1))
    lines = run_script(script, tmp_path).stdout.splitlines()
    assert lines[:3] == ["49", str(sum(x * x for x in range(1000))), "81"]
    assert lines[3] == "invalid literal for int() with base 10: 'seven'"


def test_the_monte_carlo_pi_example(tmp_path: Path) -> None:
    out = run_script(REPO / "jobs" / "python" / "pi.py", tmp_path, "8", "20000").stdout
    inside = example("pi").inside
    expected = sum(inside(seed, 20000) for seed in range(8))
    assert f"inside: {expected} of 160000" in out
    assert f"pi is about {4 * expected / 160000:.6f}" in out


def test_the_parameter_sweep_example(tmp_path: Path) -> None:
    out = run_script(REPO / "jobs" / "python" / "sweep.py", tmp_path).stdout
    sweep = example("sweep")
    grid = [(d, k) for d in (0.5, 1.0, 2.0, 4.0, 8.0) for k in (1.0, 2.0, 4.0, 8.0, 16.0)]
    best_time, best = min((sweep.settling_time(p), p) for p in grid)
    assert out.splitlines()[-1] == f"best: damping {best[0]}, stiffness {best[1]} ({best_time} s)"
    assert len(out.splitlines()) == len(grid) + 1
