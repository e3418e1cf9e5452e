"""IPDC: InterPlanetary Distributed Computing.

MapReduce and TensorFlow clusters over a private IPFS (kubo) swarm, coordinated
on MQTT (mosquitto). See README.md for the tour.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

__version__ = "0.1.0"


def ipdc_home() -> Path:
    """The node home: ``$IPDC_HOME``, or ``~/.ipdc``. Here, not in ipdc.config, so that CLI
    commands that only talk to the node's services find it without loading YAML."""
    return Path(os.environ.get("IPDC_HOME") or Path.home() / ".ipdc").expanduser().absolute()


#: The Python API (:mod:`ipdc.api`), imported on first use so that ``ipdc --help`` stays fast.
_API = ("connect", "Swarm", "Future", "as_completed", "TaskFailed")


def __getattr__(name: str) -> Any:
    if name in _API:  # by name: the package stays below every layer that imports it (lint-imports)
        return getattr(importlib.import_module("ipdc.api"), name)
    raise AttributeError(f"module 'ipdc' has no attribute {name!r}")
