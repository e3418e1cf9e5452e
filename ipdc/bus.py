"""The MQTT bus: one paho-mqtt 2 client (VERSION2 callbacks, MQTT v5) per process.

Why it looks like this:

* MQTT over TLS only. The node proves who it is with its certificate (CN = node
  name); it trusts only the swarm's CA (``broker.ca_file``, pinned when it joined)
  and checks that the broker's certificate names the address it dialled, so nobody
  else can pose as the broker. There are no passwords.
* The client id is ``<node>.<role>``: the broker's auth plugin accepts only ids
  made of the certificate's CN, a dot and a suffix, so no node can take over
  another's session, and one node can hold several connections (agent, CLI, ...).
* A refusal of the node's identity (CONNACK 135 Not authorized or 140 Bad
  authentication method, DISCONNECT 152 Administrative action: revoked) is final:
  paho would otherwise retry for ever. :attr:`Bus.failure` holds it, and
  :meth:`Bus.publish` raises it.
* paho's network loop runs callbacks on its own thread, so ``on_message`` only
  puts the message on a queue; consumers (the agent's dispatcher, a job
  controller) do the work on their own threads.
* QoS 1 everywhere, persistent sessions (``clean_start=False`` plus a session
  expiry), and an unbounded outgoing queue: a message published while the broker
  restarts is kept and sent after the automatic reconnect.
* Subscriptions are replayed on every (re)connect, so a broker that lost its
  state (no persistence) still delivers to us.
"""

from __future__ import annotations

import logging
import queue
import secrets
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from ipdc.config import BrokerSection
from ipdc.errors import BusError, IdentityRefused
from ipdc.wire.channel import MAX_PACKET

log = logging.getLogger(__name__)

#: CONNACK reason codes that no retry can change: the broker refused the identity.
FINAL_CONNACK = frozenset({135, 140})
#: DISCONNECT 152 (administrative action): the broker kicked us because the node was revoked.
REVOKED = 152
#: An upper bound of a QoS 1 PUBLISH's bytes besides topic and payload: fixed header (5),
#: topic length (2), packet id (2), properties length (1).
PACKET_OVERHEAD = 10


def client_id(node: str, role: str) -> str:
    """``<node>.<role>-<8 hex>``: a connection of its own for one process (a CLI command,
    ``deploy.py start``, a test), beside the node's agent (``<node>.agent``)."""
    return f"{node}.{role}-{secrets.token_hex(4)}"


