"""A four-host IPDC swarm in network namespaces, built the way a user builds one.

Why namespaces: each host gets its own network stack and address, so these tests
cover what a one-machine LocalCluster cannot: nodes that reach each other only over
a (virtual) LAN, a host that drops off that LAN and comes back, and a broker that
restarts under live clients. The filesystem stays shared, so the tests can read
each node's files; user code, which runs sandboxed, tells the test it reached a gate
in its runner's log, and waits for a file in a directory every node shares read-only
with its runners (``sandbox.shared_dirs``; see Gates).

Layout (every name carries a per-run prefix, so concurrent runs never collide, and
nothing is added to the root namespace's network):

    <prefix>-sw     the "switch": bridge <prefix>br, one veth end per host
    <prefix>-h<i>   host i: lo, and veth <prefix>h<i> = 10.231.X.(i+1)/24
    <prefix>-out    the outsider: on the same bridge (10.231.X.200), with no token

Host 0 founds the swarm (``deploy.py init --host``), hosts mosquitto and submits
the jobs; hosts 1-3 join with token files from ``ipdc invite -o FILE`` on host 0
(``deploy.py init --join-file``). Every command runs through ``ip netns exec <ns>``
with that host's own IPDC_HOME. Each namespace has its own loopback, so every node
gets the default ports (8883, 5001, 4001); kubo's API listens on
the namespace's 127.0.0.1 only, the swarm port and the broker on the host address.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from ipdc.config import load_config, save_config
from ipdc.node.broker import Broker
from ipdc.node.install import find_mosquitto
from ipdc.node.lifecycle import Node
from ipdc.spawn import pid_alive
from tests.helpers import REPO

T = TypeVar("T")

#: Liveness settings written into every node's ipdc.conf before it starts, so that a
#: lost worker is noticed in seconds (the defaults are 2 s and 10 s).
HEARTBEAT_INTERVAL = 0.5
PEER_TIMEOUT = 3.0


class WaitTimeout(AssertionError):
    """A condition a test waited for never held."""


def wait_until(predicate: Callable[[], T], timeout: float, what: str,
               detail: Callable[[], str] | None = None, interval: float = 0.1) -> T:
    """Poll ``predicate`` until it returns something truthy, and return that value.

    On timeout, raise WaitTimeout naming ``what`` (plus ``detail()``, e.g. a log
    tail), so a failing test says which event never happened.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            extra = f"\n{detail()}" if detail is not None else ""
            raise WaitTimeout(f"timed out after {timeout:g}s waiting for {what}{extra}")
        time.sleep(interval)


def _ip(*args: str) -> str:
    """Run one iproute2 command; a failure names the command and ip's own message."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed: {done.stderr.strip()}")
    return done.stdout


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"({path} is missing)"


@dataclass(eq=False)
class Host:
    """One machine of the swarm: a namespace, its address, and a node home."""

    index: int
    ns: str
    addr: str
    veth: str
    home: Path
    name: str = ""
    """The node name (MQTT user), known once the host is initialised."""
    role: str = ""
    """"outsider" for the host that is no member; "" for the swarm's hosts."""

    @property
    def label(self) -> str:
        return self.role or f"host{self.index}"

    def argv(self, argv: list[str]) -> list[str]:
        """``argv`` run inside this host's namespace (``ip netns exec`` execs it: same pid)."""
        return ["ip", "netns", "exec", self.ns, *argv]

    def env(self) -> dict[str, str]:
        """The host's IPDC_HOME, and this checkout's code on PYTHONPATH: the agents that
        ``deploy.py start`` spawns must run the code under test, wherever (or whether) an
        editable install points."""
        path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
        return {**os.environ, "IPDC_HOME": str(self.home), "PYTHONPATH": path}


