"""Membership, on the tooling side: found a swarm, invite, join, remove a node, rotate the
swarm key. (The founder's agent answers enrollments: :mod:`ipdc.agent.membership`.)

The founding node is the swarm's certificate authority and hosts the broker, so
``invite``, ``node remove`` and ``swarm rotate-key`` run there. What each step sends
over MQTT is signed with the founder's submitter key, which every node learns from its
invite, and only the founder's broker identity may publish it (the ACL).
"""

from __future__ import annotations

import datetime as dt
import logging
import queue
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from ipdc.bus import Bus, client_id
from ipdc.config import CA_FILE, CERT_FILE, KEY_FILE, BrokerSection
from ipdc.errors import BusError, IdentityRefused, MessageError, NodeError, TokenError, TrustError
from ipdc.home import NodeHome
from ipdc.node.broker import Broker
from ipdc.node.invite import ASK_AGAIN, Invite
from ipdc.private import private_dir, write_private
from ipdc.roster import Member, Roster
from ipdc.spawn import Service
from ipdc.trust import verify
from ipdc.wire.ids import NodeName
from ipdc.wire.membership import (
    ENROLL_PREFIX,
    ENROLL_REPLY,
    ENROLL_REQUEST,
    EVERYONE,
    REMOVAL,
    SWARMKEY,
    EnrollReply,
    EnrollRequest,
    Removal,
    SwarmKey,
    swarm_key_fingerprint,
)
from ipdc.wire.presence import PRESENCE, Presence

log = logging.getLogger(__name__)

