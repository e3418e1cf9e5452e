"""What the controller service asks of the swarm for a job: its workers' log lines,
and its signed result record (published here, found from any node).

See :mod:`ipdc.wire.logs` and :mod:`ipdc.wire.record` for the channels, and why a
record is retained, kept under its owner's result topic, and signed.
"""

from __future__ import annotations

import logging
import queue
import shutil
import time
from pathlib import Path
from typing import Any

from ipdc.errors import IPDCError, JobError, MessageError
from ipdc.kubo import KuboClient
from ipdc.submit.client import SwarmClient
from ipdc.trust import Signer, TrustStore, verify
from ipdc.wire.ids import Cid, JobId, NodeName
from ipdc.wire.logs import LOGS, LOGS_REPLY, Logs
from ipdc.wire.record import RECORD, SWARM, JobRecord

log = logging.getLogger(__name__)

#: A worker's log text larger than this is cut (to its last bytes) when fetched.
MAX_LOG_BYTES = 4 << 20


def publish_record(client: SwarmClient, signer: Signer, job_id: str, result_cid: str, parts: int,
                   submitted_at: float) -> None:
    record = JobRecord(JobId(job_id), NodeName(client.name), "mapreduce", Cid(result_cid), parts,
                       submitted_at, time.time())
    signed = signer.sign(record, RECORD.name, SWARM)
    client.bus.publish(RECORD.topic(node=client.name, job=job_id), RECORD.encode(signed), retain=True)


def find_record(client: SwarmClient, trust: TrustStore, job_id: str) -> JobRecord:
    """The result record of ``job_id`` that a trusted key signed; JobError says why there is none."""
    refused: list[str] = []
    for message in client.retained(RECORD.subscription(job=job_id)):
        owner = message.topic.split("/")[2]
        try:
            record = RECORD.decode(message.payload)
        except MessageError as exc:
            refused.append(f"a malformed record from {owner} ({exc})")
            continue
        if record.owner != owner or record.job_id != job_id:
            refused.append(f"a record on {owner}'s topic that names {record.owner}'s job {record.job_id}")
        elif record.submitter not in trust:
            refused.append(f"a record from {owner} signed by {record.submitter}, a key this node does not "
                           f"trust (`ipdc trust add {record.submitter}` if you trust it)")
        elif not verify(record, RECORD.name, SWARM):
            refused.append(f"a record from {owner} whose signature does not match")
        else:
            return record
    for reason in refused:
        log.warning("job %s: ignored %s", job_id, reason)
    why = f"; ignored {'; '.join(refused)}" if refused else ""
    raise JobError(f"no node of the swarm has published a result for job {job_id}: it may still run, have "
                   f"failed or been cancelled (`ipdc job status` on its submitting node){why}")


def write_result(kubo: KuboClient, result_cid: str, output: Path, summary: str) -> None:
    """The result directory's files in ``output`` (must not hold files), with ``summary`` as
    job.json and a _SUCCESS marker; the directory appears whole or not at all."""
    if output.exists() and any(output.iterdir()):
        raise JobError(f"output directory {output} exists and is not empty; choose another -o or remove it")
    staging = output.with_name(f".{output.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        for name, cid in kubo.ls(result_cid).items():  # file by file: an empty part is never asked
            if "/" in name or name.startswith("."):       # of bitswap (see EMPTY_CID), as `ipfs get` would
                raise JobError(f"the result directory {result_cid} holds an unsafe name {name!r}")
            kubo.cat_to(cid, staging / name)
        (staging / "job.json").write_text(summary)
        (staging / "_SUCCESS").touch()
        if output.exists():
            output.rmdir()
        staging.rename(output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def job_peers(row: dict[str, Any]) -> list[str]:
    """Every peer that took part in a recorded job (``History.job``): its workers, the ones
    it lost, and any that ran an attempt of it."""
    peers = {str(name) for name, _ in row["workers"]} | set(row["lost"])
    peers |= {a["peer"] for kind in ("map", "reduce") for t in row["tasks"][kind] for a in t["attempts"]}
    return sorted(peers)


def fetch_logs(client: SwarmClient, kubo: KuboClient, job_id: str, peers: list[str],
               timeout: float) -> tuple[dict[str, list[str]], list[str]]:
    """Each peer's log lines of the job, asked on the Logs channel and fetched by CID; and the
    peers that did not answer within ``timeout`` seconds (asleep, gone, or not holding it)."""
    topic = LOGS_REPLY.subscription(job=job_id)
    replies = client.listen(topic)
    got: dict[str, list[str]] = {}
    try:
        sent = {peer: client.send(LOGS, peer, Logs(JobId(job_id))) for peer in peers}
        deadline = time.monotonic() + timeout
        while len(got) < len(sent) and (left := deadline - time.monotonic()) > 0:
            try:
                message = replies.get(timeout=left)
            except queue.Empty:
                break
            peer = message.topic.split("/")[2]
            try:
                reply = LOGS_REPLY.decode(message.payload)
            except MessageError as exc:
                log.warning("job %s: a malformed logs reply from %s: %s", job_id, peer, exc)
                continue
            if reply.peer != peer or reply.re != sent.get(peer) or reply.kind != "logs" \
                    or len(reply.cids) != 1:
                log.warning("job %s: ignored a logs reply from %s that answers no request of ours",
                            job_id, peer)
                continue
            try:
                text = kubo.cat(reply.cids[0])[-MAX_LOG_BYTES:]
            except IPDCError as exc:
                log.warning("job %s: could not fetch %s's log lines: %s", job_id, peer, exc)
                continue
            got[peer] = text.decode(errors="replace").splitlines()
    finally:
        client.unlisten(topic)
    return got, [p for p in peers if p not in got]
