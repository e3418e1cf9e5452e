"""What a machine on the swarm's LAN without a token can reach: reusable probes for the
multi-host tests (tests/multihost/test_outsider.py against the idle swarm, and
tests/multihost/test_tf_tunnels.py while a TF cluster trains across hosts).

The outsider is the harness's ``Cluster.outsider``, which ``Lab`` puts on the hosts'
bridge with the hosts themselves: an address, but no token, no swarm key and no
certificate, and it never joins the swarm. Every probe runs inside its namespace
(``ip netns exec``), so its packets really cross the bridge, as a stranger's would:

* :func:`listeners` lists every TCP port any process listens on in a host's namespace
  (``ss -ltnpH``), whatever address it is bound to, and who listens;
* :func:`sweep` connects from the outsider to many (address, port) pairs at once,
  non-blocking, and says which accepted: every port of every host in a few seconds;
  :func:`scan` sweeps the listeners, each at its host's LAN address;
* :func:`mqtt_handshakes` speaks MQTT to the broker in plaintext (no credentials at
  all), over TLS without a certificate, and with a certificate of another CA, and
  reports how each ended;
* :func:`kubo_dials` runs a kubo in the outsider's namespace, with no swarm key or
  another one, and asks it to dial the members.
"""

from __future__ import annotations

import json
import re
import secrets
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ipdc import pki
from tests.multihost.harness import Host, wait_until

_SS_LINE = re.compile(r"LISTEN\s+\d+\s+\d+\s+(?P<address>\S+):(?P<port>\d+)\s+\S+\s*(?P<process>.*)")


@dataclass(frozen=True)
class Listener:
    host: Host
    address: str
    """As ``ss`` prints it: ``10.231.5.1``, ``127.0.0.1``, ``*``, ``0.0.0.0``, ``[::]``."""
    port: int
    process: str
    """``users:(("ipfs",pid=...,fd=...))``: who listens."""


def listeners(host: Host) -> list[Listener]:
    """Every listening TCP socket in ``host``'s namespace. A line ``ss`` prints that does not
    parse fails the test rather than being skipped: a skipped line would be a port never tried."""
    done = subprocess.run(host.argv(["ss", "-ltnpH"]), capture_output=True, text=True, check=True)
    found = []
    for line in done.stdout.splitlines():
        match = _SS_LINE.match(line.strip())
        if match is None:
            raise AssertionError(f"cannot parse this line of `ss -ltnpH` in {host.label}: {line!r}")
        found.append(Listener(host, match["address"], int(match["port"]), match["process"]))
    return found


