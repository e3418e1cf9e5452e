"""An agent's part of its TF clusters: forwards, listeners, sockets and sandboxed servers.

See :mod:`ipdc.wire.tf` for the plan every host derives its part from, and
:mod:`ipdc.submit.tf` for the controller that asks for it. For one cluster, a host:

1. makes the cluster's directory, ``run/tf/<token>/``, readable by this user only;
2. for every server task hosted elsewhere, asks its kubo to forward the unix socket
   ``t<k>.sock`` there to that task's host, over the private swarm;
3. for every server task hosted here, binds two listening sockets itself: ``t<k>.sock``
   (how tasks of this host, and the owner's chief, reach it) and, when the cluster has
   other hosts, TCP 127.0.0.1:0, the target of kubo's ``p2p listen`` for the task. It
   hands both to the task's sandbox as inherited descriptors and keeps no copy, then
   waits until the task answers gRPC through ``t<k>.sock``.

Each server runs IPDC's own ``python -m ipdc.runner.tfserver`` in a sandbox with a
network namespace of its own that has only loopback: its TF server (which binds every
interface) and its relays are reachable only through those descriptors, and it sees
the cluster's directory read-only. Where no such sandbox can be made, the node
refuses TF tasks unless ``tf.trusted_network`` says otherwise; it then runs the
servers in its own network namespace, and one relay process per cluster for them.
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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ipdc.errors import IPDCError, JobError, KuboError
from ipdc.kubo import KuboClient
from ipdc.net import grpc_answers
from ipdc.spawn import wait_for
from ipdc.tfsandbox import PACKAGE_ROOT, isolation_problem, refusal, server_argv
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
)

log = logging.getLogger(__name__)

JobKey = tuple[str, str]
"""(submitter key, cluster id), as the agent's job table keys its jobs."""
#: Seconds a server may take to answer (TF's import alone takes about 8 s on a busy machine).
START_TIMEOUT = 180.0
KILL_TIMEOUT = 10.0
#: What a TF process may see of this machine's environment: nothing else (no secrets, no proxies).
TF_ENV = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8", "PYTHONUNBUFFERED": "1",
          "PYTHONDONTWRITEBYTECODE": "1", "GRPC_FAIL_FAST": "use_caller", "TF_CPP_MIN_LOG_LEVEL": "2"}


@dataclass
class _Hosted:
    """One cluster as this host runs it."""

    plan: TfPlan
    token: str
    dir: Path
    protocols: list[str] = field(default_factory=list)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    """Task name (or "relay", the shared relay of an unisolated host) -> its process."""


