"""An agent's part of its TF clusters: forwards, listeners, sockets and sandboxed servers.

See :mod:`ipdc.wire.tf` for the plan every host derives its part from, and
:mod:`ipdc.submit.tf` for the controller that asks for it. For one cluster, a host:

1. makes the cluster's socket directory (:func:`ipdc.wire.tf.cluster_dir`);
2. for every server task hosted elsewhere, asks its kubo to forward the unix socket
   ``t<k>.sock`` there to that task's host, over the private swarm;
3. for every server task hosted here, binds two listening sockets itself: ``t<k>.sock``
   (how the tasks of this host, and the owner's chief, reach it) and, when the cluster
   has other hosts, TCP 127.0.0.1:0, the target of kubo's ``p2p listen`` for the task.
   It hands both to the task's sandbox as inherited descriptors and keeps no copy,
   then waits until the task answers gRPC through ``t<k>.sock``.

Each server runs IPDC's own ``ipdc.runner.tfserver`` in the sandbox user code runs in
(:mod:`ipdc.spawn`): a network namespace of its own with loopback only, so its TF
server (which binds every interface) and its relays are reachable only through those
descriptors; the socket directory read-only; nothing of the node's home. Where no
sandbox can be made, the node refuses TF tasks unless ``tf.trusted_network`` says
otherwise; it then runs the servers in its own network namespace, unsandboxed, and
one relay process per cluster for them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ipdc.errors import IPDCError, JobError, KuboError
from ipdc.isolation.bwrap import FIRST_EXTRA_FD
from ipdc.kubo import KuboClient
from ipdc.net import grpc_answers
from ipdc.spawn import PACKAGE, Limits, Sandbox, SandboxSpec, wait_for
from ipdc.tfsandbox import refusal
from ipdc.wire.getresult import GetResult, clip
from ipdc.wire.ids import JobId, NodeName
from ipdc.wire.tf import (
    MAX_SOCKET_PATH,
    PROTOCOL_PREFIX,
    Task,
    TfPlan,
    cluster_dir,
    cluster_token,
    protocol,
    socket_root,
)

log = logging.getLogger(__name__)

JobKey = tuple[str, str]
"""(submitter key, cluster id), as the agent's job table keys its jobs."""
#: Seconds a server may take to answer (TF's import alone takes about 8 s on a busy machine).
START_TIMEOUT = 180.0
KILL_TIMEOUT = 10.0
#: A TF server's sandbox: as a runner's (nice 19 among the rest, so a volunteer's machine stays
#: usable), but TF reserves far more address space than it uses (no RLIMIT_AS), holds ~600 MB,
#: runs dozens of threads, and serves for as long as its cluster lives (no CPU-time limit worth
#: the name, no CPU quota).
TF_LIMITS = Limits(memory_mb=4096, address_space_mb=0, max_pids=4096, cpu_percent=0,
                   cpu_seconds=1 << 30, disk_mb=64, nofile=4096)
#: Directories on the way to a cluster's sockets: others (a sandbox's uid) may pass, not list.
DIR_MODE = 0o711
#: The sockets themselves: a sandbox under a uid of its own must be able to connect.
SOCKET_MODE = 0o666


class _Process(Protocol):
    """A TF process of this host: sandboxed (:class:`ipdc.spawn.SandboxedProcess`) or not."""

    def alive(self) -> bool: ...
    def kill(self) -> None: ...
    def ended_by(self) -> str: ...