def _python_in(outsider: Host, script: str, data: object, timeout: float = 120) -> object:
    """Run ``script`` with Python in the outsider's namespace; JSON in on stdin, out on stdout."""
    done = subprocess.run(outsider.argv([sys.executable, "-c", script]), input=json.dumps(data),
                          env=outsider.env(), capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise AssertionError(f"the probe in {outsider.label} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


# Non-blocking, up to 2000 connections in flight, each given 3 s: the TF test tries all
# 65535 ports of four hosts, and one blocking connect at a time would wait out its full
# timeout, one after another, at every port that drops packets instead of refusing.
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
    """Connect from ``outsider`` to every (address, port): "open" when the TCP handshake
    completed, else why not ("ECONNREFUSED", "timeout", ...)."""
    results = _python_in(outsider, _SWEEP, sorted(set(targets)), timeout=600)
    assert isinstance(results, list)
    return {(address, int(port)): result for address, port, result in results}


def scan(outsider: Host, targets: list[Listener]) -> dict[Listener, str]:
    """:func:`sweep` of each listener at its host's LAN address, whatever address it is bound
    to (one bound to 127.0.0.1 must then be refused): listener -> "open", or why not."""
    results = sweep(outsider, [(t.host.addr, t.port) for t in targets])
    return {t: results[(t.host.addr, t.port)] for t in targets}


_MQTT = """
import json, ssl, sys
from tests.helpers import mqtt_probe
args = json.load(sys.stdin)
out = {}
for mode in ("plaintext", "TLS without a certificate", "TLS with another CA's certificate"):
    context = None
    if mode != "plaintext":
        context = ssl.create_default_context(cafile=args["ca"])
        if "another CA" in mode:
            context.load_cert_chain(args["cert"], args["key"])
    try:
        out[mode] = list(mqtt_probe(args["host"], args["port"], context, args["client_id"]))
    except OSError as exc:
        out[mode] = ["error", str(exc)]
print(json.dumps(out))
"""


def mqtt_handshakes(outsider: Host, broker: Host, port: int, ca_file: str,
                    work: Path) -> dict[str, list[str]]:
    """How the broker ends an outsider's MQTT attempts: mode -> [stage, detail]; stage
    "connack" would mean the broker answered CONNECT. The plaintext attempt sends a CONNECT
    with no credentials at all; the TLS ones show what a certificate buys. The outsider even
    knows the swarm's CA certificate (it is not secret) and claims the broker host's node name."""
    ca = pki.Authority.create("outsider")
    key = pki.new_key()
    work.mkdir(parents=True, exist_ok=True)
    (work / "foreign.crt").write_bytes(pki.cert_pem(ca.issue(broker.name, key.public_key())))
    (work / "foreign.key").write_bytes(pki.key_pem(key))
    result = _python_in(outsider, _MQTT, {"host": broker.addr, "port": port, "ca": ca_file,
                                          "cert": str(work / "foreign.crt"), "key": str(work / "foreign.key"),
                                          "client_id": f"{broker.name}.agent"})
    assert isinstance(result, dict)
    return result


def kubo_dials(outsider: Host, binary: str, swarm_key: str | None, targets: list[str],
               work: Path) -> dict[str, str]:
    """Start a kubo in the outsider's namespace (with ``swarm_key``, or none, as a public kubo)
    and dial each multiaddr in ``targets``: multiaddr -> "connected", or kubo's error."""
    work.mkdir(parents=True, exist_ok=True)
    repo = work / f"kubo-{secrets.token_hex(3)}"
    env = {**outsider.env(), "IPFS_PATH": str(repo), "IPFS_TELEMETRY": "off"}
    done = subprocess.run(outsider.argv([binary, "init", "--empty-repo", "--profile=test"]), env=env,
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise AssertionError(f"`ipfs init` of the outsider's kubo failed: {done.stderr.strip()}")
    if swarm_key is not None:
        (repo / "swarm.key").write_text(f"/key/swarm/psk/1.0.0/\n/base16/\n{swarm_key}\n")
        env["LIBP2P_FORCE_PNET"] = "1"
    config = json.loads((repo / "config").read_text())
    config["Addresses"].update(API="/ip4/127.0.0.1/tcp/5001", Gateway="/ip4/127.0.0.1/tcp/8080",
                               Swarm=[f"/ip4/{outsider.addr}/tcp/4001"])
    config["AutoConf"] = {"Enabled": False}
    config["Plugins"] = {"Plugins": {"telemetry": {"Config": {"Mode": "off"}}}}
    (repo / "config").write_text(json.dumps(config))
    log = work / f"{repo.name}.log"
    with open(log, "wb") as out:
        daemon = subprocess.Popen(outsider.argv([binary, "daemon"]), env=env, stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # (not `ipfs id`: run before the daemon holds the repo, it takes the repo's lock itself)
        wait_until(lambda: "Daemon is ready" in log.read_text() or daemon.poll() is not None, 60,
                   f"the outsider's kubo in {repo} to start", interval=0.2)
        if daemon.poll() is not None:
            raise AssertionError(f"the outsider's kubo exited:\n{log.read_text()}")
        results = {}
        for target in targets:
            done = subprocess.run(outsider.argv([binary, "swarm", "connect", target]), env=env,
                                  capture_output=True, text=True, timeout=60, check=False)
            results[target] = "connected" if done.returncode == 0 else (done.stderr or done.stdout).strip()
        return results
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(15)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
