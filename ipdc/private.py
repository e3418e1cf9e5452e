"""Files only this node's user may read: private keys, the swarm key, invite tokens.

A secret is never written into a file that another user could open, not even for an
instant: the file is created with ``O_EXCL`` (so a file or symlink planted at that name
is never reused or followed) and mode 0600 from the start, instead of being created
with the umask's mode and tightened afterwards. A secret that replaces an older one is
written to such a fresh file first and then renamed over the old one, so a reader
never sees half a key.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

PRIVATE_FILE = 0o600
PRIVATE_DIR = 0o700


def _create(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, PRIVATE_FILE)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def write_private(path: Path, data: bytes | str, *, replace: bool = False) -> None:
    """Write ``data`` to ``path`` readable by its owner only (0600).

    Without ``replace`` the file must not exist yet (FileExistsError): a key is made
    once. With ``replace`` an existing file is swapped atomically.
    """
    raw = data.encode() if isinstance(data, str) else data
    if not replace:
        _create(path, raw)
        return
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        _create(tmp, raw)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def private_dir(path: Path) -> Path:
    """Create ``path`` if needed, and make it 0700: a node's home and its key directory are
    the owner's alone, whatever the umask. Parents it makes are 0700 too (``keys/`` made
    before the home, by ``ipdc trust key`` before ``init``, made the home with the umask's
    0755); parents that exist are left as they are."""
    missing = []
    for parent in (path, *path.parents):
        if parent.exists():
            break
        missing.append(parent)
    for directory in reversed(missing):
        directory.mkdir(mode=PRIVATE_DIR, exist_ok=True)
    path.chmod(PRIVATE_DIR)
    return path
