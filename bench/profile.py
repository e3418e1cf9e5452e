"""Where a job's runners spend their time: py-spy on every runner of a warm 2-node cluster.

A diagnostic, not a benchmark. It starts a LocalCluster of 2 nodes, attaches
``py-spy record --subprocesses`` to each agent's runner fork server (so every runner
it forks is sampled), runs one ``ipdc mr --k 2`` and prints the functions with the
most samples: **self** (the function itself was running) and **total** (it was on the
stack), as shares of the samples of runners in a map or reduce task (a runner waiting
for its next task is left out). The raw collapsed stacks stay in ``--out``
(feed them to any flamegraph tool, e.g. ``flamegraph.pl`` or speedscope).

    python bench/profile.py                        # WordCount without map_chunk, 50 MB
    python bench/profile.py --job weather --size 50MB
    python bench/profile.py --job weather-no-combine --size 20MB
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
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
import weather
import wordcount

#: Frames of a runner's tasks: samples without one are a runner or fork server waiting.
TASKS = re.compile(r"Runner\.(map|reduce) ")


def job_files(job: str, scratch: Path, size: int) -> tuple[Path, list[str]]:
    """The input and the ``ipdc mr`` options of one of the benchmarks' generic jobs."""
    if job == "wordcount":
        return wordcount.slice_corpus(wordcount.CORPUS, size), ["--map", str(wordcount.generic_map(scratch))]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", choices=("wordcount", "weather", "weather-no-combine"), default="wordcount")
    parser.add_argument("--size", type=common.parse_size, default=50 * 10**6)
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--out", type=Path, default=common.RESULTS / "profile")
    args = parser.parse_args()
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
