"""The swarm's mosquitto: its config, ACL and revocation list, kept in ``$IPDC_HOME/broker``.

Settings that matter, and why (mosquitto 2.0.11, Debian 12):

* One listener, TLS only, ``require_certificate true``: a client without a
  certificate of the swarm's CA fails in the TLS handshake and never sends MQTT.
  There is no plaintext listener and no password file.
* ``use_identity_as_username`` stays false and the ``ipdc_auth`` plugin decides
  every CONNECT instead: with that option on, mosquitto skips every authentication
  callback, so any member could take over another's session by its client id. The
  plugin accepts a client only when its MQTT user is the certificate's CN and its
  client id is that CN or ``CN.<suffix>``, the CN is not in ``revoked`` (re-read on
  SIGHUP, live connections kicked), and an enrollment identity (``enroll-*``) is used
  once (``enroll-used``).
* The ACL (``acl``) uses ``%u`` patterns, which the plugin makes equal to the CN.
* ``per_listener_settings false``: the plugin kicks revoked nodes from its tick
  callback, and 2.0.11 runs tick callbacks only for global plugins.
* ``user <this user>``: started as root without it, mosquitto switches to user
  "mosquitto", which cannot read the node's private keys.
* Limits (measured with the prototype's sweep and bench/broker.py; figures in the README):

  - ``max_packet_size 1048576`` (ipdc.wire.channel.MAX_PACKET): a message is at most
    1 MiB, matching the channels' cap (MAX_PAYLOAD is 1 MiB - 16 KiB, leaving room for
    the topic and headers). Before, a member could publish up to 256 MB, which every
    subscriber received before rejecting it.
  - ``max_inflight_messages 20`` + ``max_queued_messages 100000`` +
    ``max_queued_bytes 64 MiB`` per client: bounded, yet 20,000 QoS 1 messages
    published as fast as paho can to a subscriber handling 1,200 msg/s all
    arrived (with the default 1000 only 12 % did; mosquitto drops silently past
    the bound).
  - ``persistent_client_expiration 14d``: the session and queue of a node gone
    for two weeks are dropped (it caps sessions that asked for "never").
  - ``memory_limit 1 GiB``: the last guard; a client that pushes the broker over it
    is disconnected, the broker lives on.
* ``persistence true``: a restarted broker keeps sessions and queued messages.
"""

from __future__ import annotations

import os
import pwd
import signal
from pathlib import Path

from ipdc.private import write_private
from ipdc.wire.channel import MAX_PACKET
from ipdc.wire.membership import ENROLL_PREFIX

LIMITS = {
    "max_packet_size": str(MAX_PACKET),
    "max_inflight_messages": "20",
    "max_queued_messages": "100000",
    "max_queued_bytes": str(64 << 20),
    "persistent_client_expiration": "14d",
    "memory_limit": str(1 << 30),
}

ACL = """\
# IPDC broker ACL (generated). %u is the connecting node's MQTT user name, which the
# ipdc_auth plugin makes equal to the CN of its verified certificate. Enrollment
# identities (CN enroll-*) never reach this file: the plugin lets them publish only
# their own ipdc/enroll/<CN>/request and read their own .../reply.
# A node reads its own task inbox and swarm key, and everyone's presence, heartbeats,
# results, cache records and removals; it writes any peer's task inbox (messages there
# are signed), and only its own presence, heartbeat, results and cache records.
pattern read ipdc/peer/%u/#
pattern read ipdc/swarmkey/%u
pattern read ipdc/presence/+
pattern read ipdc/heartbeat/+
pattern read ipdc/result/#
pattern read ipdc/removed/+
pattern read ipdc/cache/+/+
pattern write ipdc/peer/+/+
pattern write ipdc/presence/%u
pattern write ipdc/heartbeat/%u
pattern write ipdc/result/%u/#
pattern write ipdc/cache/+/%u

# The founding node answers enrollments and alone announces removals and swarm keys.
user {founder}
topic read ipdc/enroll/+/request
topic write ipdc/enroll/+/reply
topic write ipdc/removed/+
topic write ipdc/swarmkey/+
"""


