"""Memory, pids and CPU cgroups: one group per sandbox, in one pool group per agent.

Where the groups go:

* **root agent**: under its own group in each controller's hierarchy (so a limit an
  admin set on the agent still holds), as ``ipdc-<agent pid>-<n>/<sandbox>``;
* **non-root agent**: under a subtree an admin delegated to its user,
  ``/sys/fs/cgroup/<controller>/ipdc-<user>`` (cgroup v1), made once per boot by
  ``ipdc node delegate-cgroups --user USER`` (:func:`delegate`). The user may create
  groups below it, set their limits and move its own processes in; the subtree's own
  limit files stay root's, so it cannot raise what IPDC as a whole may use.

cgroup v1 (one hierarchy per controller) and v2 (one hierarchy, controllers enabled
per subtree; root agents only) are both handled. A pool whose agent died without
removing it is emptied and removed by the next pool opened under the same parent.

v1 has no ``cgroup.kill``: a group is emptied by SIGKILLing its members until none is
left, which ends because ``pids.max`` bounds how fast a fork bomb refills it.
"""

from __future__ import annotations

import errno
import itertools
import os
import pwd
import re
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ipdc.isolation.kernel import pid_alive
from ipdc.isolation.spec import Limits

CONTROLLERS = ("pids", "memory", "cpu")
CGROUP_MOUNT = Path("/sys/fs/cgroup")
#: Pool groups are named ipdc-<agent pid>-<n>; a pool whose agent is dead is stale.
POOL_GROUP = re.compile(r"ipdc-(\d+)-\d+")
#: What a limit is called in each version: controller -> (v1 file, v2 file).
PIDS_MAX = ("pids.max", "pids.max")
MEMORY_MAX = ("memory.limit_in_bytes", "memory.max")
CPU_PERIOD_US = 100_000
#: Seconds to empty and remove a group before giving up (and saying so).
REMOVE_TIMEOUT = 10.0
_pool_numbers = itertools.count()


def delegated_name(user: str) -> str:
    """The subtree an admin delegates to a non-root agent's user, in each hierarchy."""
    return f"ipdc-{user}"


@dataclass(frozen=True)
class Placement:
    """Where this process's pools go: a parent directory per controller, and why some
    controllers are missing."""

    parents: dict[str, Path]
    version: int
    missing: dict[str, str]


def _mounts() -> tuple[dict[str, tuple[Path, Path]], Path | None]:
    """v1 controller -> (mount root, mount point), and the v2 mount point."""
    v1: dict[str, tuple[Path, Path]] = {}
    v2: Path | None = None
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return v1, None
    for line in lines:
        fields, _, tail = line.partition(" - ")
        parts, fs = fields.split(), tail.split()
        if len(parts) < 5 or len(fs) < 3:
            continue
        if fs[0] == "cgroup":
            for option in fs[2].split(","):
                if option in CONTROLLERS:
                    v1.setdefault(option, (Path(parts[3]), Path(parts[4])))
        elif fs[0] == "cgroup2" and v2 is None:
            v2 = Path(parts[4])
    return v1, v2


def _own_groups() -> dict[str, str]:
    """This process's group path per v1 controller (from /proc/self/cgroup)."""
    own: dict[str, str] = {}
    try:
        for entry in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = entry.split(":", 2)
            for controller in controllers.split(","):
                own[controller] = path
    except (OSError, ValueError):
        pass
    return own


def _writable(directory: Path) -> bool:
    return os.access(directory, os.W_OK | os.X_OK) and os.access(directory / "cgroup.procs", os.W_OK)


def _user_name() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def placement() -> Placement:
    """Where this process may put its sandboxes' groups, controller by controller."""
    v1, v2 = _mounts()
    root = os.geteuid() == 0
    user = _user_name()
    parents: dict[str, Path] = {}
    missing: dict[str, str] = {}
    own = _own_groups()
    for controller in CONTROLLERS:
        if controller in v1:
            mount_root, mount_point = v1[controller]
            if root:
                path = Path(own.get(controller, "/"))
                inside = path.relative_to(mount_root) if path.is_relative_to(mount_root) else Path()
                parent = mount_point / inside
            else:
                parent = mount_point / delegated_name(user)
            if _writable(parent):
                parents[controller] = parent
            elif root:
                missing[controller] = f"{parent} is not writable"
            else:
                missing[controller] = (f"no {controller} cgroup was delegated to user {user} ({parent} "
                                       "is missing or not writable; as root: "
                                       f"ipdc node delegate-cgroups --user {user})")
        else:
            missing[controller] = f"no {controller} cgroup hierarchy is mounted"
    if not parents and v2 is not None:
        return _v2_placement(v2, root)
    return Placement(parents, 1, missing)


