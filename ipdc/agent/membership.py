"""Membership, on the agent's side: one identity per node, removals, new swarm keys, and
(on the founding node) answering enrollments.

* **One live instance per identity.** Before the agent connects as ``<node>.agent``
  (which would take over the session of another instance of the same node),
  :func:`check_identity` reads the node's retained presence and heartbeat through a
  connection of its own. When another instance (another machine, or a copied home:
  ``Presence.instance`` differs) has beaten within ``agent.peer_timeout``, the agent
  refuses to start and names the host that holds the identity. A live presence of
  another instance seen later (two started at once) stops this agent too: two homes
  sharing one identity would take each other's session many times a minute.
* **Removals** (``ipdc/removed/<node>``, retained, signed by the founder): the node's
  submitter key leaves ``trusted_keys`` and its jobs are refused, with a log line that
  says why. A node that reads its own removal stops.
* **Swarm keys** (``ipdc/swarmkey/<node>``, retained, signed by the founder for this
  node): the agent writes ``kubo/swarm.key`` (0600), restarts its kubo, dials its
  bootstrap peers and announces the new key's fingerprint in its presence, which is
  how ``ipdc swarm rotate-key`` sees it done.
* **Enrollment** (founder only, ``ipdc/enroll/+/request``): checks the CSR, names the
  new node, signs its certificate with the swarm's CA, records it in the member list
  and answers, signed, with the swarm key, bootstrap address and trusted keys. A
  repeated request (QoS 1) gets the same answer. ``cryptography`` is imported here only.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ipdc.bus import Bus, Inbound, client_id
from ipdc.errors import IPDCError, MessageError, NodeError, TrustError
from ipdc.home import NodeHome
from ipdc.roster import Member, Roster
from ipdc.spawn import Service, wait_for
from ipdc.trust import parse_public_key, verify
from ipdc.wire.heartbeat import HEARTBEAT, Heartbeat
from ipdc.wire.ids import NodeName
from ipdc.wire.membership import (
    ENROLL_ID,
    ENROLL_REPLY,
    ENROLL_REQUEST,
    EVERYONE,
    REMOVAL,
    SWARMKEY,
    EnrollReply,
    swarm_key_fingerprint,
)
from ipdc.wire.presence import PRESENCE, Presence

if TYPE_CHECKING:
    from ipdc.pki import Authority

log = logging.getLogger(__name__)

#: How long a restarted kubo may take to answer, and to reach its bootstrap peers after a
#: new swarm key (the peers restart at the same time, so the first dials can fail).
KUBO_RESTART_TIMEOUT = 60.0


def check_identity(node: NodeHome, timeout: float = 30.0) -> None:
    """Refuse (NodeError) when another live instance holds this node's identity."""
    cfg = node.config
    name = cfg.node.name
    presence: Presence | None = None
    beat: Heartbeat | None = None
    with Bus(cfg.broker, client_id(name, "probe"), session_expiry=0) as bus:
        bus.subscribe(PRESENCE.topic(node=name), HEARTBEAT.topic(node=name))
        bus.connect(timeout)
        bus.sync(timeout)
        while not bus.inbox.empty():
            message = bus.inbox.get()
            try:
                if message.topic.startswith("ipdc/presence/"):
                    presence = PRESENCE.decode(message.payload) if message.payload else None
                elif message.payload:
                    beat = HEARTBEAT.decode(message.payload)
            except MessageError as exc:
                log.warning("ignoring an unreadable retained message on %s: %s", message.topic, exc)
    if presence is None or not presence.instance or presence.instance == node.instance:
        return
    age = time.time() - (beat.ts if beat is not None else presence.ts)
    if age < cfg.agent.peer_timeout:
        raise NodeError(_conflict(name, presence, node, f"its last heartbeat was {max(age, 0):.1f} s ago"))


def _conflict(name: str, other: Presence, node: NodeHome, when: str) -> str:
    where = other.host + (f" ({other.extra['hostname']})" if other.extra.get("hostname") else "")
    return (f"node {name} is already live on host {where}, instance {other.instance} ({when}); this home "
            f"({node.home}, instance {node.instance}) holds the same identity, so it may be a copy of that "
            "node's home. Two homes must never share one identity: stop the other one, or give this machine "
            "its own identity with a new invite (`ipdc invite` on the broker host, then "
            "`python deploy.py init --join-file FILE` with a fresh IPDC_HOME).")