class Broker:
    """The files of the broker hosted by the founding node."""

    def __init__(self, home: Path) -> None:
        self.dir = home / "broker"
        self.conf = self.dir / "mosquitto.conf"
        self.acl = self.dir / "acl"
        self.data = self.dir / "data"
        self.cert = self.dir / "broker.crt"
        self.key = self.dir / "broker.key"
        self.revoked = self.dir / "revoked"
        """One revoked node name per line; the plugin re-reads it on SIGHUP."""
        self.enroll_used = self.dir / "enroll-used"
        """Enrollment identities already used; the plugin appends to it."""

    def write_config(self, host: str, port: int, founder: str, plugin: Path, ca_file: Path,
                     log_file: Path) -> None:
        """Write mosquitto.conf, the ACL and an empty revocation list (the broker's
        certificate and key are written by the caller, which holds the CA)."""
        self.data.mkdir(parents=True, exist_ok=True)
        self.write_acl(founder)
        write_private(self.revoked, "# nodes removed with `ipdc node remove`, one per line\n", replace=True)
        self.enroll_used.touch()
        limits = "".join(f"{key} {value}\n" for key, value in LIMITS.items())
        self.conf.write_text(
            "# IPDC broker configuration (generated by `ipdc node init`); see ipdc/node/broker.py.\n"
            f"user {pwd.getpwuid(os.geteuid()).pw_name}\n"
            "per_listener_settings false\n"
            f"listener {port} {host}\n"
            f"certfile {self.cert}\n"
            f"keyfile {self.key}\n"
            f"cafile {ca_file}\n"
            "require_certificate true\n"
            "tls_version tlsv1.2\n"  # TLS 1.2 and 1.3 (the 2.0.11 default also allows 1.1)
            "use_identity_as_username false\n"
            "allow_anonymous false\n"
            f"plugin {plugin}\n"
            f"plugin_opt_revoked_file {self.revoked}\n"
            f"plugin_opt_enroll_used_file {self.enroll_used}\n"
            f"plugin_opt_enroll_prefix {ENROLL_PREFIX}\n"
            f"acl_file {self.acl}\n"
            f"{limits}"
            # Control messages are small: send each at once rather than wait for Nagle (~40 ms).
            "set_tcp_nodelay true\n"
            "persistence true\n"
            f"persistence_location {self.data}/\n"
            "autosave_interval 10\n"
            # A log file is written line by line; stdout into a file would be buffered.
            f"log_dest file {log_file}\n"
            "log_type error\nlog_type warning\nlog_type notice\n"
            "connection_messages true\n"
            "log_timestamp_format %Y-%m-%dT%H:%M:%S\n"
        )

    def write_acl(self, founder: str) -> None:
        """The ACL of this IPDC version; written again at every start, so a swarm founded by an
        older one gets the topics new channels need (``ipdc/cache/...``)."""
        self.acl.write_text(ACL.format(founder=founder))

    def set_plugin(self, plugin: Path) -> None:
        """Point the config at ``plugin`` (a rebuilt one, after the cache was cleared or the
        source changed)."""
        lines = self.conf.read_text().splitlines()
        self.conf.write_text("".join(f"plugin {plugin}\n" if line.startswith("plugin ") else f"{line}\n"
                                     for line in lines))

    def plugin(self) -> Path:
        for line in self.conf.read_text().splitlines():
            if line.startswith("plugin "):
                return Path(line.split(" ", 1)[1])
        raise FileNotFoundError(f"{self.conf} names no plugin")

    def revoke(self, name: str) -> bool:
        """Add ``name`` to the revocation list; False when it is listed already."""
        lines = self.revoked.read_text().splitlines()
        if name in lines:
            return False
        write_private(self.revoked, "".join(f"{line}\n" for line in [*lines, name]), replace=True)
        return True

    @staticmethod
    def reload(pid: int) -> None:
        """SIGHUP: mosquitto re-reads the ACL, and the plugin the revocation list; it then
        checks every session again and kicks revoked nodes (about 0.1 s)."""
        os.kill(pid, signal.SIGHUP)
