"""Membership messages: joining the swarm, leaving it, and a new swarm key.

Who may publish each is fixed by the broker (the ACL and its auth plugin), and each
message that grants or withdraws anything is also signed by the founder's submitter
key, which every node learns from its invite and keeps (``keys/founder.pub``):

    ipdc/enroll/<enroll-id>/request   EnrollRequest  the joining node (its one-shot
                                                    enrollment identity) to the founder
    ipdc/enroll/<enroll-id>/reply     EnrollReply    founder -> that identity only: name,
                                                    certificate, swarm key (signed)
    ipdc/removed/<node>               Removal        retained, founder -> everyone: stop
                                                    trusting the node's key (signed)
    ipdc/swarmkey/<node>              SwarmKey       retained, founder -> that node only:
                                                    the new kubo swarm key (signed)

Signatures bind the channel and the recipient (:func:`ipdc.trust.canonical`): an
enrollment reply is for one enrollment identity, a swarm key for one node, and a
removal for the whole swarm (recipient :data:`EVERYONE`).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

from ipdc.errors import MessageError
from ipdc.wire.channel import Channel
from ipdc.wire.ids import NodeName
from ipdc.wire.schema import in_range

#: Common names of enrollment identities start with this; the broker's plugin gives them
#: their own ACL (their request and reply topics only) and accepts each one once.
ENROLL_PREFIX = "enroll-"
ENROLL_ID = re.compile(ENROLL_PREFIX + r"[0-9a-f]{8}")
#: The recipient of messages for every node.
EVERYONE = "*"
SWARM_KEY = re.compile(r"[0-9a-f]{64}")
MAX_PEM = 8192


def check_swarm_key(key: str) -> str:
    if not SWARM_KEY.fullmatch(key):
        raise MessageError("a swarm key is 64 lowercase hex digits")
    return key


def swarm_key_fingerprint(key: str) -> str:
    """A short name of a swarm key that reveals nothing of it: nodes announce the one they
    run with, so ``ipdc swarm rotate-key`` sees who has switched."""
    return hashlib.sha256(f"ipdc swarm key {key}".encode()).hexdigest()[:16]


@dataclass(frozen=True)
class EnrollRequest:
    csr: str
    """PEM certificate signing request for the key the node made for itself."""
    submitter: str
    """The node's Ed25519 submitter key, for the founder's member list."""
    host: str
    """The address the node will advertise (recorded by the founder)."""

    def __post_init__(self) -> None:
        in_range("enroll.csr", len(self.csr), 1, MAX_PEM, MessageError)
        in_range("enroll.host", len(self.host), 1, 255, MessageError)


@dataclass(frozen=True)
class EnrollReply:
    name: str = ""
    """The node name the founder gave the new node ("" when it refused)."""
    cert: str = ""
    """PEM certificate for the node's key, CN = name, signed by the swarm's CA."""
    swarm_key: str = ""
    bootstrap: list[str] = field(default_factory=list)
    """kubo multiaddrs of members to dial."""
    trusted: list[str] = field(default_factory=list)
    """Submitter keys the new node will trust: the founder's and those it trusts."""
    error: str = ""
    """Why the founder refused, when it did."""
    submitter: str = ""
    sig: str = ""

    def __post_init__(self) -> None:
        if self.name:
            NodeName(self.name)
            check_swarm_key(self.swarm_key)
        in_range("enroll.cert", len(self.cert), 0, MAX_PEM, MessageError)
        in_range("enroll.bootstrap", len(self.bootstrap), 0, 64, MessageError)
        in_range("enroll.trusted", len(self.trusted), 0, 4096, MessageError)


@dataclass(frozen=True)
class Removal:
    name: NodeName
    """The node that is no longer a member."""
    key: str
    """Its submitter key: every node stops running jobs signed by it."""
    serial: str
    """The serial number (hex) of its revoked certificate."""
    ts: float
    submitter: str = ""
    """The founder's key, which signs the removal."""
    sig: str = ""


@dataclass(frozen=True)
class SwarmKey:
    key: str
    """64 hex digits: the new kubo private-network key."""
    ts: float
    submitter: str = ""
    sig: str = ""

    def __post_init__(self) -> None:
        check_swarm_key(self.key)


ENROLL_REQUEST: Channel[EnrollRequest] = Channel("enroll", EnrollRequest, "ipdc/enroll/{node}/request")
ENROLL_REPLY: Channel[EnrollReply] = Channel("enroll", EnrollReply, "ipdc/enroll/{node}/reply")
REMOVAL: Channel[Removal] = Channel("removed", Removal, "ipdc/removed/{node}", retain=True)
SWARMKEY: Channel[SwarmKey] = Channel("swarmkey", SwarmKey, "ipdc/swarmkey/{node}", retain=True)
