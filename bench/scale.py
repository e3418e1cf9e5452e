"""Scale on one machine: many agents, and choosing workers among many peers.

1. For N in --agents (default 8, 16, 32, 64), a LocalCluster of N real nodes (a
   kubo daemon and an agent each; mosquitto on the first):
   - fan-out: the time for the library's own Download step to reach all N agents
     and collect their N ``ready`` acknowledgements (MapReduceController.download:
     Download on MQTT -> each agent cats Map.py and Reduce.py from IPFS, over
     bitswap from the submitter's kubo -> GetResult ``ready`` on MQTT), median of
     --rounds, each round a fresh job id and freshly added code;
   - idle cost, over --idle seconds with no job: each agent's RSS, USS and CPU, its
     runner zygote's and warm spare runner's RSS and USS (the agent keeps one forked,
     see agent.warm_runners), and each kubo daemon's RSS and CPU for comparison.
2. Choosing K peers by XOR distance among 100k synthetic peers: ``select_nearest``
   alone, and ``PeerTable.live()`` + ``select_nearest`` as a job does it, also
   right after the live set changed and when the table's periodic silence check
   is due (see ``xor_choice``); a plain list scanned, for reference.

3. ``--footprint``: the memory of a whole idle node, default and ``init --small`` side by
   side: the proportional set size (PSS: shared pages split between their sharers, so
   the sum over processes is what the node really costs) of kubo, the agent with its
   zygote and sandboxes, and the controller service, after a few jobs and --idle
   seconds without any, against the 128 MB of a small board. The broker, which only
   the founding node runs, is shown apart.

    python bench/scale.py [--agents 8,16,32,64] [--rounds 5] [--idle 20]
    python bench/scale.py --xor-only [--peers 100000] [--choices 50]
    python bench/scale.py --footprint [--idle 60]
"""

from __future__ import annotations

import argparse
import secrets
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

#: Repeats (per K) of the slow-to-set-up "silence check due" case: each beats every peer once.
SILENCE_CHECKS = 5

sys.path.insert(0, str(common.REPO))
from ipdc.peers import Peer, PeerTable, select_nearest  # noqa: E402
from ipdc.submit.client import SwarmClient  # noqa: E402
from ipdc.submit.mapreduce import MapReduceController, MapReduceJob  # noqa: E402
from ipdc.wire.cleanup import CLEANUP, CleanUp  # noqa: E402
from ipdc.wire.download import DOWNLOAD, Download  # noqa: E402
from ipdc.wire.heartbeat import Heartbeat  # noqa: E402
from ipdc.wire.ids import JobId, NodeName  # noqa: E402
from ipdc.wire.presence import Capabilities, Presence  # noqa: E402


def fan_out(cluster: Any, rounds: int, input_file: Path) -> list[float]:
    """Seconds from the first Download sent to the last ``ready`` received, per round.

    The controller chooses every node and uploads the code as a job does; then the
    Download step runs as the controller's event loop runs it (a signed Download to
    every worker, then wait for every ``ready``), timed alone.
    """
    config = cluster.nodes[0].config
    samples = []
    with SwarmClient(config, cluster.nodes[0].signer).connect() as client, cluster.nodes[0].kubo() as kubo:
        for _ in range(rounds + 1):  # the first round warms the agents' kubo connections
            controller = MapReduceController(client, kubo, MapReduceJob(input=input_file, k=cluster.n),
                                             cluster.nodes[0].home)
            workers = [p.name for p in controller.choose_workers()]
            results = client.watch(controller.job_id)
            try:
                controller.upload(controller.choose_workers())
                assert controller.manifest is not None
                t = time.perf_counter()
                for name in workers:
                    client.send(DOWNLOAD, name, Download(controller.manifest))
                waiting = set(workers)
                while waiting:
                    result = results.get(timeout=60)
                    if result.kind == "error":
                        raise RuntimeError(f"{result.peer} failed the download: {result.error}")
                    waiting.discard(result.peer)
                samples.append(time.perf_counter() - t)
            finally:
                client.unwatch(controller.job_id)
                for name in workers:
                    client.send(CLEANUP, name, CleanUp(controller.job_id))
                if controller.manifest is not None:
                    kubo.pin_rm(*controller.manifest.chunks, *controller.manifest.code.values())
                controller.uploads.forget(controller.job_id)
    return samples[1:]


def idle_cost(cluster: Any, seconds: float) -> dict[str, list[tuple[int, int, float]]]:
    """(RSS bytes, USS bytes, CPU %) of each agent, runner zygote, spare runner and kubo
    over ``seconds`` of idling. USS (memory no other process shares) is what a forked
    runner really adds: most of its RSS is the zygote's pages, shared copy-on-write."""
    import psutil

    procs: dict[str, list[psutil.Process]] = {"agent": [], "zygote": [], "spare runner": [], "kubo": []}
    for node in cluster.nodes:
        agent = psutil.Process(node.services["agent"].pid())
        procs["agent"].append(agent)
        for zygote in agent.children():
            procs["zygote"].append(zygote)
            procs["spare runner"].extend(zygote.children())
        procs["kubo"].append(psutil.Process(node.services["ipfs"].pid()))
    start = {p.pid: p.cpu_times() for ps in procs.values() for p in ps}
    time.sleep(seconds)
    out: dict[str, list[tuple[int, int, float]]] = {}
    for kind, ps in procs.items():
        out[kind] = []
        for p in ps:
            now, before = p.cpu_times(), start[p.pid]
            cpu = (now.user + now.system - before.user - before.system) / seconds * 100
            mem = p.memory_full_info()
            out[kind].append((mem.rss, mem.uss, cpu))
    return out


