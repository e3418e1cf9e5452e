"""The founder's record of the swarm's members: who joined with which keys, and who left.

It lives on the founding node only, in ``broker/members.json`` (0600). The founder's
agent adds a member when it answers an enrollment; ``ipdc node remove`` marks one
removed; ``ipdc swarm rotate-key`` sends the new swarm key to every member not removed.
The agent and a command may change it at the same moment, so every change holds an
exclusive ``flock`` on a lock file beside it and replaces the file atomically.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ipdc.errors import NodeError
from ipdc.private import write_private
from ipdc.wire.schema import build


@dataclass(frozen=True)
class Member:
    name: str
    submitter: str
    """Its Ed25519 submitter key: every node drops it from its trust when it is removed."""
    serial: str
    """The serial number (hex) of its broker certificate."""
    host: str
    joined: float
    enroll: str = ""
    """The enrollment identity it joined with ("" for the founder)."""
    cert: str = ""
    """Its certificate (PEM): sent again if its enrollment request is repeated (QoS 1)."""
    removed: float = 0.0
    """When ``ipdc node remove`` removed it (0: a member)."""


@dataclass(frozen=True)
class _File:
    members: list[Member] = dataclasses.field(default_factory=list)


class Roster:
    """The member list in ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock_path = path.with_name(path.name + ".lock")

    def members(self) -> list[Member]:
        with self._locked() as members:
            return list(members.values())

    def get(self, name: str) -> Member | None:
        with self._locked() as members:
            return members.get(name)

    def by_enroll(self, enroll: str) -> Member | None:
        """The member that joined with enrollment identity ``enroll``, if any."""
        return next((m for m in self.members() if m.enroll == enroll), None)

    def add(self, member: Member) -> None:
        with self._locked(write=True) as members:
            if member.name in members:
                raise NodeError(f"{self.path}: member {member.name} exists already")
            members[member.name] = member

    def mark_removed(self, name: str, when: float) -> Member:
        """Mark ``name`` removed (kept, so its certificate serial and key stay on record)."""
        with self._locked(write=True) as members:
            member = members.get(name)
            if member is None:
                known = ", ".join(sorted(n for n, m in members.items() if not m.removed)) or "none"
                raise NodeError(f"{name} is not a member of this swarm (members: {known})")
            if not member.removed:
                members[name] = dataclasses.replace(member, removed=when)
            return members[name]

    @contextmanager
    def _locked(self, write: bool = False) -> Iterator[dict[str, Member]]:
        self._lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self._lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            members = {m.name: m for m in self._read()}
            yield members
            if write:
                data = {"members": [dataclasses.asdict(m) for m in members.values()]}
                write_private(self.path, json.dumps(data, indent=1) + "\n", replace=True)

    def _read(self) -> list[Member]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            raise NodeError(f"cannot read the member list {self.path}: {exc}") from None
        return build(_File, data, str(self.path), NodeError).members
