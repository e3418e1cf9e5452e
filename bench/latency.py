"""Latency of tiny MapReduce jobs on a warm 4-node local cluster, as a user meets it.

Everything is measured side by side in one run, on one warm ``LocalCluster``:

* **tiny jobs through the controller service** (1 KB input, K=4 by default): each job is
  submitted over the node's control socket, as ``ipdc mr`` does, and followed with
  ``watch`` to its end; its wall time runs from the submit request to the last answer.
  p50/p95 over ``--jobs`` jobs, after ``--warmup`` unmeasured ones. The per-phase
  breakdown comes from the job's own record (``summary.timings``, as in ``job.json``):
  upload, download (Download until every worker is ready), map, reduce, fetch (from the
  last reduce result to every part in place), and ``service`` (the wall time outside
  the controller's ``run()``: queueing, recording, the socket). ``job.json``'s
  ``transport`` is checked, so each batch really took the path it is named after.
* **inline vs IPFS**: the same jobs with ``agent.inline_max`` at its default (128 KiB)
  and at 0 (every payload through kubo), the controller service restarted in between;
  batches alternate so drift on a shared machine hits both.
* **the whole ``ipdc mr``** from a shell against the warm cluster (p50), and the walls of
  ``ipdc --help``, ``ipdc peers`` and ``python3 -c pass`` in the same rounds: the venv's
  ``ipdc`` console script, with bytecode written as an installed IPDC has it.

* ``--profile SECONDS``: afterwards, py-spy (``--idle``, so waits count: this is wall time)
  records the controller service and every agent while tiny jobs run for that long, and
  the script prints where a job's wall time goes: in the controller's job thread, in the
  agents' task threads, and in their message dispatchers (raw stacks in ``--out``).

    python bench/latency.py [--jobs 60] [--warmup 3] [--k 4] [--size 1024] [--cli-runs 10]
                            [--runner-nice 0] [--warm-runners 2] [--profile 20 --out DIR]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

PHASES = ("upload", "download", "map", "reduce", "fetch", "service")
PATHS = {"inline": 128 << 10, "ipfs": 0}


def tiny_input(path: Path, size: int) -> Path:
    """``size`` bytes of short words, one line of about 60 bytes after another."""
    words = [f"w{i % 37}" for i in range(size)]
    text, line = [], []
    for word in words:
        line.append(word)
        if len(" ".join(line)) > 56:
            text.append(" ".join(line))
            line = []
    data = ("\n".join(text) + "\n").encode()[:size - 1] + b"\n"
    path.write_bytes(data)
    return path


def use_path(node: Any, inline_max: int) -> None:
    """Restart node 0's controller service with ``agent.inline_max`` set."""
    from ipdc.config import save_config
    from ipdc.node.lifecycle import Node

    node.services["control"].stop()
    save_config(node.config.replace(agent={"inline_max": inline_max}), node.conf_path)
    Node(node.home).start()


def submit(home: Path, data: Path, k: int, out: Path) -> tuple[float, dict[str, Any]]:
    """One job through the controller service: (wall seconds, its summary)."""
    from ipdc.ctlsock import ControlClient

    client = ControlClient(home, timeout=120)
    spec = {"input": str(data), "k": k, "map_file": str(common.REPO / "ipdc/jobs/mapreduce/Map.py"),
            "reduce_file": str(common.REPO / "ipdc/jobs/mapreduce/Reduce.py"), "output": str(out),
            "cache": False}  # every job computed: the same input would be answered from the swarm's cache
    t = time.perf_counter()
    job_id = client.call("submit", job=spec, cwd=str(out.parent))["job_id"]
    last: dict[str, Any] = {}
    for answer in client.stream("watch", job_id=job_id):
        last = answer
    wall = time.perf_counter() - t
    if last.get("state") != "succeeded":
        raise RuntimeError(f"job {job_id} ended {last.get('state')}: {last.get('error')}")
    return wall, last["result"]


def batch(cluster: Any, path: str, data: Path, k: int, jobs: int, warmup: int, work: Path,
          samples: dict[str, dict[str, list[float]]]) -> None:
    node = cluster.nodes[0]
    use_path(node, PATHS[path])
    for i in range(warmup + jobs):
        wall, summary = submit(node.home, data, k, work / f"{path}-{i}-{time.monotonic_ns()}")
        moved = summary["transport"]
        if any(key.endswith("_inline" if path == "ipfs" else "_ipfs") for key in moved):
            raise RuntimeError(f"a {path} job moved payloads the other way: {moved}")
        if i < warmup:
            continue
        timings = summary["timings"]
        found = samples.setdefault(path, {})
        found.setdefault("wall", []).append(wall)
        for phase in PHASES[:-1]:
            found.setdefault(phase, []).append(timings.get(phase, 0.0))
        found.setdefault("service", []).append(wall - timings["total"])


def cli_rounds(cluster: Any, data: Path, k: int, runs: int, work: Path) -> dict[str, list[float]]:
    """The whole commands, interleaved round by round so they share the machine's state."""
    env = {**os.environ, "IPDC_HOME": str(cluster.nodes[0].home)}
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # as installed: bytecode cached after the first run
    script = Path(sys.executable).with_name("ipdc")  # the console script a user runs
    ipdc = [str(script)] if script.exists() else [sys.executable, "-m", "ipdc.cli"]
    commands = {
        "ipdc mr (tiny job, whole command)": lambda i: [*ipdc, "mr", str(data), "--k", str(k), "-q", "--no-cache",
                                                        "-o", str(work / f"cli-{i}")],
        "ipdc --help": lambda i: [*ipdc, "--help"],
        "ipdc peers": lambda i: [*ipdc, "peers"],
        "python3 -c pass": lambda i: [sys.executable, "-c", "pass"],
    }
    found: dict[str, list[float]] = {name: [] for name in commands}
    for i in range(runs + 1):
        for name, argv in commands.items():
            t = time.perf_counter()
            subprocess.run(argv(i), env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           cwd=work)
            if i:  # the first round writes the bytecode and warms the page cache
                found[name].append(time.perf_counter() - t)
    return found


