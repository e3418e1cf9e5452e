"""What a sandboxed process runs, and the limits it runs under.

Both are plain frozen dataclasses that cross to the zygote as JSON.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

#: The package whose modules a sandbox may run: only IPDC's user-code side is bound in.
RUNNABLE_PACKAGE = "ipdc.runner"


@dataclass(frozen=True)
class Limits:
    """Limits of one sandbox: everything it starts shares them."""

    memory_mb: int = 4096
    """Memory cgroup limit: resident memory plus the sandbox's files (its tmpfs /job and
    memfds are memory). Past it the kernel kills a process of the sandbox."""
    address_space_mb: int = 0
    """RLIMIT_AS of each process (0: none). A large allocation then fails cleanly with
    MemoryError instead of an OOM kill; TensorFlow reserves far more than it uses and
    needs 0."""
    max_pids: int = 64
    """pids.max of the sandbox's cgroup, and RLIMIT_NPROC inside its user namespace (the
    bound when no pids cgroup is available)."""
    cpu_percent: int = 100
    """CPU bandwidth in percent of one core (cgroup cpu quota); 0 for none."""
    cpu_seconds: int = 3600
    """RLIMIT_CPU of each process: SIGXCPU at this many CPU seconds, SIGKILL 5 s later."""
    disk_mb: int = 1024
    """Size of the sandbox's writable tmpfs /job (which also holds /tmp): its disk quota."""
    file_mb: int = 4096
    """RLIMIT_FSIZE: the largest file (or memfd) a process may write."""
    nofile: int = 1024
    """RLIMIT_NOFILE."""
    nice: int = 19
    """Added to the niceness, so a volunteer's machine stays usable."""


@dataclass(frozen=True)
class SandboxSpec:
    """One sandboxed process.

    The process is ``main()`` of ``module``, an IPDC module under ``ipdc.runner`` (only
    that package, :mod:`ipdc.errors` and the wire formats it needs are bound in). It gets
    ``args`` as ``sys.argv[1:]``, its channel to the agent as fd 3 (a SOCK_SEQPACKET
    socket, see :mod:`ipdc.wire.fdmsg`), and ``fds`` as fds 4, 5, ... in that order.
    """

    module: str
    """The module whose ``main()`` runs, e.g. ``ipdc.runner.process``."""
    name: str
    """A short name for logs and cgroups, e.g. ``runner`` or ``tf-worker-0``."""
    args: tuple[str, ...] = ()
    limits: Limits = field(default_factory=Limits)
    ro_dirs: tuple[str, ...] = ()
    """Host directories bound read-only at the same path (e.g. a directory of unix
    sockets the process may connect to: a read-only mount does not stop ``connect``).
    bubblewrap runs as the sandbox's uid, which must be able to reach them: as root, every
    directory on the way must be searchable by others."""
    fds: tuple[int, ...] = ()
    """Descriptors of the caller passed in as fds 4, 5, ... (e.g. listening sockets); the
    caller keeps its own copies."""
    env: tuple[tuple[str, str], ...] = ()
    """Environment variables besides PATH, HOME, TMPDIR and LANG (the environment is
    otherwise empty)."""

    def __post_init__(self) -> None:
        if self.module != RUNNABLE_PACKAGE and not self.module.startswith(RUNNABLE_PACKAGE + "."):
            raise ValueError(f"a sandbox runs a module of {RUNNABLE_PACKAGE}, not {self.module!r}")
        if not self.name.replace("-", "").replace("_", "").isalnum() or len(self.name) > 40:
            raise ValueError(f"a sandbox name is up to 40 letters, digits, '-' and '_', not {self.name!r}")
        for path in self.ro_dirs:
            if not path.startswith("/") or "\0" in path:
                raise ValueError(f"a read-only directory must be an absolute path, not {path!r}")

    def to_json(self) -> dict[str, Any]:
        """The spec as the zygote gets it (``fds`` travel separately, as SCM_RIGHTS)."""
        data = dataclasses.asdict(self)
        data.pop("fds")
        data["fds"] = len(self.fds)
        return data


def spec_from_json(data: dict[str, Any]) -> tuple[SandboxSpec, int]:
    """The zygote's side of :meth:`SandboxSpec.to_json`: the spec, and how many fds follow."""
    return SandboxSpec(
        module=str(data["module"]), name=str(data["name"]), args=tuple(map(str, data["args"])),
        limits=Limits(**{k: int(v) for k, v in dict(data["limits"]).items()}),
        ro_dirs=tuple(map(str, data["ro_dirs"])),
        env=tuple((str(k), str(v)) for k, v in data["env"]),
    ), int(data["fds"])