class _Unsandboxed:
    """A TF process of a host that cannot sandbox it (``tf.trusted_network``)."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # a TF server has nothing to save
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(KILL_TIMEOUT)
        except subprocess.TimeoutExpired:
            log.error("TF process %d outlived SIGKILL", self.proc.pid)

    def ended_by(self) -> str:
        code = self.proc.returncode
        return "running" if code is None else f"exit code {code}" if code >= 0 else f"signal {-code}"


@dataclass
class _Hosted:
    """One cluster as this host runs it."""

    plan: TfPlan
    token: str
    dir: Path
    protocols: list[str] = field(default_factory=list)
    procs: dict[str, _Process] = field(default_factory=dict)
    """Task name (or "relay", the shared relay of an unsandboxed host) -> its process."""


class TfHost:
    """This agent's TF clusters, keyed like its jobs by (submitter, cluster id)."""

    def __init__(self, node: str, home: Path, kubo: KuboClient, sandbox: Sandbox, peer_id: str,
                 offers_tf: bool, trusted_network: bool, report: Callable[[GetResult], None]) -> None:
        self.node = NodeName(node)
        self.home = home
        self.kubo = kubo
        self.peer_id = peer_id
        self.offers_tf = offers_tf
        self.trusted_network = trusted_network
        self.report = report
        self.log_dir = home / "logs"
        self.sandbox = sandbox
        """The agent's: TF servers run in the sandbox its runners run in."""
        self._clusters: dict[JobKey, _Hosted] = {}
        self._lock = threading.Lock()

    def handle(self, op: str, key: JobKey, plan: TfPlan, re: str) -> None:
        """Serve one Tf request and answer on GetResult, echoing ``re``."""
        cluster_id = JobId(key[1])
        try:
            if op == "start":
                self.start(key, plan)
                self.report(GetResult(cluster_id, self.node, "started", re=re))
            else:
                self.stop(key)
                self.report(GetResult(cluster_id, self.node, "stopped", re=re))
        except (IPDCError, OSError) as exc:
            log.warning("TF %s of cluster %s (%s) failed: %s", op, plan.name, cluster_id, exc)
            if op == "start":
                self.stop(key)
            self.report(GetResult(cluster_id, self.node, "error", re=re, error=clip(f"{op}: {exc}")))

    # -- start -----------------------------------------------------------------------
    def start(self, key: JobKey, plan: TfPlan) -> None:
        """Bring up this host's part of the cluster (unless it runs), then wait until every
        server here answers."""
        with self._lock:
            hosted = self._clusters.get(key)
            if hosted is None:
                hosted = self._clusters[key] = self._prepare(key, plan)
                self._launch(hosted)
            procs = dict(hosted.procs)
        local = [t for t in plan.servers() if t.host == self.node]

        def settled() -> bool:
            return all(grpc_answers(hosted.dir / t.sock) or not procs[t.name].alive() for t in local)

        if not wait_for(settled, START_TIMEOUT, 0.2):
            raise JobError(f"TF servers {', '.join(t.name for t in local)} did not answer within "
                           f"{START_TIMEOUT:.0f}s; see {self.log_dir / 'runners.log'}")
        dead = [f"/job:{t.job}/task:{t.index} ended ({procs[t.name].ended_by()})"
                for t in local if not procs[t.name].alive()]
        if dead:
            raise JobError(f"{'; '.join(dead)}; see {self.log_dir / 'runners.log'}")

    def _prepare(self, key: JobKey, plan: TfPlan) -> _Hosted:
        """Check the plan against this node; the cluster's directory, empty."""
        if plan.peers.get(self.node) != self.peer_id:
            raise JobError(f"the cluster gives {self.node} the peer ID {plan.peers.get(self.node)}, "
                           f"but this node's kubo is {self.peer_id}")
        if not self.offers_tf and any(t.host == self.node for t in plan.servers()):
            raise JobError(f"{self.node} does not offer TensorFlow (node.tf, or tensorflow is not installed)")
        if self.sandbox.unusable and not self.trusted_network:
            raise JobError(refusal(self.node, self.sandbox.unusable))
        token = cluster_token(*key)
        directory = cluster_dir(self.home, token)
        longest = directory / f"t{len(plan.task_list())}.sock"
        if len(str(longest)) > MAX_SOCKET_PATH:
            raise JobError(f"the socket path {longest} is longer than a unix socket allows "
                           f"({MAX_SOCKET_PATH} bytes): give this node a shorter IPDC_HOME")
        shutil.rmtree(directory, ignore_errors=True)  # what a killed agent left
        for path in reversed([directory, *directory.parents]):
            try:
                path.mkdir()
            except FileExistsError:  # or another agent of this machine made it a moment ago
                continue
            path.chmod(DIR_MODE)
        return _Hosted(plan, token, directory)

    def _launch(self, hosted: _Hosted) -> None:
        """Forwards to the tasks elsewhere, then this host's servers."""
        plan, me = hosted.plan, self.node
        servers = plan.servers()
        for t in servers:
            hosted.protocols.append(protocol(hosted.token, t))
            if t.host != me:
                sock = hosted.dir / t.sock
                self.kubo.p2p_forward(protocol(hosted.token, t), f"/unix{sock}", plan.peers[t.host])
                sock.chmod(SOCKET_MODE)
        sandboxed = not self.sandbox.unusable
        shared: list[dict[str, Any]] = []
        """The maps of the one relay of an unsandboxed host."""
        fds: list[int] = []
        try:
            for t in servers:
                if t.host != me:
                    if not sandboxed:
                        shared.append(_to_socket(t, hosted.dir))
                    continue
                inward = [self._serve_socket(hosted.dir / t.sock)]
                if len(plan.peers) > 1:
                    inward.append(self._kubo_target(hosted.token, t))
                fds += inward
                if sandboxed:  # inside, the spec's fds are 4, 5, ...
                    maps = _inward(t, range(FIRST_EXTRA_FD, FIRST_EXTRA_FD + len(inward)), plan)
                    maps += [_to_socket(u, hosted.dir) for u in servers if u != t]
                    self._sandboxed(hosted, t, maps, inward)
                else:
                    shared += _inward(t, inward, plan)
                    self._unsandboxed(hosted, t.name, {"type": t.job, "index": t.index}, [], [])
            if shared:
                self._unsandboxed(hosted, "relay", None, shared, fds)
        finally:
            for fd in fds:  # the processes hold them now
                os.close(fd)

    def _serve_socket(self, path: Path) -> int:
        """A listening unix socket at ``path``: how this host reaches the task."""
        path.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(path))
        sock.listen(128)
        path.chmod(SOCKET_MODE)
        return sock.detach()

    def _kubo_target(self, token: str, task: Task) -> int:
        """A listening TCP socket on 127.0.0.1 that kubo's ``p2p listen`` for ``task`` dials."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        port = sock.getsockname()[1]
        self.kubo.p2p_listen(protocol(token, task), f"/ip4/127.0.0.1/tcp/{port}")
        return sock.detach()

    def _plan_for(self, hosted: _Hosted, name: str, task: dict[str, Any] | None,
                  maps: list[dict[str, Any]]) -> str:
        """tfserver's argument: what to run, as JSON (data, never code)."""
        return json.dumps({"label": f"{hosted.plan.name}/{name}", "cluster": hosted.plan.cluster_spec(),
                           "task": task, "maps": maps})

    def _sandboxed(self, hosted: _Hosted, task: Task, maps: list[dict[str, Any]], fds: list[int]) -> None:
        spec = SandboxSpec(module="ipdc.runner.tfserver", name=f"tf-{task.name}",
                           args=(self._plan_for(hosted, task.name, {"type": task.job, "index": task.index},
                                                maps),),
                           limits=TF_LIMITS, ro_dirs=(str(hosted.dir),), fds=tuple(fds))
        process = self.sandbox.start(spec)
        hosted.procs[task.name] = process
        log.info("TF cluster %s: started %s (sandbox %d)", hosted.plan.name, task.name, process.pid)

    def _unsandboxed(self, hosted: _Hosted, name: str, task: dict[str, Any] | None,
                     maps: list[dict[str, Any]], fds: list[int]) -> None:
        """A TF process in this node's own namespaces, as ``tf.trusted_network`` allows."""
        argv = [sys.executable, "-m", "ipdc.runner.tfserver", self._plan_for(hosted, name, task, maps)]
        env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8", "PYTHONPATH": str(PACKAGE.parent)}
        for fd in fds:
            os.set_inheritable(fd, True)
        with open(self.log_dir / "runners.log", "ab") as out:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    env=env, pass_fds=fds, start_new_session=True, cwd="/")
        hosted.procs[name] = _Unsandboxed(proc)
        log.warning("TF cluster %s: started %s (pid %d) NOT isolated: %s; tf.trusted_network allows it",
                    hosted.plan.name, name, proc.pid, self.sandbox.unusable)

    # -- stop ------------------------------------------------------------------------
    def stop(self, key: JobKey) -> None:
        """Kill the cluster's processes, close its listeners, forwards and streams, and remove
        its sockets. Idempotent."""
        with self._lock:
            hosted = self._clusters.pop(key, None)
        if hosted is None:
            return
        for process in hosted.procs.values():
            process.kill()
        for proto in hosted.protocols:
            try:
                self.kubo.p2p_close(proto)
            except KuboError as exc:
                log.warning("could not close the p2p listener %s: %s", proto, exc)
        shutil.rmtree(hosted.dir, ignore_errors=True)
        log.info("TF cluster %s: stopped %d process(es)", hosted.plan.name, len(hosted.procs))

    def close(self) -> None:
        """Stop every cluster (the agent is stopping)."""
        with self._lock:
            keys = list(self._clusters)
        for key in keys:
            self.stop(key)


