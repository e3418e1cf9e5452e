"""The bubblewrap command line of a sandbox, and the fds it expects.

Why bubblewrap rather than the kernel calls made by hand: the same sandbox must hold
when the agent is not root, which means an unprivileged user namespace, and inside it
a careful order of mounts, a pivot_root, a pid 1 that reaps and forwards exit codes,
``--die-with-parent`` and a seccomp load after the last privileged step. bubblewrap
(Debian's ``bubblewrap``, used by Flatpak) does exactly that, is small (one C file to
audit), is not setuid here, and takes its whole configuration as arguments, so one
command line serves root and non-root agents alike. What it does not do, the zygote
does before exec'ing it (see :mod:`ipdc.isolation.zygote`): join the cgroups, switch
to a uid of the sandbox's own, set no_new_privs and rlimits, clear the environment.

Inside, the process sees: ``/usr`` (and the usual /bin, /lib links) read-only, the
interpreter and site-packages read-only at their own paths, IPDC's user-code modules
under ``/ipdc/lib`` read-only, a synthetic /etc/passwd and /etc/group, its own /proc
(its own pid namespace: two or three processes), a minimal /dev, a size-limited
writable tmpfs ``/job`` (its disk quota; ``/tmp`` points into it), a small /dev/shm,
and nothing else: ``/`` and ``/dev`` are remounted read-only, there is no network but
its own loopback, and the node's home is not in its mount namespace at all.
"""

from __future__ import annotations

import importlib.util
import json
import py_compile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ipdc.isolation.interpreter import Interpreter
from ipdc.isolation.spec import SandboxSpec

BWRAP = "/usr/bin/bwrap"
#: The uid and gid user code sees inside (mapped onto the sandbox's own uid outside).
INNER_UID = 1000
#: Where IPDC's user-code modules are, inside.
LIB = "/ipdc/lib"
#: IPDC's files a sandbox gets, relative to the ``ipdc`` package: only the user-code side.
SHIPPED = ("__init__.py", "errors.py", "runner/*.py", "wire/fdmsg.py", "wire/partition.py", "wire/stages.py")
#: Size of /dev/shm (POSIX semaphores and shared memory, e.g. for multiprocessing).
SHM_MB = 64
#: The first fd after the channel (3): the spec's own fds, then ours.
FIRST_EXTRA_FD = 4
PASSWD = (b"root:x:0:0::/:/usr/sbin/nologin\n"
          b"job:x:1000:1000::/job:/usr/sbin/nologin\n"
          b"nobody:x:65534:65534::/:/usr/sbin/nologin\n")
GROUP = b"root:x:0:\njob:x:1000:\nnogroup:x:65534:\n"

#: What the sandbox's Python runs first (``python -I -S -c BOOT JSON``): RLIMIT_NPROC,
#: set here because inside its user namespace it counts this sandbox's processes only
#: (set outside, it would count every process of the outside uid, the agent's own for a
#: non-root agent); then IPDC's modules and site-packages on sys.path; then main().
BOOT = """\
import json, resource, sys
boot = json.loads(sys.argv[1])
resource.setrlimit(resource.RLIMIT_NPROC, (boot["nproc"], boot["nproc"]))
sys.path[:0] = [boot["lib"]]
sys.path.extend(boot["site"])
sys.argv = [boot["module"], *boot["args"]]
__import__(boot["module"], fromlist=["main"]).main()
"""


