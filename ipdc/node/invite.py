"""Invite tokens: what a new node needs to ask the founder to let it in, in one string.

A token admits one node, once, until it expires (``ipdc invite --ttl``, default 24 h).
It carries no long-term secret of the swarm: not the swarm key, not the CA key, not
another node's key. It holds

* the swarm CA's certificate, which the new node pins: it will talk only to a broker
  whose certificate that CA signed, for the address in the token;
* a short-lived enrollment identity: a certificate (CN ``enroll-<8 hex>``, valid
  until the token expires) and its key. The broker lets it publish one enrollment
  request and read the answer, and accepts it for one connection only;
* the broker's address, and the founder's submitter key, which signs the answer,
  every removal and every new swarm key.

The joining node makes its own key and sends a CSR; the founder's agent answers with
the node's name, certificate, the swarm key and whom to trust (:mod:`ipdc.node.membership`).
Until it is used or expires the token is still a credential: keep it out of argv
(``--join-file`` or ``--join -``) and out of world-readable files (``-o FILE`` is 0600).
It is ``ipdc2-`` followed by base64url JSON, so it survives copy and paste.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
from dataclasses import asdict, dataclass

from ipdc.errors import IPDCError, TokenError, TrustError
from ipdc.trust import parse_public_key
from ipdc.wire.membership import ENROLL_ID
from ipdc.wire.schema import build

PREFIX = "ipdc2-"
#: Tokens of the password era started with this.
OLD_PREFIX = "ipdc1-"
ASK_AGAIN = "ask for a new one with `ipdc invite` on the node that hosts the broker"


@dataclass(frozen=True)
class Invite:
    broker_host: str
    broker_port: int
    ca: str
    """PEM certificate of the swarm's CA: pinned by the new node."""
    identity: str
    """The enrollment identity: the CN of ``cert``, ``enroll-<8 hex>``."""
    cert: str
    """PEM enrollment certificate, valid until the token expires."""
    key: str
    """PEM key of the enrollment certificate (one use, short-lived)."""
    founder: str
    """The founder's Ed25519 submitter key."""

    def encode(self) -> str:
        raw = json.dumps(asdict(self), separators=(",", ":")).encode()
        return PREFIX + base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def decode(cls, token: str) -> Invite:
        token = token.strip()
        if token.startswith(OLD_PREFIX):
            raise TokenError("this token comes from an older IPDC that joined nodes with a broker password; "
                             f"{ASK_AGAIN}")
        if not token.startswith(PREFIX):
            raise TokenError(f"not an IPDC invite token (it should start with {PREFIX!r}); get one with "
                             "`ipdc invite` on the node that hosts the broker")
        body = token[len(PREFIX):]
        try:
            data = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        except (binascii.Error, ValueError):
            raise TokenError("the invite token is damaged (truncated or mistyped?)") from None
        try:
            invite = build(cls, data, "token", TokenError)
        except IPDCError as exc:
            raise TokenError(f"the invite token is invalid: {exc}") from None
        if not ENROLL_ID.fullmatch(invite.identity):
            raise TokenError(f"the invite token's identity {invite.identity[:40]!r} is not an enrollment "
                             "identity")
        try:
            parse_public_key(invite.founder)
        except TrustError as exc:
            raise TokenError(f"the invite token carries a bad founder key: {exc}") from None
        return invite

    def expires(self) -> dt.datetime:
        """When the token stops working: its enrollment certificate's notAfter."""
        from ipdc import pki  # cryptography: node tooling only

        try:
            return pki.load_cert(self.cert).not_valid_after_utc
        except TrustError as exc:
            raise TokenError(f"the invite token's certificate is damaged: {exc}") from None

    def check_fresh(self) -> None:
        """Fail before dialling the broker, which would refuse an expired certificate in TLS
        with an alert that clients often do not see (TLS 1.3)."""
        expires = self.expires()
        now = dt.datetime.now(dt.timezone.utc)
        if expires <= now:
            ago = (now - expires).total_seconds()
            raise TokenError(f"this invite expired at {expires:%Y-%m-%d %H:%M:%S} UTC ({_ago(ago)} ago); "
                             f"{ASK_AGAIN} (`--ttl` sets how long a token lasts; default 24h)")


def _ago(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"