#: (what, the frame whose callees are counted, how many frames below it name a row)
PROFILE_VIEWS = (
    ("controller job thread", "control", "MapReduceController.run ", 2),
    ("agent task threads", "agent", "Agent._run ", 4),
    ("agent dispatchers", "agent", "Agent.dispatch ", 1),
)


def profile(cluster: Any, data: Path, k: int, seconds: float, work: Path, out: Path) -> None:
    """py-spy over the controller service and the agents while tiny jobs run; a summary."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        sys.exit("--profile needs py-spy: pip install py-spy")
    out.mkdir(parents=True, exist_ok=True)
    node = cluster.nodes[0]
    targets = {"control": node.services["control"].pid()}
    targets.update({f"agent{i}": n.services["agent"].pid() for i, n in enumerate(cluster.nodes)})
    spies = [subprocess.Popen([spy, "record", "--pid", str(pid), "--idle", "--rate", "200", "--format", "raw",
                               "-o", str(out / f"{name}.txt"), "--duration", str(int(seconds) + 3)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for name, pid in targets.items()]
    time.sleep(1.5)  # py-spy attaches
    t, jobs = time.monotonic(), 0
    while time.monotonic() - t < seconds:
        submit(node.home, data, k, work / f"profiled-{jobs}")
        jobs += 1
    for process in spies:
        process.wait()
    print(f"\n### Where the wall time goes (py-spy --idle, 200 Hz, {jobs} jobs in {seconds:g} s)")
    for what, prefix, anchor, depth in PROFILE_VIEWS:
        rows: Counter[str] = Counter()
        for path in out.glob(f"{prefix}*.txt"):
            for line in path.read_text().splitlines():
                stack, _, count = line.rpartition(" ")
                frames = stack.split(";")
                at = [i for i, f in enumerate(frames) if f.startswith(anchor)]
                if at:
                    below = frames[at[-1] + 1:at[-1] + 1 + depth] or ["(itself)"]
                    named = (re.sub(r" \(.*?([\w.]+\.py):\d+\)", r" (\1)", f) for f in below)
                    rows[" > ".join(named)] += int(count)
        total = sum(rows.values())
        print(f"\n{what}: {total / 200 / max(jobs, 1) * 1000:.0f} ms of samples per job\n")
        for row, count in rows.most_common(8):
            print(f"- {count / total:5.1%} {row}")


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=60, help="measured jobs per path (default 60)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--size", type=int, default=1024, help="input bytes (default 1024)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating inline/IPFS batches per path")
    parser.add_argument("--cli-runs", type=int, default=10)
    parser.add_argument("--runner-nice", type=int, default=None,
                        help="the runners' niceness (default: sandbox.nice, 19)")
    parser.add_argument("--warm-runners", type=int, default=None,
                        help="agent.warm_runners of every node (default 1)")
    parser.add_argument("--profile", type=float, default=0, metavar="SECONDS",
                        help="then py-spy the controller service and the agents for this long")
    parser.add_argument("--out", type=Path, default=common.RESULTS / "latency-profile")
    args = parser.parse_args()

    print(f"machine: {common.machine()}")
    samples: dict[str, dict[str, list[float]]] = {}
    warm = args.warm_runners
    settings = {} if warm is None else {"settings": {"agent": {"warm_runners": warm}}}
    with tempfile.TemporaryDirectory(prefix="ipdc-latency-") as tmp, \
            common.warm_cluster(4, nice=args.runner_nice, **settings) as cluster:
        work = Path(tmp)
        data = tiny_input(work / "tiny.txt", args.size)
        per_batch = max(1, args.jobs // args.rounds)
        for r in range(args.rounds):
            for path in (("inline", "ipfs") if r % 2 == 0 else ("ipfs", "inline")):
                batch(cluster, path, data, args.k, per_batch, args.warmup, work, samples)
        use_path(cluster.nodes[0], PATHS["inline"])
        cli = cli_rounds(cluster, data, args.k, args.cli_runs, work)
        if args.profile:
            profile(cluster, data, args.k, args.profile, work, args.out)

    n = len(samples["inline"]["wall"])
    rows = []
    for what in ("wall", *PHASES):
        a, b = samples["inline"][what], samples["ipfs"][what]
        ratio = common.median(b) / common.median(a) if common.median(a) > 0 else float("nan")
        rows.append([what, ms(common.median(a)), ms(common.percentile(a, 95)), ms(common.median(b)),
                     ms(common.percentile(b, 95)), f"{ratio:.2f}"])
    common.print_table(f"Tiny jobs through the controller service ({args.size} B, K={args.k}, warm, {n} jobs "
                       "per path), ms", ["", "inline p50", "inline p95", "IPFS p50", "IPFS p95",
                                         "IPFS/inline (p50)"], rows)
    common.print_table(f"Whole commands ({args.cli_runs} runs each, interleaved), ms",
                       ["command", "p50", "min", "max"],
                       [[name, ms(common.median(v)), ms(min(v)), ms(max(v))] for name, v in cli.items()])
    saved = common.save("latency", {"args": vars(args), "jobs": samples, "cli": cli})
    print(f"\nraw figures: {saved}")


if __name__ == "__main__":
    main()
