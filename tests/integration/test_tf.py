"""Distributed TensorFlow on the swarm, with real kubo, agents and TF processes on 127.0.0.1.

Four nodes: three with TensorFlow, and node 3 with ``node.tf: "no"``. The cluster name
is chosen so that node 3 is the nearest peer by XOR distance: it would host the first
task if it were eligible. Every TF process runs in a loopback-only sandbox; the nodes'
kubos carry the streams between them (``p2p listen``/``forward``), exactly as across
machines. tests/multihost/test_tf_tunnels.py does the same across network namespaces,
with an outsider scanning every port.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ipdc.bus import Bus, client_id
from ipdc.config import save_config
from ipdc.net import grpc_answers
from ipdc.node.cluster import LocalCluster
from ipdc.node.lifecycle import Node
from ipdc.peers import xor_key
from ipdc.spawn import pid_alive, wait_for
from ipdc.submit.tf import EXAMPLE
from ipdc.wire.download import DOWNLOAD, Download
from ipdc.wire.getresult import GETRESULT, GetResult
from ipdc.wire.ids import Cid, JobId, NodeName
from ipdc.wire.manifest import JobManifest
from ipdc.wire.tf import PORTS, PROTOCOL_PREFIX, TfPlan, cluster_token, protocol, socket_root
from ipdc.wire.unixfs import cid_of
from tests.helpers import REPO, run_cli

pytestmark = pytest.mark.slow

NO_TF = 3
SS = shutil.which("ss") or "/usr/bin/ss"


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    # two slots each, so three TF peers can host the three servers of the spec, and more
    with LocalCluster(4, base=tmp_path_factory.mktemp("tf"), slots=2, tf={NO_TF: "no"}) as cluster:
        yield cluster


def live_peers(home: Path, count: int) -> dict[str, dict[str, Any]]:
    """name -> ``ipdc peers --json`` row, once ``count`` nodes are seen."""
    rows: dict[str, dict[str, Any]] = {}

    def all_seen() -> bool:
        rows.update({r["name"]: r for r in json.loads(run_cli(["peers", "--json"], home).stdout)})
        return len(rows) == count
    assert wait_for(all_seen, 30, 0.5), rows
    return rows


@pytest.fixture(scope="module")
def peers(swarm: LocalCluster) -> dict[str, dict[str, Any]]:
    return live_peers(swarm.nodes[0].home, 4)


def name_nearest(peers: dict[str, dict[str, Any]], wanted: list[str], prefix: str) -> str:
    """A cluster name whose nearest peers by XOR distance, in order, begin with ``wanted``."""
    for i in range(10000):
        name = f"{prefix}{i}"
        order = sorted(peers.values(), key=lambda r: xor_key(r["peer_id"]) ^ xor_key(name))
        if [r["name"] for r in order[:len(wanted)]] == wanted:
            return name
    raise AssertionError("no name found")


def tf_processes(name: str) -> dict[int, str]:
    """pid -> command line of every live TF server, relay and chief of cluster ``name``."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError):
            continue
        ours = ("ipdc.runner.tfserver" in cmd or "tfrelay" in cmd) and f"{name}/" in cmd
        if ours and pid_alive(int(entry.name)):
            found[int(entry.name)] = cmd
    return found


def servers_of(processes: dict[int, str]) -> list[str]:
    """The TF server processes among ``processes`` (not their relays, nor the bwrap around them)."""
    return [c for c in processes.values()
            if "ipdc.runner.tfserver" in c and "tfrelay" not in c and not c.split()[0].endswith("bwrap")]


def listeners() -> list[tuple[str, int, set[int]]]:
    """(address, port, owning pids) of every TCP socket listening in this network namespace."""
    out = subprocess.run([SS, "-ltnpH"], capture_output=True, text=True, check=True).stdout
    rows = []
    for line in out.splitlines():
        fields = line.split()
        address, _, port = fields[3].rpartition(":")
        pids = {int(p.split("=")[1]) for p in " ".join(fields[5:]).replace(")", ",").split(",")
                if p.startswith("pid=")}
        rows.append((address.strip("[]"), int(port), pids))
    return rows


