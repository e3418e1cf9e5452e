"""The zygote: the one process that starts an agent's sandboxes.

The agent is multithreaded, and two things must not happen in a multithreaded
process: forking to run Python code before exec (another thread may hold a lock the
child then waits on forever), and starting a child whose ``PR_SET_PDEATHSIG`` (what
bubblewrap's ``--die-with-parent`` uses) is tied to a thread that may end, which
kills the child with it. So the agent starts this single-threaded process once
(``ipdc.spawn.Sandbox``), and asks it over a SOCK_SEQPACKET socket
(:mod:`ipdc.wire.fdmsg`) to start each sandbox. It is not dumpable and it is the
subreaper of everything it starts, so a sandbox's processes are reaped here at once
(a slow reaper would keep their cgroups busy).

For each sandbox it forks a launcher that, in this order: joins the sandbox's
cgroups (so everything it ever starts counts); lays out its fds; as root, switches to
a uid of the sandbox's own (``UID_BASE`` + its pid: unique among live sandboxes, and
never 0, since a user namespace mapped onto uid 0 would still own root's files and be
exempt from RLIMIT_NPROC); sets no_new_privs and the rlimits; and execs bubblewrap
with an empty environment (the sandbox's pid 1 keeps bwrap's environment, which user
code can read in /proc/1/environ).

Messages, agent to zygote: ``{"op": "spawn", "id": N, "spec": {...}, "cgroups": [...]}``
with the sandbox's channel and the spec's fds attached. Zygote to agent: ``{"ready":
true}`` once, then ``{"spawned": N, "pid": P, "uid": U}`` with a pidfd of bwrap and
the read end of its ``--info-fd`` attached, ``{"failed": N, "error": "..."}``, and
``{"exited": P, "status": S, "cpu": SECONDS}`` for every sandbox that ends. What a
sandbox writes on stdout and stderr comes here, and goes to the zygote's own stderr
(``runners.log``), each line tagged, at most :data:`LOG_CAP` bytes per sandbox.

When the agent's end closes (it stopped, or died), the zygote kills every sandbox it
started, empties their cgroups and exits: no user code outlives its agent.
"""

from __future__ import annotations

import fcntl
import json
import os
import resource
import selectors
import signal
import socket
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from ipdc.isolation import bwrap
from ipdc.isolation.cgroups import SandboxCgroup
from ipdc.isolation.interpreter import Interpreter
from ipdc.isolation.kernel import PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS, make_undumpable, prctl
from ipdc.isolation.seccomp import compile_filter
from ipdc.isolation.spec import Limits, SandboxSpec, spec_from_json
from ipdc.wire import fdmsg

#: A root agent's sandbox runs as outside uid UID_BASE + the pid of its bwrap. The range
#: 0x70000000.. is unused by Debian, systemd and container uid ranges.
UID_BASE = 0x70000000
#: Bytes of a sandbox's output the zygote writes to runners.log; the rest is dropped.
LOG_CAP = 1 << 20
#: Seconds past RLIMIT_CPU's soft limit (SIGXCPU, which the runner reports) before SIGKILL.
CPU_GRACE = 5
#: Seconds the zygote waits for its sandboxes to end when the agent has gone.
SHUTDOWN_TIMEOUT = 10.0


@dataclass
class _Child:
    name: str
    cgroups: list[str]
    logged: int = 0
    partial: bool = field(default=False)
    """Whether the last line written to the log had no newline yet."""


