"""IPDC as a library: Python functions, futures and task graphs on the swarm.

``ipdc.connect()`` opens a :class:`Swarm` (this node's, or a temporary local cluster);
``submit`` and ``map`` run functions on its peers in the same sandboxed runners as
MapReduce code, and return :class:`Future` objects. See README "Python API".
"""

from ipdc.api.future import Future, as_completed
from ipdc.api.swarm import Swarm, connect
from ipdc.errors import TaskFailed

__all__ = ["Future", "Swarm", "TaskFailed", "as_completed", "connect"]
