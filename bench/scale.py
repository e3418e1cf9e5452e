"""Scale on one machine: many agents, and choosing workers among many peers.

1. For N in --agents (default 8, 16, 32, 64), a LocalCluster of N real nodes (a
   kubo daemon and an agent each; mosquitto on the first):
   - fan-out: the time for the library's own Download step to reach all N agents
     and collect their N ``ready`` acknowledgements (MapReduceController.download:
     Download on MQTT -> each agent cats Map.py and Reduce.py from IPFS, over
     bitswap from the submitter's kubo -> GetResult ``ready`` on MQTT), median of
     --rounds, each round a fresh job id and freshly added code;
   - idle cost, over --idle seconds with no job: each agent's RSS and CPU, its
     warm spare runner's RSS (the agent keeps one started, see agent.warm_runners),
     and each kubo daemon's RSS and CPU for comparison.
2. Choosing K peers by XOR distance among 100k synthetic peers: ``select_nearest``
   alone, and ``PeerTable.live()`` + ``select_nearest`` as a job does it.

    python bench/scale.py [--agents 8,16,32,64] [--rounds 5] [--idle 20]
"""

from __future__ import annotations

import argparse
import secrets
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

sys.path.insert(0, str(common.REPO))
from channels.cleanup import CLEANUP, CleanUp  # noqa: E402
from channels.presence import Capabilities, Presence  # noqa: E402
from ipdc.client import SwarmClient  # noqa: E402
from ipdc.ids import JobId, NodeName  # noqa: E402
from ipdc.kubo import KuboClient  # noqa: E402
from ipdc.mapreduce import MapReduceController, MapReduceJob  # noqa: E402
from ipdc.peers import PeerTable, select_nearest  # noqa: E402


def fan_out(cluster: Any, rounds: int, input_file: Path) -> list[float]:
    """Seconds from the first Download sent to the last ``ready`` received, per round."""
    config = cluster.nodes[0].config
    samples = []
    with SwarmClient(config).connect() as client, KuboClient(config.kubo_api_url) as kubo:
        for _ in range(rounds + 1):  # the first round warms the agents' kubo connections
            controller = MapReduceController(client, kubo, MapReduceJob(input=input_file, k=cluster.n))
            workers = controller.choose_workers()
            results = client.watch(controller.job_id)
            try:
                manifest, _ = controller.upload(workers)
                t = time.perf_counter()
                controller.download(manifest, workers, results)
                samples.append(time.perf_counter() - t)
            finally:
                client.unwatch(controller.job_id)
                for peer in workers:
                    client.send(CLEANUP, peer.name, CleanUp(controller.job_id))
    return samples[1:]


def idle_cost(cluster: Any, seconds: float) -> dict[str, list[tuple[int, float]]]:
    """(RSS bytes, CPU %) of each agent, spare runner and kubo over ``seconds`` of idling."""
    import psutil

    procs: dict[str, list[psutil.Process]] = {"agent": [], "spare runner": [], "kubo": []}
    for node in cluster.nodes:
        agent = psutil.Process(node.services["agent"].pid())
        procs["agent"].append(agent)
        procs["spare runner"].extend(agent.children())
        procs["kubo"].append(psutil.Process(node.services["ipfs"].pid()))
    start = {p.pid: p.cpu_times() for ps in procs.values() for p in ps}
    time.sleep(seconds)
    out: dict[str, list[tuple[int, float]]] = {}
    for kind, ps in procs.items():
        out[kind] = []
        for p in ps:
            now, before = p.cpu_times(), start[p.pid]
            cpu = (now.user + now.system - before.user - before.system) / seconds * 100
            out[kind].append((p.memory_info().rss, cpu))
    return out


def synthetic_table(n: int) -> PeerTable:
    """``n`` live peers with random peer IDs, as the submitter's table would hold them."""
    table = PeerTable(timeout=3600)
    caps = Capabilities(cores=2, mem_free_mb=1024, tf=False)
    for i in range(n):
        name = NodeName(f"n-{i:08x}")
        table.update_presence(name, Presence(name=name, peer_id="12D3KooW" + secrets.token_hex(22),
                                             host="10.0.0.1", addrs=[], caps=caps, slots=2, load=0.0,
                                             ts=time.time()))
    return table


def xor_choice(n: int, ks: list[int], repeats: int) -> list[list[str]]:
    table = synthetic_table(n)
    rows = []
    for k in ks:
        alone, with_live = [], []
        peers = table.live()
        for _ in range(repeats):
            key = JobId.new()
            t = time.perf_counter()
            select_nearest(peers, key, k)
            alone.append(time.perf_counter() - t)
            t = time.perf_counter()
            select_nearest(table.live(), key, k)
            with_live.append(time.perf_counter() - t)
        for what, samples in (("select_nearest", alone), ("live() + select_nearest", with_live)):
            ms = [s * 1000 for s in samples]
            rows.append([f"{n // 1000}k", str(k), what, f"{common.percentile(ms, 50):.2f}",
                         f"{common.percentile(ms, 95):.2f}", f"{max(ms):.2f}"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agents", default="8,16,32,64", help="comma-separated cluster sizes")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--idle", type=float, default=20.0, help="seconds of idling measured")
    parser.add_argument("--peers", type=int, default=100_000)
    args = parser.parse_args()
    common.require("psutil")
    print(f"machine: {common.machine()}")

    xor_rows = xor_choice(args.peers, [2, 4, 16], 50)
    common.print_table(f"XOR choice among {args.peers} synthetic peers (ms, 50 choices)",
                       ["peers", "K", "what", "p50", "p95", "max"], xor_rows)

    rows, raw = [], {}
    input_file = Path(__file__).resolve()  # any small file: only the code download is measured
    for n in [int(a) for a in args.agents.split(",") if a]:
        t = time.perf_counter()
        with common.warm_cluster(n) as cluster:
            started = time.perf_counter() - t
            fan = fan_out(cluster, args.rounds, input_file)
            idle = idle_cost(cluster, args.idle)
        raw[n] = {"start": started, "fan_out": fan, "idle": idle}

        def worst(kind: str, i: int) -> float:
            return max(v[i] for v in idle[kind])

        def mid(kind: str, i: int) -> float:
            return common.median(v[i] for v in idle[kind])

        rows.append([str(n), f"{started:.1f}", f"{common.median(fan) * 1000:.0f}", f"{max(fan) * 1000:.0f}",
                     f"{common.mb(mid('agent', 0))} / {common.mb(worst('agent', 0))}",
                     f"{mid('agent', 1) + 0.0:.2f} / {worst('agent', 1) + 0.0:.2f}",
                     common.mb(mid("spare runner", 0)),
                     f"{common.mb(mid('kubo', 0))} / {mid('kubo', 1):.2f}"])
        print(f"  {n} agents: {rows[-1]}", flush=True)
    common.print_table(
        f"N agents on one machine: fan-out (Download -> all ready, median/max of {args.rounds}), "
        f"idle cost over {args.idle:.0f}s (median / worst agent)",
        ["agents", "cluster start s", "fan-out ms", "max ms", "agent RSS", "agent CPU %",
         "spare runner RSS", "kubo RSS / CPU %"], rows)
    print(f"raw results: {common.save('scale', {'xor': xor_rows, 'clusters': raw})}")


if __name__ == "__main__":
    main()
