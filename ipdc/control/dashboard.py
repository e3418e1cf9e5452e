"""The live web dashboard (``ipdc dashboard``), served by the controller service.

Why the standard library's ``http.server`` and not a framework: the dashboard is
four read-only views and one server-sent-event stream for the node's own user,
on 127.0.0.1, for a handful of browser tabs. ``ThreadingHTTPServer`` does that in
a thread per connection with nothing to install (every node, a 128 MB board
included, has it), nothing to keep up to date beyond Python itself, and about
1 MB of memory, only once ``ipdc dashboard`` was asked for. Starlette plus
uvicorn would be the next step (anyio and h11 already come with httpx), at the
cost of an asyncio loop beside the service's threads, for features this page
does not use. What ``http.server`` does not do, this module does: a token on
every data request (compared in constant time), a Host check against DNS
rebinding, and no directory listing or file path from a request.

Pages (one HTML page, hash routes, plain JavaScript; no build step): peers
(live, with their capabilities, load and running tasks), jobs (live progress),
one job (a timeline per worker of every task attempt, its reassignments, and
its logs), and the TF clusters started here.
"""

from __future__ import annotations

import hmac
import json
import logging
import secrets
import threading
import time
from functools import partial
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.resources import files
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from ipdc.control.jobrun import moved
from ipdc.control.swarm import fetch_logs, job_peers
from ipdc.errors import IPDCError
from ipdc.peers import peer_rows
from ipdc.submit.tf import list_clusters, unanswered

if TYPE_CHECKING:
    from ipdc.control.service import ControlService

log = logging.getLogger(__name__)

STATIC = {"/": ("index.html", "text/html; charset=utf-8"), "/app.js": ("app.js", "text/javascript"),
          "/style.css": ("style.css", "text/css")}
#: A stream sends at most this many updates a second, however busy the jobs are.
MAX_UPDATES = 4.0
#: Seconds between updates when no job changes: peers' load and liveness change by heartbeats.
PEERS_EVERY = 2.0
#: Seconds a TF cluster's up/down state is reused (checking it opens a connection per task).
TF_TTL = 10.0
JOBS_SHOWN = 50


class Dashboard:
    """The HTTP server of one controller service, on 127.0.0.1."""

    def __init__(self, service: ControlService, port: int = 0) -> None:
        self.service = service
        self.token = secrets.token_urlsafe(18)
        self.server = ThreadingHTTPServer(("127.0.0.1", port), _Handler)
        self.server.daemon_threads = True
        self.server.dashboard = self  # type: ignore[attr-defined]
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/?token={self.token}"
        self._tf: tuple[float, list[dict[str, Any]]] = (0.0, [])

    def start(self) -> None:
        threading.Thread(target=self.server.serve_forever, daemon=True, name="dashboard").start()
        log.info("dashboard on http://127.0.0.1:%d/", self.port)

    # -- what the pages show ---------------------------------------------------------------
    def peers(self) -> list[dict[str, Any]]:
        return peer_rows(self.service.client.peers.live())

    def jobs(self) -> list[dict[str, Any]]:
        """The newest jobs, with the live state and progress of those running here."""
        rows = self.service.history.jobs(limit=JOBS_SHOWN)
        for row in rows:
            row.pop("plan", None)
            row.pop("summary", None)
            run = self.service.runs.get(row["id"])
            if run is not None:
                row["state"], row["progress"] = run.state, run.progress
        return rows

    def job(self, job_id: str) -> dict[str, Any] | None:
        row = self.service.history.job(job_id)
        if row is None:
            return None
        row.pop("plan", None)
        run = self.service.runs.get(job_id)
        if run is not None:
            row["state"], row["progress"] = run.state, run.progress
        row["now"] = time.time()
        return row

    def tf(self) -> list[dict[str, Any]]:
        when, clusters = self._tf
        if time.monotonic() - when > TF_TTL:
            clusters = [{**c.to_dict(), "up": not unanswered(c)}
                        for c in list_clusters(self.service.node.home)]
            self._tf = (time.monotonic(), clusters)
        return clusters

    def logs(self, job_id: str) -> dict[str, Any]:
        row = self.service.history.job(job_id)
        if row is None:
            return {"workers": {}, "missing": []}
        found, missing = fetch_logs(self.service.client, self.service.kubo, job_id, job_peers(row), 10.0)
        return {"workers": found, "missing": missing}

    def snapshot(self, job_id: str) -> dict[str, Any]:
        state: dict[str, Any] = {"node": self.service.config.node.name, "peers": self.peers(),
                                 "jobs": self.jobs(), "tf": self.tf(), "time": time.time()}
        if job_id:
            state["job"] = self.job(job_id)
        return state


class _Handler(BaseHTTPRequestHandler):
    server_version = "ipdc-dashboard"

    @property
    def dashboard(self) -> Dashboard:
        return self.server.dashboard  # type: ignore[attr-defined, no-any-return]

    def log_message(self, format: str, *args: Any) -> None:  # the base class's name
        log.debug("dashboard: " + format, *args)

    def do_GET(self) -> None:  # the name http.server calls
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        host = self.headers.get("Host", "")
        if host not in (f"127.0.0.1:{self.dashboard.port}", f"localhost:{self.dashboard.port}"):
            self._send(HTTPStatus.FORBIDDEN, b"wrong Host header", "text/plain")  # DNS rebinding
            return
        if url.path in STATIC:
            name, kind = STATIC[url.path]
            self._send(HTTPStatus.OK, files("ipdc.control").joinpath("static", name).read_bytes(), kind)
            return
        token = query.get("token", [""])[0]
        if not hmac.compare_digest(token.encode(), self.dashboard.token.encode()):
            self._send(HTTPStatus.FORBIDDEN, b"a valid token is needed: open the URL `ipdc dashboard` prints",
                       "text/plain")
            return
        job_id = query.get("job", [""])[0]
        try:
            if url.path == "/events":
                self._events(job_id)
            elif url.path == "/api/state":
                self._json(self.dashboard.snapshot(job_id))
            elif url.path == "/api/logs" and job_id:
                self._json(self.dashboard.logs(job_id))
            else:
                self._send(HTTPStatus.NOT_FOUND, b"not found", "text/plain")
        except (BrokenPipeError, ConnectionResetError):
            pass
        except IPDCError as exc:
            self._json({"error": str(exc)}, HTTPStatus.INTERNAL_SERVER_ERROR)

    def _send(self, status: HTTPStatus, body: bytes, kind: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", "default-src 'self'; style-src 'self'")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, data: Any, status: HTTPStatus = HTTPStatus.OK) -> None:
        self._send(status, json.dumps(data).encode(), "application/json")

    def _events(self, job_id: str) -> None:
        """Server-sent events: the whole state on connect, after every change of a job (at
        most MAX_UPDATES a second) and every PEERS_EVERY seconds; the pages redraw from it."""
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        service = self.dashboard.service
        seen = -1
        while True:
            payload = json.dumps(self.dashboard.snapshot(job_id))
            self.wfile.write(f"data: {payload}\n\n".encode())
            self.wfile.flush()
            time.sleep(1 / MAX_UPDATES)  # a rate limit, not a wait for anything
            with service.changed:  # a job changed, or it is time to show the peers' news
                service.changed.wait_for(partial(moved, service, seen), timeout=PEERS_EVERY)
                seen = service.version
