"""Helpers for tests: run the CLI as a user would, and an independent WordCount."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_cli(args: list[str], home: Path, timeout: float = 180, check: bool = True,
            cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``ipdc ARGS`` (or ``deploy.py`` when args[0] == 'deploy.py') as a user would."""
    env = {**os.environ, "IPDC_HOME": str(home), **(env or {})}
    argv = ([sys.executable, str(REPO / "deploy.py"), *args[1:]] if args[0] == "deploy.py"
            else [sys.executable, "-m", "ipdc.cli", *args])
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=cwd or home.parent)
    if check and done.returncode != 0:
        raise AssertionError(f"{argv} exited {done.returncode}\nstdout:\n{done.stdout}\n"
                             f"stderr:\n{done.stderr}")
    return done


def reference_counts(data: bytes) -> Counter[bytes]:
    """WordCount computed independently of IPDC: whitespace tokens of the raw bytes.

    Splitting bytes on ASCII whitespace and Python's ``str.split()`` agree on the
    test inputs, which hold no Unicode-only whitespace (U+00A0, U+3000, ...).
    """
    return Counter(data.split())


def read_output(output: Path, k: int) -> tuple[Counter[bytes], list[list[bytes]]]:
    """Parse part-00000..part-<k-1> back into byte keys; also return each part's keys."""
    counts: Counter[bytes] = Counter()
    keys_per_part = []
    for p in range(k):
        keys = []
        for line in (output / f"part-{p:05d}").read_bytes().split(b"\n"):
            if not line:
                continue
            key, _, value = line.rpartition(b"\t")
            assert key not in counts, f"key {key!r} appears twice"
            counts[key] = int(value)
            keys.append(key)
        keys_per_part.append(keys)
    return counts, keys_per_part


#: User code that misbehaves, as the body of a map function: each must fail its task and
#: leave the agent serving. ``bad_map(name, chunk)`` makes a Map.py of it, with the bulk
#: ``map_chunk(text)`` form or the line-by-line ``map(line)`` one.
BAD_BODIES = {
    "infinite loop": "    while True:\n        pass\n",
    "10 GB": "    block = bytearray(10 << 30)\n    return []\n",
    "fork bomb": ("    while True:\n        try:\n            os.fork()\n        except OSError:\n"
                  "            pass\n"),
}


def bad_map(name: str, chunk: bool) -> str:
    signature = "def map_chunk(text):" if chunk else "def map(line):"
    return f"import os\n\n{signature}\n{BAD_BODIES[name]}"


def processes_with(tag: str) -> list[int]:
    """Every live process on the machine whose command line holds ``tag`` (zombies excluded:
    they are dead, only not yet reaped)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if tag.encode() in cmdline and state != "Z":
            found.append(int(entry.name))
    return found
