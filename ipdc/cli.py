"""The ``ipdc`` command line.

Errors from the IPDC hierarchy print as one clear message (plus a remote
traceback where there is one) and a non-zero exit; progress and tables go to
stderr through rich, results to stdout, so ``--json`` output pipes cleanly.
"""

from __future__ import annotations

import sys

# The CLI never uses trio, but httpcore imports it whenever it is installed (70-100 ms on
# every command). The runner does not do this: user code may want trio.
sys.modules.setdefault("trio", None)  # type: ignore[arg-type]

import json
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from ipdc import __version__
from ipdc.errors import IPDCError, NodeError
from ipdc.node.invite import Invite
from ipdc.node.lifecycle import Node
from ipdc.submit.client import SwarmClient
from ipdc.submit.mapreduce import (
    JOBS_DIR,
    JobResult,
    MapReduceController,
    MapReduceJob,
    check_job_files,
)

err = Console(stderr=True, soft_wrap=True)
#: Tables go to stdout; in a pipe, print them whole rather than cut at 80 columns.
out = Console() if Console().is_terminal else Console(width=1000)
F = TypeVar("F", bound=Callable[..., Any])


class IPDCGroup(click.Group):
    """Turns IPDC errors into one message and an exit code, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except IPDCError as exc:
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
@click.option("--join", "token", metavar="TOKEN", help="Join an existing swarm (token from `ipdc invite`).")
@click.option("--join-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Read the invite token from a file.")
@click.option("--slots", type=int, default=0, help="Tasks run at once (default: one per core).")
def node_init(host: str, token: str | None, join_file: Path | None, slots: int) -> None:
    """Install what is missing (mosquitto, kubo) and create the node.

    Without --join this founds a new private swarm: a fresh swarm key, and a broker
    hosted by this node. Running it again changes nothing.
    """
    if join_file is not None:
        token = join_file.read_text()
    invite = Invite.decode(token) if token else None
    node = Node()
    click.echo(node.init(host=host, join=invite, slots=slots))
    if invite is not None:
        err.print(f"this node runs jobs signed by {len(invite.trusted)} key(s) from the invite. For other "
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
    table = Table("service", "state", "pid", "address")
    for row in rows:
        style = "green" if row.pid else "red"
        table.add_row(row.name, f"[{style}]{row.state}[/]", str(row.pid or "-"), row.address)
    out.print(table)


@main.command()
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the token to this file (mode 0600) instead of printing it.")
def invite(output: Path | None) -> None:
    """Print an invite token for one new node: `python deploy.py init --join TOKEN`.

    The token holds the swarm key and fresh broker credentials: treat it like a
    password. Run this on the node that hosts the broker.
    """
    node = Node()
    token = node.invite()
    if node.config.node.host.startswith("127."):
        err.print("[yellow]note:[/] this node listens on 127.0.0.1 only, so the token works on "
                  "this machine; re-init with --host <LAN address> to invite other machines")
    if output is None:
        click.echo(token)
    else:
        output.write_text(token + "\n")
        output.chmod(0o600)
        err.print(f"wrote the invite token to {output}")


# -- peers -----------------------------------------------------------------------------
@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def peers(as_json: bool) -> None:
    """List the live peers of the swarm, as their agents announce themselves."""
    with SwarmClient(Node().config).connect() as client:
        live = sorted(client.peers.live(), key=lambda p: p.name)
    rows = [{
        "name": p.name, "peer_id": p.peer_id, "host": p.presence.host, "addrs": p.presence.addrs,
        "cores": p.presence.caps.cores, "mem_free_mb": p.presence.caps.mem_free_mb,
        "tf": p.presence.caps.tf, "slots": p.presence.slots, "load": round(p.load, 2),
        "last_seen_s": round(p.age(), 1),
    } for p in live]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table("node", "peer ID", "address", "cores", "free MB", "TF", "slots", "load", "seen (s ago)")
    for r in rows:
        table.add_row(r["name"], r["peer_id"], r["host"], str(r["cores"]), str(r["mem_free_mb"]),
                      "yes" if r["tf"] else "no", str(r["slots"]), f"{r['load']:.2f}",
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
def swarm_for(k: int | None, quiet: bool) -> Iterator[Node]:
    """This node's swarm if it runs; else a temporary local cluster of K nodes."""
    node = Node()
    if node.initialised and node.running():
        yield node
        return
    n = k or 2
    if not quiet:
        err.print(f"[yellow]no IPDC node is running for {node.home}: starting a temporary local "
                  f"cluster of {n} nodes (mosquitto, kubo and an agent each) for this job[/]")
    from ipdc.node.cluster import (
        LocalCluster,  # only for the embedded default: 50 ms of imports
    )

    with LocalCluster(n) as cluster:
        yield cluster.nodes[0]
    if not quiet:
        err.print("[yellow]the temporary cluster was stopped and removed[/]")