def pss_mb(pid: int) -> float:
    """A process's PSS in MB (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def tree_pss(pid: int | None) -> float:
    """The PSS of a process and all its descendants (the agent: its zygote, bwrap, runners)."""
    import psutil

    if pid is None:
        return 0.0
    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    return sum(pss_mb(p.pid) for p in procs)


def footprint(idle: float) -> list[list[str]]:
    """Idle node PSS, default vs small, each after three jobs (so kubo has served blocks)."""
    import os
    import subprocess
    import tempfile

    from ipdc.node.cluster import LocalCluster

    rows = []
    data = Path(tempfile.mkdtemp(prefix="ipdc-footprint-")) / "in.txt"
    data.write_bytes(b"the quick brown fox jumps over the lazy dog\n" * 200_000)  # 9 MB
    for variant in ("default", "small"):
        with LocalCluster(3, small=variant == "small") as cluster:
            env = {**os.environ, "IPDC_HOME": str(cluster.nodes[0].home)}
            for i in range(3):
                subprocess.run([sys.executable, "-m", "ipdc.cli", "mr", str(data), "--k", "3", "-q", "--no-cache",
                                "-o", str(data.parent / f"{variant}-{i}")], env=env, check=True)
            time.sleep(idle)
            for i, node in enumerate(cluster.nodes):
                parts = {name: tree_pss(node.services[name].pid()) for name in ("ipfs", "agent", "control")}
                total = sum(parts.values())
                broker = tree_pss(node.services["mosquitto"].pid()) if i == 0 else 0.0
                rows.append([variant, f"node {i}", f"{parts['ipfs']:.0f}", f"{parts['agent']:.0f}",
                             f"{parts['control']:.0f}", f"{total:.0f}", f"{total / 128:.2f}",
                             f"{broker:.0f}" if broker else "-"])
                print(f"  {rows[-1]}", flush=True)
    return rows


class FakeClock:
    """Monotonic seconds that move only when told: lets the benchmark make the table's
    periodic silence check fall due without waiting ``peer_timeout`` seconds."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def synthetic_presence(i: int) -> Presence:
    """A peer with a random peer ID, as a real presence message would carry it."""
    name = NodeName(f"n-{i:08x}")
    return Presence(name=name, peer_id="12D3KooW" + secrets.token_hex(22), host="10.0.0.1", addrs=[],
                    caps=Capabilities(cores=2, mem_free_mb=1024, tf=False), slots=2, load=0.0, ts=time.time())


def synthetic_table(n: int, clock: FakeClock) -> PeerTable:
    """``n`` live peers, as the submitter's table holds them after connecting."""
    table = PeerTable(timeout=10.0, clock=clock)
    for i in range(n):
        p = synthetic_presence(i)
        table.update_presence(p.name, p)
    return table


def timed(samples: list[float], choose: Callable[[], object]) -> None:
    t = time.perf_counter()
    choose()
    samples.append(time.perf_counter() - t)


def choose_live(table: PeerTable, key: str, k: int) -> list[Peer]:
    """What ``MapReduceController.choose_workers`` does."""
    return select_nearest(table.live(), key, k)


