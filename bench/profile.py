"""Where a job's runners spend their time: py-spy on every runner of a warm 2-node cluster.

A diagnostic, not a benchmark. It starts a LocalCluster of 2 nodes, attaches
``py-spy record --subprocesses`` to each agent's runner fork server (so every runner
it forks is sampled), runs one ``ipdc mr --k 2`` and prints the functions with the
most samples: **self** (the function itself was running) and **total** (it was on the
stack), as shares of the samples of runners in a map or reduce task (a runner waiting
for its next task is left out). The raw collapsed stacks stay in ``--out``
(feed them to any flamegraph tool, e.g. ``flamegraph.pl`` or speedscope).

    python bench/profile.py                        # WordCount without map_chunk, 50 MB
    python bench/profile.py --job wordcount-fast   # ... with it (the shipped Map.py)
    python bench/profile.py --job weather --size 50MB
    python bench/profile.py --job weather-no-combine --size 20MB
    python bench/profile.py --job weather --phases 12MB   # CPU seconds per step, no cluster

Samples are of wall time: on a machine others are using, a runner (nice 19) that waits
for a core is sampled where it waits, so shares move between runs. ``--phases`` measures
CPU time instead, of the runner's own functions on one chunk in this process.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
import weather
import wordcount

#: Frames of a runner's tasks: samples without one are a runner or fork server waiting.
TASKS = re.compile(r"Runner\.(map|reduce) ")
#: Map outputs a reduce task merges in ``--phases`` (a 2-worker job of 202 MB has 8 map tasks).
REDUCE_INPUTS = 8


def job_files(job: str, scratch: Path, size: int) -> tuple[Path, list[str]]:
    """The input and the ``ipdc mr`` options of one of the benchmarks' jobs."""
    if job.startswith("wordcount"):
        mapper = wordcount.MAP if job == "wordcount-fast" else wordcount.generic_map(scratch)
        return wordcount.slice_corpus(wordcount.CORPUS, size), ["--map", str(mapper)]
    mapper, reducer = weather.job_files(scratch, combine=job == "weather")
    data = weather.make_data(common.BENCH / "corpus" / f"weather-{size}.csv", size)
    return data, ["--map", str(mapper), "--reduce", str(reducer)]


def fork_servers(cluster: object) -> list[int]:
    """The pids of the runner fork servers (``python -m ipdc.runner``) of every agent."""
    return [pid for pid, argv in common.descendants(common.cluster_pids(cluster)) if "ipdc.runner" in argv]


def top(stacks: Counter[str], n: int) -> tuple[list[list[str]], list[list[str]]]:
    """(self rows, total rows) of the ``n`` functions with the most samples."""
    total = sum(stacks.values()) or 1
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for stack, count in stacks.items():
        frames = stack.split(";")
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    return ([[f"{100 * c / total:.1f}%", f] for f, c in own.most_common(n)],
            [[f"{100 * c / total:.1f}%", f] for f, c in inclusive.most_common(n)])


