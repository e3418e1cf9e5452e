"""The controller service of a node (``python -m ipdc.control``).

Why a service of its own, next to the agent and not inside it: the agent must fit
a small board, and most nodes of a swarm only work; a controller holds a job's
whole state, an SQLite history, and on demand a web server. Keeping those out of
the agent keeps every worker as lean as it was, and a controller bug cannot stop
a node from working for others. Why not in the ``ipdc mr`` process, as before: a
job must outlive its terminal.

What it does, read top to bottom in :meth:`ControlService.serve`:

1. open the job history and connect to the broker (one connection for every job,
   and the CLI needs none of its own: ``ipdc mr`` starts faster);
2. take up every job the history says was queued or running when the service
   stopped (a ``deploy.py stop``, a crash, a kill -9): tasks already accepted are
   not run again (see :meth:`ipdc.submit.mrstate.JobState.restore`); workers
   still hold the job while its lease lasts;
3. answer requests on the unix socket (:mod:`ipdc.ctlsock`), one thread each.

On SIGTERM it stops answering and exits without ending its jobs: they stay
``running`` in the history and resume at the next start, within the workers'
lease. ``ipdc job cancel`` is how a job is ended.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import socketserver
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

from ipdc.agent.joblogs import job_lines
from ipdc.control.history import DB_NAME, FINISHED, History
from ipdc.control.jobrun import Context, JobRun, job_of, job_params, moved, resume_of, streaming_of
from ipdc.control.swarm import fetch_logs, find_record, job_peers, write_result
from ipdc.ctlsock import socket_address, socket_path
from ipdc.errors import ControlError, IPDCError, JobError
from ipdc.home import NodeHome
from ipdc.peers import peer_rows
from ipdc.submit.client import SwarmClient
from ipdc.submit.inputs import parse_input
from ipdc.submit.mapreduce import MapReduceJob, check_job_files
from ipdc.wire.ids import JobId

log = logging.getLogger("ipdc.control")

#: Jobs whose controllers run at once; more wait ``queued``. A controller mostly waits on
#: its workers, but each holds a fetch pool and its tasks' state.
MAX_RUNNING = 4
#: Seconds a job's workers get to answer ``ipdc job logs``.
LOGS_TIMEOUT = 10.0

Send = Callable[[dict[str, Any]], None]


class ControlService:
    """The jobs this node submits: run, recorded, resumed, shown."""

    def __init__(self, node: NodeHome) -> None:
        self.node = node
        self.config = node.config
        self.log_dir = node.home / "logs"
        self.history = History(node.home / DB_NAME)
        self.client = SwarmClient(self.config, node.signer)
        self.kubo = node.kubo(timeout=600)
        self.ctx = Context(self.client, self.kubo, self.history, node.signer, node.home, self._changed,
                           node.trust)
        self.runs: dict[str, JobRun] = {}
        self.pool = ThreadPoolExecutor(MAX_RUNNING, thread_name_prefix="job")
        self.version = 0
        self.changed = threading.Condition()
        """Notified on every change a dashboard shows."""
        self.dashboard: Any = None
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def _changed(self) -> None:
        with self.changed:
            self.version += 1
            self.changed.notify_all()

    # -- lifecycle -----------------------------------------------------------------------
    def serve(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: self._stop.set())
        signal.signal(signal.SIGINT, lambda *_: self._stop.set())
        self.client.connect(timeout=30)
        self.resume_jobs()
        path = socket_path(self.node.home)
        path.unlink(missing_ok=True)
        old = os.umask(0o177)  # the socket is born 0600: no moment in which others could connect
        try:
            with socket_address(path) as address:
                server = _Server(address, _Handler)
        finally:
            os.umask(old)
        server.service = self
        threading.Thread(target=server.serve_forever, daemon=True, name="socket").start()
        log.info("controller service of %s listening on %s", self.config.node.name, path)
        self._stop.wait()
        log.info("controller service stopping; running jobs resume at the next start")
        server.shutdown()
        path.unlink(missing_ok=True)
        self.client.close()

    def resume_jobs(self) -> None:
        for row in reversed(self.history.jobs(states=("queued", "running"))):
            job_id = row["id"]
            try:
                recorded = self.history.job(job_id)
                assert recorded is not None
                job = job_of(recorded["params"], recorded["output_dir"])
                run = JobRun(self.ctx, job_id, job, recorded["submitted_at"], resume_of(recorded),
                             recorded["started_at"] if recorded["plan"] is not None else None)
            except (IPDCError, KeyError, TypeError, ValueError) as exc:
                log.error("job %s cannot be resumed (%s); marking it failed", job_id, exc)
                self.history.update(job_id, state="failed", finished_at=time.time(), error=(
                    f"could not be resumed after the controller service restarted: {exc}"))
                continue
            log.info("resuming job %s (%s)", job_id,
                     "from its recorded tasks" if run.resume else "from the start")
            self._start(run)

    def _start(self, run: JobRun) -> None:
        with self._lock:
            self.runs[run.job_id] = run
        self.pool.submit(run.run)
        self._changed()

    # -- requests ------------------------------------------------------------------------
    def handle(self, request: dict[str, Any], send: Send) -> None:
        op = request.get("op")
        handler = getattr(self, f"op_{op}", None) if isinstance(op, str) and op.isidentifier() else None
        if handler is None:
            raise ControlError(f"unknown request {op!r}: the CLI and the service are different versions? "
                               "restart the node (`python deploy.py stop && python deploy.py start`)")
        handler(request, send)

    def op_ping(self, request: dict[str, Any], send: Send) -> None:
        send({"node": self.config.node.name, "pid": os.getpid()})

    def op_peers(self, request: dict[str, Any], send: Send) -> None:
        """The live peers, from the service's own broker connection: ``ipdc peers`` then needs
        no connection, TLS handshake and sync of its own."""
        send({"peers": peer_rows(self.client.peers.live())})

    def op_submit(self, request: dict[str, Any], send: Send) -> None:
        """Check the job as ``ipdc mr`` always did, record it, queue it; answer its id."""
        spec = request["job"]
        job_id = JobId.new()
        output = Path(spec["output"]) if spec.get("output") else Path(request["cwd"]) / "ipdc-out" / job_id
        job = MapReduceJob(
            input=parse_input(spec["input"]), k=spec.get("k"), map_file=Path(spec["map_file"]),
            reduce_file=Path(spec["reduce_file"]), output=output, chunks=spec.get("chunks"),
            max_attempts=int(spec.get("max_attempts", 3)), verify=int(spec.get("verify", 1)),
            verify_majority=bool(spec.get("verify_majority", False)), cache=bool(spec.get("cache", True)),
            **streaming_of(spec))
        check_job_files(job)
        submitted = time.time()
        self.history.add(job_id, "mapreduce", self.node.signer.public_key, self.config.node.name,
                         job_params(job), str(output), submitted)
        self._start(JobRun(self.ctx, job_id, job, submitted))
        send({"job_id": job_id, "output": str(output)})

    def op_record(self, request: dict[str, Any], send: Send) -> None:
        """Record work this node's Python API did outside the service (an offload decision and
        its estimates), so `ipdc jobs` shows it beside the jobs run here."""
        if request.get("kind") != "offload" or request.get("state") not in FINISHED:
            raise ControlError("only an ended offload decision is recorded this way")
        job_id = JobId.new()
        self.history.add(job_id, "offload", self.node.signer.public_key, self.config.node.name,
                         dict(request["params"]), "", float(request["submitted_at"]))
        self.history.update(job_id, state=request["state"], started_at=float(request["submitted_at"]),
                            finished_at=float(request["finished_at"]), error=str(request.get("error", "")),
                            workers=list(request["workers"]))
        self._changed()
        send({"job_id": job_id})

    def _run_or_row(self, request: dict[str, Any]) -> tuple[JobRun | None, dict[str, Any]]:
        job_id = self.history.resolve(str(request.get("job_id", "")))
        row = self.history.job(job_id)
        assert row is not None
        return self.runs.get(job_id), row

    def op_watch(self, request: dict[str, Any], send: Send) -> None:
        """Stream the job's state and progress until it ends (its last line has ``end``)."""
        run, row = self._run_or_row(request)
        if run is None:
            finished = row["state"]
            send({"job_id": row["id"], "state": finished, "progress": row["progress"], "error": row["error"],
                  "result": row["summary"], "exit_code": 0 if finished == "succeeded" else 1,
                  "cancelled": finished == "cancelled", "end": True})
            return
        seen = -1
        while True:
            with run.changed:
                run.changed.wait_for(partial(moved, run, seen), timeout=5.0)
                seen = run.version
                finished = run.finished  # read once: a job that ends after this is sent next round
            send({**run.snapshot(), "end": finished})
            if finished:
                return

    def op_cancel(self, request: dict[str, Any], send: Send) -> None:
        """End a queued or running job: its controller sends CleanUp to every peer that took part."""
        run, row = self._run_or_row(request)
        if row["state"] in FINISHED or run is None:
            raise JobError(f"job {row['id']} is {row['state']} already; nothing to cancel")
        run.cancel()
        with run.changed:
            run.changed.wait_for(lambda: run.finished, timeout=60)
        send({"job_id": run.job_id, "state": run.state})

    def op_logs(self, request: dict[str, Any], send: Send) -> None:
        """Every worker's log lines of the job (asked over MQTT, fetched by CID), and this
        service's own lines of it."""
        _, row = self._run_or_row(request)
        found, missing = fetch_logs(self.client, self.kubo, row["id"], job_peers(row),
                                    float(request.get("timeout", LOGS_TIMEOUT)))
        send({"job_id": row["id"], "state": row["state"], "workers": found, "missing": missing,
              "controller": job_lines(self.log_dir, row["id"], (("control.log", "controller"),))})

    def op_get(self, request: dict[str, Any], send: Send) -> None:
        """Write a finished job's output directory from its result CID, for a job of any node."""
        job_id = str(JobId(str(request.get("job_id", ""))))
        record = find_record(self.client, self.node.trust, job_id)
        output = Path(request.get("output") or Path(request["cwd"]) / "ipdc-out" / job_id)
        summary = {"job_id": job_id, "owner": record.owner, "submitter": record.submitter,
                   "result_cid": record.result_cid, "submitted_at": record.submitted_at,
                   "finished_at": record.finished_at, "parts": record.parts}
        write_result(self.kubo, record.result_cid, output, json.dumps(summary, indent=2) + "\n")
        send({**summary, "output": str(output)})

    def op_dashboard(self, request: dict[str, Any], send: Send) -> None:
        """Serve the dashboard (once; later calls answer the same URL)."""
        from ipdc.control.dashboard import Dashboard

        with self._lock:
            if self.dashboard is None:
                self.dashboard = Dashboard(self, int(request.get("port", 0)))
                self.dashboard.start()
        send({"url": self.dashboard.url})