class Lab:
    """The namespaces, veths and bridge of one run; ``destroy`` removes all of them."""

    def __init__(self, hosts: int, base: Path) -> None:
        tag = os.getpid() % 10000
        self.prefix = f"ipdc{tag}"
        subnet = f"10.231.{tag % 250 + 1}"
        self.switch = f"{self.prefix}-sw"
        self.bridge = f"{self.prefix}br"
        self.hosts = [Host(i, f"{self.prefix}-h{i}", f"{subnet}.{i + 1}", f"{self.prefix}h{i}",
                           base / f"host{i}") for i in range(hosts)]
        self.outsider = Host(hosts, f"{self.prefix}-out", f"{subnet}.200", f"{self.prefix}hout",
                             base / "outsider", role="outsider")
        """A machine on the same LAN that holds no token (see tests/multihost/outsider.py)."""
        self._created: list[str] = []

    def create(self) -> None:
        self._add_namespace(self.switch)
        _ip("-n", self.switch, "link", "add", self.bridge, "type", "bridge")
        _ip("-n", self.switch, "link", "set", self.bridge, "up")
        for host in [*self.hosts, self.outsider]:
            self._add_namespace(host.ns)
            port = f"{self.prefix}s{host.index}"
            _ip("-n", self.switch, "link", "add", port, "type", "veth",
                "peer", "name", host.veth, "netns", host.ns)
            _ip("-n", self.switch, "link", "set", port, "master", self.bridge, "up")
            _ip("-n", host.ns, "addr", "add", f"{host.addr}/24", "dev", host.veth)
            _ip("-n", host.ns, "link", "set", host.veth, "up")

    def _add_namespace(self, ns: str) -> None:
        _ip("netns", "add", ns)
        self._created.append(ns)
        _ip("-n", ns, "link", "set", "lo", "up")

    def destroy(self) -> None:
        """Kill what still runs in our namespaces (and say so: it outlived ``deploy.py stop``),
        then delete them, which removes their veths and the bridge too."""
        for ns in reversed(self._created):
            listed = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, check=False)
            pids = [int(p) for p in listed.stdout.split()]
            if pids:
                described = [f"{pid} {_cmdline(pid)}" for pid in pids]
                warnings.warn(f"processes left in namespace {ns} after every node stopped: {described}",
                              stacklevel=1)
                for pid in pids:
                    _kill(pid, signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        self._created.clear()


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


def _kill(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


@dataclass
class Job:
    """An ``ipdc -v mr ... --json`` running in the background on host 0."""

    proc: subprocess.Popen[bytes]
    stdout: Path
    stderr: Path
    output: Path
    control_log: Path
    """The log of host 0's controller service, where the job's controller runs."""
    control_offset: int
    """Its size when the job was submitted: only what came after is this job's."""

    def log(self) -> str:
        """The controller's log since the job was submitted, and the command's stderr."""
        try:
            with open(self.control_log, "rb") as f:
                f.seek(self.control_offset)
                control = f.read().decode(errors="replace")
        except FileNotFoundError:
            control = ""
        return control + self.stderr.read_text(errors="replace")

    def _tail(self) -> str:
        return (f"--- last lines of {self.control_log}:\n{_tail(self.control_log)}\n"
                f"--- last lines of {self.stderr}:\n{_tail(self.stderr)}")

    def wait_until(self, predicate: Callable[[], T], timeout: float, what: str) -> T:
        """``wait_until``, but fail at once, with the controller's log, if the job ends first."""
        def check() -> T:
            value = predicate()
            if not value and self.proc.poll() is not None:
                raise AssertionError(f"the job exited ({self.proc.returncode}) before {what}\n{self._tail()}")
            return value
        return wait_until(check, timeout, what, detail=self._tail)

    def wait_for_log(self, pattern: str, timeout: float) -> re.Match[str]:
        return self.wait_until(lambda: re.search(pattern, self.log()), timeout,
                               f"/{pattern}/ in the controller's log")

    def result(self, timeout: float) -> dict[str, Any]:
        """Wait for the job to succeed and return its ``--json`` summary."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise WaitTimeout(f"the job did not finish within {timeout:g}s\n{self._tail()}") from None
        if code != 0:
            raise AssertionError(f"the job failed (exit {code})\n{self._tail()}")
        summary: dict[str, Any] = json.loads(self.stdout.read_text())
        return summary

    def stop(self) -> None:
        """SIGINT first, so the controller's ``finally`` still sends CleanUp; SIGKILL if it hangs."""
        if self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGINT)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


class Cluster:
    """Four real nodes on four namespaced hosts; host 0 hosts the broker and submits."""

    def __init__(self, lab: Lab, base: Path) -> None:
        self.hosts = lab.hosts
        self.outsider = lab.outsider
        self.logs = base / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.gates = Path(tempfile.mkdtemp(prefix="ipdc-gates-"))
        """Shared read-only with every node's runners: where the tests open gates. Outside
        pytest's 0700 temp dirs, so that runners under uids of their own can reach it."""
        self.gates.chmod(0o755)
        self._seq = itertools.count()
        self._jobs: list[Job] = []
        self._brokers: list[subprocess.Popen[bytes]] = []
        """mosquitto processes the harness restarted; reaped in ``close``."""

    @property
    def broker_host(self) -> Host:
        return self.hosts[0]

    # -- commands --------------------------------------------------------------------
    def run(self, host: Host, args: list[str], label: str, timeout: float = 120,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``ipdc ARGS`` (or ``deploy.py ...`` when args[0] is "deploy.py") on ``host``.

        Output goes to a numbered log file under ``logs/`` as well as into the result.
        """
        argv = ([sys.executable, str(REPO / "deploy.py"), *args[1:]] if args[0] == "deploy.py"
                else [sys.executable, "-m", "ipdc.cli", *args])
        log = self.logs / f"{next(self._seq):03d}-{host.label}-{label}.log"
        done = subprocess.run(host.argv(argv), env=host.env(), cwd=host.home.parent, capture_output=True,
                              text=True, timeout=timeout, check=False)
        log.write_text(f"$ {' '.join(args)}\n[exit {done.returncode}]\n--- stdout\n{done.stdout}"
                       f"--- stderr\n{done.stderr}")
        if check and done.returncode != 0:
            raise AssertionError(f"{host.label}: `{' '.join(args)}` exited {done.returncode} "
                                 f"(log {log}):\n{done.stderr[-3000:]}")
        return done

    def start(self) -> None:
        """Found the swarm on host 0, then invite, init and start hosts 1-3."""
        first, others = self.hosts[0], self.hosts[1:]
        self.run(first, ["deploy.py", "init", "--host", first.addr, "--slots", "1"], "init")
        self._tune(first)
        self.run(first, ["deploy.py", "start"], "start")
        tokens = [self.logs / f"{h.label}.token" for h in others]
        for host, token in zip(others, tokens, strict=True):
            self.run(first, ["invite", "-o", str(token)], f"invite-{host.label}")

        def join(host: Host, token: Path) -> None:
            self.run(host, ["deploy.py", "init", "--host", host.addr, "--slots", "1",
                            "--join-file", str(token)], "init")
            self._tune(host)
            self.run(host, ["deploy.py", "start"], "start")

        with ThreadPoolExecutor(len(others)) as pool:
            list(pool.map(join, others, tokens))
        self.wait_all_live()

    def _tune(self, host: Host) -> None:
        """Fast liveness (see HEARTBEAT_INTERVAL; the submitter reads it from host 0's file),
        and the gates directory shared with the runners."""
        conf = host.home / "ipdc.conf"
        cfg = load_config(conf)
        liveness = {"heartbeat_interval": HEARTBEAT_INTERVAL, "peer_timeout": PEER_TIMEOUT}
        save_config(cfg.replace(agent=liveness, sandbox={"shared_dirs": [str(self.gates)]}), conf)
        host.name = cfg.node.name

    # -- state -----------------------------------------------------------------------
    def live_peers(self) -> set[str]:
        """Node names host 0 sees as live (``ipdc peers --json``)."""
        done = self.run(self.broker_host, ["peers", "--json"], "peers")
        return {row["name"] for row in json.loads(done.stdout)}

    def wait_all_live(self, timeout: float = 60) -> None:
        names = {h.name for h in self.hosts}
        wait_until(lambda: self.live_peers() == names, timeout,
                   f"host 0 to see all four nodes live ({sorted(names)})", interval=0.2)

    def ensure_healthy(self) -> None:
        """Undo what an earlier test did: a dead broker or agent is started again."""
        if Node(self.broker_host.home).services["mosquitto"].pid() is None:
            self._start_broker()
        for host in self.hosts:
            if not Node(host.home).running():
                self.restart_node(host)
        self.wait_all_live()

    def new_gates(self) -> Gates:
        return Gates(Path(tempfile.mkdtemp(dir=self.gates)))

    def hosts_at_gate(self, gates: Gates, phase: str) -> set[Host]:
        """The hosts where user code has reached ``phase``'s gate (for this test's job): its
        runner said so in that host's runners.log."""
        mark = gates.mark(phase)
        found = set()
        for host in self.hosts:
            log = host.home / "logs" / "runners.log"
            if log.exists() and mark in log.read_text(errors="replace"):
                found.add(host)
        return found

    def wait_at_gate(self, job: Job, gates: Gates, phase: str, hosts: int, timeout: float = 60) -> set[Host]:
        """Wait until user code on ``hosts`` distinct hosts has reached ``phase``'s gate."""
        def reached() -> set[Host] | None:
            found = self.hosts_at_gate(gates, phase)
            return found if len(found) >= hosts else None
        return job.wait_until(reached, timeout, f"{phase} markers from {hosts} hosts in {gates.dir}")

    # -- faults ----------------------------------------------------------------------
    def kill_agent(self, host: Host) -> None:
        """``kill -9`` the host's agent (its kubo keeps running); a crash, not a goodbye."""
        pid = Node(host.home).services["agent"].pid()
        if pid is None:
            raise AssertionError(f"{host.label} has no running agent to kill")
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not pid_alive(pid), 10, f"{host.label}'s agent (pid {pid}) to die")

    def restart_node(self, host: Host) -> None:
        """What a user does after a crash: ``deploy.py stop`` (what still runs), then ``start``."""
        self.run(host, ["deploy.py", "stop"], "stop")
        self.run(host, ["deploy.py", "start"], "start")

    @contextmanager
    def cut_off(self, host: Host) -> Iterator[None]:
        """Take the host off the LAN (its veth down) for the ``with`` block; always restored."""
        _ip("-n", host.ns, "link", "set", host.veth, "down")
        try:
            yield
        finally:
            _ip("-n", host.ns, "link", "set", host.veth, "up")

    def restart_broker(self) -> None:
        """SIGTERM host 0's mosquitto (it saves its persistence), then start it again with
        the same config file, as ``deploy.py start`` does (see Node._start_broker)."""
        pid = Node(self.broker_host.home).services["mosquitto"].pid()
        if pid is None:
            raise AssertionError("the broker is not running on host 0")
        os.kill(pid, signal.SIGTERM)
        wait_until(lambda: not pid_alive(pid), 15, f"mosquitto (pid {pid}) to exit on SIGTERM")
        self._start_broker()

    def _start_broker(self) -> None:
        host = self.broker_host
        service = Node(host.home).services["mosquitto"]
        found = find_mosquitto()
        if found is None:
            raise AssertionError("mosquitto is not installed")
        port = load_config(host.home / "ipdc.conf").broker.port
        with open(service.log_file, "ab") as out:
            proc = subprocess.Popen(host.argv([str(found), "-c", str(Broker(host.home).conf)]),
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self._brokers.append(proc)
        # The node's own pid file, so `deploy.py stop|status` see this broker as the node's.
        service.pid_file.write_text(f"{proc.pid}\n")
        wait_until(lambda: proc.poll() is not None or _listening(proc.pid, port), 15,
                   f"the restarted mosquitto to listen on port {port}",
                   detail=lambda: _tail(service.log_file))
        if proc.poll() is not None:
            raise AssertionError(f"mosquitto exited ({proc.returncode}) on restart:\n"
                                 f"{_tail(service.log_file)}")

    # -- jobs ------------------------------------------------------------------------
    def submit(self, input_file: Path, output: Path, *, k: int = 3, chunks: int | None = None,
               map_file: Path | None = None, reduce_file: Path | None = None) -> Job:
        """Start ``ipdc -v mr --k K INPUT --json -o OUTPUT`` on host 0, in the background."""
        args = ["-v", "mr", "--k", str(k), str(input_file), "--json", "-o", str(output)]
        if chunks is not None:
            args += ["--chunks", str(chunks)]
        if map_file is not None:
            args += ["--map", str(map_file)]
        if reduce_file is not None:
            args += ["--reduce", str(reduce_file)]
        where = self.logs / f"{next(self._seq):03d}-job"
        where.mkdir()
        host = self.broker_host
        control_log = host.home / "logs" / "control.log"
        offset = control_log.stat().st_size if control_log.exists() else 0
        with open(where / "stdout", "wb") as out, open(where / "stderr", "wb") as err:
            proc = subprocess.Popen(host.argv([sys.executable, "-m", "ipdc.cli", *args]), env=host.env(),
                                    cwd=host.home.parent, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    start_new_session=True)
        job = Job(proc, where / "stdout", where / "stderr", output, control_log, offset)
        self._jobs.append(job)
        return job

    def stop_jobs(self) -> None:
        for job in self._jobs:
            job.stop()
        self._jobs.clear()

    def close(self) -> None:
        shutil.rmtree(self.gates, ignore_errors=True)
        """Stop jobs, then every node (joiners first, the broker host last)."""
        self.stop_jobs()
        for host in reversed(self.hosts):
            if (host.home / "ipdc.conf").exists():
                self.run(host, ["deploy.py", "stop"], "stop", check=False)
        for proc in self._brokers:
            if proc.poll() is None:  # not stopped through the pid file: its own process group
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _listening(pid: int, port: int) -> bool:
    """True when a TCP socket listens on ``port`` in the network namespace of ``pid``.

    ``/proc/<pid>/net/tcp`` lists the sockets of that process's namespace, so this
    looks into a host's namespace without running anything inside it.
    """
    try:
        rows = Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return False
    for row in rows:
        fields = row.split()
        if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":  # 0A: LISTEN
            return True
    return False


# -- user code held at a gate ------------------------------------------------------------
_GATE_HEAD = '''\
"""WordCount, {phase} side, held at a gate by tests/multihost.

On its first call in this runner process it prints a mark to its log (so the test
knows which host runs it), then waits until the test creates go-{phase} in the gates
directory, which the node shares read-only with its runners; the wait is bounded, so
a test that never opens the gate fails the task.
"""
import os
import time

GATE_DIR = {gate_dir!r}
TIMEOUT = {timeout!r}
_reached = False


def _gate():
    global _reached
    if _reached:
        return
    _reached = True
    print({mark!r}, flush=True)
    go = os.path.join(GATE_DIR, "go-{phase}")
    deadline = time.monotonic() + TIMEOUT
    while not os.path.exists(go):
        if time.monotonic() > deadline:
            raise RuntimeError("gate %s stayed closed for %ss" % (go, TIMEOUT))
        time.sleep(0.05)
'''

_BODIES = {
    "map": '''

def map(line):
    _gate()
    for word in line.split():
        yield word, 1


def combine(word, counts):
    return sum(counts)
''',
    "reduce": '''

def reduce(word, counts):
    _gate()
    return sum(counts)
''',
}


class Gates:
    """Gated Map.py / Reduce.py for one test. Its user code marks reaching a gate in its
    runner's log (``mark``), and waits for ``go-<phase>`` in ``dir``."""

    def __init__(self, directory: Path, timeout: float = 240) -> None:
        self.dir = directory
        self.dir.chmod(0o755)
        self.code = directory / "code"
        self.code.mkdir()
        self.timeout = timeout

    def mark(self, phase: str) -> str:
        """What user code prints on reaching ``phase``'s gate: unique to this test."""
        return f"ipdc-gate {phase} {self.dir.name}"

    def file(self, phase: str) -> Path:
        """Write the gated ``Map.py`` ("map") or ``Reduce.py`` ("reduce"); return its path."""
        path = self.code / ("Map.py" if phase == "map" else "Reduce.py")
        path.write_text(_GATE_HEAD.format(phase=phase, gate_dir=str(self.dir), timeout=self.timeout,
                                          mark=self.mark(phase)) + _BODIES[phase])
        return path

    def open(self, phase: str) -> None:
        (self.dir / f"go-{phase}").touch()

    def open_all(self) -> None:
        for phase in _BODIES:
            self.open(phase)


# -- input -------------------------------------------------------------------------------
_WORDS = ["the", "The", "THE", "map", "Map", "reduce", "café", "naïve", "日本語", "🚀", "ipfs", "a", "b"]


def write_input(path: Path, lines: int = 3000, seed: int = 11) -> bytes:
    """Deterministic text with case variants, non-ASCII words, tabs and empty lines.

    Hundreds of distinct words, so that every one of K partitions holds keys and each
    reducer's user code is really called.
    """
    rng = random.Random(seed)
    vocabulary = _WORDS + [f"w{n}" for n in range(500)]
    rows = []
    for _ in range(lines):
        words = [rng.choice(vocabulary) for _ in range(rng.randint(0, 12))]
        rows.append(rng.choice([" ", " ", "\t", "  "]).join(words))
    data = ("\n".join(rows) + "\n").encode()
    path.write_bytes(data)
    return data
