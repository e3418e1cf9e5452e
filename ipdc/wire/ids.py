"""Identifiers as they travel on MQTT: CIDs, job ids and node names.

Each is untrusted input from a message. It ends up in kubo RPC URLs, MQTT topics,
file system paths and log lines, so it is checked against a strict pattern before
anything uses it: no path separator, no ``..``, no wildcard, no control character.
"""

from __future__ import annotations

import re
import secrets
import uuid
from typing import ClassVar

from ipdc.errors import MessageError


class _Checked(str):
    """A str that only holds values matching ``pattern``."""

    __slots__ = ()
    pattern: ClassVar[re.Pattern[str]]
    what: ClassVar[str]

    def __new__(cls, value: object) -> _Checked:
        if type(value) is cls:
            return value
        if not isinstance(value, str) or not cls.pattern.fullmatch(value):
            raise MessageError(f"not a {cls.what}: {str(value)[:80]!r}")
        return super().__new__(cls, value)


class Cid(_Checked):
    """A CID in one of the text forms kubo writes: v0 base58btc, or v1 base32."""

    __slots__ = ()
    pattern = re.compile(r"Qm[1-9A-HJ-NP-Za-km-z]{44}|b[a-z2-7]{20,120}")
    what = "CID"


class JobId(_Checked):
    """A job id: 32 hex digits of a uuid4. It names the job's work directory."""

    __slots__ = ()
    pattern = re.compile(r"[0-9a-f]{32}")
    what = "job id"

    @classmethod
    def new(cls) -> JobId:
        return cls(uuid.uuid4().hex)


class NodeName(_Checked):
    """A node's MQTT user name, which is also the key of its topics."""

    __slots__ = ()
    pattern = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
    what = "node name"

    @classmethod
    def new(cls) -> NodeName:
        """A fresh name, ``n-`` and 8 random hex digits: the founder names each new member."""
        return cls(f"n-{secrets.token_hex(4)}")
