"""The Python a sandbox runs: the agent's own, or a copy every uid can read.

A sandbox binds the interpreter and the environment's site-packages read-only at
their own paths, so user code imports what the node installed (numpy, tensorflow).
bubblewrap runs under the sandbox's uid and must be able to reach them, and a root
agent's sandboxes run under uids of their own: a Python under ``/root`` (pyenv, 0700)
is out of their reach. For that case :func:`prepare_copy` makes a readable copy,
``/opt/ipdc-python<X.Y>-<environment hash>``: the interpreter's prefix with its site-packages, and the
site-packages of a virtualenv merged in. Files are hard links where the copy is on
the same filesystem (seconds, no space), else copies. ``python deploy.py install``
makes it, and a root agent that finds it missing or out of date makes it at start.
On a stock Debian ``/usr/bin/python3`` nothing is copied.

Site-packages are put on ``sys.path`` directly (the sandbox's Python runs with
``-I -S``): their ``.pth`` files, code the environment runs at every start, do not run.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import site
import stat
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

#: Where a root agent's readable copy of its Python goes.
COPY_ROOT = Path("/opt")
MARKER = ".ipdc-copy.json"
#: How a copy is laid out: a copy made by an older rule is made again.
#: 2: a venv's package replaces the base's of the same name whole.
LAYOUT = 2


@dataclass(frozen=True)
class Interpreter:
    """A Python as a sandbox sees it: every path is the same inside and out."""

    executable: str
    binds: tuple[str, ...]
    """Directories bound read-only at their own path."""
    site: tuple[str, ...]
    """site-packages directories, appended to ``sys.path`` inside."""
    library_path: str = ""
    """``LD_LIBRARY_PATH`` inside, for an interpreter that finds libpython by an absolute
    RUNPATH its copy does not have ("" when none is needed)."""

    def environ(self) -> dict[str, str]:
        return {"LD_LIBRARY_PATH": self.library_path} if self.library_path else {}


def _site_dirs() -> list[Path]:
    return [Path(p) for p in dict.fromkeys(site.getsitepackages()) if Path(p).is_dir()]


def _library_path(prefix: Path) -> str:
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    return str(prefix / "lib") if list((prefix / "lib").glob(f"libpython{version}*.so*")) else ""


def _outermost(paths: list[Path]) -> tuple[str, ...]:
    """The paths not inside another one of them, nor inside /usr (bound anyway)."""
    kept: list[Path] = []
    for path in sorted(set(paths), key=lambda p: len(p.parts)):
        if path.is_relative_to("/usr") or any(path.is_relative_to(k) for k in kept):
            continue
        kept.append(path)
    return tuple(str(p) for p in kept)


def current() -> Interpreter:
    """The Python running this process, as it is."""
    base, prefix = Path(sys.base_prefix).resolve(), Path(sys.prefix).resolve()
    sites = _site_dirs()
    return Interpreter(executable=sys.executable, binds=_outermost([base, prefix, *sites]),
                       site=tuple(map(str, sites)), library_path=_library_path(base))


def world_readable(path: Path) -> bool:
    """Whether any uid can reach ``path`` (every directory on the way searchable by
    others) and read it."""
    try:
        st = path.stat()
        if not st.st_mode & stat.S_IROTH or (stat.S_ISDIR(st.st_mode) and not st.st_mode & stat.S_IXOTH):
            return False
        return all(parent.stat().st_mode & stat.S_IXOTH for parent in path.resolve().parents)
    except OSError:
        return False


def readable_by_others(interpreter: Interpreter) -> bool:
    return all(world_readable(Path(p)) for p in (interpreter.executable, *interpreter.binds))


def copy_path() -> Path:
    """One copy per environment (its interpreter and site-packages directories) and layout: two
    venvs on one machine, say a node's and a wheel's, or two IPDC versions that lay copies out
    differently, would otherwise replace each other's copy at every agent start."""
    where = json.dumps([str(Path(sys.base_prefix).resolve()), [str(s) for s in _site_dirs()], LAYOUT])
    tag = hashlib.sha256(where.encode()).hexdigest()[:8]
    return COPY_ROOT / f"ipdc-python{sys.version_info.major}.{sys.version_info.minor}-{tag}"


def _fingerprint() -> dict[str, object]:
    """What the copy was made from; a changed install (pip adds or removes a package, so a
    site-packages directory's mtime changes) makes it out of date."""
    sites = _site_dirs()
    return {"layout": LAYOUT, "base": str(Path(sys.base_prefix).resolve()), "version": sys.version,
            "site": {str(s): s.stat().st_mtime_ns for s in sites}}


