"""Issue 4: distributed TensorFlow on the swarm, with real TF processes on 127.0.0.1.

Four nodes: three with TensorFlow, and node 3 with ``node.tf: "no"``. The
cluster name is chosen so that node 3 is the nearest peer by XOR distance: it
would host the first task if it were eligible.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ipdc.node.cluster import LocalCluster
from ipdc.peers import xor_key
from ipdc.spawn import pid_alive, wait_for
from ipdc.submit.tf import EXAMPLE
from tests.helpers import run_cli

pytestmark = pytest.mark.slow

NO_TF = 3


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    # two slots each, so three TF peers can host the four tasks of the spec
    with LocalCluster(4, base=tmp_path_factory.mktemp("tf"), slots=2, tf={NO_TF: "no"}) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def peers(swarm: LocalCluster) -> dict[str, dict[str, Any]]:
    """name -> ``ipdc peers --json`` row, once all four nodes are seen."""
    home = swarm.nodes[0].home
    rows: dict[str, dict[str, Any]] = {}

    def all_seen() -> bool:
        rows.update({r["name"]: r for r in json.loads(run_cli(["peers", "--json"], home).stdout)})
        return len(rows) == 4
    assert wait_for(all_seen, 30, 0.5), rows
    return rows


def name_nearest(peers: dict[str, dict[str, Any]], wanted: str, prefix: str) -> str:
    """A cluster name whose nearest peer (by XOR distance, TF or not) is ``wanted``."""
    for i in range(1000):
        name = f"{prefix}{i}"
        nearest = min(peers.values(), key=lambda r: xor_key(r["peer_id"]) ^ xor_key(name))
        if nearest["name"] == wanted:
            return name
    raise AssertionError("no name found")


def tf_servers(base: Path) -> dict[int, str]:
    """pid -> command line of every create_worker.py running from a node home under ``base``."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            cwd = os.readlink(entry / "cwd")
        except (OSError, ValueError):
            continue
        if "create_worker.py" in cmd and cwd.startswith(str(base)) and pid_alive(int(entry.name)):
            found[int(entry.name)] = cmd
    return found


def write_spec(path: Path, spec: dict[str, list[int]]) -> Path:
    path.write_text(json.dumps(spec))
    return path


def test_a_ps_cluster_comes_up_trains_and_goes_down(swarm: LocalCluster, peers: dict[str, dict[str, Any]],
                                                    tmp_path: Path) -> None:
    home = swarm.nodes[0].home
    no_tf = swarm.nodes[NO_TF].config.node.name
    assert peers[no_tf]["tf"] is False and sum(r["tf"] for r in peers.values()) == 3
    name = name_nearest(peers, no_tf, "ps-")
    spec = write_spec(tmp_path / "spec.conf", {"chief": [0], "worker": [0, 1], "ps": [0]})

    cluster = json.loads(run_cli(["tf", str(spec), "--name", name, "--json"], home, timeout=300).stdout)
    hosts = {t["peer"] for t in cluster["tasks"]}
    assert no_tf not in hosts and len(hosts) == 3, cluster["tasks"]
    spec_file = json.loads((Path(cluster["dir"]) / "ClusterSpec.json").read_text())
    assert {job: len(a) for job, a in spec_file["ClusterSpec"].items()} == {"chief": 1, "ps": 1, "worker": 2}
    assert sorted(spec_file["TaskIndex"].values()) == [["chief", 0], ["ps", 0], ["worker", 0], ["worker", 1]]
    servers = tf_servers(swarm.base)
    assert len(servers) == 3, servers  # ps and two workers; the chief is the script below
    listed = json.loads(run_cli(["tf", "list", "--json"], home).stdout)
    assert [(c["name"], c["up"]) for c in listed] == [(name, True)]

    env = {**os.environ, "TF_CONFIG": spec_file["TF_CONFIG"]["chief"][0]}
    done = subprocess.run([sys.executable, str(EXAMPLE), "--steps", "100"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"python {EXAMPLE}" in cluster["command"]
    steps = [line for line in done.stdout.splitlines() if line.startswith("step ")]
    result = json.loads(done.stdout.rsplit("RESULT ", 1)[1])
    print(f"loss before {result['loss_before']:.4f}, after {result['loss_after']:.4f}, "
          f"steps per worker {result['steps_per_worker']}")
    assert len(steps) == 100
    assert result["loss_after"] < 0.2 * result["loss_before"], result
    assert float(steps[-1].split()[-1]) < float(steps[0].split()[-1])
    assert set(result["steps_per_worker"]) == {"0", "1"} and sum(result["steps_per_worker"].values()) == 100
    assert all(d.startswith("/job:ps/") for d in result["variable_devices"].values()), result

    run_cli(["tf", "down", name], home, timeout=120)
    assert not any(pid_alive(pid) for pid in servers), tf_servers(swarm.base)
    assert not Path(cluster["dir"]).exists()
    work_dirs = [n.work_dir / cluster["cluster_id"] for n in swarm.nodes]
    assert wait_for(lambda: not any(d.exists() for d in work_dirs), 10), work_dirs
    assert json.loads(run_cli(["tf", "list", "--json"], home).stdout) == []


def test_more_tasks_than_the_swarm_can_host_fail_clearly(swarm: LocalCluster, peers: dict[str, Any],
                                                         tmp_path: Path) -> None:
    spec = write_spec(tmp_path / "big.conf", {"worker": list(range(7))})
    done = run_cli(["tf", str(spec)], swarm.nodes[0].home, check=False)
    assert done.returncode != 0
    assert "asks for 7 TF tasks but the swarm can host 6" in done.stderr, done.stderr
    assert "3 of 4 live peer(s) have TensorFlow" in done.stderr, done.stderr
    assert not tf_servers(swarm.base)


def test_a_malformed_spec_names_the_bad_key(swarm: LocalCluster, tmp_path: Path) -> None:
    spec = write_spec(tmp_path / "bad.conf", {"chief": [0], "worker": [0, 2]})
    done = run_cli(["tf", str(spec)], swarm.nodes[0].home, check=False)
    assert done.returncode == 2 and "'worker'" in done.stderr and "0..1" in done.stderr, done.stderr


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
    name = name_nearest(tf_peers, victim.config.node.name, "local-")
    spec = write_spec(tmp_path / "local.conf", {"local": [0]})
    cluster = json.loads(run_cli(["tf", str(spec), "--name", name, "--json"], home, timeout=300).stdout)
    assert [t["peer"] for t in cluster["tasks"]] == [victim.config.node.name]
    servers = tf_servers(swarm.base)
    assert len(servers) == 1, servers

    victim.stop()
    assert not any(pid_alive(pid) for pid in servers)
    run_cli(["tf", "down", name], home, timeout=120)  # the gone peer no longer counts
    assert not Path(cluster["dir"]).exists()
