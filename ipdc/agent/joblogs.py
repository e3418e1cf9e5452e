"""A worker's log lines of one job, for ``ipdc job logs`` (the Logs channel).

The lines are those of this node's ``agent.log`` and ``runners.log`` that name the
job: the agent's own lines for it, and what its runners wrote that names it (a
traceback from user code names the job's work dir, whose name holds the job id).
They are added to this node's kubo unpinned (they only have to live until the
submitter fetched them, and stay until a garbage collection) and answered by CID.

Only the job's own submitter is answered, as far as this agent knows the job (a
job it never held, or forgot after a restart, is answered to any trusted key:
the lines then name a job that key already knows the id of). A request from any
other key is logged and not answered, like every refused request.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Executor
from pathlib import Path

from ipdc.agent.jobs import JobKey
from ipdc.errors import IPDCError
from ipdc.kubo import KuboClient
from ipdc.wire.getresult import GetResult
from ipdc.wire.ids import Cid, JobId, NodeName
from ipdc.wire.logs import Logs

log = logging.getLogger(__name__)

#: The log files searched, and how each line is labelled.
SOURCES = (("agent.log", "agent"), ("runners.log", "runner"))
#: At most this many lines (the newest) go back: enough to read, small enough to fetch.
MAX_LINES = 5000


def job_lines(log_dir: Path, job_id: str, sources: Iterable[tuple[str, str]] = SOURCES) -> list[str]:
    """The lines of the log files ``sources`` ((file name, label)) in ``log_dir`` that name
    ``job_id``, labelled; the newest MAX_LINES of them."""
    found: deque[str] = deque(maxlen=MAX_LINES)
    for name, label in sources:
        try:
            with open(log_dir / name, errors="replace") as f:
                found.extend(f"{label}: {line.rstrip()}" for line in f if job_id in line)
        except FileNotFoundError:
            continue
    return list(found)


class JobLogs:
    """Answers Logs requests for the agent."""

    def __init__(self, node: str, log_dir: Path, kubo: KuboClient, pool: Executor,
                 reply: Callable[[GetResult], None]) -> None:
        self.node = NodeName(node)
        self.log_dir = log_dir
        self.kubo = kubo
        self.pool = pool
        self.reply = reply

    def request(self, msg: Logs, re: str, known: Iterable[JobKey]) -> str:
        """Start answering ``msg``; returns why it is refused ("" when it is not).
        ``known``: the jobs this agent holds or remembers, by (submitter, job id)."""
        owners = {submitter for submitter, job in known if job == msg.job_id}
        if owners and msg.submitter not in owners:
            return f"refused logs of job {msg.job_id}: the request is not signed by the job's submitter"
        self.pool.submit(self._answer, msg.job_id, re)
        return ""

    def _answer(self, job_id: JobId, re: str) -> None:
        text = "".join(f"{line}\n" for line in job_lines(self.log_dir, job_id))
        try:
            cid = self.kubo.add_bytes(text.encode(), f"{job_id}.log", pin=False)
        except IPDCError as exc:
            log.warning("could not add the log lines of job %s to kubo: %s", job_id, exc)
            return
        self.reply(GetResult(job_id, self.node, "logs", cids=[Cid(cid)], re=re))
