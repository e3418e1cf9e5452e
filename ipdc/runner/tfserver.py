"""One process of an IPDC TF cluster, started in its sandbox: a TF server, or the chief.

    python -m ipdc.runner.tfserver PLAN                 # a server task (worker, ps, ...)
    python -m ipdc.runner.tfserver PLAN -- CMD [ARG...]  # the chief: the user's command

PLAN is JSON: ``label`` (cluster/task, for people reading ``ps``), ``cluster`` (the
ClusterSpec, loopback addresses), ``task``
(``{"type": ..., "index": ...}``, or null for a client of the cluster) and ``maps``
(the relays of :mod:`ipdc.runner.tfrelay`). This file is IPDC's own and installed
with it; a cluster's manifest carries only data, so no code of a job ever runs as a
TF server.

A server starts its TF server first and its relays after, then prints ``serving``:
the host then finds it answering through its socket. It runs until SIGTERM, or until
its parent (the sandbox, or the agent) is gone. ``Server.join()`` never returns and
keeps Python signal handlers from running, so the main thread waits on an event.

The chief starts its relays, then runs CMD with ``TF_CONFIG`` set and returns its
exit code. In a loopback-only network namespace the chief's own TF server (which
ParameterServerStrategy starts, and which binds every interface) is reachable by
nobody, and nobody needs to reach it.

With neither a task nor CMD it is only a relay: a host that cannot isolate its TF
servers (``tf.trusted_network``) runs one for the whole cluster.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

#: Set before TensorFlow is imported, which reads them then (see FACTS, TensorFlow); the host
#: passes a TF process no environment of its own.
TF_ENV = {"GRPC_FAIL_FAST": "use_caller", "TF_CPP_MIN_LOG_LEVEL": "2"}
RELAY = Path(__file__).with_name("tfrelay.py")


def start_relays(label: str, maps: list[dict[str, Any]]) -> subprocess.Popen[bytes] | None:
    """The relay process, once every listener of it is open; None when there is nothing to relay."""
    if not maps:
        return None
    fds = [int(m["listen"][3:]) for m in maps if m["listen"].startswith("fd:")]
    # The relay needs the standard library only: in a sandbox, its Python runs isolated (-I -S).
    argv = [sys.executable, "-I", "-S", str(RELAY), json.dumps({"label": label, "maps": maps})]
    relay = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, pass_fds=fds)
    assert relay.stdout is not None
    if relay.stdout.readline().strip() != b"ready":
        sys.exit(f"the relay exited ({relay.wait()}) before its listeners were open")
    for fd in fds:  # the relay holds them now
        os.close(fd)
    return relay


def wait_for_stop() -> None:
    """Until SIGTERM or SIGINT, or until the parent is gone."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    parent = os.getppid()
    while not stop.wait(1.0) and os.getppid() == parent:
        pass


def serve(label: str, cluster: dict[str, list[str]], job: str, index: int,
          maps: list[dict[str, Any]]) -> None:
    import tensorflow as tf  # after TF_ENV is set

    server = tf.distribute.Server(tf.train.ClusterSpec(cluster), job_name=job, task_index=index,
                                  protocol="grpc", start=True)
    relay = start_relays(label, maps)
    print(f"/job:{job}/task:{index} serving at {server.target}, {len(maps)} relay(s)", flush=True)
    wait_for_stop()
    if relay is not None:
        relay.kill()
    # Skip TF's teardown: it can block on open gRPC streams from the chief.
    os._exit(0)


def run_chief(label: str, cluster: dict[str, list[str]], task: dict[str, Any] | None,
              maps: list[dict[str, Any]], command: list[str]) -> int:
    relay = start_relays(label, maps)
    config: dict[str, Any] = {"cluster": cluster}
    if task is not None:
        config["task"] = task
    env = {**os.environ, "TF_CONFIG": json.dumps(config)}
    try:
        proc = subprocess.Popen(command, env=env)
    except OSError as exc:
        print(f"ipdc tf run: cannot start {command[0]!r}: {exc.strerror}", file=sys.stderr)
        return 127
    signal.signal(signal.SIGTERM, lambda *_: proc.terminate())
    signal.signal(signal.SIGINT, lambda *_: None)  # the terminal sends it to the command as well
    code = proc.wait()
    if relay is not None:
        relay.kill()
    return code if code >= 0 else 128 - code


def main() -> None:
    for key, value in TF_ENV.items():
        os.environ.setdefault(key, value)
    argv = sys.argv[1:]
    command = argv[argv.index("--") + 1:] if "--" in argv else []
    plan = json.loads(argv[0])
    label, cluster, task, maps = plan["label"], plan["cluster"], plan.get("task"), plan.get("maps", [])
    if command:
        sys.exit(run_chief(label, cluster, task, maps, command))
    if task is not None:
        serve(label, cluster, str(task["type"]), int(task["index"]), maps)
    relay = start_relays(label, maps)
    print(f"relaying {len(maps)} socket(s)", flush=True)
    wait_for_stop()
    if relay is not None:
        relay.kill()


if __name__ == "__main__":
    main()
