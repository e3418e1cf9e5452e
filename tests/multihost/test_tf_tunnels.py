"""A TF cluster across three namespaced hosts, while a stranger on the same LAN tries every port.

Host 0 (the broker host) owns the cluster and runs the chief; the worker and ps
servers run on hosts 1-3, each in its loopback-only sandbox, and every TF stream
between hosts rides the private libp2p swarm. While the chief trains, an outsider
namespace on the hosts' bridge, with no token, no swarm key and no broker account:

* connects to every TCP port any process listens on in any host's namespace
  (``ss -ltnp``), and to every port 1-65535 of every host: only each host's kubo swarm
  port and host 0's broker port accept;
* dials the swarm port with a kubo that has another swarm key, and with one that has
  none: both fail in the handshake;
* sends the broker an MQTT CONNECT without credentials, in plaintext, and over TLS
  without a certificate and with another CA's: refused before CONNACK every time.

The chief's training then reaches a much lower loss, on both workers, with the
variables on the ps, and ``ipdc tf down`` leaves nothing on any host.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from ipdc.node.lifecycle import Node
from ipdc.peers import xor_key
from ipdc.submit.tf import EXAMPLE
from ipdc.wire.tf import PROTOCOL_PREFIX, socket_root
from tests.multihost.harness import Cluster, Host
from tests.multihost.outsider import kubo_dials, listeners, mqtt_handshakes, sweep

pytestmark = pytest.mark.netns

STEPS = 300


def tf_processes(name: str) -> dict[int, str]:
    """pid -> command line of every live TF server, relay and chief of cluster ``name``."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, ValueError, IndexError):
            continue
        if ("ipdc.runner.tfserver" in cmd or "tfrelay" in cmd) and f"{name}/" in cmd and state != "Z":
            found[int(entry.name)] = cmd
    return found


def p2p_listeners(host: Host) -> list[str]:
    """The TF listeners and forwards of the host's kubo (``ipfs p2p ls``, in its namespace)."""
    node = Node(host.home)
    auth = f"bearer:{node.kubo_secret_file.read_text().strip()}"
    done = subprocess.run(host.argv([node.config.kubo.binary, "--api-auth", auth, "p2p", "ls", "--enc=json"]),
                          env={**host.env(), "IPFS_PATH": str(node.kubo_repo)}, capture_output=True,
                          text=True, check=True)
    entries = json.loads(done.stdout).get("Listeners") or []
    return [e["Protocol"] for e in entries if e["Protocol"].startswith(PROTOCOL_PREFIX)]


def name_on(peers: dict[str, dict[str, Any]], hosts: set[str]) -> str:
    """A cluster name whose ``len(hosts)`` nearest peers by XOR distance are ``hosts``."""
    for i in range(10000):
        name = f"across-{i}"
        order = sorted(peers.values(), key=lambda r: xor_key(r["peer_id"]) ^ xor_key(name))
        if {r["name"] for r in order[:len(hosts)]} == hosts:
            return name
    raise AssertionError("no name found")


def test_tf_trains_across_three_hosts_while_an_outsider_reaches_only_kubo_and_the_broker(
        cluster: Cluster, tmp_path: Path) -> None:
    owner = cluster.broker_host
    servers = cluster.hosts[1:]
    peers = {r["name"]: r for r in json.loads(cluster.run(owner, ["peers", "--json"], "peers").stdout)}
    assert all(r["tf"] for r in peers.values()), peers
    name = name_on(peers, {h.name for h in servers})
    spec = tmp_path / "spec.conf"
    spec.write_text(json.dumps({"chief": [0], "worker": [0, 1], "ps": [0]}))

    started = time.monotonic()
    up = cluster.run(owner, ["tf", str(spec), "--name", name, "--json"], "tf-up", timeout=300)
    up_seconds = time.monotonic() - started
    info = json.loads(up.stdout)
    assert {t["peer"] for t in info["tasks"] if t["server"]} == {h.name for h in servers}, info["tasks"]

    log = tmp_path / "chief.log"
    with open(log, "w") as out:
        chief = subprocess.Popen(owner.argv([sys.executable, "-m", "ipdc.cli", "tf", "run", name, "--",
                                             sys.executable, str(EXAMPLE), "--steps", str(STEPS)]),
                                 env=owner.env(), cwd=owner.home.parent, stdout=out, stderr=subprocess.STDOUT)
    stranger = cluster.outsider
    try:
        found = [lst for host in cluster.hosts for lst in listeners(host)]
        assert chief.poll() is None, log.read_text()  # the ports were listed while it trains
        configs = {h: Node(h.home).config for h in cluster.hosts}
        broker = configs[owner].broker
        allowed = {(h.addr, cfg.kubo.swarm_port) for h, cfg in configs.items()}
        allowed.add((owner.addr, broker.port))
        listed = {(lst.host.addr, lst.port) for lst in found}
        assert allowed <= listed and len(listed) > len(allowed), found  # the TF relays listen too
        every_port = {(h.addr, port) for h in cluster.hosts for port in range(1, 65536)}
        swept = time.monotonic()
        results = sweep(stranger, sorted(every_port | listed))
        sweep_seconds = time.monotonic() - swept
        opened = {target for target, result in results.items() if result == "open"}
        assert opened == allowed, {t: results[t] for t in opened - allowed}
        assert set(results.values()) == {"open", "ECONNREFUSED"}, {
            t: r for t, r in results.items() if r not in ("open", "ECONNREFUSED")}

        members = [Node(h.home).swarm_multiaddr() for h in cluster.hosts]
        for key in ("0f" * 32, None):
            dials = kubo_dials(stranger, configs[owner].kubo.binary, key, members, tmp_path / "kubo")
            refused = {m: r for m, r in dials.items() if "failed to negotiate security protocol" in r}
            assert refused == dials, f"swarm key {'another' if key else 'none'}: {dials}"
        handshakes = mqtt_handshakes(stranger, owner, broker.port, broker.ca_file, tmp_path / "mqtt")
        # "plaintext" is a CONNECT with no credentials at all; no attempt may get a CONNACK
        assert len(handshakes) == 3 and all(stage != "connack" for stage, _ in handshakes.values()), \
            handshakes
        code = chief.wait(timeout=600)
    finally:
        if chief.poll() is None:
            chief.kill()
            chief.wait()
    output = log.read_text()
    assert code == 0, output[-5000:]
    result = json.loads(output.rsplit("RESULT ", 1)[1].splitlines()[0])
    print(f"TF across 3 hosts: up {up_seconds:.1f} s, {result['steps_per_second']} steps/s, chief wall "
          f"{result['wall_seconds']} s, loss {result['loss_before']:.3f} -> {result['loss_after']:.3f}, "
          f"steps per worker {result['steps_per_worker']}; the outsider swept {len(results)} ports in "
          f"{sweep_seconds:.1f} s")
    assert result["loss_after"] < 0.2 * result["loss_before"], result
    assert set(result["steps_per_worker"]) == {"0", "1"}, result
    assert sum(result["steps_per_worker"].values()) == STEPS
    assert all(d.startswith("/job:ps/") for d in result["variable_devices"].values()), result

    processes = tf_processes(name)
    assert processes
    cluster.run(owner, ["tf", "down", name], "tf-down", timeout=120)
    assert not tf_processes(name)
    for host in cluster.hosts:
        assert not p2p_listeners(host), host.label
        sockets = socket_root(host.home)
        assert not (sockets.exists() and any(sockets.iterdir())), list(sockets.rglob("*"))
