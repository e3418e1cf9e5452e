"""The Python API's pure parts: the value codec, task placement and the Task wire types."""

from __future__ import annotations

import hashlib
import json

import cloudpickle
import numpy
import pytest

from ipdc.api.offload import ASSUMED_RTT, Candidate, Measured, decide
from ipdc.api.placement import choose
from ipdc.errors import JobError, MessageError, NotEnoughPeers, ValueRefused
from ipdc.peers import Peer
from ipdc.runner.pytask import decode, encode, run
from ipdc.wire.ids import Cid, JobId, NodeName
from ipdc.wire.presence import Capabilities, Presence
from ipdc.wire.task import TASK, TASK_REPLY, Task, TaskArg, TaskReply

PLAIN = [None, True, 0, -(1 << 63), (1 << 64) - 1, 1.5, "text", b"\x00bytes", [1, [2]], (1, (2, "x")),
         {"a": [1, 2], 3: (4,)}, []]


@pytest.mark.parametrize("value", PLAIN, ids=repr)
def test_plain_values_round_trip_through_msgpack_with_their_types(value: object) -> None:
    codec, data = encode(value)
    assert codec == "msgpack"
    back = decode(codec, data, allow_pickle=False)
    assert back == value and type(back) is type(value)


def test_arrays_travel_as_raw_buffers_and_decode_without_pickle() -> None:
    array = numpy.arange(24, dtype=">f4").reshape(2, 3, 4)
    codec, data = encode(array)
    assert codec == "ndarray" and array.tobytes() in data
    back = decode(codec, data, allow_pickle=False)
    assert back.dtype == array.dtype and back.shape == array.shape and (back == array).all()


def test_an_object_array_header_is_refused() -> None:
    _, data = encode(numpy.zeros(2))
    forged = data.replace(b"<f8", b"|O8")  # same header length, an object dtype
    with pytest.raises(ValueRefused, match="not raw data"):
        decode("ndarray", forged, allow_pickle=False)


def test_anything_else_is_a_pickle_that_only_trusted_senders_may_unpickle() -> None:
    codec, data = encode({1, 2})
    assert codec == "pickle"
    with pytest.raises(ValueRefused, match="runs code"):
        decode(codec, data, allow_pickle=False)
    assert decode(codec, data, allow_pickle=True) == {1, 2}


def test_garbage_in_a_codec_is_a_value_refused() -> None:
    with pytest.raises(ValueRefused):
        decode("msgpack", b"\xc1", allow_pickle=False)
    with pytest.raises(ValueRefused):
        decode("ndarray", b"\x00\x00\x00\x09short", allow_pickle=False)


def test_run_calls_the_function_with_keywords_and_chunks() -> None:
    def f(a: int, b: int = 0) -> int:
        return a * 10 + b

    fn = cloudpickle.dumps(f)
    ok, codec, data, trace = run(fn, [encode(4), encode(2)], ["b"], chunk=False)
    assert ok and decode(codec, data, False) == 42 and trace == ""
    ok, codec, data, _ = run(fn, [encode([1, 2, 3])], [], chunk=True)
    assert ok and decode(codec, data, False) == [10, 20, 30]


def test_run_returns_what_the_function_raised_with_its_traceback() -> None:
    def f() -> None:
        raise KeyError("missing")

    ok, codec, data, trace = run(cloudpickle.dumps(f), [], [], chunk=False)
    assert not ok and "KeyError: 'missing'" in trace
    error = decode(codec, data, allow_pickle=True)
    assert isinstance(error, KeyError) and error.args == ("missing",)


# -- placement ------------------------------------------------------------------------------
def peer(name: str, slots: int = 2, tf: bool = False, mem: int = 1000, running: int = 0) -> Peer:
    p = Peer(Presence(name=NodeName(name), peer_id=f"12D3Koo{name}", host="127.0.0.1", addrs=[],
                      caps=Capabilities(cores=2, mem_free_mb=mem, tf=tf), slots=slots, load=0.0, ts=0.0))
    p.running = running
    return p


def xor(p: Peer, key: str) -> int:
    return p.point ^ int.from_bytes(hashlib.sha256(key.encode()).digest(), "big")


def test_the_nearest_of_the_least_loaded_peers_is_chosen() -> None:
    peers = [peer(f"n-{i}") for i in range(8)]
    for key in (f"task-{i}" for i in range(50)):
        assert choose(peers, key, {}, {}).name == min(peers, key=lambda p: xor(p, key)).name
    busy = {p.name: 2 for p in peers[:7]}  # a full band of 2 tasks on 2 slots: only n-7 is free
    assert {choose(peers, f"task-{i}", busy, {}).name for i in range(20)} == {"n-7"}


def test_heartbeat_running_counts_as_load_and_retries_avoid_tried_peers() -> None:
    peers = [peer("n-a", running=4), peer("n-b")]
    assert choose(peers, "t", {}, {}).name == "n-b"
    assert choose(peers, "t", {}, {}, avoid=["n-b"]).name == "n-a"
    assert choose([peer("n-b")], "t", {}, {}, avoid=["n-b"]).name == "n-b"  # no other: it may retry there


