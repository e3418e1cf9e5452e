"""A stranger on the swarm's LAN: a namespace on the hosts' bridge that holds no credentials,
and what it can reach. Reusable by any multi-host test:

* :func:`outsider` adds the namespace for a ``with`` block (it never joins the swarm);
* :func:`listeners` lists the TCP sockets listening in a host's namespace (``ss -ltnpH``),
  with their processes: what every IPDC process of that host listens on;
* :func:`sweep` connects from the outsider to many (address, port) pairs at once,
  non-blocking, and says which accepted: every port of every host in a few seconds;
* :func:`kubo_dial` runs a kubo in the outsider's namespace, with another swarm key or
  none, and reports how its dial of each member ended;
* :func:`mqtt_connect` tries the broker with no credentials.

The probes run inside the outsider's namespace (``ip netns exec``), so their packets
cross the bridge as a stranger's would.
"""

from __future__ import annotations

import json
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.multihost.harness import Cluster, Host, _ip, wait_until

#: The outsider's address in the hosts' /24 (the hosts are .1 to .N).
OUTSIDER_ADDRESS = 201


@dataclass(frozen=True)
class Listener:
    host: str
    """The label of the host whose namespace it is in."""
    address: str
    """As ``ss`` prints it: ``10.231.5.1``, ``127.0.0.1``, ``*``, ``0.0.0.0``, ``[::]``."""
    port: int
    process: str


@contextmanager
def outsider(cluster: Cluster, base: Path) -> Iterator[Host]:
    """A host on the same bridge as ``cluster``'s, with an address but no token, no key, no
    certificate; removed (with its veth) when the block ends."""
    first = cluster.hosts[0]
    prefix = first.ns.rsplit("-h", 1)[0]
    subnet = first.addr.rsplit(".", 1)[0]
    host = Host(len(cluster.hosts), f"{prefix}-tfout", f"{subnet}.{OUTSIDER_ADDRESS}", f"{prefix}tfo",
                base / "outsider")
    host.home.mkdir(parents=True, exist_ok=True)
    switch, port = f"{prefix}-sw", f"{prefix}stfo"
    _ip("netns", "add", host.ns)
    try:
        _ip("-n", host.ns, "link", "set", "lo", "up")
        _ip("-n", switch, "link", "add", port, "type", "veth", "peer", "name", host.veth, "netns", host.ns)
        _ip("-n", switch, "link", "set", port, "master", f"{prefix}br", "up")
        _ip("-n", host.ns, "addr", "add", f"{host.addr}/24", "dev", host.veth)
        _ip("-n", host.ns, "link", "set", host.veth, "up")
        yield host
    finally:
        listed = subprocess.run(["ip", "netns", "pids", host.ns], capture_output=True, text=True, check=False)
        for pid in listed.stdout.split():
            subprocess.run(["kill", "-9", pid], check=False)
        subprocess.run(["ip", "netns", "del", host.ns], capture_output=True, check=False)


def listeners(host: Host) -> list[Listener]:
    """Every TCP socket listening in ``host``'s namespace, and its process."""
    done = subprocess.run(host.argv(["ss", "-ltnpH"]), capture_output=True, text=True, check=True)
    found = []
    for line in done.stdout.splitlines():
        fields = line.split()
        address, _, port = fields[3].rpartition(":")
        found.append(Listener(host.label, address, int(port), " ".join(fields[5:])))
    return found


_SWEEP = """
import errno, json, selectors, socket, sys, time
targets = [tuple(t) for t in json.load(sys.stdin)]
result, live, pending = {}, {}, list(reversed(targets))
selector = selectors.DefaultSelector()
while pending or live:
    while pending and len(live) < 2000:
        target = pending.pop()
        sock = socket.socket()
        sock.setblocking(False)
        code = sock.connect_ex(target)
        if code in (0, errno.EINPROGRESS):
            live[sock] = (target, time.monotonic())
            selector.register(sock, selectors.EVENT_WRITE)
        else:
            result[target] = errno.errorcode.get(code, str(code))
            sock.close()
    for key, _ in selector.select(0.2):
        sock = key.fileobj
        target, _ = live.pop(sock)
        selector.unregister(sock)
        code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        result[target] = "open" if code == 0 else errno.errorcode.get(code, str(code))
        sock.close()
    for sock, (target, started) in list(live.items()):
        if time.monotonic() - started > 3:
            live.pop(sock)
            selector.unregister(sock)
            sock.close()
            result[target] = "timeout"
print(json.dumps([[a, p, r] for (a, p), r in result.items()]))
"""