class Membership:
    """The agent's membership duties; :meth:`handle` runs on the agent's dispatcher thread."""

    def __init__(self, node: NodeHome, bus: Bus, announce: Callable[[], None],
                 stop: Callable[[str], None]) -> None:
        self.node = node
        self.name = node.config.node.name
        self.bus = bus
        self._announce = announce
        self._stop = stop
        self.founder = node.founder_key()
        self.removed: set[str] = set()
        """Submitter keys of removed nodes: their jobs are refused even if someone trusts them again."""
        self._swarm_fingerprint = swarm_key_fingerprint(node.swarm_key())
        self._rotation = threading.Lock()
        self._ca: Authority | None = None
        self._roster = Roster(node.broker_dir / "members.json")

    def topics(self) -> list[str]:
        topics = [REMOVAL.subscription(), SWARMKEY.topic(node=self.name), PRESENCE.topic(node=self.name)]
        if self.node.is_founder:
            topics.append(ENROLL_REQUEST.subscription())
        return topics

    def handles(self, topic: str) -> bool:
        return (topic.startswith("ipdc/removed/") or topic.startswith("ipdc/enroll/")
                or topic in (SWARMKEY.topic(node=self.name), PRESENCE.topic(node=self.name)))

    def presence_extra(self) -> dict[str, str]:
        return {"hostname": socket.gethostname(), "swarm": self._swarm_fingerprint}

    def refusal(self, key: str) -> str:
        """Why jobs signed by ``key`` are refused ("" when they are not)."""
        if key in self.removed:
            return "its submitter was removed from the swarm (`ipdc node remove`)"
        return ""

    def handle(self, message: Inbound) -> None:
        try:
            if message.topic.startswith("ipdc/removed/"):
                self._removal(message)
            elif message.topic.startswith("ipdc/enroll/"):
                self._enroll(message)
            elif message.topic.startswith("ipdc/swarmkey/"):
                self._swarm_key(message)
            else:
                self._own_presence(message)
        except MessageError as exc:
            log.warning("dropped a malformed message on %s: %s", message.topic, exc)

    # -- removals --------------------------------------------------------------------
    def _removal(self, message: Inbound) -> None:
        if not message.payload:
            return
        removal = REMOVAL.decode(message.payload)
        if removal.submitter != self.founder or not verify(removal, REMOVAL.name, EVERYONE):
            log.warning("ignored a removal of %s: it is not signed by the founder", removal.name)
            return
        if removal.name == self.name:
            self._stop(f"this node ({self.name}) was removed from the swarm (`ipdc node remove` on the "
                       "broker host); it can only come back with a new invite")
            return
        self.removed.add(removal.key)
        if self.node.trust.remove(removal.key):
            log.warning("node %s was removed from the swarm: its submitter key is no longer trusted here",
                        removal.name)

    # -- swarm key -------------------------------------------------------------------
    def _swarm_key(self, message: Inbound) -> None:
        if not message.payload:
            return
        new = SWARMKEY.decode(message.payload)
        if new.submitter != self.founder or not verify(new, SWARMKEY.name, self.name):
            log.warning("ignored a swarm key: it is not signed by the founder for this node")
            return
        if new.key == self.node.swarm_key():
            return  # the retained key we run with already
        threading.Thread(target=self._rotate, args=(new.key,), daemon=True, name="swarm-key").start()

    def _rotate(self, key: str) -> None:
        """Write the new key and restart kubo with it; announce it once kubo is back and
        has reached its bootstrap peers (or could not within the timeout)."""
        with self._rotation:
            started = time.monotonic()
            try:
                self.node.write_swarm_key(key)
                Service(self.node.home, "ipfs").stop()
                self.node.start_kubo(KUBO_RESTART_TIMEOUT)
                with self.node.kubo(timeout=10) as kubo:
                    if not wait_for(lambda: self.node.connect_swarm(kubo), KUBO_RESTART_TIMEOUT, 0.5):
                        log.warning("kubo runs with the new swarm key but has not reached its bootstrap "
                                    "peers yet")
            except IPDCError as exc:
                log.error("could not restart kubo with the new swarm key: %s", exc)
                return
            self._swarm_fingerprint = swarm_key_fingerprint(key)
            log.info("kubo restarted with the new swarm key %s in %.2f s", self._swarm_fingerprint,
                     time.monotonic() - started)
            self._announce()

    # -- one identity, one instance ---------------------------------------------------
    def _own_presence(self, message: Inbound) -> None:
        """A live (not retained) presence of this node from another instance: two homes hold
        one identity and started at once (the start check covers the other cases)."""
        if message.retain or not message.payload:
            return
        presence = PRESENCE.decode(message.payload)
        if presence.instance and presence.instance != self.node.instance:
            self._stop(_conflict(self.name, presence, self.node, "it announced itself just now"))

    # -- enrollment (founder) ----------------------------------------------------------
    def _enroll(self, message: Inbound) -> None:
        parts = message.topic.split("/")
        if not self.node.is_founder or len(parts) != 4 or parts[3] != "request" \
                or not ENROLL_ID.fullmatch(parts[2]):
            return
        identity = parts[2]
        request = ENROLL_REQUEST.decode(message.payload)
        try:
            reply = self._admit(identity, request.csr, request.submitter, request.host)
        except (TrustError, NodeError) as exc:
            log.warning("refused the enrollment of %s: %s", identity, exc)
            reply = EnrollReply(error=str(exc))
        signed = self.node.signer.sign(reply, ENROLL_REPLY.name, identity)
        self.bus.publish(ENROLL_REPLY.topic(node=identity), ENROLL_REPLY.encode(signed))

    def _admit(self, identity: str, csr: str, submitter: str, host: str) -> EnrollReply:
        from ipdc import pki

        key = pki.csr_public_key(csr)
        parse_public_key(submitter)
        member = self._roster.by_enroll(identity)
        if member is None:
            if self._ca is None:
                self._ca = pki.Authority.load(Path(self.node.config.broker.ca_file), self.node.ca_key)
            taken = {m.name for m in self._roster.members()}
            name = next(n for n in iter(NodeName.new, None) if n not in taken)
            cert = self._ca.issue(name, key)
            member = Member(name=name, submitter=submitter, serial=pki.serial_hex(cert), host=host,
                            joined=time.time(), enroll=identity, cert=pki.cert_pem(cert).decode())
            self._roster.add(member)
            log.info("enrolled node %s (host %s) with invite %s", name, host, identity)
        elif member.submitter != submitter or pki.load_cert(member.cert).public_key() != key:
            raise NodeError(f"invite {identity} was already used by node {member.name}")
        return EnrollReply(name=member.name, cert=member.cert, swarm_key=self.node.swarm_key(),
                           bootstrap=[self.node.swarm_multiaddr()], trusted=sorted(self.node.trust.keys()))
