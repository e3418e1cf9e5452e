"""Who may run code on this node: Ed25519 submitter keys, signatures and replay checks.

The broker ACL says which node may publish where, but any member may publish to
another peer's task topics. So an agent runs a job only when its manifest is
signed by a key in the node's trusted-submitters list, and every later message of
the job (DoMap, Buffer, CleanUp, Tf) is signed by that same key. A manifest is
fresh for ``agent.manifest_ttl`` seconds, and its nonce is accepted once: a
captured Download cannot be replayed later, not even after the agent restarts,
because the seen nonces are kept on disk.

Keys are written ``ed25519:<base64url of the 32 raw bytes>``, short enough to
paste into ``ipdc trust add``. The signing is PyNaCl's (libsodium): it costs an agent
about 1 MB, where ``cryptography`` costs 8, and every volunteer's agent pays it.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

from nacl.exceptions import BadSignatureError, CryptoError
from nacl.signing import SigningKey, VerifyKey

from ipdc.errors import TrustError
from ipdc.private import private_dir

log = logging.getLogger(__name__)

KEY_PREFIX = "ed25519:"
SEED_PREFIX = "ed25519-seed:"
D = TypeVar("D", bound="DataclassInstance")


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def parse_public_key(key: str) -> VerifyKey:
    """The key behind ``ed25519:...``; TrustError says what is wrong with a bad one."""
    if not key.startswith(KEY_PREFIX):
        raise TrustError(f"{key[:24]!r}... is not an IPDC submitter key (it should start with "
                         f"{KEY_PREFIX!r}); print a node's key with `ipdc trust key` on that node")
    try:
        raw = _unb64(key[len(KEY_PREFIX):])
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        raise TrustError(f"{key[:24]!r}... is damaged: an Ed25519 key is 32 bytes")
    return VerifyKey(raw)


def canonical(message: Any, channel: str, to: str) -> bytes:
    """The bytes a signature covers: the channel, the recipient, and the message's fields
    except ``sig``, as sorted JSON. Binding the channel and recipient means a message
    signed for one node is worthless on another node's inbox, or on another channel."""
    data = dataclasses.asdict(message)
    data.pop("sig", None)
    return json.dumps({"channel": channel, "to": to, "message": data}, sort_keys=True,
                      separators=(",", ":"), ensure_ascii=True).encode()


def digest(message: Any) -> str:
    """A short name for one signed message, which a reply echoes (``GetResult.re``): a
    submitter then acts only on replies to requests it really sent."""
    return hashlib.sha256(str(message.sig).encode()).hexdigest()[:32]


def signer_of(message: Any) -> str:
    """The key a signed message claims: its ``submitter``, or its manifest's."""
    submitter = getattr(message, "submitter", None)
    if submitter is None:
        submitter = message.manifest.submitter
    return str(submitter)


class Signer:
    """This node's submitter key: it signs the jobs this node submits."""

    def __init__(self, private: SigningKey) -> None:
        self._private = private
        self.public_key = KEY_PREFIX + _b64(private.verify_key.encode())

    @classmethod
    def generate(cls) -> Signer:
        return cls(SigningKey.generate())

    @classmethod
    def load_or_create(cls, path: Path) -> Signer:
        """Read the key at ``path`` (``ed25519-seed:<base64url>``); make one, mode 0600, if
        there is none yet."""
        if path.exists():
            text = path.read_text().strip()
            try:
                seed = _unb64(text[len(SEED_PREFIX):]) if text.startswith(SEED_PREFIX) else b""
            except (binascii.Error, ValueError):
                seed = b""
            if len(seed) != 32:
                raise TrustError(f"{path} is not an IPDC submitter key; move it away and run "
                                 "`ipdc node init` again to make a new one")
            return cls(SigningKey(seed))
        signer = cls.generate()
        private_dir(path.parent)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(SEED_PREFIX + _b64(signer._private.encode()) + "\n")
        return signer

    def sign(self, message: D, channel: str, to: str) -> D:
        """A copy of ``message`` for ``to`` on ``channel``, carrying this key as submitter
        (where it has the field) and a signature."""
        if any(f.name == "submitter" for f in dataclasses.fields(message)):
            message = dataclasses.replace(message, submitter=self.public_key)
        unsigned = dataclasses.replace(message, sig="")
        signature = self._private.sign(canonical(unsigned, channel, to)).signature
        return dataclasses.replace(unsigned, sig=_b64(signature))


