"""IPDC: InterPlanetary Distributed Computing.

MapReduce and TensorFlow clusters over a private IPFS (kubo) swarm, coordinated
on MQTT (mosquitto). See README.md for the tour.
"""

import os
from pathlib import Path

__version__ = "0.1.0"


def ipdc_home() -> Path:
    """The node home: ``$IPDC_HOME``, or ``~/.ipdc``. Here, not in ipdc.config, so that CLI
    commands that only talk to the node's services find it without loading YAML."""
    return Path(os.environ.get("IPDC_HOME") or Path.home() / ".ipdc").expanduser().absolute()
