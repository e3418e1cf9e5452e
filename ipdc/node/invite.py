"""Invite tokens: everything a new node needs to join a swarm, in one string.

The token carries secrets (the swarm key and a broker password), so treat it like
a password: whoever holds it can join. It is ``ipdc1-`` followed by base64url
JSON, so it survives copy and paste through a terminal or a chat.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import asdict, dataclass, field

from ipdc.errors import IPDCError, TokenError, TrustError
from ipdc.trust import parse_public_key
from ipdc.wire.ids import NodeName
from ipdc.wire.schema import build

PREFIX = "ipdc1-"


@dataclass(frozen=True)
class Invite:
    swarm_key: str
    """64 hex characters: the kubo private-network pre-shared key."""
    broker_host: str
    broker_port: int
    username: NodeName
    """The new node's own MQTT user, minted for it by the broker host."""
    password: str
    bootstrap: list[str]
    """kubo multiaddrs (``/ip4/.../tcp/.../p2p/<id>``) of existing members."""
    trusted: list[str] = field(default_factory=list)
    """Submitter keys the new node will trust: the inviting node's own, and the keys it trusts."""

    def encode(self) -> str:
        raw = json.dumps(asdict(self), separators=(",", ":")).encode()
        return PREFIX + base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def decode(cls, token: str) -> "Invite":
        token = token.strip()
        if not token.startswith(PREFIX):
            raise TokenError(f"not an IPDC invite token (it should start with {PREFIX!r}); "
                             "get one with `ipdc invite` on the node that hosts the broker")
        body = token[len(PREFIX):]
        try:
            data = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        except (binascii.Error, ValueError):
            raise TokenError("the invite token is damaged (truncated or mistyped?)") from None
        try:
            invite = build(cls, data, "token", TokenError)
        except IPDCError as exc:
            raise TokenError(f"the invite token is invalid: {exc}") from None
        if len(invite.swarm_key) != 64 or any(c not in "0123456789abcdef" for c in invite.swarm_key):
            raise TokenError("the invite token's swarm key is not 64 hex characters")
        for key in invite.trusted:
            try:
                parse_public_key(key)
            except TrustError as exc:
                raise TokenError(f"the invite token carries a bad submitter key: {exc}") from None
        return invite
