"""The MQTT bus: one paho-mqtt 2 client (VERSION2 callbacks, MQTT v5) per process.

Why it looks like this:

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
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from ipdc.config import BrokerSection
from ipdc.errors import BusError

log = logging.getLogger(__name__)


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
        self.inbox: queue.Queue[Inbound] = queue.Queue()
        self._subscriptions: dict[str, int] = {}
        self._unacked: set[int] = set()
        """Message ids of our QoS 1 publishes the broker has not acknowledged yet."""
        self._acked_early: set[int] = set()
        self._acks = threading.Condition()
        self._connected = threading.Event()
        self._refused: str | None = None
        self._lock = threading.Lock()
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
        )
        self._client.username_pw_set(broker.username, broker.password)
        self._client.max_queued_messages_set(0)
        self._client.max_inflight_messages_set(100)
        self._client.reconnect_delay_set(min_delay=0.2, max_delay=5)
        if will is not None:
            self._client.will_set(will.topic, will.payload, qos=1, retain=will.retain)
        self._session_expiry = session_expiry
        self._on_connected = on_connected
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_publish = self._on_publish

    # -- lifecycle -------------------------------------------------------------------
    def connect(self, timeout: float = 10.0) -> "Bus":
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self._session_expiry
        where = f"{self.broker.host}:{self.broker.port}"
        try:
            self._client.connect_async(
                self.broker.host, self.broker.port, keepalive=15, clean_start=False, properties=props
            )
        except (OSError, ValueError) as exc:
            raise BusError(f"cannot connect to the MQTT broker at {where}: {exc}") from None
        self._client.loop_start()
        if not self._connected.wait(timeout) or self._refused:
            self._client.loop_stop()
            reason = self._refused or f"no answer within {timeout:.0f}s"
            raise BusError(
                f"the MQTT broker at {where} refused user {self.broker.username!r}: {reason}. "
                "Check broker.host/port/username/password in ipdc.conf, and that the broker runs "
                "(`python deploy.py status`)."
            )
        return self

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every QoS 1 message we published is acknowledged by the broker.

        Acknowledgements are counted from paho's on_publish, not from MQTTMessageInfo:
        a message published while the broker was away has an info that raises forever,
        although paho sends the message after the reconnect.
        """
        with self._acks:
            return self._acks.wait_for(lambda: not self._unacked, timeout)

    def close(self) -> None:
        """Flush, then disconnect cleanly: a clean DISCONNECT does not fire the last will, and
        ends the session, so the broker keeps no queue for a client that is gone for good."""
        self.flush()
        props = Properties(PacketTypes.DISCONNECT)
        props.SessionExpiryInterval = 0  # a clean goodbye: let the broker drop our session and queue
        self._client.disconnect(properties=props)
        self._client.loop_stop()

    def __enter__(self) -> "Bus":
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
        """Queue a QoS 1 message; it survives a broker restart in paho's queue."""
        info = self._client.publish(topic, payload, qos=1, retain=retain)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            raise BusError(f"publish to {topic} failed: {mqtt.error_string(info.rc)}")
        with self._acks:  # not held across publish(): paho calls on_publish with its own locks held
            if info.mid in self._acked_early:
                self._acked_early.discard(info.mid)
            else:
                self._unacked.add(info.mid)

    # -- paho callbacks (network thread: never block here) ---------------------------
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any,
                    reason_code: ReasonCode, properties: Any) -> None:
        if reason_code.is_failure:
            self._refused = str(reason_code)
            log.error("broker refused %s: %s", self.client_id, reason_code)
            client.disconnect()
            self._connected.set()
            return
        sock = client.socket()
        if isinstance(sock, socket.socket):  # small messages: no Nagle delay on every hop
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            if self._subscriptions:
                client.subscribe([(t, q) for t, q in self._subscriptions.items()])
        log.debug("%s connected (session present: %s)", self.client_id, flags.session_present)
        if self._on_connected is not None:
            self._on_connected()
        self._connected.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any,
                       reason_code: ReasonCode, properties: Any) -> None:
        if reason_code.is_failure:
            log.warning("%s lost the broker (%s); reconnecting", self.client_id, reason_code)

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason_code: ReasonCode,
                    properties: Any) -> None:
        with self._acks:
            if mid in self._unacked:
                self._unacked.discard(mid)
                self._acks.notify_all()
            else:
                self._acked_early.add(mid)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self.inbox.put(Inbound(message.topic, message.payload, bool(message.retain)))