def phases(job: str, scratch: Path, size: int, chunk: int, repeat: int) -> None:
    """CPU seconds of each step of one map task and one reduce task, run in this process
    on one chunk of the job's input: the runner's own functions, without a cluster.

    CPU time (``time.process_time``, best of ``repeat``) hardly moves with other load on
    the machine, unlike wall time and py-spy's samples, so it is what compares two
    versions of the code. The reduce merges ``REDUCE_INPUTS`` copies of the chunk's first
    partition, as a reducer of a job of that many map tasks does.
    """
    sys.path.insert(0, str(common.REPO))
    from ipdc.runner.mapreduce import load_module, map_pairs, reduce_partitions
    from ipdc.wire.partition import write_partitions

    data, options = job_files(job, scratch, size)
    files = dict(zip(options[::2], options[1:][::2], strict=True))
    mapper = load_module(Path(files["--map"]), "profiled_map")
    reducer = load_module(Path(files.get("--reduce", str(wordcount.REDUCE))), "profiled_reduce")
    with open(data, "rb") as f:
        raw = f.read(chunk)
    raw = raw[: raw.rfind(b"\n") + 1]

    def best(step: Callable[[], Any]) -> tuple[float, Any]:
        times, result = [], None
        for _ in range(repeat):
            t = time.process_time()
            result = step()
            times.append(time.process_time() - t)
        return min(times), result

    decode, text = best(lambda: raw.decode("utf-8", "surrogateescape"))
    mapped, pairs = best(lambda: map_pairs(mapper, text))
    written, docs = best(lambda: write_partitions(pairs, 2))
    reduced, _ = best(lambda: reduce_partitions(reducer, [docs[0]] * REDUCE_INPUTS))
    common.print_table(
        f"{job}, {common.REPO}: one map task of {common.mb(len(raw))}, one reduce task of {REDUCE_INPUTS} "
        f"map outputs of {len(docs[0]) / 1e3:.0f} kB; CPU s, best of {repeat}",
        ["decode", "map_pairs", "write_partitions (K=2)", "reduce_partitions"],
        [[f"{decode:.3f}", f"{mapped:.3f}", f"{written:.3f}", f"{reduced:.3f}"]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", choices=("wordcount", "wordcount-fast", "weather", "weather-no-combine"),
                        default="wordcount", help="wordcount: without map_chunk; wordcount-fast: with it")
    parser.add_argument("--size", type=common.parse_size, default=50 * 10**6)
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--out", type=Path, default=common.RESULTS / "profile")
    parser.add_argument("--phases", type=common.parse_size, metavar="CHUNK",
                        help="instead: CPU seconds of each step on one CHUNK of input, in this process")
    parser.add_argument("--repeat", type=int, default=3, help="with --phases: best of this many")
    args = parser.parse_args()
    if args.phases:
        with tempfile.TemporaryDirectory(prefix="ipdc-profile-") as tmp:
            phases(args.job, Path(tmp), max(args.size, args.phases), args.phases, args.repeat)
        return
    common.require("psutil")
    if shutil.which("py-spy") is None:
        sys.exit(f"py-spy is not installed: {common.INSTALL_HINT}")
    args.out.mkdir(parents=True, exist_ok=True)
    stacks: Counter[str] = Counter()
    with tempfile.TemporaryDirectory(prefix="ipdc-profile-") as tmp, common.warm_cluster(2) as cluster:
        data, options = job_files(args.job, Path(tmp), args.size)
        spies = [subprocess.Popen(["py-spy", "record", "--subprocesses", "--format", "raw", "--function",
                                   "--rate", "200", "--pid", str(pid),
                                   "--output", str(args.out / f"{args.job}-{pid}.txt")],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                 for pid in fork_servers(cluster)]
        env = dict(os.environ, PYTHONPATH=str(common.REPO), IPDC_HOME=str(cluster.nodes[0].home))
        run = common.run_tree(common.ipdc_mr_argv(data, Path(tmp) / "out", *options), env)
        for spy in spies:
            spy.send_signal(signal.SIGINT)
            spy.wait(timeout=60)
    for path in args.out.glob(f"{args.job}-*.txt"):
        for line in path.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if TASKS.search(stack):  # a runner at work, not one waiting for its next task
                stacks[stack.split(";", 1)[-1]] += int(count)  # without the process's own frame
    own, inclusive = top(stacks, args.top)
    print(f"{args.job}, {common.mb(data.stat().st_size)}: ipdc mr wall {run.wall:.2f} s, "
          f"{sum(stacks.values())} samples of runners in a task at 200 Hz; raw stacks in {args.out}")
    common.print_table("self (the function was running)", ["share", "function"], own)
    common.print_table("total (the function was on the stack)", ["share", "function"], inclusive)


if __name__ == "__main__":
    main()
