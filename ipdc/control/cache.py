"""The swarm-wide result cache, as the controller service uses it.

Before a job runs, its cache key (:func:`ipdc.wire.cache.cache_key`) is computed
here without touching the swarm's kubo: the code's CIDs and a local input's CID are
hashed on this node (:mod:`ipdc.wire.unixfs`), an input given by CID is resolved.
The retained records under ``ipdc/cache/<key>/+`` are then read: the broker sends
retained messages at once on subscription, and a marker published after subscribing
comes back after all of them, so the wait is bounded by one round trip and never a
guess (:meth:`~ipdc.submit.client.SwarmClient.retained`).

A record is used only when it is well formed and small, lies under its owner's own
topic and names this key, is signed by a key this node trusts (a key whose jobs this
node would run anyway), and its result is still retrievable: every block of the
result directory is fetched into this node's kubo with a stall timeout, which is
also what writing the output needs. Anything else is logged with the reason and the
job runs. After a job is computed its record is published, ``--no-cache`` or not.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from ipdc.errors import IPDCError, MessageError
from ipdc.kubo import KuboClient
from ipdc.submit.client import SwarmClient
from ipdc.submit.mapreduce import MapReduceController, job_code
from ipdc.trust import Signer, TrustStore, verify
from ipdc.wire.cache import CACHE, MAX_RECORD, CacheRecord, cache_key
from ipdc.wire.ids import Cid, JobId, NodeName
from ipdc.wire.record import SWARM
from ipdc.wire.unixfs import cid_of_file

log = logging.getLogger(__name__)

#: Seconds for the broker to answer the lookup (its echo of the marker).
LOOKUP_TIMEOUT = 5.0
#: A cached result whose blocks stop coming for this long is not retrievable: the job runs.
RETRIEVE_STALL = 10.0


@dataclass(frozen=True)
class Keyed:
    """A job's cache key and what it was made of."""

    key: str
    code: dict[str, str]
    input_cid: str
    input_bytes: int


def job_key(client: SwarmClient, controller: MapReduceController) -> Keyed:
    """The cache key of the controller's job. With no --k, K is the live peers' count: the
    job's K when it starts now."""
    job = controller.job
    source = controller.input_source()
    shipped = job_code(job)
    code = {name: cid_of_file(path) for name, path in shipped.files.items()}
    k = job.k if job.k is not None else len(client.peers.live())
    name = source.files[0].path if len(source.files) == 1 else ""  # a directory's CID covers its names
    key = cache_key(code=code, stages=shipped.stages.to_params(), input_cid=source.cid, input_name=name, k=k,
                    chunks=job.chunks, verify=job.verify, majority=job.verify_majority)
    return Keyed(key, code, source.cid, source.size)


def check_record(payload: bytes, owner: str, key: str, trust: TrustStore) -> CacheRecord | str:
    """The record in ``payload``, found on ``owner``'s topic of ``key``, when this node may
    use it (retrievability aside); otherwise why not."""
    if len(payload) > MAX_RECORD:
        return f"a record of {len(payload)} bytes from {owner} (at most {MAX_RECORD})"
    try:
        record = CACHE.decode(payload)
    except MessageError as exc:
        return f"a malformed record from {owner} ({exc})"
    if record.owner != owner or record.key != key:
        return f"a record on {owner}'s topic that names {record.owner} and key {record.key[:12]}"
    if record.submitter not in trust:
        return (f"a record from {owner} signed by {record.submitter}, a key this node does not trust "
                f"(`ipdc trust add {record.submitter}` if you trust it)")
    if not verify(record, CACHE.name, SWARM):
        return f"a record from {owner} whose signature does not match"
    return record


def find_cached(client: SwarmClient, trust: TrustStore, kubo: KuboClient, key: str) -> CacheRecord | None:
    """A trusted, retrievable record of ``key``'s result, or None (the reasons are logged)."""
    refused: list[str] = []
    for message in client.retained(CACHE.subscription(key=key), timeout=LOOKUP_TIMEOUT):
        checked = check_record(message.payload, message.topic.split("/")[3], key, trust)
        if isinstance(checked, str):
            refused.append(checked)
            continue
        try:
            kubo.prefetch(checked.result_cid, stall=RETRIEVE_STALL)
        except IPDCError as exc:
            refused.append(f"job {checked.job_id}'s result {checked.result_cid}, not retrievable now ({exc})")
            continue
        return checked
    for reason in refused:
        log.warning("cache %s: ignored %s", key[:12], reason)
    return None


def publish_cached(client: SwarmClient, signer: Signer, key: str, result_cid: str, job_id: str) -> None:
    """Tell the swarm that ``job_id`` computed ``key``'s result (a signed, retained record)."""
    record = CacheRecord(key, Cid(result_cid), JobId(job_id), NodeName(client.name), time.time())
    signed = signer.sign(record, CACHE.name, SWARM)
    client.bus.publish(CACHE.topic(key=key, node=client.name), CACHE.encode(signed), retain=True)