def _v2_placement(v2: Path, root: bool) -> Placement:
    """cgroup v2: the top of the hierarchy (below it, a group holding processes, ours,
    may not hand controllers to child groups). Root agents only."""
    if not root:
        reason = "cgroup v2 delegation to a non-root agent is not supported; run the agent as root"
        return Placement({}, 2, {c: reason for c in CONTROLLERS})
    try:
        available = (v2 / "cgroup.controllers").read_text().split()
    except OSError as exc:
        return Placement({}, 2, {c: f"cannot read {v2}/cgroup.controllers ({exc})" for c in CONTROLLERS})
    parents = {c: v2 for c in CONTROLLERS if c in available}
    missing = {c: f"the cgroup v2 hierarchy at {v2} has no {c} controller"
               for c in CONTROLLERS if c not in available}
    return Placement(parents, 2, missing)


class SandboxCgroup:
    """The group of one sandbox, in every controller the pool has."""

    def __init__(self, dirs: dict[str, Path], version: int) -> None:
        self.dirs = dirs
        self.version = version

    def _unique(self) -> list[Path]:
        return list(dict.fromkeys(self.dirs.values()))

    def procs_files(self) -> list[str]:
        """What a process writes its pid into to join the group."""
        return [str(d / "cgroup.procs") for d in self._unique()]

    def members(self) -> set[int]:
        found: set[int] = set()
        for directory in self._unique():
            try:
                found.update(int(p) for p in (directory / "cgroup.procs").read_text().split())
            except FileNotFoundError:
                pass
        return found

    def _counter(self, controller: str, file: str, name: str) -> int:
        if controller not in self.dirs:
            return 0
        try:
            for line in (self.dirs[controller] / file).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == name:
                    return int(value)
        except (OSError, ValueError):
            pass
        return 0

    def hit_pids_max(self) -> bool:
        """Whether a fork in the group was ever refused because of ``pids.max``."""
        return self._counter("pids", "pids.events", "max") > 0

    def oom_killed(self) -> bool:
        """Whether the kernel killed a process of the group for its memory limit."""
        if self.version == 1:
            return self._counter("memory", "memory.oom_control", "oom_kill") > 0
        return self._counter("memory", "memory.events", "oom_kill") > 0

    def remove(self) -> None:
        """SIGKILL every member until the group is empty, then delete it."""
        kill_file = self._unique()[0] / "cgroup.kill"  # v2 (Linux 5.14+): the kernel kills them all
        if self.version == 2 and kill_file.exists():
            try:
                kill_file.write_text("1")
            except OSError:
                pass
        deadline = time.monotonic() + REMOVE_TIMEOUT
        while True:
            members = self.members()
            for pid in members:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if not members and all(_rmdir(d) for d in self._unique()):
                return
            if time.monotonic() > deadline:
                raise OSError(errno.EBUSY, f"could not empty the cgroup {self._unique()[0]} within "
                                           f"{REMOVE_TIMEOUT:.0f} s (members: {sorted(self.members())})")
            time.sleep(0.002)


class CgroupPool:
    """One agent's pool group in each available controller, holding one group per sandbox."""

    def __init__(self, dirs: dict[str, Path], version: int) -> None:
        self.dirs = dirs
        self.version = version
        self._numbers = itertools.count()

    @classmethod
    def open(cls) -> tuple[CgroupPool | None, dict[str, str]]:
        """A pool in every controller it can have, or None; and why the others are missing."""
        where = placement()
        missing = dict(where.missing)
        if not where.parents:
            return None, missing
        for parent in set(where.parents.values()):
            _remove_stale_pools(parent, where.version)
        name = f"ipdc-{os.getpid()}-{next(_pool_numbers)}"
        dirs: dict[str, Path] = {}
        for controller, parent in where.parents.items():
            pool = parent / name
            try:
                if where.version == 2:
                    _enable(parent, controller)
                pool.mkdir(exist_ok=True)
                if where.version == 2:
                    _enable(pool, controller)
                dirs[controller] = pool
            except OSError as exc:
                missing[controller] = f"cannot make a {controller} cgroup under {parent} ({exc})"
        if not dirs:
            return None, missing
        made = cls(dirs, where.version)
        try:  # a group that cannot hold our limits is no limit at all
            made.new_group("probe", Limits()).remove()
        except OSError as exc:
            made.close()
            return None, {**missing, **{c: f"cannot use the cgroup {d} ({exc})" for c, d in dirs.items()}}
        return made, missing

    def new_group(self, name: str, limits: Limits) -> SandboxCgroup:
        """An empty group for one sandbox, with its limits written."""
        label = f"{name}-{next(self._numbers)}"
        group = SandboxCgroup({c: d / label for c, d in self.dirs.items()}, self.version)
        v = self.version - 1
        try:
            for directory in group._unique():
                directory.mkdir()
            writes = {"pids": [(PIDS_MAX[v], str(limits.max_pids))],
                      "memory": [(MEMORY_MAX[v], str(limits.memory_mb << 20))],
                      "cpu": _cpu_limit(limits.cpu_percent, self.version)}
            for controller, files in writes.items():
                for file, value in files if controller in group.dirs else []:
                    (group.dirs[controller] / file).write_text(value)
        except OSError:
            group.remove()
            raise
        return group

    def close(self) -> None:
        """Remove every sandbox's group, then the pool's own."""
        for pool in set(self.dirs.values()):
            _remove_tree(pool, self.version)