def test_resources_restrict_the_choice_and_none_fitting_says_so() -> None:
    peers = [peer("n-a"), peer("n-tf", tf=True), peer("n-big", mem=64000)]
    assert choose(peers, "t", {}, {"tf": True}).name == "n-tf"
    assert choose(peers, "t", {}, {"mem_mb": 2000}).name == "n-big"
    with pytest.raises(NotEnoughPeers, match="no live peer offering"):
        choose(peers, "t", {}, {"tf": True, "mem_mb": 2000})
    with pytest.raises(NotEnoughPeers, match="unknown resource 'gpu'"):
        choose(peers, "t", {}, {"gpu": 1})


# -- wire -----------------------------------------------------------------------------------
def test_task_messages_round_trip_and_refuse_nonsense() -> None:
    fn = Cid("bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy")
    task = Task(JobId.new(), JobId.new(), 0, "run", fn=fn, args=[TaskArg("msgpack", data="kg==")], kwargs=[])
    assert TASK.decode(TASK.encode(task)) == task
    for bad in ({"op": "run", "fn": None}, {"op": "explode"}, {"attempt": -1},
                {"args": [{"codec": "marshal"}]}, {"chunk": True, "args": []}, {"kwargs": ["a"], "args": []}):
        data = {**json.loads(TASK.encode(task)), **bad}
        with pytest.raises(MessageError):
            TASK.decode(json.dumps(data).encode())
    reply = TaskReply(JobId.new(), JobId.new(), 0, NodeName("n-a"), ok=True, data="kg==")
    assert TASK_REPLY.decode(TASK_REPLY.encode(reply)) == reply
    with pytest.raises(MessageError):
        TASK_REPLY.decode(json.dumps({**json.loads(TASK_REPLY.encode(reply)), "codec": "eval"}).encode())


# -- the offloading cost model --------------------------------------------------------------
def test_an_idle_peer_wins_a_heavy_call_from_a_loaded_node() -> None:
    idle = Candidate("n-idle", load=0.0, rtt=0.005, bandwidth=100e6)
    busy = Candidate("n-busy", load=2.0, rtt=0.005, bandwidth=100e6)
    choice, estimates = decide("auto", run=1.0, local_load=1.0, peers=[busy, idle], arg_bytes=1000,
                               result_bytes=100)
    assert choice == "n-idle"
    by_place = {e.where: e for e in estimates}
    assert by_place["local"].total == pytest.approx(2.0)
    assert by_place["n-busy"].total == pytest.approx(3.0 + 0.005 + 1100 / 100e6)
    assert by_place["n-idle"].total == pytest.approx(1.0 + 0.005 + 1100 / 100e6)


def test_a_tiny_call_with_a_large_argument_stays_here() -> None:
    peer = Candidate("n-a", load=0.0, rtt=0.002, bandwidth=100e6)
    choice, estimates = decide("auto", run=0.001, local_load=0.5, peers=[peer], arg_bytes=50 << 20,
                               result_bytes=8)
    assert choice == "local" and estimates[1].transfer > 0.5


def test_unmeasured_figures_are_assumed_and_named() -> None:
    choice, estimates = decide("auto", run=None, local_load=0.0, peers=[Candidate("n-a", 0.0, None, None)],
                               arg_bytes=0, result_bytes=0)
    assert choice == "local"  # a function never measured runs here first, where it is measured
    assert estimates[0].assumed == ("run",) and estimates[1].assumed == ("run", "rtt", "bandwidth")
    assert estimates[1].transfer == pytest.approx(ASSUMED_RTT)


def test_policies_force_the_side_and_bad_ones_are_refused() -> None:
    peer = Candidate("n-a", load=0.0, rtt=1.0, bandwidth=1.0)
    assert decide("remote", 0.001, 0.0, [peer], 10, 10)[0] == "n-a"
    assert decide("local", 100.0, 50.0, [Candidate("n-a", 0.0, 0.0, 1e9)], 0, 0)[0] == "local"
    with pytest.raises(JobError, match="no live peer"):
        decide("remote", 1.0, 0.0, [], 0, 0)
    with pytest.raises(JobError, match="unknown offload policy"):
        decide("fastest", 1.0, 0.0, [], 0, 0)


def test_measured_means_weigh_new_samples() -> None:
    m = Measured()
    assert m.get(7.0) == 7.0
    m.add(1.0)
    m.add(2.0)
    assert m.value == pytest.approx(1.3) and m.samples == 2


def test_the_api_is_imported_only_when_used() -> None:
    import subprocess
    import sys

    probe = ("import sys, ipdc, ipdc.cli; assert 'ipdc.api' not in sys.modules and 'cloudpickle' not in "
             "sys.modules; ipdc.connect; assert 'ipdc.api' in sys.modules; print(ipdc.Future.__module__)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ipdc.api.future"
