"""One exception hierarchy for IPDC.

Every error a user can meet derives from :class:`IPDCError`, and its message says
what went wrong and what to do about it. The CLI prints the message and exits
non-zero; it never shows a Python traceback for these.
"""

from __future__ import annotations


class IPDCError(Exception):
    """Base of every error IPDC raises on purpose."""

    exit_code: int = 1


class ConfigError(IPDCError):
    """ipdc.conf (or another YAML/JSON file a user wrote) is missing or invalid."""

    exit_code = 2


class TokenError(IPDCError):
    """An invite token is malformed or from an unknown format version."""

    exit_code = 2


class InstallError(IPDCError):
    """A dependency (mosquitto, kubo) is missing and could not be installed."""


class NodeError(IPDCError):
    """Starting, stopping or inspecting a node's processes failed."""


class KuboError(IPDCError):
    """The kubo RPC API failed or could not be reached."""


class SandboxError(IPDCError):
    """A sandbox for user code could not be set up, or a process in one broke its protocol
    (an oversized or malformed message, an unsealed output)."""


class BusError(IPDCError):
    """The MQTT broker refused us or could not be reached."""


class IdentityRefused(BusError):
    """The broker refused this node's identity for good (CONNACK 135/140, DISCONNECT 152):
    its certificate was revoked, or it used a client id that is not its own. Retrying
    cannot help, so the connection is not retried."""


class MessageError(IPDCError):
    """A message on a channel is malformed. The agent logs and drops it."""


class JobError(IPDCError):
    """A job could not be run to completion."""


class NotEnoughPeers(JobError):
    """Fewer live peers than the job asked for."""


class TaskFailed(JobError):
    """User code raised, or a task exhausted its attempts, on some peer."""

    def __init__(self, message: str, *, peer: str = "", remote_traceback: str = "") -> None:
        super().__init__(message)
        self.peer = peer
        self.remote_traceback = remote_traceback


class ValueRefused(JobError):
    """A task's value that does not decode as its codec says, or a pickle from a worker the
    submitter does not trust (unpickling runs code)."""


class VerificationFailed(JobError):
    """Replicas of one task (``--verify N``) reported different outputs."""

    def __init__(self, task: str, reports: dict[str, list[str]]) -> None:
        lines = "\n".join(f"  {peer}: {' '.join(cids)}" for peer, cids in sorted(reports.items()))
        super().__init__(f"{task}: its replicas on {len(reports)} peers disagree, so no output was "
                         f"accepted. One of these peers computes wrongly or lies:\n{lines}\n"
                         "Check those nodes, or run with --verify-majority to take the output most "
                         "replicas agree on.")
        self.task = task
        self.reports = reports


class TrustError(IPDCError):
    """A submitter key or signature is malformed, or a key file cannot be read."""

    exit_code = 2


class SpecError(IPDCError):
    """A TensorFlow cluster spec is malformed."""

    exit_code = 2


class HistoryError(IPDCError):
    """The job history ($IPDC_HOME/ipdc.db) cannot be read or written, or names no such job."""


class ControlError(IPDCError):
    """The node's controller service is not running, or refused a request."""


class JobCancelled(JobError):
    """The job was cancelled (``ipdc job cancel``, or Ctrl-C answered with yes)."""

    exit_code = 130
