"""What the secured broker costs, and how long membership changes take.

1. **Connect**: IPDC's own client (``ipdc.bus.Bus``: TLS 1.3, ECDSA P-256 client
   certificate, the ``ipdc_auth`` plugin) from ``connect()`` to CONNACK, against the
   swarm's real broker; for scale, a plain paho client against a throwaway plaintext
   mosquitto on the same machine (what IPDC ran before).
2. **Removal**: ``ipdc node remove`` (library call) until every remaining node has
   dropped the removed node's key from its trust; and until its agent is gone.
3. **Rotation**: ``ipdc swarm rotate-key`` (library call): from sending the new key to
   the last member's confirmation (kubo restarted with it and bootstrap peers reached).
4. **Queue** (``--queue``): 20,000 QoS 1 messages of 200 B published as fast as the
   Bus can, to a subscriber that spends 0.5 ms on each (about 1,200 msg/s), through
   the swarm's broker with its generated limits: how many arrive.

    python bench/broker.py [--connects 200] [--nodes 4] [--rotations 3] [--queue]
"""

from __future__ import annotations

import argparse
import os
import pwd
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

sys.path.insert(0, str(common.REPO))
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from ipdc.bus import Bus, client_id, tls_context
from ipdc.node.install import find_mosquitto
from ipdc.node.membership import remove, rotate_swarm_key
from ipdc.spawn import wait_for


def stats(samples: list[float]) -> list[str]:
    ms = [s * 1000 for s in samples]
    return [f"{common.median(ms):.2f}", f"{common.percentile(ms, 90):.2f}", f"{min(ms):.2f}", str(len(ms))]


def tls_connects(config: Any, n: int) -> list[float]:
    samples = []
    for _ in range(n):
        bus = Bus(config.broker, client_id(config.node.name, "bench"), session_expiry=0)
        started = time.perf_counter()
        bus.connect()
        samples.append(time.perf_counter() - started)
        bus.close()
    return samples


def plaintext_connects(n: int, work: Path) -> list[float]:
    """The same through a plaintext, anonymous mosquitto: the cost TLS and the plugin add."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    conf = work / "plain.conf"
    conf.write_text(f"user {pwd.getpwuid(os.geteuid()).pw_name}\nlistener {port} 127.0.0.1\n"
                    "allow_anonymous true\nset_tcp_nodelay true\n")
    mosquitto = find_mosquitto()
    if mosquitto is None:
        sys.exit("mosquitto is not installed")
    broker = subprocess.Popen([str(mosquitto), "-c", str(conf)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        def listening() -> bool:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return True
            except OSError:
                return False
        wait_for(listening, 10)
        samples = []
        for i in range(n):
            client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"plain-{i}", protocol=mqtt.MQTTv5)
            connected = threading.Event()
            client.on_connect = lambda *_, connected=connected: connected.set()
            started = time.perf_counter()
            client.connect("127.0.0.1", port)
            client.loop_start()
            connected.wait(10)
            samples.append(time.perf_counter() - started)
            client.disconnect()
            client.loop_stop()
        return samples
    finally:
        broker.terminate()
        broker.wait()


def removal(cluster: Any) -> tuple[float, float]:
    """Seconds until every other node dropped the last node's key, and until its agent exited."""
    founder, leaving = cluster.nodes[0], cluster.nodes[-1]
    others = [*cluster.nodes[1:-1], founder]
    key = leaving.signer.public_key
    started = time.perf_counter()
    remove(founder, leaving.config.node.name)
    wait_for(lambda: all(key not in node.trust for node in others), 30, 0.005)
    untrusted = time.perf_counter() - started
    wait_for(lambda: not leaving.running(), 30, 0.005)
    return untrusted, time.perf_counter() - started


def queue_delivery(cluster: Any, n: int = 20_000, size: int = 200, delay: float = 0.0005) -> dict[str, Any]:
    sender, receiver = cluster.nodes[0].config, cluster.nodes[1].config
    topic = f"ipdc/peer/{receiver.node.name}/bench"
    got = [0]
    last = [0.0]
    slow = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id(receiver.node.name, "slow"),
                       protocol=mqtt.MQTTv5)
    slow.tls_set_context(tls_context(receiver.broker))
    subscribed = threading.Event()

    def on_message(*_: Any) -> None:
        got[0] += 1
        last[0] = time.perf_counter()
        time.sleep(delay)  # a slow consumer: the network loop itself is held up
    slow.on_message = on_message
    slow.on_subscribe = lambda *_: subscribed.set()
    slow.on_connect = lambda client, *_: client.subscribe(topic, qos=1)
    slow.connect(receiver.broker.host, receiver.broker.port)
    slow.loop_start()
    subscribed.wait(10)
    try:
        with Bus(sender.broker, client_id(sender.node.name, "bench-pub"), session_expiry=0) as bus:
            bus.connect()
            started = time.perf_counter()
            payload = b"x" * size
            for _ in range(n):
                bus.publish(topic, payload)
            bus.flush(120)
            published = time.perf_counter() - started
        wait_for(lambda: got[0] >= n or time.perf_counter() - last[0] > 5, 300, 0.1)
    finally:
        slow.disconnect()
        slow.loop_stop()
    return {"n": n, "delivered": got[0], "pct": round(100 * got[0] / n, 1), "publish_s": round(published, 2),
            "last_delivery_s": round(last[0] - started, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connects", type=int, default=200)
    parser.add_argument("--nodes", type=int, default=4, help="cluster size for removal and rotation")
    parser.add_argument("--rotations", type=int, default=3)
    parser.add_argument("--queue", action="store_true", help="also run the 20,000-message queue test (~30 s)")
    args = parser.parse_args()
    print(f"machine: {common.machine()}")
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="ipdc-bench-") as tmp, common.warm_cluster(args.nodes) as cluster:
        config = cluster.nodes[0].config
        tls = tls_connects(config, args.connects)
        plain = plaintext_connects(args.connects, Path(tmp))
        common.print_table("connect() -> CONNACK, 127.0.0.1 (ms)", ["client", "median", "p90", "min", "n"], [
            ["IPDC Bus: TLS 1.3 + client certificate + ipdc_auth", *stats(tls)],
            ["paho, plaintext anonymous mosquitto (before)", *stats(plain)],
        ])
        results["connect_ms"] = {"tls": [s * 1000 for s in tls], "plaintext": [s * 1000 for s in plain]}
        if args.queue:
            results["queue"] = queue_delivery(cluster)
            q = results["queue"]
            common.print_table("QoS 1 to a slow subscriber through the swarm's broker", list(q),
                               [list(q.values())])
        untrusted, kicked = removal(cluster)
        rotations = []
        for _ in range(args.rotations):
            started = time.perf_counter()
            done = rotate_swarm_key(cluster.nodes[0])
            wall = time.perf_counter() - started
            rotations.append((done.seconds, wall, len(done.switched), len(done.pending)))
        common.print_table(f"membership changes, {args.nodes}-node local cluster (s)", ["step", "seconds"], [
            ["remove: until every other node dropped its key", f"{untrusted:.3f}"],
            ["remove: until its agent exited (revoked, kicked)", f"{kicked:.3f}"],
            *[[f"rotate-key #{i + 1}: {n} members switched, {p} pending (whole command)",
               f"{s:.3f} ({w:.3f})"] for i, (s, w, n, p) in enumerate(rotations)],
        ])
        results["removal_s"] = {"untrusted": untrusted, "kicked": kicked}
        results["rotation_s"] = [r[0] for r in rotations]
    print(f"raw figures: {common.save('broker', results)}")


if __name__ == "__main__":
    main()
