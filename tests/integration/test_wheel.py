"""A wheel that works: built from this tree, installed without ``-e`` into a fresh venv,
and run from a directory that is not the source tree: ``ipdc mr`` with the default job,
and ``ipdc tf`` with the shipped spec and example on a swarm of nodes the wheel made.

The default WordCount job and its example input are package data, found with
``importlib.resources``, so ``ipdc mr`` with no ``--map``/``--reduce`` must work from
the wheel alone. Its dependencies come from PyPI (or pip's cache), so the wheel's
metadata is checked too.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.helpers import REPO, read_output, reference_counts

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv holding only the wheel of this tree and the dependencies it declares."""
    base = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(base / "dist"),
                    str(REPO)], check=True)
    (wheel,) = (base / "dist").glob("ipdc-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for shipped in ("ipdc/jobs/mapreduce/Map.py", "ipdc/jobs/mapreduce/Reduce.py",
                    "ipdc/jobs/mapreduce/input.txt", "ipdc/jobs/tf/spec.conf"):
        assert shipped in names, f"{shipped} is missing from the wheel"
    assert not any(n.startswith(("tests/", "bench/")) for n in names)
    subprocess.run([sys.executable, "-m", "venv", str(base / "venv")], check=True)
    # with the TF extra: the wheel's metadata must bring TensorFlow for `ipdc tf`
    subprocess.run([str(base / "venv" / "bin" / "python"), "-m", "pip", "install", "-q", f"{wheel}[tf]"],
                   check=True)
    return base / "venv"


def clean_env(home: Path) -> dict[str, str]:
    """The user's environment, without anything that would point back at the source tree."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return {**env, "IPDC_HOME": str(home)}


def test_the_wheel_runs_the_default_job_outside_the_source_tree(venv: Path, tmp_path: Path) -> None:
    env = clean_env(tmp_path / "home")
    where = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import ipdc, ipdc.jobs; print(ipdc.__file__); "
                            "print(ipdc.jobs.shipped('mapreduce'))"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, check=True).stdout.split()
    assert all(Path(p).is_relative_to(venv) for p in where), where
    example = Path(where[1]) / "input.txt"
    done = subprocess.run([str(venv / "bin" / "ipdc"), "mr", "--k", "2", str(example), "-o",
                           str(tmp_path / "out")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert read_output(tmp_path / "out", 2)[0] == reference_counts(example.read_bytes())


def ipdc(venv: Path, home: Path, *args: str, timeout: float = 300, stdin: str | None = None) -> str:
    """The wheel's ``ipdc`` for the node at ``home``; fails with its output."""
    done = subprocess.run([str(venv / "bin" / "ipdc"), *args], cwd=home.parent, env=clean_env(home),
                          input=stdin, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"ipdc {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_the_wheel_runs_the_shipped_tf_example_on_a_swarm_it_made(venv: Path, tmp_path: Path) -> None:
    homes = [tmp_path / f"node{i}" for i in range(3)]
    try:
        ipdc(venv, homes[0], "node", "init")
        ipdc(venv, homes[0], "node", "start")
        for home in homes[1:]:
            token = tmp_path / f"{home.name}.token"
            ipdc(venv, homes[0], "invite", "-o", str(token))
            ipdc(venv, home, "node", "init", "--join-file", str(token))
            ipdc(venv, home, "node", "start")
        shipped = subprocess.run([str(venv / "bin" / "python"), "-c", "from ipdc.jobs import shipped; "
                                  "print(shipped('tf'))"], cwd=tmp_path, env=clean_env(homes[0]),
                                 capture_output=True, text=True, check=True).stdout.strip()
        assert Path(shipped).is_relative_to(venv)
        cluster = json.loads(ipdc(venv, homes[0], "tf", f"{shipped}/spec.conf", "--name", "wheel", "--json"))
        assert sum(t["server"] for t in cluster["tasks"]) == 3
        out = ipdc(venv, homes[0], "tf", "run", "wheel", "--", str(venv / "bin" / "python"),
                   f"{shipped}/example.py", "--steps", "60", timeout=600)
        result = json.loads(out.split("RESULT ", 1)[1].splitlines()[0])
        assert result["loss_after"] < 0.5 * result["loss_before"], result
        ipdc(venv, homes[0], "tf", "down", "wheel", timeout=120)
    finally:
        for home in reversed(homes):
            if (home / "ipdc.conf").exists():
                subprocess.run([str(venv / "bin" / "ipdc"), "node", "stop"], env=clean_env(home),
                               capture_output=True, timeout=120)
        # a root agent's sandboxes ran a readable copy of this venv's Python: it goes with the venv
        copy = subprocess.run([str(venv / "bin" / "python"), "-c", "from ipdc.isolation.interpreter import "
                               "copy_path; print(copy_path())"], cwd=tmp_path, capture_output=True, text=True,
                              check=True).stdout.strip()
        shutil.rmtree(copy, ignore_errors=True)
