"""Inputs by CID and the result cache: what each costs, end to end through ``ipdc mr``.

On a warm 3-node local cluster, the same WordCount input (synthetic words) is given as

  file       one local file (its chunks are added to kubo)
  dir        the same bytes as a local directory of ``--files`` files
  cid        that directory's CID, added beforehand on another node: the workers read
             byte ranges of its files from the swarm, nothing is added again
  cached     the file again without --no-cache: the result comes from the swarm's cache
             (key computed here, retained record read, result fetched)

Each run is a fresh ``ipdc mr --k 3`` process (its start included), ``--no-cache`` except
for ``cached``. Counts are compared with each other (one canonical hash per variant).

    python bench/data.py [--size 20MB] [--files 8] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common


def make_corpus(root: Path, size: int, files: int) -> tuple[Path, Path]:
    """The same bytes as one file and as a directory of ``files`` files (split on lines)."""
    rng = random.Random(7)
    words = [f"w{i}" for i in range(20_000)]
    lines: list[bytes] = []
    total = 0
    while total < size:
        line = " ".join(rng.choices(words, k=12)).encode() + b"\n"
        lines.append(line)
        total += len(line)
    single = root / "corpus.txt"
    single.write_bytes(b"".join(lines))
    directory = root / "corpus"
    for i in range(files):
        part = directory / f"d{i % 3}" / f"f{i:03d}.txt"
        part.parent.mkdir(parents=True, exist_ok=True)
        part.write_bytes(b"".join(lines[i::files]))
    return single, directory


def ipfs_add(node: Any, path: Path) -> str:
    secret = node.kubo_secret_file.read_text().strip()
    done = subprocess.run(["ipfs", "--api-auth", f"bearer:{secret}", "add", "-r", "-Q", "--cid-version=1",
                           "--raw-leaves", str(path)], env=node.kubo_env(), capture_output=True, text=True,
                          check=True)
    return done.stdout.strip()


def mr(home: Path, source: str, output: Path, *options: str) -> float:
    argv = [sys.executable, "-m", "ipdc.cli", "mr", source, "--k", "3", "-q", "-o", str(output), *options]
    t0 = time.monotonic()
    subprocess.run(argv, env={**os.environ, "IPDC_HOME": str(home)}, check=True, capture_output=True)
    return time.monotonic() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="20MB", help="Input size (default 20MB).")
    parser.add_argument("--files", type=int, default=8, help="Files of the directory input (default 8).")
    parser.add_argument("--runs", type=int, default=3, help="Runs per variant (default 3).")
    args = parser.parse_args()
    size = common.parse_size(args.size)
    with tempfile.TemporaryDirectory(prefix="ipdc-bench-data-") as tmp, common.warm_cluster(3) as cluster:
        root = Path(tmp)
        single, directory = make_corpus(root, size, args.files)
        home = cluster.nodes[0].home
        cid = ipfs_add(cluster.nodes[2], directory)
        variants = {"file": (str(single), ("--no-cache",)), "dir": (str(directory), ("--no-cache",)),
                    "cid": (cid, ("--no-cache",)), "cached": (str(single), ())}
        times: dict[str, list[float]] = {}
        hashes: dict[str, set[str]] = {}
        for run in range(args.runs):
            for name, (source, options) in variants.items():
                output = root / f"out-{name}-{run}"
                times.setdefault(name, []).append(mr(home, source, output, *options))
                hashes.setdefault(name, set()).add(common.canonical_sha256(common.read_ipdc_output(output)))
        assert len(set().union(*hashes.values())) == 1, f"the variants disagree: {hashes}"
        rows = [[name, f"{common.median(t):.2f}", f"{min(t):.2f}-{max(t):.2f}",
                 f"{size / 1e6 / common.median(t):.1f}"] for name, t in times.items()]
        common.print_table(f"ipdc mr --k 3 over {common.mb(size)} ({args.files} files for dir/cid), "
                           f"{args.runs} runs; {common.machine()}",
                           ["input", "median s", "range s", "MB/s"], rows)
        print(f"\nsaved {common.save('data', {'size': size, 'files': args.files, 'times': times})}")


if __name__ == "__main__":
    main()
