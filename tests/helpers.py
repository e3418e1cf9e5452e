"""Helpers for tests: run the CLI as a user would, an independent WordCount, a raw MQTT
probe, and a watch on every process's argv."""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ipdc.isolation.cgroups import POOL_GROUP, delegate, placement, undelegate

if TYPE_CHECKING:
    from ipdc.node.cluster import LocalCluster
    from ipdc.submit.mapreduce import JobResult, MapReduceJob

REPO = Path(__file__).resolve().parent.parent
#: The unprivileged user the tests run agents as (made by the sandbox's setup).
AGENT_USER = "ipdcagent"


@contextmanager
def cluster_as(user: str | None, prefix: str, sandbox: dict[str, Any]) -> Iterator[LocalCluster]:
    """Two nodes whose agents run as root (``user`` None) or as ``user``, whose cgroups are
    delegated to it for the while."""
    from ipdc.node.cluster import LocalCluster

    base = Path(tempfile.mkdtemp(prefix=prefix))
    base.chmod(0o755)  # the user must reach its homes
    if user is not None:
        delegate(user)
    try:
        with LocalCluster(2, base=base, slots=2, settings={"sandbox": sandbox}, user=user) as cluster:
            yield cluster
    finally:
        if user is not None:
            undelegate(user)
        shutil.rmtree(base, ignore_errors=True)


def run_on(cluster: LocalCluster, job: MapReduceJob) -> JobResult:
    """Run ``job`` with the first node as its submitter, in this process."""
    from ipdc.submit.client import SwarmClient
    from ipdc.submit.mapreduce import MapReduceController

    node = cluster.nodes[0]
    with SwarmClient(node.config, node.signer).connect() as client, node.kubo() as kubo:
        return MapReduceController(client, kubo, job, node.home).run()


