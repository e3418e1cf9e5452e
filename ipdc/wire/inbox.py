"""The channels whose topic is a node's inbox, ``ipdc/peer/<node>/<name>``: what an agent
subscribes to and dispatches by name."""

from __future__ import annotations

from typing import Any

from ipdc.wire.buffer import BUFFER
from ipdc.wire.channel import Channel
from ipdc.wire.cleanup import CLEANUP
from ipdc.wire.domap import DOMAP
from ipdc.wire.download import DOWNLOAD
from ipdc.wire.logs import LOGS
from ipdc.wire.renew import RENEW
from ipdc.wire.task import TASK
from ipdc.wire.tf import TF

INBOX_CHANNELS: dict[str, Channel[Any]] = {
    c.name: c for c in (DOWNLOAD, DOMAP, BUFFER, CLEANUP, TF, RENEW, LOGS, TASK)}