def sweep(home: Path, kubo: KuboClient) -> None:
    """What an agent killed with SIGKILL left: kubo's TF listeners and forwards (they live as long
    as kubo) and socket files. Only this node's agent makes ``/x/ipdc-tf/`` listeners on its kubo."""
    try:
        stale = {e["Protocol"] for e in kubo.p2p_ls() if e["Protocol"].startswith(PROTOCOL_PREFIX)}
        for proto in sorted(stale):
            kubo.p2p_close(proto)
    except KuboError as exc:
        log.warning("could not close stale TF listeners: %s", exc)
        return
    if stale:
        log.info("closed %d stale TF listener(s) and forward(s)", len(stale))
    shutil.rmtree(socket_root(home), ignore_errors=True)


def _inward(task: Task, fds: Iterable[int], plan: TfPlan) -> list[dict[str, Any]]:
    """The relay maps into ``task`` from its listening sockets ``fds``: its own unix socket,
    then kubo's target, whose streams must come from one of the cluster's hosts."""
    own = f"tcp:127.0.0.1:{task.port}"
    fds = list(fds)
    maps: list[dict[str, Any]] = [{"listen": f"fd:{fds[0]}", "target": own}]
    return maps + [{"listen": f"fd:{fd}", "target": own, "peers": sorted(plan.peers.values())}
                   for fd in fds[1:]]


def _to_socket(task: Task, directory: Path) -> dict[str, Any]:
    """The relay map by which a process reaches ``task`` at its ClusterSpec address."""
    return {"listen": f"tcp:127.0.0.1:{task.port}", "target": f"unix:{directory / task.sock}"}
