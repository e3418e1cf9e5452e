"""What keeping TF servers off the network costs: steps/s and wall time of the TF example
(chief + 2 workers + 1 ps, ParameterServerStrategy), direct against through IPDC.

    python bench/tf_tunnels.py [--runs 3] [--steps 300] [--variants direct,direct-nice,one-host,netns]

* ``direct``: 3 TF servers and the chief as plain processes on 127.0.0.1, no sandbox,
  no relay, no kubo: TF as its docs run it (and every port open to the LAN).
* ``direct-nice``: the same at nice 19, as IPDC runs TF servers (like every runner), so
  that on a busy machine the difference to the variants below is the isolation's alone.
* ``one-node``: ``ipdc tf`` on a 1-node LocalCluster: every server in its sandbox,
  relays over unix sockets between sandboxes of one host, the chief in its own
  namespace; no kubo stream.
* ``one-host``: ``ipdc tf`` on a 4-node LocalCluster (one machine, 127.0.0.1): a server
  on each of nodes 1-3, the chief on node 0; every stream between nodes goes relay,
  kubo ``p2p forward``, the libp2p swarm over loopback, kubo ``p2p listen``, relay.
* ``netns``: the same across 4 hosts in network namespaces (tests/multihost/harness.py;
  needs root): the libp2p streams cross a veth bridge.

Figures per run: **steps/s** over the example's timed steps (after 5 untimed warm-up
steps), **up s** (``ipdc tf SPEC``: placement, Download, sandboxes, TF import and the
controller's check through every tunnel; for ``direct``, until every server answers),
**chief s** (the chief's run, TF's import included) and **total s** (the two). Medians
of the runs; variants alternate run by run.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

sys.path.insert(0, str(common.REPO))
from ipdc.net import HTTP2_PREFACE
from ipdc.node.cluster import LocalCluster
from ipdc.peers import xor_key
from ipdc.spawn import wait_for
from ipdc.submit.tf import EXAMPLE

SPEC = {"chief": [0], "worker": [0, 1], "ps": [0]}
Runner = Callable[[int], dict[str, float]]


def result_of(output: str) -> dict[str, Any]:
    if "RESULT " not in output:
        raise RuntimeError(f"the chief printed no RESULT:\n{output[-3000:]}")
    result: dict[str, Any] = json.loads(output.rsplit("RESULT ", 1)[1].splitlines()[0])
    if result["loss_after"] >= 0.2 * result["loss_before"]:
        raise RuntimeError(f"the example did not train: {result}")
    return result


# -- direct -----------------------------------------------------------------------------
def tcp_grpc_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            sock.sendall(HTTP2_PREFACE)
            return len(sock.recv(9)) > 3
    except OSError:
        return False


@contextmanager
def direct(nice: int = 0) -> Iterator[Runner]:
    def run(steps: int) -> dict[str, float]:
        ports = []
        for _ in range(4):
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                ports.append(sock.getsockname()[1])
        cluster = {"chief": [f"127.0.0.1:{ports[0]}"], "ps": [f"127.0.0.1:{ports[1]}"],
                   "worker": [f"127.0.0.1:{ports[2]}", f"127.0.0.1:{ports[3]}"]}
        env = {**os.environ, "PYTHONPATH": str(common.REPO)}
        launcher = ["nice", "-n", str(nice), sys.executable, "-m", "ipdc.runner.tfserver"]
        started = time.monotonic()
        servers = [subprocess.Popen([*launcher, json.dumps({"label": "bench/direct", "cluster": cluster,
                                                            "task": {"type": job, "index": i}})],
                                    env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                   for job, i in (("ps", 0), ("worker", 0), ("worker", 1))]
        try:
            if not wait_for(lambda: all(tcp_grpc_answers(p) for p in ports[1:]), 180, 0.1):
                raise RuntimeError("the direct TF servers did not answer")
            up = time.monotonic() - started
            chief = {"label": "bench/direct", "cluster": cluster, "task": {"type": "chief", "index": 0}}
            argv = [*launcher, json.dumps(chief), "--", sys.executable, str(EXAMPLE), "--steps", str(steps)]
            done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
            return figures(up, time.monotonic() - started - up, result_of(done.stdout + done.stderr))
        finally:
            for server in servers:
                server.kill()
                server.wait()
    yield run


def figures(up: float, chief: float, result: dict[str, Any]) -> dict[str, float]:
    return {"steps/s": result["steps_per_second"], "up s": up, "chief s": chief, "total s": up + chief}


# -- through IPDC -------------------------------------------------------------------------
def name_on(peers: list[tuple[str, str]], hosts: set[str], prefix: str) -> str:
    """A cluster name whose ``len(hosts)`` nearest peers (name, peer ID) are ``hosts``."""
    for i in range(100000):
        name = f"{prefix}{i}"
        order = sorted(peers, key=lambda p: xor_key(p[1]) ^ xor_key(name))
        if {n for n, _ in order[:len(hosts)]} == hosts:
            return name
    raise RuntimeError("no cluster name places the servers as wanted")


Cli = Callable[[list[str]], subprocess.CompletedProcess[str]]


def through_ipdc(cli: Cli, peers: list[tuple[str, str]], hosts: set[str], spec: Path) -> Runner:
    """A run: ``ipdc tf SPEC``, ``ipdc tf run NAME -- python example.py``, ``ipdc tf down NAME``."""
    names = iter(range(10**6))

    def run(steps: int) -> dict[str, float]:
        name = name_on(peers, hosts, f"bench{next(names)}-")
        started = time.monotonic()
        cli(["tf", str(spec), "--name", name])
        up = time.monotonic() - started
        try:
            done = cli(["tf", "run", name, "--", sys.executable, str(EXAMPLE), "--steps", str(steps)])
            return figures(up, time.monotonic() - started - up, result_of(done.stdout + done.stderr))
        finally:
            cli(["tf", "down", name])
    return run


def local_cli(home: Path) -> Cli:
    env = {**os.environ, "IPDC_HOME": str(home), "PYTHONPATH": str(common.REPO)}

    def cli(args: list[str]) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([sys.executable, "-m", "ipdc.cli", *args], env=env, capture_output=True,
                              text=True, check=False, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"ipdc {' '.join(args)} failed:\n{done.stderr[-3000:]}")
        return done
    return cli


@contextmanager
def local(nodes: int, base: Path, spec: Path) -> Iterator[Runner]:
    """``nodes`` real nodes on this machine; with more than one, a server on each of nodes 1-3."""
    with LocalCluster(nodes, base=base, slots=3 if nodes == 1 else 1) as cluster:
        cli = local_cli(cluster.nodes[0].home)
        rows: list[dict[str, Any]] = []

        def all_live() -> bool:
            rows[:] = json.loads(cli(["peers", "--json"]).stdout)
            return len(rows) == nodes
        if not wait_for(all_live, 60, 0.3):
            raise RuntimeError(f"only {len(rows)} of {nodes} nodes announced themselves")
        peers = [(r["name"], r["peer_id"]) for r in rows]
        hosts = {n.config.node.name for n in (cluster.nodes[1:4] if nodes > 1 else cluster.nodes)}
        yield through_ipdc(cli, peers, hosts, spec)


@contextmanager
def netns(base: Path, spec: Path) -> Iterator[Runner]:
    """Four hosts in network namespaces (root only): servers on hosts 1-3, chief on host 0."""
    from tests.multihost.harness import Cluster, Lab

    lab = Lab(4, base)
    cluster = Cluster(lab, base)
    try:
        lab.create()
        cluster.start()
        owner = cluster.broker_host

        def cli(args: list[str]) -> subprocess.CompletedProcess[str]:
            step = args[1] if args[1] in ("run", "down", "list", "--json") else "up"
            return cluster.run(owner, args, f"{args[0]}-{step}", timeout=600)
        rows = json.loads(cli(["peers", "--json"]).stdout)
        peers = [(r["name"], r["peer_id"]) for r in rows]
        yield through_ipdc(cli, peers, {h.name for h in cluster.hosts[1:]}, spec)
    finally:
        try:
            cluster.close()
        finally:
            lab.destroy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--variants", default="direct,direct-nice,one-node,one-host,netns")
    args = parser.parse_args()
    variants = args.variants.split(",")
    if "netns" in variants and os.geteuid() != 0:
        sys.exit("the netns variant needs root (network namespaces); leave it out with --variants")
    base = Path(tempfile.mkdtemp(prefix="ipdc-bench-tf-"))
    spec = base / "spec.conf"
    spec.write_text(json.dumps(SPEC))
    makers: dict[str, Callable[[], AbstractContextManager[Runner]]] = {
        "direct": direct, "direct-nice": lambda: direct(19),
        "one-node": lambda: local(1, base / "one-node", spec),
        "one-host": lambda: local(4, base / "one-host", spec), "netns": lambda: netns(base / "netns", spec)}
    samples: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    with ExitStack() as stack:
        runners = {v: stack.enter_context(makers[v]()) for v in variants}
        for run in range(args.runs):
            for variant in variants:
                samples[variant].append(runners[variant](args.steps))
                print(f"run {run + 1} {variant}: {samples[variant][-1]}", file=sys.stderr, flush=True)
    keys = ["steps/s", "up s", "chief s", "total s"]
    rows = [[v, *(f"{common.median(s[k] for s in samples[v]):.1f}" for k in keys),
             f"{min(s['steps/s'] for s in samples[v]):.0f}-{max(s['steps/s'] for s in samples[v]):.0f}"]
            for v in variants]
    title = f"TF example, {args.steps} timed steps, medians of {args.runs} runs ({common.machine()})"
    common.print_table(title, ["variant", *keys, "steps/s range"], rows)
    print(f"\nraw figures: {common.save('tf_tunnels', {'steps': args.steps, 'samples': samples})}")


if __name__ == "__main__":
    main()