def sweep(outsider: Host, targets: list[tuple[str, int]]) -> dict[tuple[str, int], str]:
    """Connect from ``outsider`` to every target: "open" when the TCP handshake completed,
    else why not ("ECONNREFUSED", "timeout", ...)."""
    done = subprocess.run(outsider.argv([sys.executable, "-c", _SWEEP]), input=json.dumps(targets),
                          capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0:
        raise AssertionError(f"the sweep from {outsider.ns} failed:\n{done.stderr[-3000:]}")
    return {(address, int(port)): result for address, port, result in json.loads(done.stdout)}


def kubo_dial(outsider: Host, binary: str, swarm_key: str | None, members: list[str],
              work: Path) -> dict[str, str]:
    """Start a kubo in the outsider's namespace, with ``swarm_key`` (or none, as a public
    kubo), dial every member's swarm multiaddr, and return multiaddr -> "connected" or
    kubo's error."""
    repo = work / f"kubo-{secrets.token_hex(3)}"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(work), "IPFS_PATH": str(repo), "IPFS_TELEMETRY": "off"}
    done = subprocess.run(outsider.argv([binary, "init", "--empty-repo", "--profile=test"]), env=env,
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise AssertionError(f"`ipfs init` for the outsider failed: {done.stderr}")
    if swarm_key is not None:
        (repo / "swarm.key").write_text(f"/key/swarm/psk/1.0.0/\n/base16/\n{swarm_key}\n")
        env["LIBP2P_FORCE_PNET"] = "1"
    config = json.loads((repo / "config").read_text())
    config["Addresses"].update(Swarm=[f"/ip4/{outsider.addr}/tcp/4001"], API="/ip4/127.0.0.1/tcp/5001",
                               Gateway="/ip4/127.0.0.1/tcp/8080")
    config["AutoConf"] = {"Enabled": False}
    (repo / "config").write_text(json.dumps(config))
    log = work / f"{repo.name}.log"
    with open(log, "wb") as out:
        daemon = subprocess.Popen(outsider.argv([binary, "daemon"]), env=env, stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until(lambda: "Daemon is ready" in log.read_text() or daemon.poll() is not None, 60,
                   "the outsider's kubo to start", interval=0.2)
        if daemon.poll() is not None:
            raise AssertionError(f"the outsider's kubo exited:\n{log.read_text()}")
        dials = {}
        for member in members:
            done = subprocess.run(outsider.argv([binary, "swarm", "connect", member]), env=env,
                                  capture_output=True, text=True, timeout=60, check=False)
            dials[member] = "connected" if done.returncode == 0 else (done.stderr or done.stdout).strip()
        return dials
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(15)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()


_MQTT = """
import json, sys
import paho.mqtt.client as mqtt
host, port = json.load(sys.stdin)
client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="outsider", protocol=mqtt.MQTTv5)
try:
    client.connect(host, port, keepalive=5)
    outcome = []
    client.on_connect = lambda c, u, f, reason, p: outcome.append(str(reason))
    client.on_disconnect = lambda c, u, f, reason, p: outcome.append("disconnected: " + str(reason))
    for _ in range(50):
        client.loop(0.1)
        if outcome:
            break
    print(json.dumps(outcome[0] if outcome else "no answer"))
except OSError as exc:
    print(json.dumps("error: " + str(exc)))
"""


def mqtt_connect(outsider: Host, broker: Host, port: int) -> str:
    """How the broker answers an MQTT CONNECT without credentials: "Success" would be a breach."""
    done = subprocess.run(outsider.argv([sys.executable, "-c", _MQTT]), input=json.dumps([broker.addr, port]),
                          env=broker.env(), capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        raise AssertionError(f"the MQTT probe failed:\n{done.stderr[-3000:]}")
    outcome: str = json.loads(done.stdout)
    return outcome