class _Server(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True
    service: ControlService


class _Handler(socketserver.StreamRequestHandler):
    """One connection: one request, its answers."""

    server: _Server

    def handle(self) -> None:
        creds = self.connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _, uid, _ = struct.unpack("3i", creds)
        if uid != os.getuid():
            log.warning("refused a connection from uid %d: only the node's user may use the service", uid)
            return

        def send(reply: dict[str, Any]) -> None:
            self.wfile.write(json.dumps({"ok": True, **reply}).encode() + b"\n")
            self.wfile.flush()

        try:
            request = json.loads(self.rfile.readline())
            if not isinstance(request, dict):
                raise ControlError("a request is one JSON object on one line")
            self.server.service.handle(request, send)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the CLI went away (Ctrl-C, --detach): the job goes on
        except IPDCError as exc:
            self._fail(str(exc), exc.exit_code)
        except (KeyError, TypeError, ValueError) as exc:
            self._fail(f"malformed request: {type(exc).__name__}: {exc}", 2)
        except Exception as exc:  # one request must never stop the service
            log.exception("request failed")
            self._fail(f"the controller service failed: {type(exc).__name__}: {exc}; see logs/control.log", 1)

    def _fail(self, message: str, exit_code: int) -> None:
        try:
            reply = {"ok": False, "error": message, "exit_code": exit_code}
            self.wfile.write(json.dumps(reply).encode() + b"\n")
        except OSError:
            pass


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    ControlService(NodeHome()).serve()
    # The jobs' threads are not waited for: a job blocked on kubo or the broker would keep a
    # stopped service alive, and every running job resumes from its record at the next start.
    logging.shutdown()
    os._exit(0)
