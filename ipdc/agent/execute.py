"""How the agent runs one task of a job: in a runner from its pool, never in itself.

The agent's shell decides *that* a task runs (see :mod:`ipdc.agent.jobs`); this
module does it: it finds or binds a runner for the job, sends it the task, and
checks the answer before anything of it goes back on the wire.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ipdc.agent.sandbox import RunnerPool
from ipdc.config import SandboxSection
from ipdc.errors import MessageError
from ipdc.wire.ids import Cid
from ipdc.wire.manifest import JobManifest

log = logging.getLogger(__name__)


class Executor:
    """Runs map and reduce tasks of the jobs this agent holds, each in the job's own runners."""

    def __init__(self, settings: SandboxSection, kubo_url: str, log_dir: Path, warm: int) -> None:
        self.settings = settings
        self.kubo_url = kubo_url
        self.pool = RunnerPool(settings, log_dir, warm)

    def _bind(self, manifest: JobManifest, job_dir: Path) -> dict[str, Any]:
        code = manifest.code
        return {
            "dir": str(job_dir), "kubo": self.kubo_url, "partitions": manifest.partitions,
            "map": str(job_dir / "Map.py") if "Map.py" in code else "",
            "reduce": str(job_dir / "Reduce.py") if "Reduce.py" in code else "",
        }

    def prepare(self, job: str, manifest: JobManifest, job_dir: Path) -> None:
        """Bind a runner to the job now, while its first task is on its way."""
        self.pool.release(self.pool.acquire(job, self._bind(manifest, job_dir)))

    def run_map(self, job: str, manifest: JobManifest, job_dir: Path, chunk: Cid) -> tuple[list[Cid], dict[str, float]]:
        return self._run(job, manifest, job_dir, {"op": "map", "cid": chunk}, manifest.partitions)

    def run_reduce(self, job: str, manifest: JobManifest, job_dir: Path,
                   inputs: tuple[Cid, ...]) -> tuple[list[Cid], dict[str, float]]:
        return self._run(job, manifest, job_dir, {"op": "reduce", "cids": list(inputs)}, 1)

    def _run(self, job: str, manifest: JobManifest, job_dir: Path, request: dict[str, Any],
             outputs: int) -> tuple[list[Cid], dict[str, float]]:
        runner = self.pool.acquire(job, self._bind(manifest, job_dir))
        try:
            reply = runner.call(request, timeout=self.settings.task_timeout)
        finally:
            self.pool.release(runner)
        cids = [Cid(c) for c in reply["cids"]]
        if len(cids) != outputs:
            raise MessageError(f"the runner answered {len(cids)} CIDs, not {outputs}")
        return cids, {str(k): float(v) for k, v in dict(reply.get("stats", {})).items()}

    def drop(self, job: str) -> None:
        self.pool.drop(job)

    def close(self) -> None:
        self.pool.close()
