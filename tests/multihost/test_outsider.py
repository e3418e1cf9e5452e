"""An outsider on the swarm's LAN, with no token, against every port of every host.

Only two kinds of port may accept its TCP connection: each host's kubo swarm port and
the broker's port on host 0. Both must then refuse it in their handshake: kubo's
private network (a kubo with no swarm key, or another one, fails with "failed to
negotiate security protocol") and the broker's TLS (no certificate of the swarm's CA:
no CONNACK, whether in plaintext, without a certificate or with another CA's).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ipdc.node.lifecycle import Node
from tests.multihost.harness import Cluster
from tests.multihost.outsider import kubo_dials, listeners, mqtt_handshakes, scan

pytestmark = pytest.mark.netns


def test_an_outsider_reaches_only_kubo_swarm_and_broker_ports_and_is_refused_there(cluster: Cluster,
                                                                                 tmp_path: Path) -> None:
    nodes = {host: Node(host.home).config for host in cluster.hosts}
    broker_host, broker = cluster.broker_host, nodes[cluster.broker_host].broker
    allowed = {(h.addr, cfg.kubo.swarm_port) for h, cfg in nodes.items()} | {(broker_host.addr, broker.port)}
    found = [listener for host in cluster.hosts for listener in listeners(host)]
    assert {(lst.host.addr, lst.port) for lst in found} >= allowed, found

    results = scan(cluster.outsider, found)
    opened = {(lst.host.addr, lst.port) for lst, result in results.items() if result == "open"}
    unexpected = [f"{lst.host.label} {lst.address}:{lst.port} {lst.process}" for lst in results
                  if (lst.host.addr, lst.port) in opened - allowed]
    assert not unexpected, f"the outsider reached ports beyond kubo's swarm and the broker: {unexpected}"
    assert opened == allowed, results
    assert all(r in ("open", "ECONNREFUSED") for r in results.values()), results

    handshakes = mqtt_handshakes(cluster.outsider, broker_host, broker.port, broker.ca_file,
                                 tmp_path / "mqtt")
    assert len(handshakes) == 3 and all(stage != "connack" for stage, _ in handshakes.values()), handshakes

    members = [Node(h.home).swarm_multiaddr() for h in cluster.hosts]
    binary = nodes[broker_host].kubo.binary
    for key in (None, "0f" * 32):
        dials = kubo_dials(cluster.outsider, binary, key, members, tmp_path / "kubo")
        refused = {m: r for m, r in dials.items() if "failed to negotiate security protocol" in r}
        assert refused == dials, f"swarm key {(key and 'another key') or 'none'}: {dials}"
