"""The ``ipdc`` command line.

Errors from the IPDC hierarchy print as one clear message (plus a remote
traceback where there is one) and a non-zero exit; progress and tables go to
stderr through rich, results to stdout, so ``--json`` output pipes cleanly.

Imports are late: each command loads what it uses, so ``ipdc --help`` loads click
alone and ``ipdc mr`` only what talks to the node's controller service (the
service holds the broker and kubo connections). ``Node`` and ``SwarmClient`` below
are stand-ins that import their class on first call.
"""

from __future__ import annotations

import sys

# The CLI never uses trio, but httpcore imports it whenever it is installed (70-100 ms on
# every command). The runner does not do this: user code may want trio.
sys.modules.setdefault("trio", None)  # type: ignore[arg-type]

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ipdc import __version__, ipdc_home
from ipdc.errors import ControlError, IPDCError, JobCancelled, JobError, NodeError, TokenError

if TYPE_CHECKING:
    import json

    from rich.console import Console

    from ipdc.config import Config
    from ipdc.control.history import History
    from ipdc.ctlsock import ControlClient as ControlClientT
    from ipdc.node.lifecycle import Node as NodeT
    from ipdc.submit.client import SwarmClient as SwarmClientT
    from ipdc.trust import Signer



class _LazyModule:
    """A standard module imported on first use: ``json`` alone is several ms that
    ``ipdc --help`` does not need."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        import importlib

        return getattr(importlib.import_module(self._name), attr)


if not TYPE_CHECKING:
    json = _LazyModule("json")


class _LazyConsole:
    """A rich Console made on first use: rich costs tens of milliseconds to import, and
    ``ipdc --help`` or a detached ``ipdc mr`` print nothing through it."""

    def __init__(self, make: Callable[[], Console]) -> None:
        self._make = make
        self._console: Console | None = None

    def __getattr__(self, name: str) -> Any:
        if self._console is None:
            self._console = self._make()
        return getattr(self._console, name)


def _stderr_console() -> Console:
    from rich.console import Console

    return Console(stderr=True, soft_wrap=True, emoji=False)  # ":AB:" in a fingerprint is not an emoji


def _stdout_console() -> Console:
    """Tables go to stdout; in a pipe, print them whole rather than cut at 80 columns."""
    from rich.console import Console

    return Console(emoji=False) if Console().is_terminal else Console(width=1000, emoji=False)


err: Console = _LazyConsole(_stderr_console)  # type: ignore[assignment]
out: Console = _LazyConsole(_stdout_console)  # type: ignore[assignment]


def Node(home: Path | None = None) -> NodeT:
    from ipdc.node.lifecycle import Node as _Node

    return _Node(home)


def ControlClient(home: Path, timeout: float | None = 30.0) -> ControlClientT:
    from ipdc.ctlsock import ControlClient as _ControlClient

    return _ControlClient(home, timeout)


def SwarmClient(config: Config, signer: Signer | None = None) -> SwarmClientT:
    from ipdc.submit.client import SwarmClient as _SwarmClient

    return _SwarmClient(config, signer)


def _table(*columns: str) -> Any:
    from rich.table import Table

    return Table(*columns)


class IPDCGroup(click.Group):
    """Turns IPDC errors into one message and an exit code, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except IPDCError as exc:
            from rich.markup import escape

            err.print("[bold red]error:[/]", escape(str(exc)), highlight=False)
            sys.exit(exc.exit_code)


