"""Task and TaskReply: the Python API's channels (:mod:`ipdc.api`).

A Task asks one peer to call a function: the function by CID (cloudpickled, signed by
the submitter with the rest of the request, as a manifest is), each argument inline
or by CID. It is signed for that peer and this channel, fresh and never seen before,
like a Download: an agent runs it only when its submitter's key is trusted there.
``op = "cancel"`` stops a task that is queued or running there.

The worker answers on its own result topic, ``ipdc/result/<worker>/<session>/task``
(the broker lets only that node publish there), with the result inline or by CID, and
signs the answer (for the session) with its node key, so the submitter knows which key's node produced a
pickled value before it decides to unpickle it.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field

from ipdc.errors import MessageError
from ipdc.wire.channel import Channel
from ipdc.wire.getresult import MAX_ATTEMPT, MAX_ERROR
from ipdc.wire.ids import Cid, JobId, NodeName
from ipdc.wire.schema import in_range

CODECS = ("msgpack", "ndarray", "pickle")
OPS = ("run", "cancel")
#: Arguments of one call.
MAX_ARGS = 256
#: Inline bytes (base64 text) per message: larger values travel by CID.
MAX_INLINE = 768 << 10


def _codec(where: str, codec: str) -> None:
    if codec not in CODECS:
        raise MessageError(f"{where}: {codec!r} is not one of {', '.join(CODECS)}")


@dataclass(frozen=True)
class TaskArg:
    codec: str
    data: str = ""
    """The encoded value, base64, when it is small; else ""."""
    cid: Cid | None = None
    """The encoded value's CID when it is not inline."""

    def __post_init__(self) -> None:
        _codec("task.arg.codec", self.codec)
        in_range("task.arg.data", len(self.data), 0, MAX_INLINE, MessageError)


@dataclass(frozen=True)
class Task:
    session: JobId
    """The submitting :class:`ipdc.api.Swarm`'s id: replies go to its result topic."""
    task: JobId
    attempt: int = 0
    op: str = "run"
    fn: Cid | None = None
    """The cloudpickled function's CID."""
    args: list[TaskArg] = field(default_factory=list)
    kwargs: list[str] = field(default_factory=list)
    """Names of the last ``len(kwargs)`` arguments, passed by keyword."""
    chunk: bool = False
    """The one argument is a list of items: the result is the list of ``fn(item)``."""
    submitted_at: float = field(default_factory=time.time)
    nonce: str = field(default_factory=lambda: secrets.token_hex(16))
    submitter: str = ""
    sig: str = ""

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise MessageError(f"task.op: {self.op!r} is not one of {', '.join(OPS)}")
        if self.op == "run" and self.fn is None:
            raise MessageError("task.fn: a task to run names its function's CID")
        in_range("task.attempt", self.attempt, 0, MAX_ATTEMPT, MessageError)
        in_range("task.args", len(self.args), 0, MAX_ARGS, MessageError)
        in_range("task.kwargs", len(self.kwargs), 0, len(self.args), MessageError)
        in_range("task.nonce", len(self.nonce), 16, 64, MessageError)
        if self.chunk and len(self.args) != 1:
            raise MessageError("task.chunk: a chunk task has exactly one argument")


@dataclass(frozen=True)
class TaskReply:
    session: JobId
    task: JobId
    attempt: int
    peer: NodeName
    ok: bool
    """False: the function raised, and the value is the exception (or its text)."""
    codec: str = "msgpack"
    data: str = ""
    cid: Cid | None = None
    size: int = 0
    """Bytes of the encoded value."""
    error: str = ""
    """The task could not run (not user code's exception): why; with ``ok`` False."""
    traceback: str = ""
    seconds: float = 0.0
    """How long the function ran in the runner."""
    re: str = ""
    """The digest of the Task this answers."""
    submitter: str = ""
    """The key that signed this reply: the worker node's own."""
    sig: str = ""

    def __post_init__(self) -> None:
        _codec("taskreply.codec", self.codec)
        in_range("taskreply.attempt", self.attempt, 0, MAX_ATTEMPT, MessageError)
        in_range("taskreply.data", len(self.data), 0, MAX_INLINE, MessageError)
        in_range("taskreply.size", self.size, 0, 1 << 40, MessageError)
        in_range("taskreply.error", len(self.error), 0, MAX_ERROR, MessageError)
        in_range("taskreply.traceback", len(self.traceback), 0, 4 * MAX_ERROR, MessageError)
        in_range("taskreply.seconds", self.seconds, 0, 1e9, MessageError)
        in_range("taskreply.re", len(self.re), 0, 64, MessageError)


TASK: Channel[Task] = Channel("task", Task, "ipdc/peer/{node}/task")
TASK_REPLY: Channel[TaskReply] = Channel("taskreply", TaskReply, "ipdc/result/{node}/{job}/task")