def verify(message: Any, channel: str, to: str) -> bool:
    """True when ``message.sig`` is a valid signature, by the key it claims, of this message
    for ``to`` on ``channel``."""
    try:
        key = parse_public_key(signer_of(message))
        key.verify(canonical(message, channel, to), _unb64(message.sig))
    except (TrustError, BadSignatureError, CryptoError, binascii.Error, ValueError, TypeError):
        return False
    return True


class TrustStore:
    """The trusted-submitters list: one key per line, then an optional note.

    The file is re-read when it changes, so ``ipdc trust add`` takes effect on a
    running agent at its next job.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._keys: dict[str, str] = {}
        self._mtime: float | None = None
        self._lock = threading.Lock()

    def keys(self) -> dict[str, str]:
        """Key -> note."""
        with self._lock:
            try:
                mtime = self.path.stat().st_mtime
            except FileNotFoundError:
                return {}
            if mtime != self._mtime:
                self._keys, self._mtime = self._read(), mtime
            return dict(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self.keys()

    def _read(self) -> dict[str, str]:
        keys: dict[str, str] = {}
        for number, line in enumerate(self.path.read_text().splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            key, _, note = line.partition(" ")
            try:
                parse_public_key(key)
            except TrustError as exc:
                log.warning("%s line %d ignored: %s", self.path, number, exc)
                continue
            keys[key] = note.strip()
        return keys

    def add(self, key: str, note: str = "") -> bool:
        """Trust ``key``; False when it was trusted already."""
        parse_public_key(key)
        if key in self:
            return False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(f"{key} {note}".rstrip() + "\n")
        self.path.chmod(0o600)
        return True

    def remove(self, key: str) -> bool:
        """Stop trusting ``key``; False when it was not trusted."""
        if key not in self:
            return False
        lines = [line for line in self.path.read_text().splitlines() if line.split(" ", 1)[0] != key]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(f"{line}\n" for line in lines))
        tmp.chmod(0o600)
        tmp.replace(self.path)
        return True


class NonceLog:
    """Nonces of accepted manifests, kept on disk for as long as a manifest stays fresh."""

    def __init__(self, path: Path, ttl: float) -> None:
        self.path = path
        self.ttl = ttl
        self._seen: dict[str, float] = {}
        self._lock = threading.Lock()
        if path.exists():
            for line in path.read_text().splitlines():
                nonce, _, ts = line.partition(" ")
                try:
                    self._seen[nonce] = float(ts)
                except ValueError:
                    continue
        self._prune(time.time())

    def check(self, nonce: str, submitted_at: float, now: float | None = None) -> str:
        """Accept a manifest's nonce once. Returns "" or the reason it is refused."""
        now = time.time() if now is None else now
        if submitted_at < now - self.ttl:
            return (f"stale: submitted {now - submitted_at:.0f} s ago, more than agent.manifest_ttl "
                    f"({self.ttl:.0f} s)")
        if submitted_at > now + self.ttl:
            return f"submitted {submitted_at - now:.0f} s in the future (check the submitter's clock)"
        with self._lock:
            if nonce in self._seen:
                return "replayed: its nonce was seen before"
            self._seen[nonce] = submitted_at
            with open(self.path, "a") as f:
                f.write(f"{nonce} {submitted_at}\n")
            if len(self._seen) % 256 == 0:
                self._prune(now)
        return ""

    def _prune(self, now: float) -> None:
        self._seen = {n: ts for n, ts in self._seen.items() if ts >= now - self.ttl}
        tmp = self.path.with_suffix(".tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text("".join(f"{n} {ts}\n" for n, ts in self._seen.items()))
        tmp.replace(self.path)
