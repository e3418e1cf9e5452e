"""A client for kubo's RPC API (``POST /api/v0/<cmd>``), over httpx.

ipfshttpclient 0.7.0, the last release of the library the design card names,
refuses every kubo since 0.8 with ``VersionMismatch``; this module replaces it.
Every call has a timeout, and every failure becomes a :class:`KuboError` that
names the command and the daemon's own message.

The API is an admin interface (``shutdown``, ``config``, ``pin/rm``, ``repo/gc``), so
each node's kubo answers only requests with its bearer secret (``API.Authorizations``,
written at ``ipfs init``; the secret is in ``keys/kubo-api.secret``, mode 0600). Build
clients with :meth:`ipdc.home.NodeHome.kubo`, which reads it.
"""

from __future__ import annotations

import base64
import io
import json
import os
import sys
import tarfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, TypeVar

# httpx imports its command-line client (rich, pygments, click) unless that import fails:
# about 6 MB in every agent, for a CLI IPDC never runs.
sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]
import httpx  # noqa: E402

from ipdc.errors import KuboError  # noqa: E402
from ipdc.wire.fdmsg import write_all  # noqa: E402
from ipdc.wire.ids import Cid  # noqa: E402
from ipdc.wire.unixfs import UnsupportedCid, verify, verify_file  # noqa: E402

_T = TypeVar("_T")

#: Import settings every node uses, so the same bytes give the same CID everywhere.
ADD_PARAMS = {"pin": "true", "cid-version": "1", "raw-leaves": "true", "quieter": "true"}
#: The CID of zero bytes under ADD_PARAMS. kubo never sends this block over bitswap (a
#: peer asking for it waits forever), so the client answers it locally: a CID names
#: its content, and this content is empty.
EMPTY_CID = "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku"


class _Window(io.RawIOBase):
    """A read-only view of ``length`` bytes of a file from ``offset``: uploads a
    chunk of the input without copying it."""

    def __init__(self, path: Path, offset: int, length: int) -> None:
        self._file = open(path, "rb")  # noqa: SIM115 - closed in close()
        self._file.seek(offset)
        self._left = length

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if size < 0 or size > self._left:
            size = self._left
        data = self._file.read(size)
        self._left -= len(data)
        return data

    def close(self) -> None:
        self._file.close()
        super().close()


