"""The MQTT channels of IPDC: one module per channel, each a topic pattern plus a
strictly validated message type.

Topics:

    ipdc/presence/<node>          Presence   retained; cleared by the node's last will
    ipdc/heartbeat/<node>         Heartbeat  every agent.heartbeat_interval seconds
    ipdc/peer/<node>/download     Download   job manifest; the agent fetches the code
    ipdc/peer/<node>/domap        DoMap      run one map task
    ipdc/peer/<node>/buffer       Buffer     a map output partition for this reducer
    ipdc/peer/<node>/cleanup      CleanUp    drop a finished job's files and runners
    ipdc/peer/<node>/tf           Tf         reserve ports, start or stop a TF cluster's servers
    ipdc/result/<node>/<job>      GetResult  a worker's report to the job's owner
"""

from __future__ import annotations

from typing import Any

from channels.base import Channel
from channels.buffer import BUFFER
from channels.cleanup import CLEANUP
from channels.domap import DOMAP
from channels.download import DOWNLOAD
from channels.getresult import GETRESULT
from channels.heartbeat import HEARTBEAT
from channels.presence import PRESENCE
from channels.tf import TF

#: Channels whose topic is a node's inbox, ``ipdc/peer/<node>/<name>``.
INBOX_CHANNELS: dict[str, Channel[Any]] = {c.name: c for c in (DOWNLOAD, DOMAP, BUFFER, CLEANUP, TF)}

__all__ = ["BUFFER", "CLEANUP", "DOMAP", "DOWNLOAD", "GETRESULT", "HEARTBEAT", "INBOX_CHANNELS",
           "PRESENCE", "TF", "Channel"]