def run_cli(args: list[str], home: Path, timeout: float = 180, check: bool = True,
            cwd: Path | None = None, env: dict[str, str] | None = None,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``ipdc ARGS`` (or ``deploy.py`` when args[0] == 'deploy.py') as a user would,
    with ``input`` on stdin."""
    env = {**os.environ, "IPDC_HOME": str(home), **(env or {})}
    argv = ([sys.executable, str(REPO / "deploy.py"), *args[1:]] if args[0] == "deploy.py"
            else [sys.executable, "-m", "ipdc.cli", *args])
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=cwd or home.parent, input=input)
    if check and done.returncode != 0:
        raise AssertionError(f"{argv} exited {done.returncode}\nstdout:\n{done.stdout}\n"
                             f"stderr:\n{done.stderr}")
    return done


def reference_counts(data: bytes) -> Counter[bytes]:
    """WordCount computed independently of IPDC: whitespace tokens of the raw bytes.

    Splitting bytes on ASCII whitespace and Python's ``str.split()`` agree on the
    test inputs, which hold no Unicode-only whitespace (U+00A0, U+3000, ...).
    """
    return Counter(data.split())


def read_output(output: Path, k: int) -> tuple[Counter[bytes], list[list[bytes]]]:
    """Parse part-00000..part-<k-1> back into byte keys; also return each part's keys."""
    counts: Counter[bytes] = Counter()
    keys_per_part = []
    for p in range(k):
        keys = []
        for line in (output / f"part-{p:05d}").read_bytes().split(b"\n"):
            if not line:
                continue
            key, _, value = line.rpartition(b"\t")
            assert key not in counts, f"key {key!r} appears twice"
            counts[key] = int(value)
            keys.append(key)
        keys_per_part.append(keys)
    return counts, keys_per_part


#: User code that misbehaves, as the body of a map function: each must fail its task and
#: leave the agent serving. ``bad_map(name, chunk)`` makes a Map.py of it, with the bulk
#: ``map_chunk(text)`` form or the line-by-line ``map(line)`` one.
BAD_BODIES = {
    "infinite loop": "    while True:\n        pass\n",
    "10 GB": "    block = bytearray(10 << 30)\n    return []\n",
    "fork bomb": ("    while True:\n        try:\n            os.fork()\n        except OSError:\n"
                  "            pass\n"),
}


def bad_map(name: str, chunk: bool) -> str:
    signature = "def map_chunk(text):" if chunk else "def map(line):"
    return f"import os\n\n{signature}\n{BAD_BODIES[name]}"


def mqtt_connect_packet(client_id: str) -> bytes:
    """A minimal MQTT 5 CONNECT (clean start, keepalive 30 s, no username)."""
    name = client_id.encode()
    body = (b"\x00\x04MQTT" + bytes([5, 0x02]) + struct.pack("!H", 30) + b"\x00"
            + struct.pack("!H", len(name)) + name)
    return bytes([0x10, len(body)]) + body


def mqtt_probe(host: str, port: int, context: ssl.SSLContext | None, client_id: str,
               timeout: float = 5.0) -> tuple[str, str]:
    """Open a connection (TLS with ``context``, else plaintext), send CONNECT, and say how it
    ended: ("connack", reason code) when the broker answered, else ("handshake" | "alert" |
    "closed" | "reset", detail): refused before MQTT.

    With TLS 1.3 the server judges the client's certificate after the client's side of the
    handshake is done, so this waits briefly for an alert before sending CONNECT (sent at
    once, the alert is often lost to a TCP reset)."""
    sock = socket.create_connection((host, port), timeout=timeout)
    try:
        if context is not None:
            try:
                sock = context.wrap_socket(sock, server_hostname=host)
            except ssl.SSLError as exc:
                return "handshake", exc.reason or str(exc)
            sock.settimeout(0.5)
            try:
                if not sock.recv(1024):
                    return "closed", ""
            except ssl.SSLError as exc:
                return "alert", exc.reason or str(exc)
            except TimeoutError:
                pass
            except ConnectionError:
                return "reset", ""
            sock.settimeout(timeout)
        try:
            sock.sendall(mqtt_connect_packet(client_id))
            data = sock.recv(1024)
        except ssl.SSLError as exc:
            return "alert", exc.reason or str(exc)
        except ConnectionError:
            return "reset", ""
        if not data:
            return "closed", ""
        if data[0] == 0x20 and len(data) >= 4:
            return "connack", str(data[3])
        return "other", data[:16].hex()
    finally:
        sock.close()


class ArgvWatch:
    """Every command line (/proc/*/cmdline) seen on this machine while the ``with`` block
    runs, sampled every few milliseconds: a secret passed in argv would show up here."""

    def __init__(self, interval: float = 0.005) -> None:
        self.seen: set[str] = set()
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
                try:
                    self.seen.add(cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"))
                except OSError:
                    continue

    def __enter__(self) -> ArgvWatch:
        """Watch (again): one watch may cover several separate blocks."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def leaks(self, secrets: list[str]) -> list[tuple[str, str]]:
        """(secret, command line) for every command line that holds one of ``secrets``."""
        return [(s, line) for line in self.seen for s in secrets if s and s in line]
def processes_with(tag: str) -> list[int]:
    """Every live process on the machine whose command line holds ``tag`` (zombies excluded:
    they are dead, only not yet reaped)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if tag.encode() in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


def runner_groups(cluster: LocalCluster) -> list[Path]:
    """The pids cgroups of every runner of the cluster's agents (none without cgroups)."""
    parent = placement().parents.get("pids")
    if parent is None:
        return []
    agents = {str(node.services["agent"].pid()) for node in cluster.nodes}
    pools = [p for p in parent.iterdir() if (m := POOL_GROUP.fullmatch(p.name)) and m.group(1) in agents]
    return [group for pool in pools for group in pool.glob("runner-*")]


def members(group: Path) -> list[str]:
    try:
        return (group / "cgroup.procs").read_text().split()
    except FileNotFoundError:
        return []


def live_runners(cluster: LocalCluster) -> int:
    """How many runners of the cluster's agents hold a process: after a job is dropped, only
    each agent's warm spares. (Inside its sandbox a runner's cwd is /job, so the process
    table cannot tell whose it is; its cgroup can.)"""
    return sum(1 for group in runner_groups(cluster) if members(group))