class KuboClient:
    """One kubo daemon's RPC API. Thread-safe; keep one per process."""

    def __init__(self, api_url: str, *, secret: str = "", timeout: float = 60.0) -> None:
        """``secret``: the node's API bearer secret ("" for a kubo without authorizations)."""
        self.api_url = api_url.rstrip("/")
        self._timeout = timeout
        self._http = httpx.Client(
            base_url=f"{self.api_url}/api/v0/",
            headers={"Authorization": f"Bearer {secret}"} if secret else None,
            timeout=httpx.Timeout(timeout, connect=5.0),
            limits=httpx.Limits(max_connections=32, max_keepalive_connections=16),
            # kubo's API is plain HTTP on loopback: loading the CA bundle for a TLS that never
            # happens costs 25-90 ms per client, which a runner would pay on every job.
            verify=self.api_url.startswith("https://"),
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> KuboClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transport -------------------------------------------------------------------
    def _post(self, cmd: str, params: Mapping[str, Any] | list[tuple[str, str]] | None = None,
              **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.post(cmd, params=_query(params), **kwargs)
        except httpx.TimeoutException as exc:
            raise KuboError(f"kubo {cmd} timed out at {self.api_url} ({exc})") from None
        except httpx.TransportError as exc:
            raise KuboError(
                f"cannot reach kubo's RPC API at {self.api_url} ({exc}); is the daemon "
                "running? Start the node with `python deploy.py start`"
            ) from None
        if response.status_code != 200:
            raise KuboError(f"kubo {cmd} failed: {_daemon_message(response)}")
        return response

    def _json(self, cmd: str, params: dict[str, Any] | list[tuple[str, str]] | None = None) -> Any:
        return self._post(cmd, params).json()

    # -- node ------------------------------------------------------------------------
    def id(self) -> dict[str, Any]:
        identity: dict[str, Any] = self._json("id")
        return identity

    def swarm_peers(self) -> list[str]:
        """Multiaddrs (with ``/p2p/<id>``) of the peers we are connected to."""
        peers = self._json("swarm/peers").get("Peers") or []
        return [f"{p['Addr']}/p2p/{p['Peer']}" for p in peers]

    def swarm_connect(self, multiaddr: str) -> None:
        self._post("swarm/connect", {"arg": multiaddr})

    # -- stream mounting (Experimental.Libp2pStreamMounting) ---------------------------
    def p2p_listen(self, protocol: str, target: str) -> None:
        """Carry streams of ``protocol`` from peers to the TCP ``target``; kubo first writes
        ``<peer-id>\\n`` on each connection (report-peer-id), so the target can check who dials."""
        self._post("p2p/listen", [("arg", protocol), ("arg", target), ("report-peer-id", "true")])

    def p2p_forward(self, protocol: str, listen: str, peer_id: str) -> None:
        """Accept connections on ``listen`` (e.g. ``/unix/PATH``) and carry each to ``peer_id``'s
        listener for ``protocol`` over the swarm."""
        self._post("p2p/forward", [("arg", protocol), ("arg", listen), ("arg", f"/p2p/{peer_id}")])

    def p2p_ls(self) -> list[dict[str, str]]:
        """Every listener and forward: ``Protocol``, ``ListenAddress``, ``TargetAddress``."""
        return list(self._json("p2p/ls").get("Listeners") or [])

    def p2p_close(self, protocol: str) -> int:
        """Close the listeners and forwards of exactly ``protocol`` (kubo matches no prefix), and
        cut its open streams, which closing a listener leaves alone. Returns how many closed."""
        closed = int(self._json("p2p/close", {"protocol": protocol}) or 0)
        for stream in self._json("p2p/stream/ls").get("Streams") or []:
            if stream.get("Protocol") == protocol:
                try:
                    self._post("p2p/stream/close", {"arg": str(stream["HandlerID"])})
                except KuboError as exc:  # it ended by itself meanwhile
                    if "not found" not in str(exc):
                        raise
        return closed

    # -- content ---------------------------------------------------------------------
    def add_bytes(self, data: bytes, name: str = "data", *, pin: bool = True) -> Cid:
        """``pin=False`` for content that only has to live until someone fetched it: it stays
        in the blockstore until a garbage collection."""
        return self.add_streams([(name, io.BytesIO(data))], pin=pin)[0]

    def add_ranges(self, pieces: Iterable[tuple[Path, int, int]]) -> list[Cid]:
        """Add byte ranges (file, offset, length) of one or more files in one request, one
        CID per range."""
        windows = [(f"chunk-{i:05d}", _Window(path, off, n)) for i, (path, off, n) in enumerate(pieces)]
        try:
            return self.add_streams(windows)
        finally:
            for _, window in windows:
                window.close()

    def add_streams(self, streams: Sequence[tuple[str, IO[bytes] | io.RawIOBase]], *,
                    pin: bool = True) -> list[Cid]:
        if not streams:
            return []
        files = [("file", (name, stream, "application/octet-stream")) for name, stream in streams]
        response = self._post("add", {**ADD_PARAMS, "pin": str(pin).lower()}, files=files)
        cids = [Cid(json.loads(line)["Hash"]) for line in response.text.splitlines() if line]
        if len(cids) != len(streams):
            raise KuboError(f"kubo add answered {len(cids)} CIDs for {len(streams)} files")
        return cids

    def cat(self, cid: str) -> bytes:
        if cid == EMPTY_CID:
            return b""
        return self._post("cat", {"arg": str(Cid(cid))}).content
    def fetch(self, cid: str, *, stall: float, cap: int | None = None) -> bytes:
        """The bytes of ``cid`` from wherever the swarm holds them; KuboError when no byte
        arrives for ``stall`` seconds (kubo's ``cat`` of content no reachable peer holds
        waits forever), or when there are more than ``cap`` of them: a few blocks can make a
        file of any size (one block linked a million times), so what a peer names is read
        only up to what the caller can hold.

        A file of several blocks is fetched with ``refs -r`` first: it asks for all the
        blocks at once, where ``cat`` asks a few blocks ahead; twice as fast for a 10 MB
        chunk from another node. The ``cat`` that follows reads the local copies.
        """
        if cid == EMPTY_CID:
            return b""
        arg = self._ask_ahead(cid, stall)
        return self._read_stalling("cat", {"arg": arg}, arg, stall, cap)

    def fetch_into(self, cid: str, fd: int, *, stall: float, cap: int) -> int:
        """:meth:`fetch`, written to the file ``fd`` as it arrives instead of held: a worker
        fills its runner's input memfd without the chunk ever being whole in its memory.
        Returns the byte count; the caller checks the bytes against ``cid``."""
        if cid == EMPTY_CID:
            return 0
        arg = self._ask_ahead(cid, stall)
        return self._stream("cat", {"arg": arg}, arg, stall, lambda response: _write_capped(response, fd, cap, arg))

    def _ask_ahead(self, cid: str, stall: float) -> str:
        """``cid`` checked, after asking for all of its blocks at once when it has more than
        one (see :meth:`fetch`): what a ``cat`` of it then reads locally."""
        arg = str(Cid(cid))
        if not single_block(arg):
            self._read_stalling("refs", {"arg": arg, "recursive": "true", "unique": "true"}, arg, stall)
        return arg

    def _read_stalling(self, cmd: str, params: dict[str, Any], cid: str, stall: float,
                       cap: int | None = None) -> bytes:
        return self._stream(cmd, params, cid, stall,
                            lambda response: response.read() if cap is None else _read_capped(response, cap, cid))

    def _stream(self, cmd: str, params: dict[str, Any], cid: str, stall: float,
                consume: Callable[[httpx.Response], _T]) -> _T:
        # httpx's read timeout bounds each wait for bytes (the headers included), not the
        # whole transfer: exactly a stall timeout.
        timeout = httpx.Timeout(self._timeout, connect=5.0, read=stall)
        try:
            with self._http.stream("POST", cmd, params=params, timeout=timeout) as response:
                if response.status_code != 200:
                    response.read()
                    raise KuboError(f"kubo {cmd} {cid} failed: {_daemon_message(response)}")
                return consume(response)
        except httpx.ReadTimeout:
            raise KuboError(f"could not fetch {cid} from the swarm: no data for {stall:g} s "
                            "(the peer holding it may have left)") from None
        except httpx.TimeoutException as exc:
            raise KuboError(f"kubo {cmd} {cid} timed out at {self.api_url} ({exc})") from None
        except httpx.TransportError as exc:
            raise KuboError(f"kubo {cmd} {cid} at {self.api_url} failed: {exc}") from None

    def fetch_range(self, cid: str, offset: int, length: int, *, stall: float) -> bytes:
        """``length`` bytes from ``offset`` of the UnixFS file ``cid``, fetching only the
        blocks that hold them; KuboError on a stall, as :meth:`fetch`.

        No check against a CID of its own is possible for a part of a file: kubo checks
        every block it takes from a peer against the block's CID, and walks the file's
        DAG down from ``cid``, so the bytes are the ones ``cid`` names.
        """
        if length == 0 or cid == EMPTY_CID:
            return b""
        arg = str(Cid(cid))
        data = self._read_stalling("cat", {"arg": arg, "offset": str(offset), "length": str(length)},
                                   arg, stall)
        _check_range(len(data), cid, offset, length)
        return data

    def fetch_range_into(self, cid: str, offset: int, length: int, fd: int, *, stall: float) -> None:
        """:meth:`fetch_range`, written to the file ``fd`` as it arrives (see :meth:`fetch_into`)."""
        if length == 0 or cid == EMPTY_CID:
            return
        arg = str(Cid(cid))
        written = self._stream("cat", {"arg": arg, "offset": str(offset), "length": str(length)}, arg, stall,
                               lambda response: _write_capped(response, fd, length, arg))
        _check_range(written, cid, offset, length)

    def prefetch(self, cid: str, *, stall: float) -> None:
        """Every block of ``cid``'s DAG into this node (``refs -r``); KuboError when no block
        arrives for ``stall`` seconds: what is not retrievable from the swarm now. Each block
        is listed once (``--unique``): without it kubo lists a block once per path to it, so a
        DAG of 60 blocks each linking the next twice is 2**60 lines, read here whole."""
        arg = str(Cid(cid))
        if cid != EMPTY_CID:
            self._read_stalling("refs", {"arg": arg, "recursive": "true", "unique": "true"}, arg, stall)
            self._read_stalling("block/stat", {"arg": arg}, arg, stall)

    def resolve(self, path: str, timeout: float) -> Cid:
        """The CID an IPFS path (``/ipfs/CID/dir/file``) names; KuboError when its blocks do
        not come within ``timeout`` seconds (kubo would wait for them forever)."""
        answer = self._post("resolve", {"arg": path}, timeout=timeout).json()
        return Cid(str(answer["Path"]).removeprefix("/ipfs/"))

    def stat(self, cid: str, timeout: float) -> tuple[str, int]:
        """A UnixFS node's type ("file" or "directory") and, for a file, its size in bytes."""
        answer = self._post("files/stat", {"arg": f"/ipfs/{Cid(cid)}"}, timeout=timeout).json()
        return str(answer["Type"]), int(answer.get("Size") or 0)

    def entries(self, cid: str, timeout: float) -> list[tuple[str, Cid, bool, int]]:
        """A UnixFS directory's entries: (name, CID, is a directory, size of a file)."""
        params = {"arg": str(Cid(cid)), "resolve-type": "true", "size": "true"}
        objects = self._post("ls", params, timeout=timeout).json()["Objects"]
        return [(str(link["Name"]), Cid(link["Hash"]), link.get("Type") == 1, int(link.get("Size") or 0))
                for obj in objects for link in obj.get("Links") or []]

    def fetch_checked(self, cid: str, *, stall: float, cap: int | None = None) -> bytes:
        """:meth:`fetch`, and the bytes checked against the CID before anything uses them:
        what a peer served, or a compromised kubo returned, is exactly what ``cid`` names."""
        data = self.fetch(cid, stall=stall, cap=cap)
        _check(lambda: verify(data, cid), cid, len(data))
        return data

    def fetch_checked_into(self, cid: str, fd: int, *, stall: float, cap: int) -> int:
        """:meth:`fetch_checked` into the empty file ``fd`` (see :meth:`fetch_into`), read back
        in pieces for the check. Returns the byte count."""
        size = self.fetch_into(cid, fd, stall=stall, cap=cap)
        with open(os.dup(fd), "rb", buffering=0) as back:  # shares fd's offset: the caller rewinds
            back.seek(0)
            _check(lambda: verify_file(back, cid), cid, size)
        return size

    def cat_to(self, cid: str, path: Path) -> int:
        """Stream one file's bytes to ``path``; returns the byte count."""
        if cid == EMPTY_CID:
            path.write_bytes(b"")
            return 0
        written = 0
        request = self._http.build_request("POST", "cat", params={"arg": str(Cid(cid))})
        try:
            with self._http.stream(request.method, request.url) as response:
                if response.status_code != 200:
                    response.read()
                    raise KuboError(f"kubo cat {cid} failed: {_daemon_message(response)}")
                with open(path, "wb") as out:
                    for block in response.iter_bytes(1 << 20):
                        written += out.write(block)
        except httpx.TransportError as exc:
            raise KuboError(f"kubo cat {cid} at {self.api_url} failed: {exc}") from None
        return written

    def get(self, cid: str, dest: Path) -> Path:
        """Fetch a file or directory by CID into ``dest``/<cid>; refuses unsafe tar paths."""
        data = self._post("get", {"arg": str(Cid(cid))}).content
        dest.mkdir(parents=True, exist_ok=True)
        with tarfile.open(fileobj=io.BytesIO(data)) as archive:
            archive.extractall(dest, filter="data")
        return dest / str(cid)

    def ls(self, cid: str) -> dict[str, Cid]:
        """A UnixFS directory's entries: name -> CID (files only; what a result directory holds)."""
        params = {"arg": str(Cid(cid)), "resolve-type": "false", "size": "false"}
        objects = self._json("ls", params)["Objects"]
        return {link["Name"]: Cid(link["Hash"]) for obj in objects for link in obj.get("Links") or []}

    def pins(self) -> set[str]:
        """The CIDs pinned recursively (what ``add`` and ``dag/put`` pin)."""
        keys = self._json("pin/ls", {"type": "recursive"}).get("Keys") or {}
        return set(keys)

    def pin_add(self, *cids: str) -> None:
        """Pin (again) content this node holds, or fetches now from the swarm."""
        unique = list(dict.fromkeys(str(Cid(c)) for c in cids if c != EMPTY_CID))
        if unique:
            self._post("pin/add", [("arg", c) for c in unique])

    def pin_rm(self, *cids: str) -> None:
        """Unpin, in one call; a CID that is not pinned is not an error (CleanUp may run twice)."""
        unique = list(dict.fromkeys(str(Cid(c)) for c in cids))
        if not unique:
            return
        try:
            self._post("pin/rm", [("arg", c) for c in unique])
        except KuboError as exc:
            if "not pinned" not in str(exc):
                raise
            if len(unique) > 1:  # kubo stops at the first unpinned one: do the rest one by one
                for cid in unique:
                    self.pin_rm(cid)

    def make_directory(self, entries: dict[str, Cid], sizes: dict[str, int]) -> Cid:
        """A pinned UnixFS directory holding existing CIDs under the given names.

        One ``dag/put`` of the directory node, so no byte is uploaded twice and no MFS
        state is touched: 5 ms where building it in MFS took 15. ``sizes`` are each
        entry's cumulative DAG size (a link's Tsize: :meth:`cumulative_size`, or the
        length of a single raw block); with them the CID equals what ``ipfs add -r`` of
        the same files gives.
        """
        if EMPTY_CID in entries.values():
            self.add_bytes(b"")  # the pin needs the empty block here: kubo would wait for it forever
        node = {"Data": {"/": {"bytes": "CAE"}},  # UnixFS Data{Type: Directory}
                "Links": [{"Hash": {"/": str(Cid(entries[name]))}, "Name": name, "Tsize": sizes[name]}
                          for name in sorted(entries)]}
        answer = self._post("dag/put", {"store-codec": "dag-pb", "input-codec": "dag-json", "pin": "true"},
                            files={"file": ("node", json.dumps(node).encode())}).json()
        return Cid(answer["Cid"]["/"])

    def has(self, cid: str) -> bool:
        """Whether this node holds ``cid``'s root block, asking no other peer: what proves that
        content never came here."""
        try:
            self._post("block/stat", {"arg": str(Cid(cid)), "offline": "true"})
        except KuboError:
            return False
        return True

    def cumulative_size(self, cid: str) -> int:
        """The bytes of ``cid``'s whole DAG, nodes included (a directory link's Tsize)."""
        return int(self._json("files/stat", {"arg": f"/ipfs/{Cid(cid)}"})["CumulativeSize"])


def _read_capped(response: httpx.Response, cap: int, cid: str) -> bytes:
    """A response's body, or KuboError as soon as it passes ``cap`` bytes (the rest unread)."""
    pieces: list[bytes] = []
    size = 0
    for piece in response.iter_bytes():
        size += len(piece)
        if size > cap:
            raise KuboError(f"{cid} is more than {cap >> 20} MB; it was not read further")
        pieces.append(piece)
    return b"".join(pieces)


def _write_capped(response: httpx.Response, fd: int, cap: int, cid: str) -> int:
    """:func:`_read_capped`, each piece written to ``fd`` as it comes; returns the byte count."""
    size = 0
    for piece in response.iter_bytes():
        size += len(piece)
        if size > cap:
            raise KuboError(f"{cid} is more than {cap >> 20} MB; it was not read further")
        write_all(fd, piece)
    return size


def _check(verified: Callable[[], bool], cid: str, size: int) -> None:
    try:
        if verified():
            return
    except UnsupportedCid as exc:
        raise KuboError(f"cannot check {cid}: {exc} (IPDC adds everything as CIDv1, raw leaves, "
                        "sha2-256)") from None
    raise KuboError(f"kubo returned {size} bytes for {cid} that are not what that CID names; "
                    "they were not used")


def _check_range(got: int, cid: str, offset: int, length: int) -> None:
    if got != length:
        raise KuboError(f"kubo returned {got} bytes of {cid} from offset {offset}, not {length}: "
                        "the input file is shorter than planned")


def single_block(cid: str) -> bool:
    """Whether ``cid`` names one raw block (a CIDv1 with the raw codec, 0x55), which has
    no links to fetch ahead: a file of at most one chunk under ADD_PARAMS."""
    if not cid.startswith("b"):
        return False
    head = cid[1:9].upper()  # 8 base32 digits: the first 5 bytes
    return base64.b32decode(head)[:2] == b"\x01\x55"


def _daemon_message(response: httpx.Response) -> str:
    try:
        return str(response.json().get("Message") or response.text)
    except ValueError:
        return f"HTTP {response.status_code}: {response.text[:200]}"


def _query(params: Mapping[str, Any] | list[tuple[str, str]] | None) -> httpx.QueryParams | None:
    """kubo takes repeated keys (`arg`), hence the list form beside the mapping one."""
    if params is None:
        return None
    if isinstance(params, list):
        return httpx.QueryParams([(key, value) for key, value in params])
    return httpx.QueryParams({key: value for key, value in params.items()})