class TfHost:
    """This agent's TF clusters, keyed like its jobs by (submitter, cluster id)."""

    def __init__(self, node: str, home: Path, kubo: KuboClient, peer_id: str, offers_tf: bool,
                 trusted_network: bool, report: Callable[[GetResult], None]) -> None:
        self.node = NodeName(node)
        self.home = home
        self.kubo = kubo
        self.peer_id = peer_id
        self.offers_tf = offers_tf
        self.trusted_network = trusted_network
        self.report = report
        self.log_dir = home / "logs"
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
            return all(grpc_answers(hosted.dir / t.sock) or procs[t.name].poll() is not None for t in local)

        if not wait_for(settled, START_TIMEOUT, 0.2):
            raise JobError(f"TF servers {', '.join(t.name for t in local)} did not answer within "
                           f"{START_TIMEOUT:.0f}s; see {self.log_dir}/tf-{hosted.token}-*.log")
        dead = [f"/job:{t.job}/task:{t.index} exited ({_tail(self._log(hosted, t.name))})"
                for t in local if procs[t.name].poll() is not None]
        if dead:
            raise JobError("; ".join(dead))

    def _prepare(self, key: JobKey, plan: TfPlan) -> _Hosted:
        """Check the plan against this node; the cluster's directory, empty."""
        if plan.peers.get(self.node) != self.peer_id:
            raise JobError(f"the cluster gives {self.node} the peer ID {plan.peers.get(self.node)}, "
                           f"but this node's kubo is {self.peer_id}")
        if not self.offers_tf and any(t.host == self.node for t in plan.servers()):
            raise JobError(f"{self.node} does not offer TensorFlow (node.tf, or tensorflow is not installed)")
        problem = isolation_problem()
        if problem and not self.trusted_network:
            raise JobError(refusal(self.node, problem))
        token = cluster_token(*key)
        directory = cluster_dir(self.home, token)
        longest = directory / f"t{len(plan.task_list())}.sock"
        if len(str(longest)) > MAX_SOCKET_PATH:
            raise JobError(f"the socket path {longest} is longer than a unix socket allows "
                           f"({MAX_SOCKET_PATH} bytes): give this node a shorter IPDC_HOME")
        shutil.rmtree(directory, ignore_errors=True)  # what a killed agent left
        directory.mkdir(parents=True, mode=0o700)
        return _Hosted(plan, token, directory)

    def _launch(self, hosted: _Hosted) -> None:
        """Forwards to the tasks elsewhere, then this host's servers in their sandboxes."""
        plan, me = hosted.plan, self.node
        others = len(plan.peers) > 1
        servers = plan.servers()
        allowed = sorted(plan.peers.values())
        for t in servers:
            hosted.protocols.append(protocol(hosted.token, t))
            if t.host != me:
                self.kubo.p2p_forward(protocol(hosted.token, t), f"/unix{hosted.dir / t.sock}",
                                      plan.peers[t.host])
        isolated = not isolation_problem()
        shared: list[dict[str, Any]] = []
        """The maps of the one relay of an unisolated host."""
        fds: list[int] = []
        try:
            for t in servers:
                if t.host != me:
                    if not isolated:
                        shared.append(_to_socket(t, hosted.dir))
                    continue
                inward = [self._serve_socket(hosted.dir / t.sock)]
                if others:
                    inward.append(self._kubo_target(hosted.token, t))
                fds += inward
                own = f"tcp:127.0.0.1:{t.port}"
                maps: list[dict[str, Any]] = [{"listen": f"fd:{inward[0]}", "target": own}]
                maps += [{"listen": f"fd:{fd}", "target": own, "peers": allowed} for fd in inward[1:]]
                if isolated:
                    maps += [_to_socket(u, hosted.dir) for u in servers if u != t]
                    self._spawn(hosted, t, maps, inward, sandboxed=True)
                else:
                    shared += maps
                    self._spawn(hosted, t, [], [], sandboxed=False)
            if shared:
                self._spawn(hosted, None, shared, fds, sandboxed=False)
        finally:
            for fd in fds:  # the sandboxes hold them now
                os.close(fd)

    def _serve_socket(self, path: Path) -> int:
        """A listening unix socket at ``path``: how this host reaches the task."""
        path.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(path))
        sock.listen(128)
        return sock.detach()

    def _kubo_target(self, token: str, task: Task) -> int:
        """A listening TCP socket on 127.0.0.1 that kubo's ``p2p listen`` for ``task`` dials."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        port = sock.getsockname()[1]
        self.kubo.p2p_listen(protocol(token, task), f"/ip4/127.0.0.1/tcp/{port}")
        return sock.detach()

    def _log(self, hosted: _Hosted, name: str) -> Path:
        return self.log_dir / f"tf-{hosted.token}-{name}.log"

    def _spawn(self, hosted: _Hosted, task: Task | None, maps: list[dict[str, Any]], fds: list[int],
               sandboxed: bool) -> None:
        """Start ``python -m ipdc.runner.tfserver`` for ``task`` (None: the shared relay)."""
        name = task.name if task is not None else "relay"
        env = {**TF_ENV, "PYTHONPATH": PACKAGE_ROOT}
        plan: dict[str, Any] = {"label": f"{hosted.plan.name}/{name}", "cluster": hosted.plan.cluster_spec(),
                                "maps": maps,
                                "task": None if task is None else {"type": task.job, "index": task.index}}
        argv = [sys.executable, "-m", "ipdc.runner.tfserver", json.dumps(plan)]
        if sandboxed:
            argv = server_argv(hosted.dir) + [a for k, v in env.items() for a in ("--setenv", k, v)] + argv
        for fd in fds:
            os.set_inheritable(fd, True)
        with open(self._log(hosted, name), "ab") as out:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    env=env, pass_fds=fds, start_new_session=True, cwd="/")
        hosted.procs[name] = proc
        log.info("TF cluster %s: started %s (pid %d%s)", hosted.plan.name, name, proc.pid,
                 ", sandboxed" if sandboxed else ", NOT isolated (tf.trusted_network)")

    # -- stop ------------------------------------------------------------------------
    def stop(self, key: JobKey) -> None:
        """Kill the cluster's processes, close its listeners, forwards and streams, and remove
        its sockets. Idempotent."""
        with self._lock:
            hosted = self._clusters.pop(key, None)
        if hosted is None:
            return
        procs = list(hosted.procs.values())
        for proc in procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # a TF server has nothing to save
            except ProcessLookupError:
                pass
        if not wait_for(lambda: all(p.poll() is not None for p in procs), KILL_TIMEOUT, 0.05):
            log.error("TF processes of cluster %s outlived SIGKILL", hosted.plan.name)
        for proto in hosted.protocols:
            try:
                self.kubo.p2p_close(proto)
            except KuboError as exc:
                log.warning("could not close the p2p listener %s: %s", proto, exc)
        shutil.rmtree(hosted.dir, ignore_errors=True)
        log.info("TF cluster %s: stopped %d process(es)", hosted.plan.name, len(procs))

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
    shutil.rmtree(home / "run" / "tf", ignore_errors=True)


def _to_socket(task: Task, directory: Path) -> dict[str, Any]:
    """The relay map by which a process reaches ``task`` at its ClusterSpec address."""
    return {"listen": f"tcp:127.0.0.1:{task.port}", "target": f"unix:{directory / task.sock}"}


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "no log"