DEFAULT_TTL = dt.timedelta(hours=24)
_UNITS = {"s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def roster(node: NodeHome) -> Roster:
    return Roster(node.broker_dir / "members.json")


def parse_duration(text: str) -> dt.timedelta:
    """``90s``, ``30m``, ``24h``, ``7d``, ``2w`` (a bare number is hours)."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|m|min|h|d|w)?", text.strip())
    if not match or float(match[1]) <= 0:
        raise TokenError(f"--ttl {text!r}: give a positive duration such as 90s, 30m, 24h or 7d")
    return dt.timedelta(seconds=float(match[1]) * _UNITS[match[2] or "h"])


def _require_founder(node: NodeHome, what: str) -> None:
    cfg = node.config
    if not (cfg.broker.hosted and node.is_founder):
        raise NodeError(f"node {cfg.node.name} is not the swarm's founding node, which holds the CA key and "
                        f"hosts the broker: run `{what}` on the broker host ({cfg.broker.host})")


# -- founding --------------------------------------------------------------------------
def found(node: NodeHome, name: str, host: str, port: int, plugin: Path) -> None:
    """Make the swarm's CA, the broker's certificate (for ``host``) and the founder's own
    node certificate, and write the broker's files."""
    from ipdc import pki

    ca = pki.Authority.create(name)
    ca.save(node.home / CA_FILE, node.ca_key)
    key = pki.new_key()
    cert = ca.issue(name, key.public_key())
    write_private(node.home / KEY_FILE, pki.key_pem(key))
    (node.home / CERT_FILE).write_bytes(pki.cert_pem(cert))
    broker = Broker(node.home)
    private_dir(broker.dir)
    broker_key = pki.new_key()
    write_private(broker.key, pki.key_pem(broker_key))
    broker.cert.write_bytes(pki.cert_pem(ca.issue("ipdc-broker", broker_key.public_key(),
                                                   server_addresses=[host])))
    broker.write_config(host, port, name, plugin, node.home / CA_FILE,
                        Service(node.home, "mosquitto").log_file)
    roster(node).add(Member(name=name, submitter=node.signer.public_key, serial=pki.serial_hex(cert),
                            host=host, joined=time.time()))


# -- invite ------------------------------------------------------------------------------
def invite(node: NodeHome, ttl: dt.timedelta = DEFAULT_TTL) -> Invite:
    """A token for one new node, valid for ``ttl``: a fresh one-shot enrollment identity."""
    from ipdc import pki

    _require_founder(node, "ipdc invite")
    cfg = node.config
    ca = pki.Authority.load(Path(cfg.broker.ca_file), node.ca_key)
    identity = f"{ENROLL_PREFIX}{secrets.token_hex(4)}"
    key = pki.new_key()
    cert = ca.issue(identity, key.public_key(), not_after=pki.now() + ttl)
    return Invite(broker_host=cfg.broker.host, broker_port=cfg.broker.port, ca=pki.cert_pem(ca.cert).decode(),
                  identity=identity, cert=pki.cert_pem(cert).decode(), key=pki.key_pem(key).decode(),
                  founder=node.signer.public_key)


# -- join --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Enrolled:
    """What the founder gave a new node."""

    name: str
    key_pem: bytes
    cert_pem: bytes
    swarm_key: str
    bootstrap: list[str]
    trusted: list[str]


def enroll(node: NodeHome, token: Invite, host: str, timeout: float = 30.0) -> Enrolled:
    """Ask the founder to let this node in: connect with the invite's one-shot identity,
    send a CSR for a key made here (it never leaves the node) and this node's submitter
    key, and check the signed answer. Writes the pinned CA to ``keys/ca.crt``."""
    from ipdc import pki

    token.check_fresh()
    key = pki.new_key()
    keys = private_dir(node.keys_dir)
    (node.home / CA_FILE).write_text(token.ca)
    enroll_cert, enroll_key = keys / "enroll.crt", keys / "enroll.key"
    enroll_cert.write_text(token.cert)
    write_private(enroll_key, token.key, replace=True)
    broker = BrokerSection(host=token.broker_host, port=token.broker_port, ca_file=str(node.home / CA_FILE),
                           cert_file=str(enroll_cert), key_file=str(enroll_key))
    request = EnrollRequest(csr=pki.make_csr(key).decode(), submitter=node.signer.public_key, host=host)
    try:
        reply = _ask_founder(broker, token, request, timeout)
    finally:
        enroll_cert.unlink(missing_ok=True)
        enroll_key.unlink(missing_ok=True)
    if not verify(reply, ENROLL_REPLY.name, token.identity) or reply.submitter != token.founder:
        raise TokenError("the enrollment answer is not signed by the founder named in the invite: "
                         "refusing it")
    if reply.error:
        raise NodeError(f"the founder refused to enroll this node: {reply.error}")
    try:
        cert = pki.load_cert(reply.cert)
        pki.check_issued(cert, pki.load_cert(token.ca), key.public_key(), reply.name)
    except TrustError as exc:
        raise TokenError(f"the founder's answer carries a bad certificate: {exc}") from None
    return Enrolled(reply.name, pki.key_pem(key), reply.cert.encode(), reply.swarm_key, reply.bootstrap,
                    reply.trusted)


def _ask_founder(broker: BrokerSection, token: Invite, request: EnrollRequest, timeout: float) -> EnrollReply:
    reply_topic = ENROLL_REPLY.topic(node=token.identity)
    bus = Bus(broker, token.identity, session_expiry=0)
    bus.subscribe(reply_topic)
    try:
        bus.connect(timeout)
    except IdentityRefused:
        raise TokenError(f"this invite was already used (a token admits one node, once); "
                         f"{ASK_AGAIN}") from None
    except BusError as exc:
        token.check_fresh()  # it may have expired while we dialled
        raise TokenError(f"cannot join with this invite: {exc}") from None
    try:
        bus.publish(ENROLL_REQUEST.topic(node=token.identity), ENROLL_REQUEST.encode(request))
        try:
            message = bus.inbox.get(timeout=timeout)
        except queue.Empty:
            raise NodeError(f"the founding node did not answer within {timeout:.0f}s: its agent must be "
                            f"running (`python deploy.py start` on {token.broker_host}). This invite is used "
                            f"up now; {ASK_AGAIN}") from None
    finally:
        bus.close()
    try:
        return ENROLL_REPLY.decode(message.payload)
    except MessageError as exc:
        raise TokenError(f"the founder's answer is malformed: {exc}") from None


# -- remove ------------------------------------------------------------------------------
def remove(node: NodeHome, name: str, timeout: float = 10.0) -> Member:
    """Make ``name`` a non-member everywhere: revoke its broker identity (its live
    connections are closed within about 0.1 s), and tell every node, in a retained message
    signed by the founder, to stop trusting its submitter key. Running it again repeats
    the announcement."""
    _require_founder(node, "ipdc node remove")
    cfg = node.config
    if name == cfg.node.name:
        raise NodeError(f"{name} is this node, the founder: it holds the CA and hosts the broker, so it "
                        "cannot remove itself")
    member = roster(node).mark_removed(name, time.time())
    Broker(node.home).revoke(name)
    if (pid := Service(node.home, "mosquitto").pid()) is not None:
        Broker.reload(pid)
    node.trust.remove(member.submitter)
    removal = node.signer.sign(Removal(NodeName(name), key=member.submitter, serial=member.serial,
                                       ts=member.removed), REMOVAL.name, EVERYONE)
    try:
        with Bus(cfg.broker, client_id(cfg.node.name, "cli"), session_expiry=0) as bus:
            bus.connect(timeout)
            bus.publish(REMOVAL.topic(node=name), REMOVAL.encode(removal), retain=True)
            bus.publish(SWARMKEY.topic(node=name), b"", retain=True)  # its swarm key is no longer kept for it
    except BusError as exc:
        raise NodeError(f"{name} is revoked at the broker, but the other nodes were not told to stop "
                        f"trusting its key: {exc}. Start the broker and run `ipdc node remove {name}` "
                        "again.") from None
    return member


# -- rotate ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rotation:
    fingerprint: str
    switched: list[str]
    """Live members whose agent runs kubo with the new key now."""
    pending: list[str]
    """Live members that did not confirm within the timeout."""
    offline: list[str]
    """Members not live now: the key waits for them on the broker (retained)."""
    seconds: float
    """From sending the first key to the last confirmation."""


def rotate_swarm_key(node: NodeHome, timeout: float = 120.0) -> Rotation:
    """Give every member that is not removed a new swarm key: each one's agent writes
    ``kubo/swarm.key`` and restarts its kubo, so a removed node holding the old key can no
    longer connect to any member. Waits until every live member announces the new key's
    fingerprint in its presence."""
    _require_founder(node, "ipdc swarm rotate-key")
    cfg = node.config
    key = secrets.token_hex(32)
    fingerprint = swarm_key_fingerprint(key)
    members = [m.name for m in roster(node).members() if not m.removed]
    with Bus(cfg.broker, client_id(cfg.node.name, "cli"), session_expiry=0) as bus:
        bus.subscribe(PRESENCE.subscription())
        bus.connect(timeout=10)
        bus.sync()
        presences = _presences(bus, {})
        live = {name for name in members if presences.get(name)}
        started = time.monotonic()
        for name in members:
            message = node.signer.sign(SwarmKey(key, time.time()), SWARMKEY.name, name)
            bus.publish(SWARMKEY.topic(node=name), SWARMKEY.encode(message), retain=True)

        def switched() -> set[str]:
            return {n for n in live
                    if (p := presences.get(n)) is not None and p.extra.get("swarm") == fingerprint}
        deadline = started + timeout
        while switched() != live and time.monotonic() < deadline:
            presences = _presences(bus, presences, wait=min(1.0, max(0.0, deadline - time.monotonic())))
        seconds = time.monotonic() - started
        done = switched()
    return Rotation(fingerprint, sorted(done), sorted(live - done), sorted(set(members) - live), seconds)


def _presences(bus: Bus, known: dict[str, Presence | None], wait: float = 0.0) -> dict[str, Presence | None]:
    """``known`` updated with the presence messages waiting in the bus's inbox (blocking up to
    ``wait`` seconds for the first); an unreadable presence counts as none."""
    updated = dict(known)
    block = wait > 0
    while True:
        try:
            message = bus.inbox.get(timeout=wait) if block else bus.inbox.get_nowait()
        except queue.Empty:
            return updated
        block = False
        name = message.topic.rsplit("/", 1)[-1]
        try:
            updated[name] = PRESENCE.decode(message.payload) if message.payload else None
        except MessageError:
            updated[name] = None