@main.command()
@click.argument("input_file", metavar="INPUT", type=click.Path(path_type=Path))
@click.option("--k", type=int, default=None,
              help="Workers (= reducers = output parts). Default: every live peer.")
@click.option("--map", "map_file", type=click.Path(path_type=Path), default=JOBS_DIR / "Map.py",
              show_default="the shipped WordCount Map.py", help="File defining map(line) [and combine].")
@click.option("--reduce", "reduce_file", type=click.Path(path_type=Path), default=JOBS_DIR / "Reduce.py",
              show_default="the shipped WordCount Reduce.py", help="File defining reduce(key, values).")
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
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or notes.")
@click.option("--json", "as_json", is_flag=True, help="Print the job summary as JSON.")
def mr(input_file: Path, k: int | None, map_file: Path, reduce_file: Path, output: Path | None,
       chunks: int | None, max_attempts: int, verify: int, verify_majority: bool, quiet: bool,
       as_json: bool) -> None:
    """Run a MapReduce job over INPUT on K peers of the swarm.

    The job is your Map.py and Reduce.py (WordCount by default). Input is UTF-8;
    bytes that are not valid UTF-8 reach map() as surrogate escapes and are written
    back out as the same bytes. The result is OUTPUT/part-00000 ... part-<K-1>,
    "key<TAB>value" lines sorted by key, plus job.json and _SUCCESS.

    A worker lost mid-job (crash, sleep, network) has its tasks rerun on the next
    XOR-nearest live peer; a task is tried --max-attempts times in all. With
    --verify N every task runs on N peers whose outputs must agree (by CID).

    With no running node for $IPDC_HOME, a temporary local cluster is started for
    the job and removed afterwards.
    """
    job = MapReduceJob(input=input_file, k=k, map_file=map_file, reduce_file=reduce_file,
                       output=output, chunks=chunks, max_attempts=max_attempts, verify=verify,
                       verify_majority=verify_majority)
    check_job_files(job)
    show = not quiet and not as_json and err.is_terminal
    with swarm_for(k, quiet or as_json) as node, SwarmClient(node.config, node.signer).connect() as client, \
            node.kubo() as kubo, _progress(show) as progress:
        result = MapReduceController(client, kubo, job, node.home, progress).run()
    _print_result(result, as_json)


@contextmanager
def _progress(show: bool) -> Iterator[Callable[[str, float, float], None]]:
    if not show:
        yield lambda phase, done, total: None
        return
    bars = Progress(TextColumn("{task.description:>7}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=err, transient=True)
    ids: dict[str, Any] = {}

    def update(phase: str, done: float, total: float) -> None:
        if phase not in ids:
            ids[phase] = bars.add_task(phase, total=total)
        bars.update(ids[phase], completed=done, total=total)

    with bars:
        yield update


def _print_result(result: JobResult, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
        return
    click.echo(f"job {result.job_id} succeeded in {result.timings['total']:.2f}s")
    click.echo(f"output:  {result.output}")
    click.echo(f"result:  {result.result_cid}")
    click.echo(f"workers: {', '.join(w['name'] for w in result.workers)}")


# -- tensorflow ------------------------------------------------------------------------
class TfGroup(IPDCGroup):
    """``ipdc tf SPEC`` is ``ipdc tf up SPEC``: a first argument that names no subcommand is a spec."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = ["up", *args]
        return super().parse_args(ctx, args)


def _running_node() -> Node:
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
    table = Table("task", "address (in its sandbox)", "peer", "runs")
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
    table = Table("name", "state", "tasks", "peers")
    for r in rows:
        table.add_row(r["name"], "[green]up[/]" if r["up"] else "[red]down[/]",
                      ", ".join(f"{t['job']}:{t['index']}" for t in r["tasks"]),
                      ", ".join(sorted({t["peer"] for t in r["tasks"]})))
    out.print(table)


if __name__ == "__main__":
    main()