def _cpu_limit(percent: int, version: int) -> list[tuple[str, str]]:
    if version == 1:
        quota = str(percent * CPU_PERIOD_US // 100) if percent else "-1"
        return [("cpu.cfs_period_us", str(CPU_PERIOD_US)), ("cpu.cfs_quota_us", quota)]
    return [("cpu.max", f"{percent * CPU_PERIOD_US // 100 if percent else 'max'} {CPU_PERIOD_US}")]


def _enable(directory: Path, controller: str) -> None:
    """cgroup v2: let the groups below ``directory`` use ``controller``."""
    control = directory / "cgroup.subtree_control"
    if controller not in control.read_text().split():
        control.write_text(f"+{controller}")


def _rmdir(path: Path) -> bool:
    """Remove an empty group; False while it is still busy."""
    try:
        path.rmdir()
    except FileNotFoundError:
        return True
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            return False
        raise
    return True


def _remove_tree(directory: Path, version: int) -> None:
    """Empty and remove a group and every group below it, deepest first."""
    children: Iterable[Path] = [p for p in directory.iterdir() if p.is_dir()] if directory.is_dir() else []
    for child in children:
        _remove_tree(child, version)
    SandboxCgroup({"any": directory}, version).remove()


def _remove_stale_pools(parent: Path, version: int) -> None:
    """Empty and delete the pools of agents that died without closing theirs."""
    try:
        stale = [p for p in parent.iterdir()
                 if (m := POOL_GROUP.fullmatch(p.name)) and not pid_alive(int(m[1]))]
    except OSError:
        return
    for pool in stale:
        try:
            _remove_tree(pool, version)
        except OSError:
            pass  # another agent's, or busy: the next start tries again


def delegate(user: str, max_pids: int = 0, memory_mb: int = 0, cpu_percent: int = 0) -> list[Path]:
    """As root: give ``user`` a subtree in the pids, memory and cpu hierarchies (cgroup v1).

    The user may create groups below it, set their limits and move its own processes
    into them. The subtree's own limit files stay root's: optional caps on everything
    the user's agents run (0 = no cap). Lasts until reboot; idempotent.
    """
    pwd.getpwnam(user)  # KeyError for an unknown user, before anything is made
    v1, _ = _mounts()
    made = []
    for controller in CONTROLLERS:
        if controller not in v1:
            raise OSError(errno.ENOENT, f"no cgroup v1 {controller} hierarchy is mounted at {CGROUP_MOUNT}")
        subtree = v1[controller][1] / delegated_name(user)
        subtree.mkdir(exist_ok=True)
        for path in (subtree, subtree / "cgroup.procs", subtree / "tasks"):
            os.chown(path, pwd.getpwnam(user).pw_uid, -1)
        made.append(subtree)
    caps = {"pids": [("pids.max", str(max_pids) if max_pids else "max")],
            "memory": [("memory.limit_in_bytes", str(memory_mb << 20) if memory_mb else "-1")],
            "cpu": _cpu_limit(cpu_percent, 1)}
    for controller, files in caps.items():
        for file, value in files:
            (v1[controller][1] / delegated_name(user) / file).write_text(value)
    return made


def undelegate(user: str) -> list[Path]:
    """As root: remove what :func:`delegate` made (and any group left below it)."""
    v1, _ = _mounts()
    removed = []
    for controller in CONTROLLERS:
        if controller in v1:
            subtree = v1[controller][1] / delegated_name(user)
            if subtree.is_dir():
                _remove_tree(subtree, 1)
                removed.append(subtree)
    return removed