class Zygote:
    """The zygote's loop: spawn requests, ended children, sandbox output."""

    def __init__(self, control: socket.socket, config: dict[str, Any]) -> None:
        self.control = control
        python = config["python"]
        self.python = Interpreter(executable=str(python["executable"]), binds=tuple(python["binds"]),
                                  site=tuple(python["site"]), library_path=str(python["library_path"]))
        self.separate_uid = bool(config["separate_uid"])
        self.bwrap = str(config["bwrap"])
        self.filter = compile_filter()
        self.data = bwrap.data_files(bwrap.shipped_files(Path(config["package"])))
        self.children: dict[int, _Child] = {}
        self.outputs: dict[int, tuple[int, _Child]] = {}  # stderr pipe -> the sandbox writing it
        self.selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def serve(self) -> None:
        signal.set_wakeup_fd(self._wake_w)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)  # wakes the selector
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the agent, not a terminal's ^C, ends us
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        self.selector.register(self.control, selectors.EVENT_READ)
        self.selector.register(self._wake_r, selectors.EVENT_READ)
        fdmsg.send(self.control, {"ready": True})
        while True:
            for key, _ in self.selector.select():
                if key.fileobj is self.control:
                    if not self._command():
                        self._shutdown()
                        return
                elif key.fileobj == self._wake_r:
                    while _read_some(self._wake_r):
                        pass
                    self._reap()
                else:
                    self._drain(int(key.fd))

    # -- requests ---------------------------------------------------------------------
    def _command(self) -> bool:
        """Serve one request; False when the agent has gone."""
        try:
            got = fdmsg.recv(self.control, None)
        except (OSError, ValueError):
            return False
        if got is None:
            return False
        request, fds = got
        try:
            if request.get("op") != "spawn":
                raise ValueError(f"unknown request {request.get('op')!r}")
            spec, extras = spec_from_json(request["spec"])
            if len(fds) != 1 + extras:
                raise ValueError(f"{len(fds)} fds for a spec of {extras}")
            self._spawn(int(request["id"]), spec, [str(p) for p in request["cgroups"]], fds)
        except Exception as exc:  # a bad request fails that request only
            self._send({"failed": request.get("id"), "error": f"{type(exc).__name__}: {exc}"})
        finally:
            fdmsg.close_all(fds)
        return True

    def _send(self, message: dict[str, Any], fds: list[int] | None = None) -> None:
        try:
            fdmsg.send(self.control, message, fds or [])
        except OSError:  # the agent is gone; the next read of the control socket ends us
            pass

    def _spawn(self, number: int, spec: SandboxSpec, cgroups: list[str], fds: list[int]) -> None:
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        info_r, info_w = os.pipe2(os.O_CLOEXEC)
        try:
            pid = os.fork()
            if pid == 0:
                self._launch(spec, cgroups, fds, err_w, info_w)
        finally:
            os.close(err_w)
            os.close(info_w)
        pidfd = os.pidfd_open(pid)  # before any reaping: it names this process, never a reused pid
        self.children[pid] = child = _Child(spec.name, cgroups)
        os.set_blocking(err_r, False)
        self.outputs[err_r] = (pid, child)
        self.selector.register(err_r, selectors.EVENT_READ)
        uid = UID_BASE + pid if self.separate_uid else os.geteuid()
        self._send({"spawned": number, "pid": pid, "uid": uid}, [pidfd, info_r])
        os.close(pidfd)
        os.close(info_r)

    def _launch(self, spec: SandboxSpec, cgroups: list[str], fds: list[int], err_w: int,
                info_w: int) -> NoReturn:
        """In the forked child: become the sandbox's bwrap. Never returns."""
        try:
            signal.set_wakeup_fd(-1)
            for signum in (signal.SIGCHLD, signal.SIGINT, signal.SIGPIPE):
                signal.signal(signum, signal.SIG_DFL)
            pid = str(os.getpid())
            for procs in cgroups:  # first: everything the sandbox ever starts counts against the limits
                with open(procs, "w") as f:
                    f.write(pid)
            data = [fdmsg.sealed_memfd([content]) for content in self.data.values()]
            seccomp = fdmsg.sealed_memfd([self.filter])
            layout = bwrap.FdLayout(extras=len(fds) - 1, data=tuple(self.data))
            sources = [os.open(os.devnull, os.O_RDONLY), err_w, err_w, *fds, info_w, seccomp, *data]
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD, layout.count) for fd in sources]  # out of the way
            for target, fd in enumerate(high):
                os.dup2(fd, target, inheritable=True)
            os.closerange(layout.count, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
            if self.separate_uid:
                uid = UID_BASE + int(pid)
                os.setgroups([])
                os.setresgid(uid, uid, uid)
                os.setresuid(uid, uid, uid)
            prctl(PR_SET_NO_NEW_PRIVS, 1)
            _set_limits(spec.limits)
            os.execve(self.bwrap, bwrap.argv(spec, self.python, layout, self.bwrap), {})
        except BaseException:  # whatever happens, the child must not return into the zygote
            try:
                os.write(2, traceback.format_exc().encode())
            finally:
                os._exit(127)

    # -- ended children and their output -----------------------------------------------------
    def _reap(self) -> None:
        """Wait for every ended descendant (we are their subreaper); report our sandboxes."""
        while True:
            try:
                pid, status, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if self.children.pop(pid, None) is not None:
                self._send({"exited": pid, "status": status, "cpu": usage.ru_utime + usage.ru_stime})

    def _drain(self, fd: int) -> None:
        """Copy what a sandbox wrote to our log, each line tagged, up to LOG_CAP bytes."""
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        pid, child = self.outputs[fd]
        if not chunk:
            self.selector.unregister(fd)
            os.close(fd)
            del self.outputs[fd]
            if child.partial:
                sys.stderr.buffer.write(b"\n")
            sys.stderr.flush()
            return
        room = LOG_CAP - child.logged
        if room <= 0:
            return
        tag = f"[{child.name} {pid}] ".encode()
        text = chunk[:room]
        lines = text.split(b"\n")
        out = [] if child.partial else [tag]
        out.append(lines[0])
        for line in lines[1:]:
            out += [b"\n", tag, line] if line else [b"\n"]
        child.partial = not text.endswith(b"\n")
        child.logged += len(text)
        if child.logged >= LOG_CAP:
            out.append(b"\n" + tag + b"(output over %d bytes cut)\n" % LOG_CAP)
            child.partial = False
        sys.stderr.buffer.write(b"".join(out))
        sys.stderr.flush()

    def _shutdown(self) -> None:
        """The agent is gone: kill every sandbox, wait for it, and empty its cgroups."""
        for pid in self.children:
            try:
                os.kill(pid, signal.SIGKILL)  # its sandbox's pid 1 follows (PDEATHSIG)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + SHUTDOWN_TIMEOUT
        left = dict(self.children)
        while left and time.monotonic() < deadline:
            try:
                pid, _ = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            left.pop(pid, None)
        for child in self.children.values():
            dirs = {str(i): Path(procs).parent for i, procs in enumerate(child.cgroups)}
            if dirs:
                try:
                    SandboxCgroup(dirs, 1).remove()
                except OSError as exc:
                    print(f"zygote: {exc}", file=sys.stderr, flush=True)


def _read_some(fd: int) -> bool:
    try:
        return bool(os.read(fd, 4096))
    except BlockingIOError:
        return False


def _set_limits(limits: Limits) -> None:
    """The rlimits of the sandbox's processes (a hard limit cannot rise without root)."""
    mb = 1 << 20
    wanted = [(resource.RLIMIT_NOFILE, limits.nofile, limits.nofile),
              (resource.RLIMIT_FSIZE, limits.file_mb * mb, limits.file_mb * mb),
              (resource.RLIMIT_CORE, 0, 0),
              (resource.RLIMIT_CPU, limits.cpu_seconds, limits.cpu_seconds + CPU_GRACE)]
    if limits.address_space_mb:
        wanted.append((resource.RLIMIT_AS, limits.address_space_mb * mb, limits.address_space_mb * mb))
    for which, soft, hard in wanted:
        _, ceiling = resource.getrlimit(which)
        if ceiling != resource.RLIM_INFINITY:
            hard = min(hard, ceiling)
        resource.setrlimit(which, (min(soft, hard), hard))
    os.nice(limits.nice)


def main() -> None:
    """``python -I -S -c ... CONTROL_FD CONFIG_JSON``, started by :class:`ipdc.spawn.Sandbox`."""
    control = socket.socket(fileno=int(sys.argv[1]))
    config = json.loads(sys.argv[2])
    make_undumpable()
    prctl(PR_SET_CHILD_SUBREAPER, 1)
    try:
        zygote = Zygote(control, config)
    except Exception as exc:  # say why to the agent, which says it once
        fdmsg.send(control, {"ready": False, "error": f"{type(exc).__name__}: {exc}"})
        raise
    zygote.serve()