def xor_choice(n: int, ks: list[int], repeats: int) -> tuple[list[list[str]], dict[str, float]]:
    """Per-choice times (ms) of the ways a job can meet the table, and one-off costs (s).

    - ``select_nearest``: on a snapshot already taken (the sorted-index search alone);
    - ``live() + select_nearest``: as ``choose_workers`` calls them, nothing changed;
    - ``... after a join``: one new peer joined since the last read (the index
      takes it in, the snapshot is copied);
    - ``... silence check due``: ``peer_timeout`` passed since the last check, so the
      read looks at every peer's clock (every peer beat meanwhile: nobody drops);
    - ``plain list``: a list that is not a snapshot, scanned (e.g. ``list(live())``).
    """
    clock = FakeClock()
    t = time.perf_counter()
    table = synthetic_table(n, clock)
    once = {"fill table": time.perf_counter() - t}
    t = time.perf_counter()
    table.live()
    once["first live() (full sort)"] = time.perf_counter() - t
    beats = [Heartbeat(name=NodeName(p.name), ts=0.0, load=0.0, running=0) for p in table.live()]
    joins = iter(range(n, n + len(ks) * repeats))
    rows = []
    for k in ks:
        samples: dict[str, list[float]] = defaultdict(list)
        for r in range(repeats):
            key = JobId.new()
            peers = table.live()
            timed(samples["select_nearest"], partial(select_nearest, peers, key, k))
            timed(samples["live() + select_nearest"], partial(choose_live, table, key, k))
            joiner = synthetic_presence(next(joins))
            table.update_presence(joiner.name, joiner)
            beats.append(Heartbeat(name=joiner.name, ts=0.0, load=0.0, running=0))
            timed(samples["live() + select_nearest after a join"], partial(choose_live, table, key, k))
            if r < SILENCE_CHECKS:
                clock.now += table.timeout / 2
                for beat in beats:
                    table.update_heartbeat(beat)
                clock.now += table.timeout / 2 + 1
                timed(samples["live() + select_nearest, silence check due"], partial(choose_live, table, key, k))
            timed(samples["plain list (scan)"], partial(select_nearest, list(peers), key, k))
        for what, taken in samples.items():
            ms = [s * 1000 for s in taken]
            rows.append([f"{n // 1000}k", str(k), what, str(len(ms)), f"{common.percentile(ms, 50):.2f}",
                         f"{common.percentile(ms, 95):.2f}", f"{max(ms):.2f}"])
    return rows, once


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agents", default="8,16,32,64", help="comma-separated cluster sizes")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--idle", type=float, default=20.0, help="seconds of idling measured")
    parser.add_argument("--peers", type=int, default=100_000)
    parser.add_argument("--choices", type=int, default=50, help="XOR choices timed per K")
    parser.add_argument("--xor-only", action="store_true", help="only the XOR choice, no cluster")
    parser.add_argument("--footprint", action="store_true",
                        help="only the idle node's memory, default vs small")
    args = parser.parse_args()
    common.require("psutil")
    print(f"machine: {common.machine()}")
    if args.footprint:
        rows = footprint(args.idle)
        common.print_table(f"Idle node PSS (MB) after 3 jobs and {args.idle:.0f} s idle: default vs "
                           "`ipdc node init --small`; ratio to a 128 MB board",
                           ["variant", "node", "kubo", "agent + zygote + sandboxes", "controller service",
                            "node total", "/ 128 MB", "broker (founder only)"], rows)
        print(f"raw results: {common.save('footprint', {'rows': rows})}")
        return

    xor_rows, xor_once = xor_choice(args.peers, [2, 4, 16], args.choices)
    common.print_table(f"XOR choice among {args.peers} synthetic peers (ms)",
                       ["peers", "K", "what", "n", "p50", "p95", "max"], xor_rows)
    print("\n" + "; ".join(f"{what}: {s * 1000:.0f} ms" for what, s in xor_once.items()))
    if args.xor_only:
        print(f"raw results: {common.save('scale', {'xor': xor_rows, 'xor_once': xor_once})}")
        return

    rows, raw = [], {}
    input_file = Path(__file__).resolve()  # any small file: only the code download is measured
    for n in [int(a) for a in args.agents.split(",") if a]:
        t = time.perf_counter()
        with common.warm_cluster(n) as cluster:
            started = time.perf_counter() - t
            fan = fan_out(cluster, args.rounds, input_file)
            idle = idle_cost(cluster, args.idle)
        raw[n] = {"start": started, "fan_out": fan, "idle": idle}

        def worst(kind: str, i: int, idle: dict[str, list[tuple[int, int, float]]] = idle) -> float:
            return max((v[i] for v in idle[kind]), default=0.0)

        def mid(kind: str, i: int, idle: dict[str, list[tuple[int, int, float]]] = idle) -> float:
            return common.median(v[i] for v in idle[kind]) if idle[kind] else 0.0

        rows.append([str(n), f"{started:.1f}", f"{common.median(fan) * 1000:.0f}", f"{max(fan) * 1000:.0f}",
                     f"{common.mb(mid('agent', 0))} / {common.mb(worst('agent', 0))}",
                     common.mb(mid("agent", 1)),
                     f"{mid('agent', 2) + 0.0:.2f} / {worst('agent', 2) + 0.0:.2f}",
                     f"{common.mb(mid('zygote', 0))} / {common.mb(mid('zygote', 1))}",
                     f"{common.mb(mid('spare runner', 0))} / {common.mb(mid('spare runner', 1))}",
                     f"{common.mb(mid('kubo', 0))} / {mid('kubo', 2):.2f}"])
        print(f"  {n} agents: {rows[-1]}", flush=True)
    common.print_table(
        f"N agents on one machine: fan-out (Download -> all ready, median/max of {args.rounds}), "
        f"idle cost over {args.idle:.0f}s (median / worst agent)",
        ["agents", "cluster start s", "fan-out ms", "max ms", "agent RSS", "agent USS", "agent CPU %",
         "zygote RSS / USS", "spare runner RSS / USS", "kubo RSS / CPU %"], rows)
    print(f"raw results: {common.save('scale', {'xor': xor_rows, 'xor_once': xor_once, 'clusters': raw})}")


if __name__ == "__main__":
    main()