@click.group(cls=IPDCGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ipdc")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def main(verbose: int) -> None:
    """IPDC: MapReduce and TensorFlow on a private IPFS swarm.

    Every node runs kubo, an agent, and reaches one mosquitto broker. Set up a node
    with `python deploy.py init` (or `ipdc node init`), start it with
    `python deploy.py start`, and submit jobs from any node. The node is the one in
    $IPDC_HOME (default ~/.ipdc).
    """
    import logging

    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(max(level, logging.WARNING))


# -- node ------------------------------------------------------------------------------
@main.group()
def node() -> None:
    """Create, start, stop and inspect this machine's node ($IPDC_HOME)."""


@node.command("init")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address the node binds and advertises; use the LAN address to serve other machines.")
@click.option("--join", "join_stdin", metavar="-",
              help="Join an existing swarm, reading the invite token from stdin (`--join -`).")
@click.option("--join-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Join an existing swarm with the invite token in this file (from `ipdc invite -o FILE`).")
@click.option("--slots", type=click.IntRange(min=0), default=0,
              help="Tasks run at once (default, 0: one per core).")
@click.option("--small", is_flag=True,
              help="A node for a board with little memory (a 128 MB Raspberry Pi): kubo's lowpower profile "
                   "and a 64 MB soft limit, one slot, no warm spare runner. Automatic below 1 GB of memory.")
def node_init(host: str, join_stdin: str | None, join_file: Path | None, slots: int, small: bool) -> None:
    """Install what is missing (mosquitto, kubo) and create the node.

    Without --join/--join-file this founds a new private swarm: a fresh swarm key, the
    swarm's certificate authority, and a broker hosted by this node. Running it again
    changes nothing.
    """
    from ipdc.node.invite import Invite

    if join_stdin is not None and join_stdin != "-":
        raise TokenError("--join takes no token on the command line: there every user of this machine can "
                         "read it (ps, /proc/<pid>/cmdline) and it stays in your shell history. Use "
                         "--join-file FILE (written by `ipdc invite -o FILE`), or --join - to read it from "
                         "stdin." + (" If other people use this machine, ask for a new token: this one may "
                                     "have been seen." if join_stdin.startswith("ipdc") else ""))
    token = join_file.read_text() if join_file is not None else sys.stdin.read() if join_stdin else None
    invite = Invite.decode(token) if token is not None else None
    node = Node()
    click.echo(node.init(host=host, join=invite, slots=slots, small=small))
    if invite is not None:
        err.print(f"pinned the swarm's CA {_ca_fingerprint(invite.ca)} (compare it with the one "
                  "`ipdc invite` printed)", highlight=False)
        err.print(f"this node runs jobs signed by {len(node.trust.keys())} key(s) it was given. For other "
                  "nodes to run jobs submitted here, run on each of them:\n"
                  f"  ipdc trust add {node.signer.public_key}", highlight=False)


@node.command("start")
@click.option("--timeout", default=60.0, show_default=True, help="Seconds to wait for each service.")
def node_start(timeout: float) -> None:
    """Start kubo, the broker (on the broker host) and the agent, in the background."""
    with err.status("starting the node..."):
        rows = Node().start(timeout)
    _print_status(rows)


@node.command("stop")
def node_stop() -> None:
    """Stop what start started: SIGTERM, then SIGKILL after a timeout."""
    stopped = Node().stop()
    click.echo(f"stopped {', '.join(stopped)}" if stopped else "nothing was running")


@node.command("status")
def node_status() -> None:
    """Show the node's services and their pids."""
    _print_status(Node().status())


main.add_command(node_status, "status")


@node.command("delegate-cgroups")
@click.option("--user", required=True, help="The user the node's agent runs as.")
@click.option("--remove", is_flag=True, help="Undo it (and remove any group left below).")
@click.option("--max-pids", type=int, default=0, help="Cap on processes of all that user's sandboxes (0: none).")
@click.option("--memory-mb", type=int, default=0, help="Cap on their memory (0: none).")
@click.option("--cpu-percent", type=int, default=0, help="Cap on their CPU, in % of one core (0: none).")
def node_delegate_cgroups(user: str, remove: bool, max_pids: int, memory_mb: int, cpu_percent: int) -> None:
    """As root, once per boot: let USER's agent limit its sandboxes with cgroups.

    An agent that is not root cannot create cgroups; without them its sandboxes get no
    memory or CPU limit, and only RLIMIT_NPROC against fork bombs. This gives USER a
    subtree in the pids, memory and cpu hierarchies (cgroup v1) that its agent finds at
    start; the caps on the subtree itself stay root's. Run it from the unit that starts
    the node (e.g. systemd's ExecStartPre=+).
    """
    from ipdc.isolation.cgroups import delegate, undelegate

    if os.geteuid() != 0:
        raise NodeError("delegate-cgroups writes to /sys/fs/cgroup: run it as root "
                        f"(sudo ipdc node delegate-cgroups --user {user})")
    try:
        paths = undelegate(user) if remove else delegate(user, max_pids, memory_mb, cpu_percent)
    except KeyError:
        raise NodeError(f"there is no user {user!r} on this machine") from None
    except OSError as exc:
        raise NodeError(f"cannot delegate cgroups to {user}: {exc}") from None
    verb = "removed" if remove else f"delegated to {user}"
    click.echo(f"{verb}: {', '.join(map(str, paths)) or 'nothing'}")


def _print_status(rows: list[Any]) -> None:
    table = _table("service", "state", "pid", "address")
    for row in rows:
        style = "green" if row.pid else "red"
        table.add_row(row.name, f"[{style}]{row.state}[/]", str(row.pid or "-"), row.address)
    out.print(table)


@main.command()
@click.option("--ttl", default="24h", show_default=True,
              help="How long the token can be used: 90s, 30m, 24h, 7d (it admits one node, once).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the token to this new file (mode 0600) instead of printing it.")
def invite(ttl: str, output: Path | None) -> None:
    """Make an invite token for one new node: `python deploy.py init --join-file FILE`.

    The token admits one node, once, until it expires. It holds no long-term secret
    (the new node gets the swarm key from this node's agent when it joins), but
    until it is used it is a credential: keep it out of other users' reach. Run this
    on the node that hosts the broker.
    """
    from ipdc.node import membership

    node = Node()
    token = membership.invite(node, membership.parse_duration(ttl))
    if node.config.node.host.startswith("127."):
        err.print("[yellow]note:[/] this node listens on 127.0.0.1 only, so the token works on "
                  "this machine; re-init with --host <LAN address> to invite other machines")
    if output is None:
        click.echo(token.encode())
    else:
        try:
            from ipdc.private import write_private

            write_private(output, token.encode() + "\n")
        except FileExistsError:
            raise NodeError(f"{output} exists: choose another file name (a token is written to a new file "
                            "only, so no one else can have opened it)") from None
        err.print(f"wrote an invite for one node to {output}")
    err.print(f"valid until {token.expires():%Y-%m-%d %H:%M} UTC; swarm CA {_ca_fingerprint(token.ca)}",
              highlight=False)


def _ca_fingerprint(pem: str) -> str:
    """The SHA-256 fingerprint of the swarm's CA: the joining node pins it, and a user can
    compare it on both machines (a token changed on the way would show another)."""
    from ipdc import pki  # cryptography: only when a node is made or invited

    return pki.fingerprint(pki.load_cert(pem))


@node.command("remove")
@click.argument("name")
def node_remove(name: str) -> None:
    """Remove node NAME from the swarm (run on the broker host).

    Its broker identity is revoked at once (its connections close), and every node
    stops trusting its submitter key. Run `ipdc swarm rotate-key` afterwards so its
    kubo can no longer reach any member.
    """
    from ipdc.node import membership

    member = membership.remove(Node(), name)
    click.echo(f"removed {member.name}: its broker identity is revoked and every node drops its "
               "submitter key")
    err.print("next: `ipdc swarm rotate-key`, so that it can no longer reach the members' kubo either")


@main.group()
def swarm() -> None:
    """Swarm-wide operations of the founding node."""


@swarm.command("rotate-key")
@click.option("--timeout", default=120.0, show_default=True,
              help="Seconds to wait for every live member to switch.")
def swarm_rotate_key(timeout: float) -> None:
    """Give every member a new kubo swarm key (run on the broker host).

    Each member's agent receives the key (signed by this node, for that member only),
    writes kubo/swarm.key and restarts its kubo. A removed node keeps the old key and
    can no longer connect to any member.
    """
    from ipdc.node import membership

    with err.status("sending the new swarm key and waiting for the members to restart kubo..."):
        done = membership.rotate_swarm_key(Node(), timeout)
    click.echo(f"rotated the swarm key (fingerprint {done.fingerprint}): {len(done.switched)} live member(s) "
               f"switched in {done.seconds:.2f} s")
    if done.offline:
        click.echo(f"not live now, they switch when they come back: {', '.join(done.offline)}")
    if done.pending:
        raise NodeError(f"these members did not confirm within {timeout:.0f} s: {', '.join(done.pending)}; "
                        "check their agent.log (they keep the key and apply it when they can)")


# -- peers -----------------------------------------------------------------------------
@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def peers(as_json: bool) -> None:
    """List the live peers of the swarm, as their agents announce themselves."""
    try:  # the node's controller service follows them already
        rows: list[dict[str, Any]] = ControlClient(ipdc_home()).call("peers")["peers"]
    except ControlError:  # it is not running: ask the broker
        from ipdc.peers import peer_rows

        with SwarmClient(Node().config).connect() as client:
            rows = peer_rows(client.peers.live())
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = _table("node", "peer ID", "address", "cores", "free MB", "TF", "slots", "running", "load",
                   "seen (s ago)")
    for r in rows:  # running: tasks in its runners now, MapReduce and Python API alike
        table.add_row(r["name"], r["peer_id"], r["host"], str(r["cores"]), str(r["mem_free_mb"]),
                      "yes" if r["tf"] else "no", str(r["slots"]), str(r["running"]), f"{r['load']:.2f}",
                      f"{r['last_seen_s']:.1f}")
    out.print(table)
    err.print(f"{len(rows)} live peer(s)")


# -- trust -----------------------------------------------------------------------------
@main.group()
def trust() -> None:
    """Whose jobs this node runs: Ed25519 submitter keys.

    An agent runs a job only if its manifest is signed by a key in this node's
    trusted list. A node trusts its own key, and a node that joined with an invite
    also trusts the keys the invite carried (the inviting node's and those it trusts).
    """


@trust.command("key")
def trust_key() -> None:
    """Print this node's own submitter key, for `ipdc trust add` on other nodes."""
    click.echo(Node().signer.public_key)


@trust.command("add")
@click.argument("key")
@click.option("--note", default="", help="Whose key this is, kept beside it.")
def trust_add(key: str, note: str) -> None:
    """Run jobs signed by KEY (as printed by `ipdc trust key` on the submitting node)."""
    added = Node().trust.add(key.strip(), note)
    click.echo("trusted" if added else "already trusted")


@trust.command("remove")
@click.argument("key")
def trust_remove(key: str) -> None:
    """Stop running jobs signed by KEY."""
    click.echo("removed" if Node().trust.remove(key.strip()) else "was not trusted")


@trust.command("list")
def trust_list() -> None:
    """The trusted submitter keys and their notes."""
    for key, note in Node().trust.keys().items():
        click.echo(f"{key} {note}".rstrip())


# -- mapreduce -------------------------------------------------------------------------
@contextmanager
def swarm_for(k: int | None, quiet: bool, spec: dict[str, Any]) -> Iterator[Path]:
    """The home of the node whose controller service runs the job: this node's when it
    runs, else the first node of a temporary local cluster of K nodes.

    Before a temporary cluster is started, the job ``spec`` gets the check a node's service
    gives it, here: a mistake the user can fix at once (a missing input, ``--k 0``) fails in
    a second, not after the cluster's start, and ``--k -1`` never reaches the cluster."""
    home = ipdc_home()
    try:
        ControlClient(home, timeout=5).call("ping")
    except ControlError:
        pass
    else:
        yield home
        return
    from ipdc.control.jobrun import job_of
    from ipdc.submit.mapreduce import check_job_files

    check_job_files(job_of(spec, spec["output"]))
    n = k or 2
    if not quiet:
        err.print(f"[yellow]no IPDC node is running for {home}: starting a temporary local "
                  f"cluster of {n} nodes (mosquitto, kubo and an agent each) for this job[/]")
    from ipdc.node.cluster import (
        LocalCluster,  # only for the embedded default: 50 ms of imports
    )

    with LocalCluster(n) as cluster:
        yield cluster.nodes[0].home
    if not quiet:
        err.print("[yellow]the temporary cluster was stopped and removed[/]")


@main.command()
@click.argument("input_ref", metavar="INPUT")
@click.option("--k", type=int, default=None,
              help="Workers (= reducers = output parts). Default: every live peer.")
@click.option("--map", "map_file", type=click.Path(path_type=Path), default=None,
              show_default="the shipped WordCount Map.py",
              help="File defining map(line) or map(line, path) [and combine].")
@click.option("--reduce", "reduce_file", type=click.Path(path_type=Path), default=None,
              show_default="the shipped WordCount Reduce.py", help="File defining reduce(key, values).")
@click.option("--mapper", metavar="CMD", help="Streaming mapper instead of --map: a command (split like a shell "
              "line, never run by one) reading input lines on stdin, writing key<TAB>value lines.")
@click.option("--reducer", metavar="CMD", help="Streaming reducer instead of --reduce: reads its partition's "
              "key<TAB>value lines sorted by key on stdin; what it writes is the part file.")
@click.option("--combiner", metavar="CMD", help="Streaming combiner (with --mapper): runs on each map task's "
              "output sorted by key, writing key<TAB>value lines.")
@click.option("--file", "files", multiple=True, type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="Ship this file with the job into the tasks' working directory (repeatable). A CMD whose "
                   "program has this file's name runs it; otherwise CMD's program comes from the worker's PATH.")
@click.option("-o", "--output", type=click.Path(path_type=Path),
              help="Output directory (default ./ipdc-out/<job-id>); must not hold files.")
@click.option("--chunks", type=int, default=None, help="Map tasks (default: from input size and K).")
@click.option("--max-attempts", type=int, default=3, show_default=True,
              help="Tries per task, counting failures and lost workers, before the job fails.")
@click.option("--verify", type=int, default=1, show_default=True, metavar="N",
              help="Run every map and reduce task on N distinct peers and accept an output only when "
                   "their CIDs agree; on disagreement the job fails and names the peers.")
@click.option("--verify-majority", is_flag=True,
              help="With --verify N: take the output most replicas agree on instead of failing.")
@click.option("-d", "--detach", is_flag=True,
              help="Print the job id and return at once; the node's controller service runs the job "
                   "(see `ipdc jobs`, `ipdc job status ID`).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or notes.")
@click.option("--json", "as_json", is_flag=True, help="Print the job summary as JSON.")
@click.option("--print-cid", is_flag=True,
              help="Print only the result CID, to chain jobs: ipdc mr B.py $(ipdc mr --print-cid ...).")
@click.option("--no-cache", is_flag=True,
              help="Run the job even when the swarm has the result of an identical one.")
def mr(input_ref: str, k: int | None, map_file: Path | None, reduce_file: Path | None, mapper: str | None,
       reducer: str | None, combiner: str | None, files: tuple[Path, ...], output: Path | None,
       chunks: int | None, max_attempts: int, verify: int, verify_majority: bool, detach: bool, quiet: bool,
       as_json: bool, print_cid: bool, no_cache: bool) -> None:
    """Run a MapReduce job over INPUT on K peers of the swarm.

    INPUT is a local file; a local directory (every file in it, hidden ones left out);
    a CID of a file or directory the swarm holds; or /ipfs/CID/path inside one. An
    input given by CID is read from the swarm, never uploaded again. A directory that
    holds part-00000 (a job's output, or its result CID) is read as its part-* files
    only, so jobs chain with --print-cid. A map(line, path) gets each line's file path
    inside INPUT as its second argument.

    When a swarm member has already run the same job (the same code, input CID, K,
    --chunks and --verify), its signed result is used at once (cached: true in the
    summary), after checking the signer is trusted and the result still retrievable;
    --no-cache runs it anyway.

    The job is your Map.py and Reduce.py (WordCount by default). Input is UTF-8;
    bytes that are not valid UTF-8 reach map() as surrogate escapes and are written
    back out as the same bytes. The result is OUTPUT/part-00000 ... part-<K-1>,
    "key<TAB>value" lines sorted by key, plus job.json and _SUCCESS.

    A worker lost mid-job (crash, sleep, network) has its tasks rerun on the next
    XOR-nearest live peer; a task is tried --max-attempts times in all. With
    --verify N every task runs on N peers whose outputs must agree (by CID).

    Hadoop Streaming: --mapper, --reducer and --combiner take a command instead of
    a Python file, e.g. --mapper 'cut -f 2' or --mapper ./mymap --file mymap. The
    mapper gets the raw input bytes on stdin; each line it writes is split at its first TAB into key and
    value. The reducer gets its partition's lines sorted by key (bytewise) and its
    stdout becomes the part file. A program named like a --file runs that file
    (a script needs a #! line); any other comes from the worker's PATH, inside its
    sandbox. A command stage mixes with a Python one; with --mapper, give --reducer
    or --reduce (a Python reducer gets the values as strings).

    The job runs in this node's controller service, so it outlives this command:
    Ctrl-C asks whether to cancel it (no: it goes on, detached). With no running
    node for $IPDC_HOME, a temporary local cluster is started for the job and
    removed afterwards.
    """
    from ipdc.jobs import shipped
    from ipdc.submit.inputs import input_text, parse_input

    if (mapper is not None and map_file is not None) or (reducer is not None and reduce_file is not None):
        raise click.UsageError("--mapper/--map (and --reducer/--reduce) both name one stage: give one of them")
    if mapper is not None and reducer is None and reduce_file is None:
        raise click.UsageError("a --mapper job needs --reducer CMD, or --reduce FILE for a Python reducer "
                               "(which gets the values as strings)")
    map_file = map_file or shipped("mapreduce", "Map.py")
    reduce_file = reduce_file or shipped("mapreduce", "Reduce.py")
    spec = {"input": input_text(parse_input(input_ref)), "k": k, "cache": not no_cache,
            "map_file": str(map_file.absolute()),
            "reduce_file": str(reduce_file.absolute()), "output": str(output.absolute()) if output else None,
            "chunks": chunks, "max_attempts": max_attempts, "verify": verify,
            "verify_majority": verify_majority, "mapper": mapper, "reducer": reducer, "combiner": combiner,
            "files": [str(f.absolute()) for f in files]}
    if detach:
        client = ControlClient(ipdc_home())
        try:
            client.call("ping")
        except ControlError as exc:
            raise ControlError(f"--detach hands the job to this node's controller service, and {exc}") \
                from None
        reply = client.call("submit", job=spec, cwd=os.getcwd())
        queued = {"job_id": reply["job_id"], "state": "queued", "output": reply["output"]}
        click.echo(json.dumps(queued, indent=2) if as_json else reply["job_id"])
        return
    show = not quiet and not as_json and not print_cid and err.is_terminal
    with swarm_for(k, quiet or as_json or print_cid, spec) as home:
        client = ControlClient(home, timeout=None)
        job_id = client.call("submit", job=spec, cwd=os.getcwd())["job_id"]
        try:
            with _progress(show) as progress:
                final = _follow(client, job_id, progress)
        except KeyboardInterrupt:
            final = _interrupted(client, job_id)
    if final["state"] != "succeeded":
        from ipdc.ctlsock import remote_error

        raise remote_error(final)
    if print_cid:
        click.echo(final["result"]["result_cid"])
    else:
        _print_result(final["result"], as_json)


def _follow(client: ControlClientT, job_id: str,
            progress: Callable[[str, float, float], None]) -> dict[str, Any]:
    """Show the job's progress until it ends; its last state."""
    final: dict[str, Any] = {}
    for final in client.stream("watch", job_id=job_id):
        for phase, (done, total) in final["progress"].items():
            progress(phase, done, total)
    return final


def _interrupted(client: ControlClientT, job_id: str) -> dict[str, Any]:
    """Ctrl-C on a running job: cancel it, or leave it running detached. Without a terminal
    to ask on, cancel: nobody would be left to follow the job."""
    keep = False
    if sys.stdin.isatty():
        try:
            keep = not click.confirm(f"\ncancel job {job_id}? (no: it keeps running, detached)", default=True,
                                     err=True)
        except click.Abort:
            keep = True
    if keep:
        err.print(f"job {job_id} keeps running; follow it with `ipdc job status {job_id}`", highlight=False)
        sys.exit(0)
    err.print(f"cancelling job {job_id}...", highlight=False)
    try:
        client.call("cancel", job_id=job_id)
    except KeyboardInterrupt:  # a second Ctrl-C stops only the wait: the service has the cancel
        raise JobCancelled(f"stopped waiting: the controller service goes on cancelling job {job_id} "
                           f"(`ipdc job status {job_id}` shows when it is)") from None
    raise JobCancelled(f"job {job_id} was cancelled")


@contextmanager
def _progress(show: bool) -> Iterator[Callable[[str, float, float], None]]:
    if not show:
        yield lambda phase, done, total: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bars = Progress(TextColumn("{task.description:>7}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=err, transient=True)
    ids: dict[str, Any] = {}

    def update(phase: str, done: float, total: float) -> None:
        if phase not in ids:
            ids[phase] = bars.add_task(phase, total=total)
        bars.update(ids[phase], completed=done, total=total)

    with bars:
        yield update


def _print_result(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(f"job {result['job_id']} succeeded in {result['timings']['total']:.2f}s"
               + (f" (cached: the result of job {result['cached_from']})" if result.get("cached") else ""))
    click.echo(f"output:  {result['output']}")
    click.echo(f"result:  {result['result_cid']}")
    click.echo(f"workers: {', '.join(w['name'] for w in result['workers']) or 'none (the result was cached)'}")


# -- jobs ------------------------------------------------------------------------------
def _history() -> History:
    from ipdc.control.history import DB_NAME, History

    return History(ipdc_home() / DB_NAME)


def _job_id(history: History, prefix: str) -> str:
    return history.resolve(prefix.strip().lower())


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def _duration(job: dict[str, Any]) -> float | None:
    if not job["started_at"]:
        return None
    return float((job["finished_at"] or time.time()) - job["started_at"])


def _progress_text(job: dict[str, Any]) -> str:
    if job["kind"] == "offload":  # a Python API decision: where it ran, and the estimates it chose from
        return "estimated " + ", ".join(f"{e['where']} {e['total']:.3g}s" for e in job["params"]["estimates"])
    progress = job["progress"]
    return "  ".join(f"{phase} {int(progress[phase][0])}/{int(progress[phase][1])}"
                     for phase in ("map", "reduce") if phase in progress) or "-"


STATE_STYLE = {"queued": "yellow", "running": "cyan", "succeeded": "green", "failed": "red",
               "cancelled": "magenta"}


@main.command("jobs")
@click.option("--all", "show_all", is_flag=True, help="Every job in the history, not only the 20 newest.")
@click.option("--state", type=click.Choice(["queued", "running", "succeeded", "failed", "cancelled"]),
              multiple=True, help="Only jobs in this state (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def jobs_list(show_all: bool, state: tuple[str, ...], as_json: bool) -> None:
    """The jobs submitted from this node, newest first: id, kind, state, progress,
    submitted, duration, workers. Read from the job history ($IPDC_HOME/ipdc.db), so it
    works whether or not the node runs."""
    rows = _history().jobs(states=state, limit=0 if show_all else 20)
    if as_json:
        click.echo(json.dumps([{k: v for k, v in r.items() if k != "plan"} for r in rows], indent=2))
        return
    table = _table("id", "kind", "state", "progress", "submitted", "duration", "workers")
    for r in rows:
        duration = _duration(r)
        table.add_row(r["id"][:12], r["kind"], f"[{STATE_STYLE[r['state']]}]{r['state']}[/]",
                      _progress_text(r),
                      _when(r["submitted_at"]), f"{duration:.1f}s" if duration is not None else "-",
                      ", ".join(str(w[0]) for w in r["workers"]) or "-")
    out.print(table)


@main.group()
def job() -> None:
    """One job of this node: `status`, `logs`, `cancel`, `get` (any node's job). ID may be
    the first digits of a job id, as `ipdc jobs` shows them."""


@job.command("status")
@click.argument("job_id", metavar="ID")
@click.option("--json", "as_json", is_flag=True, help="Print the job, its tasks and attempts as JSON.")
def job_status(job_id: str, as_json: bool) -> None:
    """Per-task states, attempts (peer, time, outcome) and reassignments of job ID."""
    history = _history()
    found = history.job(_job_id(history, job_id))
    assert found is not None
    if as_json:
        click.echo(json.dumps({k: v for k, v in found.items() if k != "plan"}, indent=2))
        return
    duration = _duration(found)
    click.echo(f"job {found['id']} ({found['kind']}): {found['state']}"
               + (f" after {duration:.1f}s" if duration is not None else ""))
    click.echo(f"submitted {_when(found['submitted_at'])} by node {found['node']}; "
               f"output {found['output_dir']}")
    if found["result_cid"]:
        click.echo(f"result:  {found['result_cid']}")
    if (found["summary"] or {}).get("cached"):
        click.echo(f"cached:  the result of job {found['summary']['cached_from']}; no task ran")
    if found["error"]:
        click.echo(f"error:   {found['error']}")
    table = _table("task", "state", "attempts (peer: outcome, seconds)", "output by")
    for kind in ("map", "reduce"):
        for t in found["tasks"][kind]:
            attempts = "; ".join(
                f"#{a['number']} {a['peer']}: {a['state']}"
                + (f" {a['ended'] - a['started']:.2f}s" if a["ended"] is not None else "")
                + (f" ({a['error']})" if a["error"] else "") for a in t["attempts"])
            table.add_row(f"{kind} {t['index']}", t["state"], attempts or "-", ", ".join(t["by"]) or "-")
    out.print(table)
    for r in found["reassigned"]:
        click.echo(f"reassigned {r['kind']} task {r['task']} from {r['from']} "
                   f"to {r['to'] or '(the remaining workers)'}")
    for peer, why in found["lost"].items():
        click.echo(f"lost worker {peer}: {why}")


def _print_logs(reply: dict[str, Any], shown: dict[str, int]) -> None:
    """Lines not shown yet, by source; ``shown`` counts what was printed of each."""
    sources = {"controller": reply["controller"], **reply["workers"]}
    for source, lines in sources.items():
        new = lines[shown.get(source, 0):]
        if new:
            click.echo(f"== {source} ==")
            for line in new:
                click.echo(line)
            shown[source] = len(lines)


@job.command("logs")
@click.argument("job_id", metavar="ID")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines until the job ends.")
@click.option("--json", "as_json", is_flag=True,
              help="Print JSON: each worker's lines, and who did not answer.")
def job_logs(job_id: str, follow: bool, as_json: bool) -> None:
    """Each worker's log lines of job ID, fetched from the workers by CID, and this node's
    controller lines of it."""
    full_id = _job_id(_history(), job_id)
    client = ControlClient(ipdc_home(), timeout=None)
    shown: dict[str, int] = {}
    while True:
        reply = client.call("logs", job_id=full_id)
        if as_json:
            click.echo(json.dumps({k: v for k, v in reply.items() if k not in ("ok", "end")}, indent=2))
            return
        _print_logs(reply, shown)
        if not follow or reply["state"] in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(2.0)
    if reply["missing"]:
        err.print(f"no answer from {', '.join(reply['missing'])} (asleep, gone, or restarted since)",
                  highlight=False)


@job.command("cancel")
@click.argument("job_id", metavar="ID")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def job_cancel(job_id: str, as_json: bool) -> None:
    """Cancel job ID: every peer that took part drops its runners, work dir and pins."""
    reply = ControlClient(ipdc_home(), timeout=None).call("cancel", job_id=_job_id(_history(), job_id))
    click.echo(json.dumps({"job_id": reply["job_id"], "state": reply["state"]}, indent=2) if as_json
               else f"job {reply['job_id']} {reply['state']}")


@job.command("get")
@click.argument("job_id", metavar="ID")
@click.option("-o", "--output", type=click.Path(path_type=Path),
              help="Directory to write (default ./ipdc-out/<job-id>); must not hold files.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def job_get(job_id: str, output: Path | None, as_json: bool) -> None:
    """Write the output directory of finished job ID from its result CID. Works on any node
    of the swarm: the job's signed result record is found on the broker, and accepted when
    a key this node trusts signed it. ID is the whole job id for another node's job."""
    from ipdc.wire.ids import JobId

    try:
        full_id = _job_id(_history(), job_id)
    except IPDCError as exc:
        full_id = job_id.strip().lower()
        if not JobId.pattern.fullmatch(full_id):  # the broker finds another node's job by its whole id only
            raise JobError(f"{exc}; a job of another node is named by its whole id (32 hex digits)") from None
    reply = ControlClient(ipdc_home(), timeout=None).call(
        "get", job_id=full_id, output=str(output.absolute()) if output else None, cwd=os.getcwd())
    if as_json:
        click.echo(json.dumps({k: v for k, v in reply.items() if k not in ("ok", "end")}, indent=2))
        return
    click.echo(f"job {reply['job_id']} (from node {reply['owner']}): wrote {reply['output']}")
    click.echo(f"result:  {reply['result_cid']}")


@main.command()
@click.option("--port", type=int, default=0, help="Port on 127.0.0.1 (default: a free one). Only the first "
              "call of a service's life chooses it.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def dashboard(port: int, as_json: bool) -> None:
    """Serve the live web dashboard from this node's controller service; print its URL.

    The URL carries a token, as Jupyter's does: only who has it (this node's user)
    can look. It listens on 127.0.0.1 only; from another machine, forward a port
    (ssh -L). It keeps running until the node stops.
    """
    url = ControlClient(ipdc_home()).call("dashboard", port=port)["url"]
    click.echo(json.dumps({"url": url}) if as_json else f"IPDC dashboard: {url}")


# -- tensorflow ------------------------------------------------------------------------
class TfGroup(IPDCGroup):
    """``ipdc tf SPEC`` is ``ipdc tf up SPEC``: a first argument that names no subcommand is a spec."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = ["up", *args]
        return super().parse_args(ctx, args)


def _running_node() -> NodeT:
    """A TF cluster outlives the command that starts it, so it needs this machine's node."""
    node = Node()
    if not (node.initialised and node.running()):
        raise NodeError(f"no IPDC node is running for {node.home}; a TF cluster outlives this "
                        "command, so start the node first: `python deploy.py start` "
                        "(after `python deploy.py init --with-tf`)")
    return node


@main.group(cls=TfGroup)
def tf() -> None:
    """Distributed TensorFlow on the swarm: `ipdc tf SPEC`, `ipdc tf run NAME -- CMD`, `ipdc tf down NAME`."""


@tf.command("up")
@click.argument("spec_file", metavar="SPEC", type=click.Path(path_type=Path))
@click.option("--name", help="Cluster name (default tf-<random>); also the key that places tasks on peers.")
@click.option("--json", "as_json", is_flag=True, help="Print the cluster as JSON for scripts.")
def tf_up(spec_file: Path, name: str | None, as_json: bool) -> None:
    """Start a TF server per task of SPEC ({"chief": [0], "worker": [0, 1], "ps": [0]}, YAML or JSON).

    Each server task goes to a TF-capable peer near the cluster name by XOR distance,
    in a loopback-only sandbox reachable only over the private swarm; the chief is your
    script, run here with `ipdc tf run NAME -- python script.py`.
    """
    from ipdc.submit.tf import TfController, load_spec

    spec = load_spec(spec_file)
    node = _running_node()
    with SwarmClient(node.config, node.signer).connect() as client, \
            err.status(f"starting {sum(map(len, spec.values()))} TF task(s)..."):
        cluster = TfController(client, node.home).up(spec, name)
    if as_json:
        click.echo(json.dumps(cluster.to_dict(), indent=2))
        return
    table = _table("task", "address (in its sandbox)", "peer", "runs")
    for t in cluster.to_dict()["tasks"]:
        table.add_row(f"/job:{t['job']}/task:{t['index']}", t["address"], t["peer"],
                      "tf server" if t["server"] else "your script (ipdc tf run)")
    click.echo(f"TF cluster {cluster.name} is up")
    out.print(table)
    click.echo(f"run your script as the chief:\n  {cluster.command()}")
    click.echo(f"stop it with: ipdc tf down {cluster.name}")


@tf.command("run", context_settings={"ignore_unknown_options": True})
@click.argument("name")
@click.argument("command", nargs=-1, type=click.UNPROCESSED, required=True)
def tf_run(name: str, command: tuple[str, ...]) -> None:
    """Run COMMAND as the chief of cluster NAME: `ipdc tf run NAME -- python script.py`.

    It runs in a network namespace with loopback only, with TF_CONFIG set and every
    server reachable at its ClusterSpec address; the exit code is COMMAND's.
    """
    from ipdc.submit.tf import load_cluster, run_chief

    node = _running_node()
    sys.exit(run_chief(load_cluster(node.home, name), list(command), node.config.node.name,
                       node.config.tf.trusted_network))


@tf.command("down")
@click.argument("name")
def tf_down(name: str) -> None:
    """Remove cluster NAME from every host: its servers, relays, p2p listeners, forwards and sockets."""
    node = _running_node()
    from ipdc.submit.tf import TfController

    with SwarmClient(node.config, node.signer).connect() as client:
        cluster = TfController(client, node.home).down(name)
    click.echo(f"stopped TF cluster {cluster.name} ({len(cluster.servers)} server(s); hosts "
               f"{', '.join(cluster.peers)})")


@tf.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def tf_list(as_json: bool) -> None:
    """The TF clusters started from this node, and whether every server answers through the swarm."""
    from ipdc.submit.tf import list_clusters, unanswered

    rows = [{**c.to_dict(), "up": not unanswered(c)} for c in list_clusters(Node().home)]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = _table("name", "state", "tasks", "peers")
    for r in rows:
        table.add_row(r["name"], "[green]up[/]" if r["up"] else "[red]down[/]",
                      ", ".join(f"{t['job']}:{t['index']}" for t in r["tasks"]),
                      ", ".join(sorted({t["peer"] for t in r["tasks"]})))
    out.print(table)


if __name__ == "__main__":
    main()
