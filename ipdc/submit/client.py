"""The submitter's connection to the swarm, used by job controllers and ``ipdc peers``.

It keeps the live peer table (retained presence plus heartbeats), routes each
job's GetResult reports to that job's queue, and signs what it sends with the
node's submitter key, so agents can tell the job's owner from any other member.
``connect`` returns only after every retained presence message has arrived
(:meth:`ipdc.bus.Bus.sync`); :meth:`SwarmClient.retained` does the same for any topic.
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
from dataclasses import fields
from typing import Any

from paho.mqtt.client import topic_matches_sub

from ipdc.bus import Bus, Inbound, client_id
from ipdc.config import Config
from ipdc.errors import BusError, MessageError
from ipdc.peers import PeerTable
from ipdc.trust import Signer, digest
from ipdc.wire.channel import Channel
from ipdc.wire.getresult import GETRESULT, GetResult
from ipdc.wire.heartbeat import HEARTBEAT
from ipdc.wire.presence import PRESENCE

log = logging.getLogger(__name__)


class SwarmClient:
    """A connection to the swarm's broker, with the node's own credentials."""

    def __init__(self, config: Config, signer: Signer | None = None) -> None:
        self.config = config
        self.name = config.node.name
        self.signer = signer
        self.client_id = client_id(self.name, "cli")
        self.peers = PeerTable(config.agent.peer_timeout)
        self.connections = 0
        """How many times the broker connection was made: a controller that sees it grow
        knows it was cut off, and sends again what may have been lost meanwhile."""
        self.bus = Bus(config.broker, self.client_id, session_expiry=600, on_connected=self._on_connected)
        self._jobs: dict[str, queue.Queue[GetResult]] = {}
        self._listeners: dict[str, queue.Queue[Inbound]] = {}
        """Topic filter -> raw messages matching it (retained job records, log replies)."""
        self._stop = threading.Event()
        self._pump = threading.Thread(target=self._run, daemon=True, name="swarm-client")

    def connect(self, timeout: float = 10.0) -> SwarmClient:
        self.bus.subscribe(PRESENCE.subscription(), HEARTBEAT.subscription())
        self.bus.connect(timeout)
        self.bus.sync(timeout)
        while not self.bus.inbox.empty():  # the retained presences, before anyone reads the table
            self._handle(self.bus.inbox.get_nowait())
        self._pump.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self.bus.close()

    def __enter__(self) -> SwarmClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- jobs ------------------------------------------------------------------------
    def watch(self, job_id: str) -> queue.Queue[GetResult]:
        """Start receiving the job's GetResult reports (before sending it anything)."""
        results: queue.Queue[GetResult] = queue.Queue()
        self._jobs[job_id] = results
        self.bus.subscribe(GETRESULT.subscription(job=job_id))
        return results

    def unwatch(self, job_id: str) -> None:
        self._jobs.pop(job_id, None)
        self.bus.unsubscribe(GETRESULT.subscription(job=job_id))

    def listen(self, topic: str) -> queue.Queue[Inbound]:
        """Start receiving raw messages matching the filter ``topic``."""
        messages: queue.Queue[Inbound] = queue.Queue()
        self._listeners[topic] = messages
        self.bus.subscribe(topic)
        return messages

    def unlisten(self, topic: str) -> None:
        self._listeners.pop(topic, None)
        self.bus.unsubscribe(topic)

    def retained(self, topic: str, timeout: float = 10.0) -> list[Inbound]:
        """The retained messages matching ``topic`` now. As in :meth:`connect`: a marker
        published after the subscription comes back after every retained message."""
        marker = f"ipdc/result/{self.name}/sync-{secrets.token_hex(6)}"
        found = self.listen(topic)
        echo = self.listen(marker)
        try:
            self.bus.publish(marker, b"sync")
            try:
                echo.get(timeout=timeout)
            except queue.Empty:
                raise BusError(f"the broker did not echo a marker within {timeout:g} s: check the broker "
                               "ACL and that it runs (`python deploy.py status`)") from None
            messages = []
            while not found.empty():
                messages.append(found.get())
            return [m for m in messages if m.payload]
        finally:
            self.unlisten(marker)
            self.unlisten(topic)

    def _signer(self) -> Signer:
        if self.signer is None:
            raise BusError("this swarm client has no submitter key, so it cannot submit jobs")
        return self.signer

    @property
    def submitter(self) -> str:
        """The key this client signs with: a job's manifest names it."""
        return self._signer().public_key

    def send(self, channel: Channel[Any], node: str, message: Any) -> str:
        """Publish to a peer's inbox; messages with a ``sig`` field are signed first, for
        that peer and channel. Returns the digest a reply to it will echo ("" if unsigned)."""
        signed = any(f.name == "sig" for f in fields(message))
        if signed:
            message = self._signer().sign(message, channel.name, node)
        self.bus.publish(channel.topic(node=node), channel.encode(message))
        return digest(message) if signed else ""

    def _on_connected(self) -> None:
        """Runs on paho's thread: peers were silent to us while we were cut off, not dead."""
        self.connections += 1
        self.peers.refresh_all()

    # -- the pump --------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._handle(self.bus.inbox.get(timeout=0.2))
            except queue.Empty:
                continue

    def _handle(self, message: Inbound) -> None:
        try:
            self._route(message)
        except MessageError as exc:
            log.warning("dropped a malformed message on %s: %s", message.topic, exc)
        except Exception:  # one bad message must never stop the pump
            log.exception("dropped a message on %s that could not be handled", message.topic)

    def _route(self, message: Inbound) -> None:
        parts = message.topic.split("/")
        for topic, messages in list(self._listeners.items()):
            if topic_matches_sub(topic, message.topic):
                messages.put(message)
        if len(parts) < 3:
            return
        elif parts[1] == "presence":
            try:
                presence = PRESENCE.decode(message.payload) if message.payload else None
                if presence is not None and presence.name != parts[2]:
                    raise MessageError(f"a presence on {parts[2]}'s topic claims to be {presence.name}")
            except MessageError:  # garbage is no presence: the node is not live, as a fresh client sees it
                self.peers.update_presence(parts[2], None)
                raise
            log.debug("presence of %s: %s%s", parts[2], "announced" if presence else "gone",
                      " (retained)" if message.retain else "")
            self.peers.update_presence(parts[2], presence, _age(message, presence.ts if presence else 0))
        elif parts[1] == "heartbeat" and message.payload:
            beat = HEARTBEAT.decode(message.payload)
            if beat.name != parts[2]:
                raise MessageError(f"a heartbeat on {parts[2]}'s topic claims to be {beat.name}")
            self.peers.update_heartbeat(beat, _age(message, beat.ts))
        elif parts[1] == "result" and len(parts) == 4 and (results := self._jobs.get(parts[3])) is not None:
            result = GETRESULT.decode(message.payload)
            if result.peer != parts[2]:
                raise MessageError(f"{result.peer} reported on {parts[2]}'s result topic")
            results.put(result)


def _age(message: Inbound, ts: float) -> float:
    """A live message is news now; a retained one is as old as the timestamp it carries."""
    return max(0.0, time.time() - ts) if message.retain else 0.0