def tls_context(broker: BrokerSection) -> ssl.SSLContext:
    """TLS 1.2+ that trusts the swarm's CA only and presents this node's certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the certificate and the broker's address
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_verify_locations(cafile=broker.ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise BusError(f"cannot load the swarm's CA certificate (broker.ca_file {broker.ca_file}): "
                       f"{exc}") from None
    try:
        context.load_cert_chain(broker.cert_file, broker.key_file)
    except (OSError, ssl.SSLError) as exc:
        raise BusError(f"cannot load this node's broker certificate (broker.cert_file {broker.cert_file}, "
                       f"broker.key_file {broker.key_file}): {exc}") from None
    return context


@dataclass(frozen=True)
class Inbound:
    topic: str
    payload: bytes
    retain: bool


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes = b""
    retain: bool = True


class Bus:
    """A connected MQTT client whose inbound messages wait in :attr:`inbox`."""

    def __init__(
        self,
        broker: BrokerSection,
        client_id: str,
        *,
        session_expiry: int = 3600,
        will: Will | None = None,
        on_connected: Callable[[], None] | None = None,
    ) -> None:
        self.broker = broker
        self.client_id = client_id
        self.node = client_id.split(".", 1)[0]
        self.where = f"{broker.host}:{broker.port}"
        self.inbox: queue.Queue[Inbound] = queue.Queue()
        self.failure: BusError | None = None
        """Set when the broker refused this node's identity for good; the bus is dead then."""
        self._subscriptions: dict[str, int] = {}
        self._markers: dict[str, threading.Event] = {}
        """Topics of :meth:`sync` markers in flight -> the event their arrival sets (single dict
        operations, atomic under the GIL: paho's thread must never wait for our locks)."""
        self._unacked: set[int] = set()
        """Message ids of our QoS 1 publishes the broker has not acknowledged yet."""
        self._acked_early: set[int] = set()
        self._acks = threading.Condition()
        self._settled = threading.Event()
        """The first connect ended: subscribed (CONNACK and SUBACK), or failed."""
        self._first_suback: int | None = None
        self._last_error = ""
        self._lock = threading.Lock()
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
        )
        self._client.tls_set_context(tls_context(broker))
        self._client.max_queued_messages_set(0)
        self._client.max_inflight_messages_set(100)
        self._client.reconnect_delay_set(min_delay=0.2, max_delay=5)  # type: ignore[arg-type]  # floats work
        if will is not None:
            self._client.will_set(will.topic, will.payload, qos=1, retain=will.retain)
        self._session_expiry = session_expiry
        self._on_connected = on_connected
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_publish = self._on_publish
        self._client.on_subscribe = self._on_subscribe

    # -- lifecycle -------------------------------------------------------------------
    def connect(self, timeout: float = 10.0) -> Bus:
        """Connect, retrying while the broker is unreachable (it may be starting) until
        ``timeout``; return once the subscriptions made so far are active, so nothing
        published to them afterwards is missed. A TLS or identity refusal fails at once,
        with what to do about it."""
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self._session_expiry
        deadline = time.monotonic() + timeout
        self._client.on_log = self._on_log  # paho reports socket-level errors only there
        while True:
            try:
                self._client.connect(self.broker.host, self.broker.port, keepalive=15, clean_start=False,
                                     properties=props)
                break
            except ssl.SSLCertVerificationError as exc:
                raise BusError(
                    f"the server at {self.where} is not this swarm's broker: {exc.verify_message} (this node "
                    f"trusts only the CA in {self.broker.ca_file}, and the broker's certificate must name "
                    f"{self.broker.host}). Check broker.host/port in ipdc.conf.") from None
            except ssl.SSLError as exc:
                raise BusError(f"the TLS handshake with the broker at {self.where} failed "
                               f"({exc.reason or exc}): {self._not_accepted()}") from None
            except (OSError, ValueError) as exc:
                if time.monotonic() >= deadline:
                    raise BusError(
                        f"cannot reach the MQTT broker at {self.where}: {exc}. Check that it runs "
                        "(`python deploy.py status` on the broker host) and broker.host/port in ipdc.conf."
                    ) from None
                time.sleep(0.2)  # back off before the next attempt; the broker may be starting
        self._client.loop_start()
        settled = self._settled.wait(max(0.0, deadline - time.monotonic()))
        if self.failure is not None or not settled:
            self._client.disconnect()
            self._client.loop_stop()
            if self.failure is not None:
                raise self.failure
            raise BusError(f"the MQTT broker at {self.where} did not answer {self.client_id} within "
                           f"{timeout:.0f}s{self._last_error_text()}")
        self._client.on_log = None
        return self

    def _not_accepted(self) -> str:
        return (f"the broker did not accept node {self.node}'s certificate ({self.broker.cert_file}): it may "
                "have expired, or come from another swarm. A node needs a certificate of this swarm's CA: "
                "join with a new invite (`ipdc invite` on the broker host).")

    def _last_error_text(self) -> str:
        return f" (last error: {self._last_error})" if self._last_error else ""

    def sync(self, timeout: float = 10.0) -> None:
        """Return once every message the broker had for our subscriptions so far (retained
        ones included) is in :attr:`inbox`: a marker published on this node's own result
        topic comes back after them, because the broker handles one client's packets in order."""
        topic = f"ipdc/result/{self.node}/sync-{secrets.token_hex(6)}"
        arrived = threading.Event()
        self._markers[topic] = arrived
        self.subscribe(topic)
        self.publish(topic, b"sync")
        try:
            if not arrived.wait(timeout):
                raise BusError(f"the broker at {self.where} accepted {self.client_id} but delivers nothing "
                               "to it: check the broker's ACL (broker/acl on the broker host)")
        finally:
            self._markers.pop(topic, None)
            self.unsubscribe(topic)

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every QoS 1 message we published is acknowledged by the broker.

        Acknowledgements are counted from paho's on_publish, not from MQTTMessageInfo:
        a message published while the broker was away has an info that raises forever,
        although paho sends the message after the reconnect.
        """
        with self._acks:
            return self._acks.wait_for(lambda: not self._unacked or self.failure is not None, timeout)

    def close(self) -> None:
        """Flush, then disconnect cleanly: a clean DISCONNECT does not fire the last will, and
        ends the session, so the broker keeps no queue for a client that is gone for good."""
        if self.failure is None:
            self.flush()
        props = Properties(PacketTypes.DISCONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 0  # a clean goodbye: let the broker drop our session and queue
        self._client.disconnect(properties=props)
        self._client.loop_stop()

    def __enter__(self) -> Bus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def connected(self) -> bool:
        return self._client.is_connected()

    # -- traffic ---------------------------------------------------------------------
    def subscribe(self, *topics: str) -> None:
        with self._lock:
            for topic in topics:
                self._subscriptions[topic] = 1
            if self._client.is_connected():
                self._client.subscribe([(t, 1) for t in topics])

    def unsubscribe(self, *topics: str) -> None:
        with self._lock:
            for topic in topics:
                self._subscriptions.pop(topic, None)
            self._client.unsubscribe(list(topics))

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """Queue a QoS 1 message; it survives a broker restart in paho's queue. Raises
        :attr:`failure` once the broker has refused this node for good."""
        if self.failure is not None:
            raise self.failure
        if len(payload) + len(topic.encode()) + PACKET_OVERHEAD > MAX_PACKET:
            # The broker would disconnect us for it, and paho would send it again on every
            # reconnect, holding up everything queued behind it.
            raise BusError(f"a message of {len(payload)} bytes to {topic} is larger than the broker's "
                           f"max_packet_size ({MAX_PACKET} bytes)")
        info = self._client.publish(topic, payload, qos=1, retain=retain)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            raise BusError(f"publish to {topic} failed: {mqtt.error_string(info.rc)}")
        with self._acks:  # not held across publish(): paho calls on_publish with its own locks held
            if info.mid in self._acked_early:
                self._acked_early.discard(info.mid)
            else:
                self._unacked.add(info.mid)

    # -- paho callbacks (network thread: never block here) ---------------------------
    def _fail(self, client: mqtt.Client, failure: BusError) -> None:
        """Give up for good: stop paho's reconnect loop, and let every waiter see why."""
        if self.failure is None:
            self.failure = failure  # raised to (or reported by) whoever uses the bus
            log.info("%s", failure)
        client.disconnect()
        self._settled.set()
        with self._acks:
            self._acks.notify_all()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any,
                    reason_code: ReasonCode, properties: Any) -> None:
        if reason_code.is_failure:
            if reason_code.value in FINAL_CONNACK:
                self._fail(client, IdentityRefused(
                    f"the MQTT broker at {self.where} refused node {self.node}'s identity ({reason_code}): "
                    f"its certificate was revoked (`ipdc node remove`), or client id {self.client_id!r} is "
                    "not its own. A removed node can only come back with a new invite (`ipdc invite` on the "
                    "broker host)."))
            elif not self._settled.is_set():
                self._fail(client, BusError(f"the MQTT broker at {self.where} refused {self.client_id}: "
                                            f"{reason_code}"))
            else:
                log.warning("broker refused %s (%s); retrying", self.client_id, reason_code)
            return
        sock = client.socket()
        if isinstance(sock, socket.socket):  # small messages: no Nagle delay on every hop
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            if self._subscriptions:
                _, mid = client.subscribe([(t, q) for t, q in self._subscriptions.items()])
                if not self._settled.is_set():
                    self._first_suback = mid  # connect() returns on its SUBACK (_on_subscribe)
        log.debug("%s connected (session present: %s)", self.client_id, flags.session_present)
        if self._on_connected is not None:
            self._on_connected()
        if self._first_suback is None:
            self._settled.set()

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: Any,
                      properties: Any) -> None:
        if mid == self._first_suback:
            self._settled.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any,
                       reason_code: ReasonCode, properties: Any) -> None:
        if self.failure is not None:
            return
        if reason_code.value == REVOKED:
            self._fail(client, IdentityRefused(
                f"the MQTT broker at {self.where} disconnected node {self.node} ({reason_code}): the node "
                "was removed from the swarm and its identity revoked (`ipdc node remove`). It can only come "
                "back with a new invite (`ipdc invite` on the broker host)."))
        elif not self._settled.is_set():
            self._fail(client, BusError(f"the broker at {self.where} closed the connection without answering "
                                        f"CONNECT{self._last_error_text()}: {self._not_accepted()}"))
        elif reason_code.is_failure:
            log.warning("%s lost the broker (%s); reconnecting", self.client_id, reason_code)

    def _on_log(self, client: mqtt.Client, userdata: Any, level: int, text: str) -> None:
        if level == mqtt.MQTT_LOG_ERR:
            self._last_error = text

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason_code: ReasonCode,
                    properties: Any) -> None:
        with self._acks:
            if mid in self._unacked:
                self._unacked.discard(mid)
                self._acks.notify_all()
            else:
                self._acked_early.add(mid)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        marker = self._markers.get(message.topic)
        if marker is not None:
            marker.set()
            return
        self.inbox.put(Inbound(message.topic, bytes(message.payload), bool(message.retain)))