def tf_leftovers(swarm: LocalCluster) -> list[str]:
    """What any node still holds of any TF cluster: p2p listeners or forwards (in a running
    kubo), socket files."""
    left = []
    for node in swarm.nodes:
        if node.services["ipfs"].pid() is not None:
            with node.kubo() as kubo:
                left += [f"{node.config.node.name}: {e['Protocol']} {e['ListenAddress']}"
                         for e in kubo.p2p_ls() if e["Protocol"].startswith(PROTOCOL_PREFIX)]
        sockets = socket_root(node.home)
        left += [str(p) for p in sockets.rglob("*")] if sockets.exists() else []
    return left


def write_spec(path: Path, spec: dict[str, list[int]]) -> Path:
    path.write_text(json.dumps(spec))
    return path


def up(home: Path, spec: Path, name: str, **kwargs: Any) -> dict[str, Any]:
    cluster: dict[str, Any] = json.loads(run_cli(["tf", str(spec), "--name", name, "--json"], home,
                                                 timeout=300, **kwargs).stdout)
    return cluster


def run_example(home: Path, name: str, steps: int = 100) -> dict[str, Any]:
    """``ipdc tf run NAME -- python example.py`` and its RESULT line; asserts it trained."""
    done = run_cli(["tf", "run", name, "--", sys.executable, str(EXAMPLE), "--steps", str(steps)], home,
                   timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    steps_seen = [line for line in done.stdout.splitlines() if line.startswith("step ")]
    result: dict[str, Any] = json.loads(done.stdout.rsplit("RESULT ", 1)[1])
    print(f"loss before {result['loss_before']:.4f}, after {result['loss_after']:.4f}, "
          f"steps per worker {result['steps_per_worker']}")
    assert len(steps_seen) == steps
    assert result["loss_after"] < 0.2 * result["loss_before"], result
    assert set(result["steps_per_worker"]) == {"0", "1"} and sum(result["steps_per_worker"].values()) == steps
    assert all(d.startswith("/job:ps/") for d in result["variable_devices"].values()), result
    return result


def test_a_ps_cluster_comes_up_trains_privately_and_goes_down(
        swarm: LocalCluster, peers: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    home = swarm.nodes[0].home
    owner = swarm.nodes[0].config.node.name
    no_tf = swarm.nodes[NO_TF].config.node.name
    assert peers[no_tf]["tf"] is False and sum(r["tf"] for r in peers.values()) == 3
    name = name_nearest(peers, [no_tf], "ps-")
    spec = write_spec(tmp_path / "spec.conf", {"chief": [0], "worker": [0, 1], "ps": [0]})

    cluster = up(home, spec, name)
    tasks = {(t["job"], t["index"]): t for t in cluster["tasks"]}
    assert tasks[("chief", 0)]["peer"] == owner and not tasks[("chief", 0)]["server"]
    servers = [t for t in cluster["tasks"] if t["server"]]
    assert no_tf not in {t["peer"] for t in servers} and len({t["peer"] for t in servers}) == 3, servers
    assert {job: len(a) for job, a in cluster["cluster_spec"].items()} == {"chief": 1, "ps": 1, "worker": 2}
    addresses = [a for listed in cluster["cluster_spec"].values() for a in listed]
    assert all(a.startswith("127.0.0.1:") for a in addresses)
    assert f"ipdc tf run {name} -- python" in cluster["command"]
    processes = tf_processes(name)
    assert len(servers_of(processes)) == 3, processes  # none for the chief
    listed = json.loads(run_cli(["tf", "list", "--json"], home).stdout)
    assert [(c["name"], c["up"]) for c in listed] == [(name, True)]

    # No TF port, and no port that forwards to one, is on a non-loopback address: the servers
    # listen inside their sandboxes; in this namespace, only kubo's peer-checked targets are open.
    ports = {int(a.rsplit(":", 1)[1]) for a in addresses}
    for address, port, pids in listeners():
        assert port not in ports, f"a TF port is open outside the sandboxes: {address}:{port} {pids}"
        if pids & processes.keys():
            assert address == "127.0.0.1", f"{processes[min(pids & processes.keys())]} listens on {address}"

    run_example(home, name)
    assert run_cli(["tf", "run", name], home, check=False).returncode != 0  # no command: a usage error

    run_cli(["tf", "down", name], home, timeout=120)
    assert not any(pid_alive(pid) for pid in processes), tf_processes(name)
    assert not tf_leftovers(swarm)
    assert json.loads(run_cli(["tf", "list", "--json"], home).stdout) == []
    done = run_cli(["tf", "run", name, "--", "true"], home, check=False)
    assert done.returncode != 0 and f"no TF cluster named {name!r}" in done.stderr


def test_only_the_clusters_own_hosts_reach_its_servers(swarm: LocalCluster, peers: dict[str, dict[str, Any]],
                                                       tmp_path: Path) -> None:
    """Node 3 holds the swarm key but is no host of the cluster: its stream to a server is dropped
    by the server's relay, and so is a local connection to kubo's target that names no host."""
    home = swarm.nodes[0].home
    tf_peers = {n: r for n, r in peers.items() if r["tf"]}
    target = swarm.nodes[1].config.node.name
    name = name_nearest(tf_peers, [target], "peer-")
    cluster = up(home, write_spec(tmp_path / "spec.conf", {"worker": [0, 1]}), name)
    plan = TfPlan.from_params(cluster["plan"])
    served = next(t for t in plan.servers() if t.host == target)
    outsider = swarm.nodes[NO_TF]
    assert outsider.config.node.name not in plan.peers
    proto = protocol(cluster_token(cluster["submitter"], cluster["cluster_id"]), served)
    sock = tmp_path / "steal.sock"
    with outsider.kubo() as kubo:
        kubo.p2p_forward(proto, f"/unix{sock}", peers[target]["peer_id"])
        try:
            assert not grpc_answers(sock)
        finally:
            kubo.p2p_close(proto)
    log = swarm.nodes[1].home / "logs" / "runners.log"
    assert wait_for(lambda: f"refused a stream from peer '{peers[outsider.config.node.name]['peer_id']}'"
                    in log.read_text(), 10), log.read_text()
    with swarm.nodes[1].kubo() as kubo:
        (entry,) = [e for e in kubo.p2p_ls() if e["Protocol"] == proto]
    port = int(entry["TargetAddress"].rsplit("/", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        raw.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        raw.settimeout(10)
        assert raw.recv(64) == b""  # closed, unanswered
    run_cli(["tf", "down", name], home, timeout=120)
    assert not tf_leftovers(swarm)


def test_a_forged_reply_from_a_host_does_not_steer_the_controller(swarm: LocalCluster,
                                                                   peers: dict[str, dict[str, Any]],
                                                                   tmp_path: Path) -> None:
    """Node 1 hosts the cluster's one server, and publishes, on its own result topic, an error
    that answers no request of the controller's: the controller ignores it and the cluster
    comes up."""
    home = swarm.nodes[0].home
    liar = swarm.nodes[1]
    tf_peers = {n: r for n, r in peers.items() if r["tf"]}
    name = name_nearest(tf_peers, [liar.config.node.name], "forged-")
    spec = write_spec(tmp_path / "spec.conf", {"worker": [0]})
    env = {**os.environ, "IPDC_HOME": str(home)}
    with Bus(liar.config.broker, client_id(liar.config.node.name, "liar")) as bus:
        bus.subscribe("ipdc/result/+/+")
        bus.connect()
        argv = [sys.executable, "-m", "ipdc.cli", "-v", "tf", str(spec), "--name", name, "--json"]
        controller = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True)
        try:
            topic = ""
            while not re.fullmatch(r"ipdc/result/[^/]+/[0-9a-f]{32}", topic):  # a host's first reply
                topic = bus.inbox.get(timeout=120).topic
            cluster_id = JobId(topic.rsplit("/", 1)[1])
            liar_name = NodeName(liar.config.node.name)
            forged = GetResult(cluster_id, liar_name, "error", error="forged", re="0" * 32)
            bus.publish(GETRESULT.topic(node=liar_name, job=cluster_id), GETRESULT.encode(forged))
            assert bus.flush()
            out, err = controller.communicate(timeout=300)
        finally:
            if controller.poll() is None:
                controller.kill()
                controller.wait()
    assert controller.returncode == 0, err[-3000:]
    assert f"ignored a error reply from {liar.config.node.name} that answers no request of ours" in err, err
    assert json.loads(out)["cluster_id"] == cluster_id
    run_cli(["tf", "down", name], home, timeout=120)
    assert not tf_leftovers(swarm)


def test_a_tf_manifest_that_carries_code_is_dropped_unanswered(swarm: LocalCluster,
                                                                peers: dict[str, dict[str, Any]]) -> None:
    """A TF cluster's Download carries data only: one that names a file to fetch (code a TF
    server would run) is refused before anything is fetched, even signed by a trusted key."""
    owner, host = swarm.nodes[0], swarm.nodes[1]
    owner_name, host_name = NodeName(owner.config.node.name), NodeName(host.config.node.name)
    ids = {n: peers[n]["peer_id"] for n in (owner_name, host_name)}
    plan = TfPlan("smuggler", {"worker": [host_name]}, ids, PORTS[0])
    code = {"tfserver.py": Cid(cid_of(b"import os"))}
    manifest = JobManifest(job_id=JobId.new(), owner=owner_name, code=code, chunks=[], partitions=0,
                           workers=[owner_name, host_name],
                           submitter=owner.signer.public_key, kind="tf", params=plan.to_params())
    signed = owner.signer.sign(Download(manifest), DOWNLOAD.name, host_name)
    log = host.home / "logs" / "agent.log"
    with Bus(owner.config.broker, client_id(owner_name, "test")) as bus:
        bus.connect()
        bus.publish(DOWNLOAD.topic(node=host_name), DOWNLOAD.encode(signed))
        assert bus.flush()
    assert wait_for(lambda: f"TF cluster {manifest.job_id} carries code" in log.read_text(), 20)
    assert not any(p.name.endswith(manifest.job_id) for p in host.work_dir.iterdir())


def test_more_tasks_than_the_swarm_can_host_fail_clearly(swarm: LocalCluster, peers: dict[str, Any],
                                                         tmp_path: Path) -> None:
    spec = write_spec(tmp_path / "big.conf", {"chief": [0], "worker": list(range(7))})
    done = run_cli(["tf", str(spec)], swarm.nodes[0].home, check=False)
    assert done.returncode != 0
    assert "asks for 7 TF server tasks but the swarm can host 6" in done.stderr, done.stderr
    assert "3 of 4 live peer(s) have TensorFlow" in done.stderr, done.stderr
    assert not tf_leftovers(swarm)


@pytest.mark.parametrize(("spec", "words"), [
    ({"chief": [0], "worker": [0, 2]}, ["'worker'", "0..1"]),
    ({"chief": [0]}, ["no server task"]),
    ({"Worker": [0]}, ["'Worker'", "lower-case"]),
    ({"chief": [0, 1], "worker": [0]}, ["'chief'", "one task only"]),
])
def test_a_malformed_spec_names_the_bad_key(swarm: LocalCluster, tmp_path: Path, spec: dict[str, list[int]],
                                            words: list[str]) -> None:
    done = run_cli(["tf", str(write_spec(tmp_path / "bad.conf", spec))], swarm.nodes[0].home, check=False)
    assert done.returncode == 2 and all(w in done.stderr for w in words), done.stderr


def test_without_a_running_node_the_user_is_told_to_start_one(tmp_path: Path) -> None:
    spec = write_spec(tmp_path / "spec.conf", {"local": [0, 1]})
    done = run_cli(["tf", str(spec)], tmp_path / "no-node", check=False)
    assert done.returncode != 0 and "python deploy.py start" in done.stderr, done.stderr


def test_an_agent_that_stops_stops_its_tf_servers(swarm: LocalCluster, peers: dict[str, dict[str, Any]],
                                                   tmp_path: Path) -> None:
    """Runs last: it stops node 1 (not the broker host) while it serves a {"local": [0]} cluster."""
    home = swarm.nodes[0].home
    victim = swarm.nodes[1]
    tf_peers = {n: r for n, r in peers.items() if r["tf"]}
    name = name_nearest(tf_peers, [victim.config.node.name], "local-")
    cluster = up(home, write_spec(tmp_path / "local.conf", {"local": [0]}), name)
    assert [t["peer"] for t in cluster["tasks"]] == [victim.config.node.name]
    processes = tf_processes(name)
    assert len(servers_of(processes)) == 1, processes

    victim.stop()
    assert not any(pid_alive(pid) for pid in processes)
    run_cli(["tf", "down", name], home, timeout=120)  # the gone peer no longer counts
    assert not tf_leftovers(swarm)


# -- the lease ------------------------------------------------------------------------------------
LEASE = 4.0


@pytest.fixture(scope="module")
def leased(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    settings = {"agent": {"job_lease": LEASE, "heartbeat_interval": 0.5, "peer_timeout": 3.0}}
    with LocalCluster(2, base=tmp_path_factory.mktemp("tf-lease"), slots=2, settings=settings) as cluster:
        yield cluster


def test_a_cluster_lives_while_its_owner_does_and_ends_a_lease_after_it(leased: LocalCluster,
                                                                         tmp_path: Path) -> None:
    """The owner's agent renews the cluster with its hosts, so it outlives their lease; once the
    owner node is gone, its hosts drop it within the lease."""
    home = leased.nodes[0].home
    rows = live_peers(home, 2)
    host = leased.nodes[1].config.node.name
    name = name_nearest(rows, [host], "leased-")
    cluster = up(home, write_spec(tmp_path / "spec.conf", {"worker": [0]}), name)
    assert [t["peer"] for t in cluster["tasks"]] == [host]
    processes = tf_processes(name)
    assert servers_of(processes)

    def down() -> bool:
        return not all(pid_alive(pid) for pid in processes)
    assert not wait_for(down, 3 * LEASE, 0.2), "the cluster ended while its owner renewed it"
    assert json.loads(run_cli(["tf", "list", "--json"], home).stdout)[0]["up"]

    leased.nodes[0].services["agent"].stop()  # the owner is gone: nobody renews the cluster
    assert wait_for(lambda: not any(pid_alive(pid) for pid in processes), 3 * LEASE, 0.2), tf_processes(name)
    assert not tf_leftovers(leased)


# -- a node that cannot sandbox TF servers -----------------------------------------------------
#: Runs a command in a user namespace where no further user namespace can be made: there,
#: bubblewrap cannot make a sandbox, as on a kernel without unprivileged user namespaces.
NO_USERNS = ["unshare", "--user", "--map-root-user", "sh", "-c",
             'echo 0 > /proc/sys/user/max_user_namespaces && exec "$@"', "sh"]


def restart_agent(cluster: LocalCluster, i: int, trusted_network: bool) -> None:
    node = cluster.nodes[i]
    save_config(node.config.replace(tf={"trusted_network": trusted_network}), node.conf_path)
    node.services["agent"].stop()
    cluster.nodes[i] = Node(node.home)
    cluster.nodes[i].start()


def refused_unless_trusted(base: Path) -> None:
    """The scenario of the test below, run where no sandbox can be made (see NO_USERNS)."""
    with LocalCluster(2, base=base, slots=4, settings={"tf": {"trusted_network": True}}) as cluster:
        restart_agent(cluster, 1, trusted_network=False)
        home = cluster.nodes[0].home
        live_peers(home, 2)
        untrusted = cluster.nodes[1].config.node.name
        spec = write_spec(base / "spec.conf", {"chief": [0], "worker": [0, 1], "ps": [0]})

        # three servers on two peers: at least one of them on node 1, which refuses
        refused = run_cli(["tf", str(spec), "--name", "closed"], home, timeout=300, check=False)
        assert refused.returncode != 0
        for words in (f"{untrusted} refuses TensorFlow tasks", "bubblewrap",
                      "executes any graph", "trusted_network: true"):
            assert words in refused.stderr, refused.stderr
        assert not tf_leftovers(cluster)

        # Where the host trusts its network, the cluster runs there unsandboxed, as it asked: its
        # servers listen on every interface, as TensorFlow's do. (Unsandboxed hosts need a network
        # each, so this cluster has one host: the nodes here share one.)
        cluster.nodes[1].stop()
        live_peers(home, 1)
        cluster_info = up(home, spec, "open")
        processes = tf_processes("open")
        exposed = {port for address, port, pids in listeners()
                   if pids & processes.keys() and address != "127.0.0.1"}
        assert {int(a.rsplit(":", 1)[1]) for a in cluster_info["cluster_spec"]["worker"]} <= exposed
        run_example(home, "open", steps=60)
        run_cli(["tf", "down", "open"], home, timeout=120)
        assert not any(pid_alive(pid) for pid in processes)
        assert not tf_leftovers(cluster)


def test_a_node_that_cannot_sandbox_tf_refuses_it_unless_its_network_is_trusted(tmp_path: Path) -> None:
    """Real nodes in a user namespace that forbids nested ones: see refused_unless_trusted."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([*NO_USERNS, sys.executable, "-c",
                           "import sys, pathlib, tests.integration.test_tf as t; "
                           "t.refused_unless_trusted(pathlib.Path(sys.argv[1]))", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