def for_sandbox(separate_uid: bool, prune: bool = False) -> Interpreter:
    """The interpreter sandboxes run: this one, unless their uid cannot read it (then the
    copy, made first when missing or out of date: root only)."""
    here = current()
    if not separate_uid or readable_by_others(here):
        return here
    return copied(prepare_copy(prune))


def copied(root: Path) -> Interpreter:
    """The copy at ``root`` as an Interpreter."""
    base = Path(sys.base_prefix).resolve()
    executable = root / Path(sys.executable).resolve().relative_to(base)
    site_dir = root / _purelib(base).relative_to(base)
    return Interpreter(executable=str(executable), binds=(str(root),), site=(str(site_dir),),
                       library_path=_library_path(root))


def _purelib(base: Path) -> Path:
    """The site-packages directory of the Python installed at ``base``."""
    return Path(sysconfig.get_path("purelib", vars={"base": str(base)}))


def prepare_copy(prune: bool = False) -> Path:
    """Make (or refresh) the readable copy of this Python; return its root. Root only.

    A copy it replaces is renamed aside, not deleted: running sandboxes may have it
    mounted, and a file removed from it would vanish from under them. ``prune`` (for
    ``deploy.py install``, run while the node is stopped) deletes copies set aside before.
    """
    root = copy_path()
    wanted = _fingerprint()
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # agents starting side by side make it once
        try:
            if json.loads((root / MARKER).read_text()) == wanted:
                return root
        except (OSError, ValueError):
            pass
        log.info("making %s, a copy of %s its sandboxes can read (once; `python deploy.py install` makes "
                 "it ahead)", root, sys.base_prefix)
        building = root.with_name(f".{root.name}.new-{os.getpid()}")
        shutil.rmtree(building, ignore_errors=True)
        base = Path(sys.base_prefix).resolve()
        shutil.copytree(base, building, symlinks=True, copy_function=_link_or_copy)
        _merge_sites(base, building / _purelib(base).relative_to(base))
        building.chmod(0o755)
        (building / MARKER).write_text(json.dumps(wanted))
        if root.exists():
            root.rename(root.with_name(f".{root.name}.old-{time.time_ns()}"))
        building.rename(root)
    if prune:
        for old in root.parent.glob(f".{root.name}.old-*"):
            shutil.rmtree(old, ignore_errors=True)
    return root


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _merge_sites(base: Path, inner_site: Path) -> None:
    """Merge a virtualenv's packages into the copy's site-packages, as the venv sees them:
    a package the venv has replaces the base interpreter's of the same name whole (the venv's
    cloudpickle 3, say, not the base's cloudpickle 2 with a few files swapped), and among
    several venv site directories the first one wins. Only the copy's links are removed;
    the base install is never written to."""
    merged: set[str] = set()
    for directory in _site_dirs():
        if directory.is_relative_to(base):
            continue
        for entry in sorted(directory.iterdir()):
            if entry.name in merged:
                continue
            merged.add(entry.name)
            target = inner_site / entry.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif os.path.lexists(target):
                target.unlink()
            if entry.is_symlink():
                os.symlink(os.readlink(entry), target)
            elif entry.is_dir():
                shutil.copytree(entry, target, symlinks=True, copy_function=_link_or_copy)
            else:
                _link_or_copy(str(entry), str(target))


def readable_package(package: Path) -> Path:
    """A directory every uid can import ``package`` from: its own parent when others can
    read it, else a copy under :data:`COPY_ROOT` (root only).

    An agent that runs as a dedicated user imports IPDC like any other program; an editable
    install's source tree under a private directory (a home, a ``mktemp -d``) is out of that
    user's reach, and its agent died at its first import. The copy is named by a hash of the
    package's files, so a changed tree gets a new copy and a running agent keeps its own.
    """
    files = _package_files(package)
    if all(world_readable(f) for f in files):
        return package.parent
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes() + b"\0")
    root = COPY_ROOT / f"ipdc-package-{digest.hexdigest()[:12]}"
    if (root / package.name / "__init__.py").exists():
        return root
    building = root.with_name(f".{root.name}.new-{os.getpid()}")
    shutil.rmtree(building, ignore_errors=True)
    for path in files:
        target = building / package.name / path.relative_to(package)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
        target.chmod(0o644)
    for directory in [building, *building.rglob("*")]:
        if directory.is_dir():
            directory.chmod(0o755)
    try:
        building.rename(root)
    except OSError:  # another agent of this machine made the same copy a moment ago
        shutil.rmtree(building, ignore_errors=True)
    return root


def _package_files(package: Path) -> list[Path]:
    """The package's files, without compiled caches (each importer writes its own)."""
    return sorted(p for p in package.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
