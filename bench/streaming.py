"""Hadoop Streaming against Python stages: WordCount on a warm K-node local cluster.

Variants (each the same counts, checked against a Counter of the input's words):

* ``python``: the shipped Map.py (``map_chunk``, a Counter) and Reduce.py;
* ``awk``: ``awk '{for (i = 1; i <= NF; i++) print $i "\\t1"}'`` and the shipped
  streaming reducer ``sum_reduce.py``: every word crosses the shuffle as a line;
* ``awk+combiner``: the same with ``sum_reduce.py`` as the combiner too;
* ``c+combiner``: a C mapper compiled here (words split on C-locale whitespace),
  shipped with ``--file``, with the same combiner and reducer.

The corpus is the first ``--size`` bytes of ``bench/corpus/corpus.txt`` (see README),
line-aligned, or the shipped WordCount input repeated when there is no corpus.
Words are split on blanks for awk and on all whitespace for the others, so each
variant is checked against its own reference.

    python bench/streaming.py [--size 20MB] [--k 2] [--runs 3]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

sys.path.insert(0, str(common.REPO))
from ipdc.jobs import shipped
from ipdc.submit.client import SwarmClient
from ipdc.submit.mapreduce import MapReduceController, MapReduceJob

AWK = "awk '{for (i = 1; i <= NF; i++) print $i \"\\t1\"}'"
SUM = shipped("streaming", "sum_reduce.py")
C_MAPPER = r"""
#include <stdio.h>
#include <ctype.h>
int main(void) {
    static char out[1 << 16];
    setvbuf(stdout, out, _IOFBF, sizeof out);
    int c, in_word = 0;
    while ((c = getchar_unlocked()) != EOF) {
        if (isspace(c)) { if (in_word) fputs("\t1\n", stdout); in_word = 0; }
        else { putchar_unlocked(c); in_word = 1; }
    }
    if (in_word) fputs("\t1\n", stdout);
    return 0;
}
"""


def corpus(path: Path, size: int) -> bytes:
    source = common.REPO / "bench" / "corpus" / "corpus.txt"
    if source.exists():
        with open(source, "rb") as f:
            data = f.read(size)
        data = data[:data.rfind(b"\n") + 1]
    else:
        seed = shipped("mapreduce", "input.txt").read_bytes()
        data = seed * (size // len(seed) + 1)
        data = data[:data.rfind(b"\n", 0, size) + 1]
    path.write_bytes(data)
    return data


def counts_of(output: Path, k: int) -> Counter[bytes]:
    counts: Counter[bytes] = Counter()
    for p in range(k):
        for line in (output / f"part-{p:05d}").read_bytes().splitlines():
            key, _, value = line.rpartition(b"\t")
            counts[key] += int(value)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="20MB")
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    print(f"machine: {common.machine()}")
    with tempfile.TemporaryDirectory(prefix="ipdc-bench-streaming-") as tmp:
        work = Path(tmp)
        data = corpus(work / "in.txt", common.parse_size(args.size))
        subprocess.run(["gcc", "-O2", "-o", str(work / "wc_map"), "-x", "c", "-"], input=C_MAPPER.encode(),
                       check=True)
        blanks = Counter(w for line in data.split(b"\n") for w in re.split(rb"[ \t]+", line) if w)
        spaces = Counter(data.split())
        variants: dict[str, tuple[dict[str, Any], Counter[bytes]]] = {
            "python": ({}, spaces),
            "awk": (dict(mapper=AWK, reducer=SUM.name, files=(SUM,)), blanks),
            "awk+combiner": (dict(mapper=AWK, combiner=SUM.name, reducer=SUM.name, files=(SUM,)), blanks),
            "c+combiner": (dict(mapper=str(work / "wc_map"), combiner=SUM.name, reducer=SUM.name,
                                files=(SUM, work / "wc_map")), spaces),
        }
        walls: dict[str, list[float]] = {name: [] for name in variants}
        with common.warm_cluster(args.k) as cluster:
            node = cluster.nodes[0]
            with SwarmClient(node.config, node.signer).connect() as client, node.kubo() as kubo:
                for run in range(args.runs):
                    for name, (options, expected) in variants.items():
                        out = work / f"out-{name}-{run}"
                        job = MapReduceJob(input=work / "in.txt", k=args.k, output=out, **options)
                        t = time.perf_counter()
                        MapReduceController(client, kubo, job, node.home).run()
                        walls[name].append(time.perf_counter() - t)
                        if counts_of(out, args.k) != expected:
                            raise SystemExit(f"{name}: the counts differ from the reference")
    rows = [[name, f"{common.median(w):.2f}", f"{min(w):.2f}", len(w),
             f"{len(data) / 1e6 / common.median(w):.1f}"] for name, w in walls.items()]
    common.print_table(f"WordCount, {common.mb(len(data))}, K={args.k} (wall seconds)",
                       ["variant", "median", "min", "runs", "MB/s"], rows)
    common.save("streaming", {"size": len(data), "k": args.k, "walls": walls})


if __name__ == "__main__":
    main()