def shipped_files(package: Path) -> dict[str, bytes]:
    """IPDC's files every sandbox gets, by their path inside (made once, by the zygote).

    Each module comes with its compiled form, an *unchecked* hash-based .pyc (PEP 552):
    the sandbox's Python uses it without comparing it with the source (whose mtime, in
    the sandbox, is its start), so no sandbox spends its start compiling them.
    """
    files: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory(prefix="ipdc-pyc-") as tmp:
        for pattern in SHIPPED:
            for path in sorted(package.glob(pattern)):
                inside = path.relative_to(package)
                files[f"{LIB}/ipdc/{inside}"] = path.read_bytes()
                compiled = Path(tmp) / "module.pyc"
                py_compile.compile(str(path), cfile=str(compiled), doraise=True,
                                   invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
                cached = Path(importlib.util.cache_from_source(f"{LIB}/ipdc/{inside}"))
                files[str(cached)] = compiled.read_bytes()
    return files


@dataclass(frozen=True)
class FdLayout:
    """The fds bwrap starts with: 0 /dev/null, 1 and 2 the log pipe, 3 the channel, the
    spec's fds, bwrap's --info-fd and --seccomp, then one per file of data
    (``--ro-bind-data``: /etc/passwd, /etc/group and IPDC's modules, in ``data`` order)."""

    extras: int
    data: tuple[str, ...]

    @property
    def info(self) -> int:
        return FIRST_EXTRA_FD + self.extras

    @property
    def seccomp(self) -> int:
        return self.info + 1

    def data_fd(self, index: int) -> int:
        return self.seccomp + 1 + index

    @property
    def count(self) -> int:
        return self.seccomp + 1 + len(self.data)


def data_files(shipped: dict[str, bytes]) -> dict[str, bytes]:
    """Every --ro-bind-data file of a sandbox, by its path inside."""
    return {"/etc/passwd": PASSWD, "/etc/group": GROUP, **shipped}


def argv(spec: SandboxSpec, python: Interpreter, layout: FdLayout, bwrap: str = BWRAP) -> list[str]:
    """bubblewrap's arguments for ``spec``, with fds as in ``layout``."""
    limits = spec.limits
    env = {"PATH": "/usr/bin:/bin", "HOME": "/job", "TMPDIR": "/tmp", "LANG": "C.UTF-8",
           **python.environ(), **dict(spec.env)}
    args = [
        bwrap,
        "--unshare-all",                # user, ipc, pid, net (only its own loopback), uts, cgroup
        "--unshare-user", "--disable-userns",  # and no user namespace inside it
        "--uid", str(INNER_UID), "--gid", str(INNER_UID), "--hostname", "ipdc-job",
        "--cap-drop", "ALL",
        "--new-session",                # setsid: no TIOCSTI into a terminal
        "--die-with-parent",            # PDEATHSIG on the monitor and the sandbox's pid 1
        "--clearenv",
    ]
    for key, value in env.items():
        args += ["--setenv", key, value]
    args += ["--ro-bind", "/usr", "/usr",
             "--symlink", "usr/bin", "/bin", "--symlink", "usr/sbin", "/sbin",
             "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64",
             "--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache",
             "--ro-bind-try", "/etc/localtime", "/etc/localtime",
             "--ro-bind-try", "/etc/alternatives", "/etc/alternatives"]  # /usr/bin/awk etc. link there
    for path in python.binds:
        args += ["--ro-bind", path, path]
    for index, target in enumerate(layout.data):
        args += ["--ro-bind-data", str(layout.data_fd(index)), target]
    args += [
        "--proc", "/proc",              # of its own pid namespace
        "--dev", "/dev",
        "--size", str(limits.disk_mb << 20), "--tmpfs", "/job",
        "--dir", "/job/.tmp", "--symlink", "job/.tmp", "/tmp",  # relative: resolved inside
        "--size", str(SHM_MB << 20), "--tmpfs", "/dev/shm",
    ]
    for path in spec.ro_dirs:  # after /tmp is made: one under /tmp lands in the job's tmpfs
        args += ["--ro-bind", path, path]
    args += [
        "--remount-ro", "/dev",         # else /dev and / are writable tmpfs without a size
        "--remount-ro", "/",
        "--chdir", "/job",
        "--seccomp", str(layout.seccomp),
        "--info-fd", str(layout.info),  # {"child-pid": N}: the sandbox's pid 1, as seen outside
        "--",
        python.executable, "-I", "-S", "-c", BOOT,
        json.dumps({"nproc": limits.max_pids, "lib": LIB, "site": list(python.site),
                    "module": spec.module, "args": list(spec.args)}),
    ]
    return args
