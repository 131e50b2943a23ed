"""Channel benchmark: procwire against the usual ways two processes talk, on one machine.

Every figure comes from fresh child processes started with the ``spawn`` method (so nothing is
inherited from a threaded parent): a producer and a consumer for throughput, a client and an echo
server for latency. The Node figures come from ``node node_fork_bench.js``, which forks its own
child. Each repetition runs every measurement once, so ratios are taken inside one repetition and
then summarised (median, min-max) over the repetitions; on a noisy machine read the ratios.

How each figure is taken:

* **Throughput**: the producer sends one message per call until it has sent N messages or T
  seconds have passed, then an end marker. Elapsed = the consumer's CLOCK_MONOTONIC when it sees
  the end marker minus the producer's just before its first send (the clock is system-wide). The
  consumer counts every message; a run where sent != received is reported as an error. MB/s =
  payload bytes / 10^6, headers not counted.
* **Latency**: 64 B ping-pong, a warm-up, then up to N round trips or T seconds; p50/p99 of the
  round-trip time.
* **Small dict**: ``{"event": "task", "data": {"id": 123, "name": "doSomething"}}``, encoded by the
  sender and decoded by the receiver (so serialization is included), one ``send()`` per message.

Use :func:`run` for structured results, :func:`main` for the command line.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import functools
import io
import itertools
import json
import math
import multiprocessing
import os
import platform
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as mp_wait
from pathlib import Path
from typing import Any

__all__ = [
    "METHODS",
    "RATIOS",
    "TESTS",
    "BenchResult",
    "Measurement",
    "Method",
    "RatioSpec",
    "RatioValue",
    "Settings",
    "main",
    "run",
    "run_node_json",
    "select",
]

KiB = 1024
MiB = 1024 * KiB
SIZES: tuple[int, ...] = (64, KiB, 64 * KiB, MiB)
LATENCY_SIZE = 64
SMALL_DICT: dict[str, Any] = {"event": "task", "data": {"id": 123, "name": "doSomething"}}

# Payloads are at least 64 B, so any shorter message is the end marker; every transport can
# carry it, including ones that might treat an empty message specially.
END_BYTES = b"end"
END_MAX = 8
# The small dict has two keys, the end marker one.
END_DICT: dict[str, Any] = {"end": 1}

# Raw framing used by the hand-written alternatives: a 4-byte little-endian length prefix.
_HDR = struct.Struct("<I")
RECV_BUF = 256 * KiB
# Above this, copying header + payload into one buffer costs more than a gather write.
GATHER_MIN = 16 * KiB

NODE_SCRIPT = Path(__file__).with_name("node_fork_bench.js")

TPUT_TESTS = tuple(f"tput_{s}" for s in SIZES)
TESTS: tuple[str, ...] = (*TPUT_TESTS, "lat_64", "dict", "dict_lat")


# --------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class Settings:
    """Bounds of every loop. Each loop stops at its count or its time, whichever comes first."""

    tput_seconds: float = 0.5
    #: messages per throughput run, per payload size (64 B, 1 KiB, 64 KiB, 1 MiB)
    tput_counts: tuple[int, ...] = (1_000_000, 600_000, 100_000, 6_000)
    #: mp.Queue.put never blocks, so its producer would run far ahead and the drain would take
    #: many seconds; it gets smaller counts (its figure is end to end, so it includes the drain).
    queue_counts: tuple[int, ...] = (40_000, 30_000, 6_000, 300)
    dict_count: int = 1_000_000
    lat_warmup: int = 1_000
    lat_count: int = 20_000
    lat_seconds: float = 0.5
    #: child start-up, connect and accept
    setup_timeout: float = 30.0
    #: one blocking receive inside a measurement
    op_timeout: float = 10.0

    @classmethod
    def quick(cls) -> Settings:
        return cls(
            tput_seconds=0.2,
            tput_counts=(200_000, 100_000, 20_000, 1_000),
            queue_counts=(12_000, 8_000, 1_500, 80),
            dict_count=200_000,
            lat_warmup=200,
            lat_count=5_000,
            lat_seconds=0.2,
        )

    def count_for(self, method: str, size: int) -> int:
        counts = self.queue_counts if method == "mp_queue" else self.tput_counts
        return counts[SIZES.index(size)]

    def measurement_timeout(self) -> float:
        busy = max(self.tput_seconds, self.lat_seconds)
        return self.setup_timeout + 3 * busy + 2 * self.op_timeout


@dataclass(frozen=True)
class Method:
    key: str
    label: str
    tests: tuple[str, ...]
    #: label in the small-dict table, where the codec is part of the method
    dict_label: str = ""


_ALL = (*TPUT_TESTS, "lat_64")
_WITH_DICT = (*_ALL, "dict", "dict_lat")

METHODS: tuple[Method, ...] = (
    Method(
        "raw_unix",
        "raw UNIX socket, named path",
        _WITH_DICT,
        "raw UNIX socket + msgspec.json, length-prefixed, 1 sendall per msg",
    ),
    Method("raw_tcp", "raw TCP loopback (NODELAY)", _ALL),
    Method("os_pipe", "os.pipe", _ALL),
    Method(
        "mp_pipe",
        "mp.Pipe send_bytes/recv_bytes",
        _WITH_DICT,
        "mp.Pipe send/recv (pickle)",
    ),
    Method("mp_queue", "mp.Queue put/get", _ALL),
    Method("zmq_ipc", "pyzmq PUSH/PULL ipc (lat: REQ/REP)", _ALL),
    Method("zmq_tcp", "pyzmq PUSH/PULL tcp (lat: REQ/REP)", _ALL),
    Method("node_fork", "Node fork IPC, json", _WITH_DICT, "Node fork IPC, json"),
    Method(
        "procwire_unix",
        "procwire UNIX, raw codec",
        _WITH_DICT,
        "procwire UNIX, json codec",
    ),
    Method("procwire_tcp", "procwire TCP, raw codec", _ALL),
    Method("raw_tls", "raw TLS socket (ssl module, NODELAY)", _ALL),
    Method("procwire_tls", "procwire TLS, raw codec", _ALL),
    Method("raw_udp", "raw UDP datagrams (lat only)", ("lat_64",)),
    Method("procwire_udp", "procwire UDP, raw codec (lat only)", ("lat_64",)),
)
_METHODS_BY_KEY = {m.key: m for m in METHODS}


@dataclass(frozen=True)
class RatioSpec:
    """``num / den`` of one metric each, taken inside each repetition."""

    label: str
    num: tuple[str, str, str]  # (method, test, metric)
    den: tuple[str, str, str]
    #: (">=" or "<=", threshold) for a target; None for an informational ratio
    goal: tuple[str, float] | None = None


def _ratio(
    label: str, metric: str, test: str, num: str, den: str, goal: tuple[str, float] | None = None
) -> RatioSpec:
    return RatioSpec(label, (num, test, metric), (den, test, metric), goal)


RATIOS: tuple[RatioSpec, ...] = (
    _ratio(
        "small dict msg/s: procwire UNIX json / mp.Pipe pickle",
        "msgs_per_s", "dict", "procwire_unix", "mp_pipe",
        goal=(">=", 5.0),
    ),
    _ratio(
        "small dict msg/s: procwire UNIX json / Node fork IPC",
        "msgs_per_s", "dict", "procwire_unix", "node_fork",
        goal=(">=", 3.0),
    ),
    _ratio(
        "64 B msg/s: procwire UNIX raw / pyzmq PUSH/PULL ipc",
        "msgs_per_s", "tput_64", "procwire_unix", "zmq_ipc",
        goal=(">=", 1.5),
    ),
    _ratio(
        "1 MiB MB/s: procwire UNIX raw / raw UNIX socket",
        "mb_per_s", f"tput_{MiB}", "procwire_unix", "raw_unix",
        goal=(">=", 0.9),
    ),
    _ratio(
        "64 B RTT p50: procwire UNIX raw / raw UNIX socket",
        "p50_us", "lat_64", "procwire_unix", "raw_unix",
        goal=("<=", 1.15),
    ),
    _ratio(
        "64 B msg/s: procwire UNIX / raw UNIX socket",
        "msgs_per_s", "tput_64", "procwire_unix", "raw_unix",
    ),
    _ratio(
        "1 KiB msg/s: procwire UNIX / raw UNIX socket",
        "msgs_per_s", f"tput_{KiB}", "procwire_unix", "raw_unix",
    ),
    _ratio(
        "64 KiB MB/s: procwire UNIX / raw UNIX socket",
        "mb_per_s", f"tput_{64 * KiB}", "procwire_unix", "raw_unix",
    ),
    _ratio(
        "64 B RTT p99: procwire UNIX / raw UNIX socket",
        "p99_us", "lat_64", "procwire_unix", "raw_unix",
    ),
    _ratio(
        "64 B msg/s: procwire TCP / raw TCP",
        "msgs_per_s", "tput_64", "procwire_tcp", "raw_tcp",
    ),
    _ratio(
        "64 B msg/s: procwire TCP / pyzmq PUSH/PULL tcp",
        "msgs_per_s", "tput_64", "procwire_tcp", "zmq_tcp",
    ),
    _ratio(
        "1 MiB MB/s: procwire TCP / raw TCP",
        "mb_per_s", f"tput_{MiB}", "procwire_tcp", "raw_tcp",
    ),
    _ratio(
        "64 B RTT p50: procwire TCP / raw TCP",
        "p50_us", "lat_64", "procwire_tcp", "raw_tcp",
    ),
    _ratio(
        "64 B msg/s: procwire TLS / raw TLS socket",
        "msgs_per_s", "tput_64", "procwire_tls", "raw_tls",
    ),
    _ratio(
        "1 MiB MB/s: procwire TLS / raw TLS socket",
        "mb_per_s", f"tput_{MiB}", "procwire_tls", "raw_tls",
    ),
    _ratio(
        "64 B RTT p50: procwire TLS / raw TLS socket",
        "p50_us", "lat_64", "procwire_tls", "raw_tls",
    ),
    _ratio(
        "64 B RTT p50: procwire UDP / raw UDP",
        "p50_us", "lat_64", "procwire_udp", "raw_udp",
    ),
    _ratio(
        "small dict msg/s: procwire UNIX json / raw UNIX + msgspec",
        "msgs_per_s", "dict", "procwire_unix", "raw_unix",
    ),
    _ratio(
        "small dict RTT p50: procwire UNIX json / Node fork IPC",
        "p50_us", "dict_lat", "procwire_unix", "node_fork",
    ),
    _ratio(
        "64 B msg/s: raw UNIX socket / pyzmq ipc",
        "msgs_per_s", "tput_64", "raw_unix", "zmq_ipc",
    ),
    _ratio(
        "64 B msg/s: raw UNIX socket / mp.Pipe(bytes)",
        "msgs_per_s", "tput_64", "raw_unix", "mp_pipe",
    ),
    _ratio(
        "64 B RTT p50: pyzmq REQ/REP ipc / raw UNIX socket",
        "p50_us", "lat_64", "zmq_ipc", "raw_unix",
    ),
)


# --------------------------------------------------------------------------------------------
# Results


@dataclass
class Measurement:
    rep: int
    method: str
    test: str
    #: messages received (throughput) or round trips timed (latency)
    msgs: int = 0
    seconds: float = 0.0
    msgs_per_s: float | None = None
    mb_per_s: float | None = None
    p50_us: float | None = None
    p99_us: float | None = None
    error: str | None = None

    def metric(self, name: str) -> float | None:
        value = getattr(self, name)
        return None if value is None else float(value)


@dataclass
class RatioValue:
    label: str
    median: float | None
    low: float | None
    high: float | None
    n: int
    goal: tuple[str, float] | None = None

    @property
    def met(self) -> bool | None:
        if self.goal is None or self.median is None:
            return None
        op, threshold = self.goal
        return self.median >= threshold if op == ">=" else self.median <= threshold


@dataclass
class BenchResult:
    settings: Settings
    reps: int
    machine: dict[str, str]
    measurements: list[Measurement] = field(default_factory=list)
    started: str = ""
    wall_seconds: float = 0.0

    def values(self, method: str, test: str, metric: str) -> list[float]:
        out = []
        for m in self.measurements:
            if m.method == method and m.test == test and m.error is None:
                v = m.metric(metric)
                if v is not None:
                    out.append(v)
        return out

    def median(self, method: str, test: str, metric: str) -> float | None:
        vals = self.values(method, test, metric)
        return statistics.median(vals) if vals else None

    def ratios(self, specs: Sequence[RatioSpec] = RATIOS) -> list[RatioValue]:
        by_key: dict[tuple[int, str, str], Measurement] = {
            (m.rep, m.method, m.test): m for m in self.measurements if m.error is None
        }
        out = []
        for spec in specs:
            per_rep = []
            for rep in range(self.reps):
                num = by_key.get((rep, spec.num[0], spec.num[1]))
                den = by_key.get((rep, spec.den[0], spec.den[1]))
                if num is None or den is None:
                    continue
                a, b = num.metric(spec.num[2]), den.metric(spec.den[2])
                if a is not None and b:
                    per_rep.append(a / b)
            if per_rep:
                out.append(
                    RatioValue(
                        spec.label,
                        statistics.median(per_rep),
                        min(per_rep),
                        max(per_rep),
                        len(per_rep),
                        spec.goal,
                    )
                )
            else:
                out.append(RatioValue(spec.label, None, None, None, 0, spec.goal))
        return out

    def targets(self) -> list[RatioValue]:
        return [r for r in self.ratios() if r.goal is not None]

    def errors(self) -> list[Measurement]:
        return [m for m in self.measurements if m.error is not None]

    def summary(self) -> list[dict[str, Any]]:
        """Medians over repetitions, one row per (method, test) that was run."""
        rows = []
        for test in TESTS:
            for meth in METHODS:
                ms = [m for m in self.measurements if m.method == meth.key and m.test == test]
                if not ms:
                    continue
                row: dict[str, Any] = {"method": meth.key, "test": test}
                for metric in ("msgs_per_s", "mb_per_s", "p50_us", "p99_us"):
                    row[metric] = self.median(meth.key, test, metric)
                row["ok"] = sum(m.error is None for m in ms)
                row["failed"] = len(ms) - row["ok"]
                rows.append(row)
        return rows

    def to_dict(self) -> dict[str, Any]:
        return {
            "started": self.started,
            "wall_seconds": self.wall_seconds,
            "reps": self.reps,
            "settings": asdict(self.settings),
            "machine": self.machine,
            "measurements": [asdict(m) for m in self.measurements],
            "summary": self.summary(),
            "ratios": [{**asdict(r), "met": r.met} for r in self.ratios()],
        }

    def to_markdown(self) -> str:
        return _markdown(self)


# --------------------------------------------------------------------------------------------
# Child side: links between the two processes of one measurement


@dataclass
class _Link:
    """One end of a measured connection, reduced to what the loops below need."""

    send: Callable[[Any], None]
    recv: Callable[[], Any]
    #: count messages until the end marker; returns (messages, payload bytes)
    consume: Callable[[], tuple[int, int]]


class _FrameReader:
    """Length-prefixed frames from a byte stream.

    One large ``readinto`` per call and the frames split inside that buffer: reading header and
    body separately costs two system calls per message and was measured 2.5x slower. Each message
    is copied out as its own ``bytearray`` (what a library hands to its caller); a frame larger
    than the buffer is read straight into its own buffer.
    """

    def __init__(self, readinto: Callable[[memoryview], int], size: int = RECV_BUF) -> None:
        self._readinto = readinto
        self._buf = bytearray(size)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0

    def _fill(self) -> bytearray | None:
        """Read more; returns a whole frame when the next one cannot fit in the buffer."""
        start, end = self._start, self._end
        avail = end - start
        if avail >= 4:
            (n,) = _HDR.unpack_from(self._buf, start)
            if 4 + n > len(self._buf):
                return self._read_big(n)
        if avail == 0:
            start = end = 0
        elif start:
            # memoryview assignment uses memmove, so the overlapping move is safe.
            self._view[:avail] = self._view[start:end]
            start, end = 0, avail
        got = self._readinto(self._view[end:])
        if not got:
            raise EOFError("peer closed the stream")
        self._start, self._end = start, end + got
        return None

    def _read_big(self, n: int) -> bytearray:
        msg = bytearray(n)
        view = memoryview(msg)
        have = self._end - self._start - 4
        view[:have] = self._view[self._start + 4 : self._end]
        self._start = self._end = 0
        while have < n:
            got = self._readinto(view[have:])
            if not got:
                raise EOFError("peer closed the stream")
            have += got
        return msg

    def recv(self) -> bytearray:
        buf, unpack_from = self._buf, _HDR.unpack_from
        while True:
            start, end = self._start, self._end
            if end - start >= 4:
                (n,) = unpack_from(buf, start)
                stop = start + 4 + n
                if stop <= end:
                    self._start = stop
                    return buf[start + 4 : stop]
            big = self._fill()
            if big is not None:
                return big

    def consume(self) -> tuple[int, int]:
        buf, unpack_from = self._buf, _HDR.unpack_from
        count = nbytes = 0
        start, end = self._start, self._end
        while True:
            while end - start >= 4:
                (n,) = unpack_from(buf, start)
                stop = start + 4 + n
                if stop > end:
                    break
                msg = buf[start + 4 : stop]
                start = stop
                if n < END_MAX:
                    self._start, self._end = start, end
                    return count, nbytes
                count += 1
                nbytes += len(msg)
            self._start, self._end = start, end
            big = self._fill()
            if big is not None:
                if len(big) < END_MAX:
                    return count, nbytes
                count += 1
                nbytes += len(big)
            start, end = self._start, self._end


def _write_rest(
    write: Callable[[bytes | memoryview], int], parts: Sequence[bytes], done: int
) -> None:
    """Finish a write that the kernel took only part of."""
    for part in parts:
        if done >= len(part):
            done -= len(part)
            continue
        view = memoryview(part)[done:]
        done = 0
        while view:
            view = view[write(view) :]


def _socket_sender(sock: socket.socket) -> Callable[[Any], None]:
    sendall, sendmsg, pack = sock.sendall, sock.sendmsg, _HDR.pack

    def send(payload: Any) -> None:
        n = len(payload)
        if n <= GATHER_MIN:
            sendall(pack(n) + payload)
        else:
            parts = (pack(n), payload)
            done = sendmsg(parts)
            if done < 4 + n:
                _write_rest(sock.send, parts, done)

    return send


def _pipe_sender(fd: int) -> Callable[[Any], None]:
    write, writev, pack = os.write, os.writev, _HDR.pack

    def send(payload: Any) -> None:
        n = len(payload)
        if n <= GATHER_MIN:
            data = pack(n) + payload
            done = write(fd, data)
            if done < len(data):
                _write_rest(functools.partial(write, fd), (data,), done)
        else:
            parts = (pack(n), payload)
            done = writev(fd, parts)
            if done < 4 + n:
                _write_rest(functools.partial(write, fd), parts, done)

    return send


def _consume_bytes(recv: Callable[[], Any]) -> tuple[int, int]:
    count = nbytes = 0
    while True:
        n = len(recv())
        if n < END_MAX:
            return count, nbytes
        count += 1
        nbytes += n


def _consume_dicts(recv: Callable[[], Any]) -> tuple[int, int]:
    count = 0
    while True:
        if len(recv()) == 1:
            return count, 0
        count += 1


def _bytes_link(send: Callable[[Any], None], recv: Callable[[], Any]) -> _Link:
    return _Link(send, recv, functools.partial(_consume_bytes, recv))


def _dict_link(send: Callable[[Any], None], recv: Callable[[], Any]) -> _Link:
    return _Link(send, recv, functools.partial(_consume_dicts, recv))


def _msgspec_link(raw: _Link) -> _Link:
    import msgspec

    encode, decode = msgspec.json.Encoder().encode, msgspec.json.Decoder().decode
    bsend, brecv = raw.send, raw.recv

    def send(obj: Any) -> None:
        bsend(encode(obj))

    def recv() -> Any:
        return decode(brecv())

    return _dict_link(send, recv)


def _tune_socket(sock: socket.socket, op_timeout: float, tcp: bool) -> None:
    sock.settimeout(None)
    if tcp:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    # A kernel-side timeout bounds every blocking call without the extra poll() per call that a
    # Python-level socket timeout would add to the measured path.
    tv = struct.pack("@ll", int(op_timeout), 0)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


def _raw_socket_link(sock: socket.socket, is_dict: bool) -> _Link:
    reader = _FrameReader(sock.recv_into)
    raw = _Link(_socket_sender(sock), reader.recv, reader.consume)
    return _msgspec_link(raw) if is_dict else raw


def _tls_sender(sock: Any) -> Callable[[Any], None]:
    # An SSL socket has no gather write: small frames go as one record, large ones as two.
    sendall, pack = sock.sendall, _HDR.pack

    def send(payload: Any) -> None:
        n = len(payload)
        if n <= GATHER_MIN:
            sendall(pack(n) + payload)
        else:
            sendall(pack(n))
            sendall(payload)

    return send


def _tls_files(tmpdir: str) -> dict[str, str]:
    """A throwaway CA and a certificate for 127.0.0.1 (trustme), written once per run."""
    folder = Path(tmpdir) / "tls"
    files = {"cafile": str(folder / "ca.pem"), "certfile": str(folder / "server.pem")}
    if not folder.exists():
        try:
            import trustme
        except ImportError:
            raise _ChildFailed(
                "the TLS rows need trustme for throwaway certificates: "
                "pip install trustme (or procwire[bench])"
            ) from None
        ca = trustme.CA()
        folder.mkdir(mode=0o700)
        ca.cert_pem.write_to_path(files["cafile"])
        ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(
            files["certfile"]
        )
    return files


def _udp_link(sock: socket.socket, server: bool) -> _Link:
    """One datagram per message; the server answers whoever sent the last datagram."""
    if not server:
        recv: Callable[[], Any] = functools.partial(sock.recv, 65536)
        csend = sock.send

        def send(payload: Any) -> None:
            csend(payload)

        return _bytes_link(send, recv)
    peer: list[Any] = [None]
    recvfrom, sendto = sock.recvfrom, sock.sendto

    def srecv() -> bytes:
        data, peer[0] = recvfrom(65536)
        return data

    def ssend(payload: Any) -> None:
        sendto(payload, peer[0])

    return _bytes_link(ssend, srecv)


def _procwire() -> Any:
    # Imported by name so the benchmark keeps working (and reports an error row) while the API
    # it measures is still changing.
    import importlib

    return importlib.import_module("procwire")


@dataclass(frozen=True)
class _Spec:
    """What a child needs to know about its measurement (pickled to the spawned child)."""

    method: str
    test: str
    settings: Settings
    tmpdir: str
    tag: str

    @property
    def size(self) -> int:
        return int(self.test.split("_")[1]) if self.test.startswith(("tput_", "lat_")) else 0

    @property
    def is_dict(self) -> bool:
        return self.test.startswith("dict")

    @property
    def is_latency(self) -> bool:
        return self.test in ("lat_64", "dict_lat")


def _open_server(
    spec: _Spec,
    res: Mapping[str, Any],
    stack: contextlib.ExitStack,
    announce: Callable[[Any], None],
) -> _Link:
    """The receiving / echoing end. Calls ``announce`` once it can be connected to."""
    s = spec.settings
    method = spec.method
    if method in ("raw_unix", "raw_tcp"):
        tcp = method == "raw_tcp"
        if tcp:
            lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            lsock.bind(("127.0.0.1", 0))
            addr: Any = lsock.getsockname()[1]
        else:
            lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            addr = os.path.join(spec.tmpdir, f"{spec.tag}.sock")
            lsock.bind(addr)
        stack.callback(lsock.close)
        lsock.listen(1)
        lsock.settimeout(s.setup_timeout)
        announce(addr)
        sock, _ = lsock.accept()
        stack.callback(sock.close)
        _tune_socket(sock, s.op_timeout, tcp)
        return _raw_socket_link(sock, spec.is_dict)
    if method == "raw_tls":
        import ssl

        sctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        sctx.load_cert_chain(res["certfile"])
        lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        stack.callback(lsock.close)
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(1)
        lsock.settimeout(s.setup_timeout)
        announce(lsock.getsockname()[1])
        plain, _ = lsock.accept()
        stack.callback(plain.close)
        plain.settimeout(s.setup_timeout)
        tsock = sctx.wrap_socket(plain, server_side=True)
        stack.callback(tsock.close)
        _tune_socket(tsock, s.op_timeout, True)
        reader = _FrameReader(tsock.recv_into)
        return _Link(_tls_sender(tsock), reader.recv, reader.consume)
    if method == "raw_udp":
        usock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        stack.callback(usock.close)
        usock.bind(("127.0.0.1", 0))
        _tune_socket(usock, s.op_timeout, False)
        announce(usock.getsockname()[1])
        return _udp_link(usock, server=True)
    if method == "os_pipe":
        rfile = io.FileIO(res["r"].fileno(), "rb", closefd=False)
        reader = _FrameReader(rfile.readinto)
        send = _pipe_sender(res["w"].fileno()) if "w" in res else _no_send
        announce(None)
        return _Link(send, reader.recv, reader.consume)
    if method == "mp_pipe":
        conn: Connection = res["conn"]
        announce(None)
        if spec.is_dict:
            return _dict_link(conn.send, conn.recv)
        return _bytes_link(conn.send_bytes, conn.recv_bytes)
    if method == "mp_queue":
        announce(None)
        return _bytes_link(res["out"].put if "out" in res else _no_send, res["in"].get)
    if method in ("zmq_ipc", "zmq_tcp"):
        import zmq

        ctx = zmq.Context()
        stack.callback(ctx.term)
        zsock = ctx.socket(zmq.REP if spec.is_latency else zmq.PULL)
        stack.callback(zsock.close)
        _tune_zmq(zsock, s.op_timeout)
        if method == "zmq_ipc":
            zsock.bind(f"ipc://{os.path.join(spec.tmpdir, spec.tag)}.zmq")
        else:
            zsock.bind("tcp://127.0.0.1:*")
        announce(zsock.getsockopt_string(zmq.LAST_ENDPOINT))
        copy = spec.size <= GATHER_MIN
        return _bytes_link(
            functools.partial(zsock.send, copy=copy), functools.partial(zsock.recv, copy=copy)
        )
    if method in ("procwire_unix", "procwire_tcp", "procwire_tls", "procwire_udp"):
        pw = _procwire()
        opts: dict[str, Any] = {}
        if method == "procwire_unix":
            url = f"unix://{os.path.join(spec.tmpdir, spec.tag)}.sock"
        elif method == "procwire_tls":
            url = "tls://127.0.0.1:0"
            opts["certfile"] = res["certfile"]
        else:
            url = f"{method.removeprefix('procwire_')}://127.0.0.1:0"
        srv = pw.listen(url, codec="json" if spec.is_dict else "raw", **opts)
        stack.callback(srv.close)
        announce(str(srv.address))
        ch = srv.accept(timeout=s.setup_timeout)
        stack.callback(ch.close)
        recv = functools.partial(ch.recv, timeout=s.op_timeout)
        return _dict_link(ch.send, recv) if spec.is_dict else _bytes_link(ch.send, recv)
    raise ValueError(f"no server side for {method}")


def _open_client(
    spec: _Spec, res: Mapping[str, Any], stack: contextlib.ExitStack, addr: Any
) -> _Link:
    """The sending / pinging end, connected to what the server announced."""
    s = spec.settings
    method = spec.method
    if method in ("raw_unix", "raw_tcp"):
        tcp = method == "raw_tcp"
        if tcp:
            sock = socket.create_connection(("127.0.0.1", addr), timeout=s.setup_timeout)
        else:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(s.setup_timeout)
            sock.connect(addr)
        stack.callback(sock.close)
        _tune_socket(sock, s.op_timeout, tcp)
        return _raw_socket_link(sock, spec.is_dict)
    if method == "raw_tls":
        import ssl

        cctx = ssl.create_default_context(cafile=res["cafile"])
        plain = socket.create_connection(("127.0.0.1", addr), timeout=s.setup_timeout)
        stack.callback(plain.close)
        tsock = cctx.wrap_socket(plain, server_hostname="127.0.0.1")
        stack.callback(tsock.close)
        _tune_socket(tsock, s.op_timeout, True)
        reader = _FrameReader(tsock.recv_into)
        return _Link(_tls_sender(tsock), reader.recv, reader.consume)
    if method == "raw_udp":
        usock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        stack.callback(usock.close)
        usock.connect(("127.0.0.1", addr))
        _tune_socket(usock, s.op_timeout, False)
        return _udp_link(usock, server=False)
    if method == "os_pipe":
        send = _pipe_sender(res["w"].fileno())
        if "r" in res:
            reader = _FrameReader(io.FileIO(res["r"].fileno(), "rb", closefd=False).readinto)
            return _Link(send, reader.recv, reader.consume)
        return _bytes_link(send, _no_recv)
    if method == "mp_pipe":
        conn: Connection = res["conn"]
        if spec.is_dict:
            return _dict_link(conn.send, conn.recv)
        return _bytes_link(conn.send_bytes, conn.recv_bytes)
    if method == "mp_queue":
        return _bytes_link(res["out"].put, res["in"].get if "in" in res else _no_recv)
    if method in ("zmq_ipc", "zmq_tcp"):
        import zmq

        ctx = zmq.Context()
        stack.callback(ctx.term)
        zsock = ctx.socket(zmq.REQ if spec.is_latency else zmq.PUSH)
        stack.callback(zsock.close)
        _tune_zmq(zsock, s.op_timeout)
        zsock.connect(addr)
        # zmq connects in the background; wait for it so connecting is not timed.
        if not spec.is_latency and not zsock.poll(int(s.setup_timeout * 1000), zmq.POLLOUT):
            raise TimeoutError("pyzmq PUSH never became writable")
        copy = spec.size <= GATHER_MIN
        return _bytes_link(
            functools.partial(zsock.send, copy=copy), functools.partial(zsock.recv, copy=copy)
        )
    if method in ("procwire_unix", "procwire_tcp", "procwire_tls", "procwire_udp"):
        pw = _procwire()
        codec = "json" if spec.is_dict else "raw"
        opts = {"cafile": res["cafile"]} if method == "procwire_tls" else {}
        ch = pw.connect(addr, codec=codec, timeout=s.setup_timeout, **opts)
        stack.callback(ch.close)
        recv = functools.partial(ch.recv, timeout=s.op_timeout)
        return _dict_link(ch.send, recv) if spec.is_dict else _bytes_link(ch.send, recv)
    raise ValueError(f"no client side for {method}")


def _tune_zmq(zsock: Any, op_timeout: float) -> None:
    import zmq

    ms = int(op_timeout * 1000)
    zsock.setsockopt(zmq.RCVTIMEO, ms)
    zsock.setsockopt(zmq.SNDTIMEO, ms)
    # Bounded so that closing never hangs on a dead peer, yet long enough to deliver the end
    # marker, which is still queued when the producer closes.
    zsock.setsockopt(zmq.LINGER, ms)


def _no_send(_: Any) -> None:
    raise RuntimeError("this end only receives")


def _no_recv() -> Any:
    raise RuntimeError("this end only sends")


def _chunk(size: int) -> int:
    """Messages sent between two looks at the clock: about 1/4 MiB, at most 256 messages."""
    return max(1, min(256, (256 * KiB) // max(size, 1)))


def _wait_msg(ctl: Connection, timeout: float) -> tuple[str, Any]:
    if not ctl.poll(timeout):
        raise TimeoutError("no word from the orchestrator")
    kind, value = ctl.recv()
    return str(kind), value


def _wait_go(ctl: Connection, timeout: float) -> Any:
    kind, value = _wait_msg(ctl, timeout)
    if kind != "go":
        raise RuntimeError(f"unexpected control message {kind!r}")
    return value


def _role_server(ctl: Connection, spec: _Spec, res: Mapping[str, Any]) -> dict[str, Any]:
    with contextlib.ExitStack() as stack:
        link = _open_server(spec, res, stack, lambda addr: ctl.send(("ready", addr)))
        if spec.is_latency:
            send, recv = link.send, link.recv
            if spec.is_dict:
                while True:
                    msg = recv()
                    if len(msg) == 1:
                        break
                    send(msg)
            else:
                while True:
                    msg = recv()
                    if len(msg) < END_MAX:
                        break
                    send(msg)
            return {}
        count, nbytes = link.consume()
        t_end = time.monotonic_ns()
        return {"t_end_ns": t_end, "received": count, "bytes": nbytes}


def _role_client(ctl: Connection, spec: _Spec, res: Mapping[str, Any]) -> dict[str, Any]:
    s = spec.settings
    addr = _wait_go(ctl, s.setup_timeout)
    with contextlib.ExitStack() as stack:
        link = _open_client(spec, res, stack, addr)
        send = link.send
        if spec.is_dict:
            payload: Any = SMALL_DICT
            end: Any = END_DICT
        else:
            payload = b"x" * (spec.size or LATENCY_SIZE)
            end = END_BYTES
        if spec.is_latency:
            rtts = _ping(send, link.recv, payload, s)
            send(end)
            _linger(ctl, spec)
            return {"rtts_ns": rtts}
        count = s.dict_count if spec.is_dict else s.count_for(spec.method, spec.size)
        chunk = _chunk(len(payload) if isinstance(payload, bytes) else 64)
        # time.monotonic is CLOCK_MONOTONIC on Linux: one clock for all processes, so the
        # consumer's end time can be compared with this start time.
        clock = time.monotonic_ns
        t0 = clock()
        deadline = t0 + int(s.tput_seconds * 1e9)
        sent = 0
        while sent < count:
            k = min(chunk, count - sent)
            for _ in itertools.repeat(None, k):
                send(payload)
            sent += k
            if clock() >= deadline:
                break
        send(end)
        _linger(ctl, spec)
        return {"t0_ns": t0, "sent": sent}


def _linger(ctl: Connection, spec: _Spec) -> None:
    """Keep a pyzmq producer's connection open until the consumer has everything.

    Here, with libzmq 4.3.5, about one run in three lost the tail of the stream (end marker
    included) when the PUSH socket was closed right after its last send, whatever LINGER said;
    the PULL side was still at its receive high-water mark then.

    A raw TLS 1.3 producer never reads the session tickets the server sends after the
    handshake; closing a socket with unread input makes the kernel send a reset, which throws
    away what the consumer has not read yet. It too waits until the consumer is done.
    """
    if spec.method.startswith(("zmq", "raw_tls")) and not spec.is_latency:
        kind, _ = _wait_msg(ctl, spec.settings.measurement_timeout())
        if kind != "close":
            raise RuntimeError(f"unexpected control message {kind!r}")


def _ping(
    send: Callable[[Any], None], recv: Callable[[], Any], payload: Any, s: Settings
) -> list[int]:
    clock = time.perf_counter_ns
    deadline = clock() + int(s.lat_seconds * 1e9)
    for _ in range(s.lat_warmup):
        send(payload)
        recv()
        if clock() >= deadline:
            break
    rtts: list[int] = []
    append = rtts.append
    deadline = clock() + int(s.lat_seconds * 1e9)
    for _ in range(s.lat_count):
        t = clock()
        send(payload)
        recv()
        t2 = clock()
        append(t2 - t)
        if t2 >= deadline:
            break
    return rtts


_ROLES: dict[str, Callable[[Connection, _Spec, Mapping[str, Any]], dict[str, Any]]] = {
    "server": _role_server,
    "client": _role_client,
}


def _child_main(ctl: Connection, role: str, spec: _Spec, res: Mapping[str, Any]) -> None:
    """Entry point of every spawned child: run one role, report its result or its error."""
    try:
        result = _ROLES[role](ctl, spec, res)
    except BaseException as exc:
        where = traceback.extract_tb(exc.__traceback__)[-1:]
        loc = f" at {Path(where[0].filename).name}:{where[0].lineno}" if where else ""
        with contextlib.suppress(OSError):
            ctl.send(("error", f"{role}: {type(exc).__name__}: {exc}{loc}"))
        if not isinstance(exc, Exception):
            raise
    else:
        ctl.send(("result", result))
    finally:
        ctl.close()


# --------------------------------------------------------------------------------------------
# Orchestrator side


class _ChildFailed(RuntimeError):
    pass


def _resources(
    ctx: Any, spec: _Spec
) -> tuple[dict[str, Any], dict[str, Any], list[Callable[[], None]]]:
    """Objects created before the children start: (client's, server's, closers)."""
    method, lat = spec.method, spec.is_latency
    if method == "os_pipe":
        r1, w1 = ctx.Pipe(duplex=False)
        if not lat:
            return {"w": w1}, {"r": r1}, [r1.close, w1.close]
        r2, w2 = ctx.Pipe(duplex=False)
        return {"w": w1, "r": r2}, {"r": r1, "w": w2}, [r1.close, w1.close, r2.close, w2.close]
    if method == "mp_pipe":
        a, b = ctx.Pipe()
        return {"conn": a}, {"conn": b}, [a.close, b.close]
    if method in ("raw_tls", "procwire_tls"):
        files = _tls_files(spec.tmpdir)
        return {"cafile": files["cafile"]}, {"certfile": files["certfile"]}, []
    if method == "mp_queue":
        q1 = ctx.Queue()
        if not lat:
            return {"out": q1}, {"in": q1}, [q1.close]
        q2 = ctx.Queue()
        return {"out": q1, "in": q2}, {"in": q1, "out": q2}, [q1.close, q2.close]
    return {}, {}, []


def _expect(conn: Connection, proc: Any, kind: str, deadline: float) -> Any:
    """Wait for ``kind`` from a child, failing fast if it dies or errs."""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no {kind!r} from the {proc.name} child in time")
        ready = mp_wait([conn, proc.sentinel], remaining)
        if conn in ready:
            try:
                got_kind, value = conn.recv()
            except EOFError:
                proc.join(1)
                raise _ChildFailed(f"{proc.name} exited (code {proc.exitcode})") from None
            if got_kind == "error":
                raise _ChildFailed(value)
            if got_kind != kind:
                raise _ChildFailed(f"{proc.name}: expected {kind!r}, got {got_kind!r}")
            return value
        if proc.sentinel in ready and not conn.poll():
            proc.join(1)
            raise _ChildFailed(f"{proc.name} exited (code {proc.exitcode})")


def _collect(
    client_ctl: Connection, client: Any, server_ctl: Connection, server: Any, deadline: float
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Both results, whichever comes first; tells the client to close once the server is done.

    When one side fails, the other usually fails next with a mere "peer closed": both are kept
    (the first one is the cause), after a short wait for the second.
    """
    results: dict[str, dict[str, Any]] = {}
    errors: list[str] = []
    pending: dict[Connection, Any] = {client_ctl: client, server_ctl: server}
    while pending:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            if errors:
                break
            names = " and ".join(p.name for p in pending.values())
            raise TimeoutError(f"no result from the {names} child in time")
        ready = mp_wait([*pending, *(p.sentinel for p in pending.values())], remaining)
        for conn, proc in list(pending.items()):
            if conn not in ready and proc.sentinel not in ready:
                continue
            del pending[conn]
            kind: str = "error"
            value: Any = None
            if conn.poll():
                with contextlib.suppress(EOFError):
                    kind, value = conn.recv()
            if value is None:
                proc.join(1)
                value = f"{proc.name} exited (code {proc.exitcode})"
            if kind == "result":
                results[proc.name] = value
                if proc is server:
                    with contextlib.suppress(OSError):
                        client_ctl.send(("close", None))
                continue
            if kind != "error":
                value = f"{proc.name}: expected a result, got {kind!r}"
            if not errors:
                deadline = min(deadline, time.monotonic() + 2.0)
            errors.append(str(value))
    if errors:
        raise _ChildFailed("; then ".join(errors))
    return results["client"], results["server"]


def _reap(procs: Sequence[Any], grace: float) -> None:
    end = time.monotonic() + grace
    for p in procs:
        if p.pid is None:
            continue
        p.join(max(0.0, end - time.monotonic()))
    for p in procs:
        if p.pid is not None and p.is_alive():
            p.terminate()
            p.join(1.0)
        if p.pid is not None and p.is_alive():
            p.kill()
            p.join()


def _measure_python(spec: _Spec) -> tuple[dict[str, Any], dict[str, Any]]:
    ctx = multiprocessing.get_context("spawn")
    s = spec.settings
    deadline = time.monotonic() + s.measurement_timeout()
    client_res, server_res, closers = _resources(ctx, spec)
    procs: list[Any] = []
    ctls: list[Connection] = []
    # A child that outlived a failure is stuck or waiting for a peer that is gone.
    grace = 0.5
    try:
        server_ctl, server_child_ctl = ctx.Pipe()
        client_ctl, client_child_ctl = ctx.Pipe()
        ctls += [server_ctl, server_child_ctl, client_ctl, client_child_ctl]
        server = ctx.Process(
            target=_child_main,
            args=(server_child_ctl, "server", spec, server_res),
            name="server",
            daemon=True,
        )
        client = ctx.Process(
            target=_child_main,
            args=(client_child_ctl, "client", spec, client_res),
            name="client",
            daemon=True,
        )
        procs += [server, client]
        server.start()
        client.start()
        # Only the children may hold their ends, so a dead child shows up as EOF.
        server_child_ctl.close()
        client_child_ctl.close()
        for close in closers:
            close()
        closers = []
        addr = _expect(server_ctl, server, "ready", deadline)
        client_ctl.send(("go", addr))
        results = _collect(client_ctl, client, server_ctl, server, deadline)
        grace = 5.0
        return results
    finally:
        for close in closers:
            with contextlib.suppress(OSError):
                close()
        _reap(procs, grace)
        for c in ctls:
            c.close()


def _node_binary() -> str | None:
    return os.environ.get("PROCWIRE_BENCH_NODE") or shutil.which("node")


def _measure_node(spec: _Spec) -> dict[str, Any]:
    node = _node_binary()
    if node is None:
        raise _ChildFailed("node not found on PATH (set PROCWIRE_BENCH_NODE)")
    s = spec.settings
    if spec.test == "dict":
        args = ["dict", str(s.dict_count), str(s.tput_seconds)]
    elif spec.test == "dict_lat":
        args = ["dict_lat", str(s.lat_warmup), str(s.lat_count), str(s.lat_seconds)]
    elif spec.is_latency:
        args = ["lat", str(spec.size), str(s.lat_warmup), str(s.lat_count), str(s.lat_seconds)]
    else:
        args = ["tput", str(spec.size), str(s.count_for(spec.method, spec.size))]
        args.append(str(s.tput_seconds))
    return run_node_json([node, str(NODE_SCRIPT), *args], s.measurement_timeout())


def run_node_json(cmd: Sequence[str], timeout: float) -> dict[str, Any]:
    """Run a Node benchmark script and return the JSON object on its last line of output.

    The script runs in a session of its own, so a timeout kills Node's forked children along
    with it; a non-zero exit raises ``RuntimeError`` with the end of its stderr."""
    proc = subprocess.Popen(list(cmd), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"node exited {proc.returncode}: {err.decode(errors='replace')[-300:]}")
    result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return result


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    i = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[i]


def _measure(spec: _Spec, rep: int) -> Measurement:
    m = Measurement(rep=rep, method=spec.method, test=spec.test)
    try:
        if spec.method.startswith("procwire"):
            reason = _procwire_unavailable()
            if reason:
                raise _ChildFailed(reason)
        if spec.method == "node_fork":
            res = _measure_node(spec)
            if spec.is_latency:
                m.msgs = int(res["n"])
                m.p50_us = res["p50_ns"] / 1e3
                m.p99_us = res["p99_ns"] / 1e3
                return m
            t0, t_end = int(res["t0_ns"]), int(res["t_end_ns"])
            sent, received, nbytes = int(res["sent"]), int(res["received"]), int(res["bytes"])
        else:
            client, server = _measure_python(spec)
            if spec.is_latency:
                rtts = sorted(client["rtts_ns"])
                if not rtts:
                    raise _ChildFailed("no round trips timed")
                m.msgs = len(rtts)
                m.p50_us = _percentile(rtts, 0.5) / 1e3
                m.p99_us = _percentile(rtts, 0.99) / 1e3
                return m
            t0, t_end = client["t0_ns"], server["t_end_ns"]
            sent, received, nbytes = client["sent"], server["received"], server["bytes"]
        if sent != received:
            raise _ChildFailed(f"sent {sent} messages but {received} arrived")
        m.msgs = received
        m.seconds = (t_end - t0) / 1e9
        if m.seconds <= 0:
            raise _ChildFailed("non-positive elapsed time")
        m.msgs_per_s = received / m.seconds
        if not spec.is_dict:
            m.mb_per_s = nbytes / m.seconds / 1e6
    except Exception as exc:
        m.error = str(exc) or type(exc).__name__
    return m


@functools.lru_cache(maxsize=1)
def _procwire_unavailable() -> str | None:
    try:
        pw = _procwire()
    except Exception as exc:
        return f"procwire not importable: {exc}"
    missing = [n for n in ("listen", "connect") if not callable(getattr(pw, n, None))]
    return f"procwire lacks {', '.join(missing)}" if missing else None


def _machine_info() -> dict[str, str]:
    info = {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "nproc": str(os.cpu_count()),
    }
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    try:
        import zmq

        info["pyzmq"] = f"{zmq.__version__} (libzmq {zmq.zmq_version()})"
    except ImportError:
        info["pyzmq"] = "not installed"
    try:
        import msgspec

        info["msgspec"] = msgspec.__version__
    except ImportError:
        info["msgspec"] = "not installed"
    with contextlib.suppress(OSError):
        info["loadavg"] = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    node = _node_binary()
    if node:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run([node, "--version"], capture_output=True, timeout=10, check=True)
            info["node"] = out.stdout.decode().strip()
    try:
        info["procwire"] = str(getattr(_procwire(), "__version__", "?"))
    except Exception as exc:
        info["procwire"] = f"unavailable ({exc})"
    return info


def select(only: Sequence[str] | None = None) -> list[tuple[str, str]]:
    """The (method, test) pairs to run. ``only`` holds glob patterns of methods and/or tests:
    patterns that name methods filter the methods, the others filter the tests."""
    pairs = [(m.key, t) for t in TESTS for m in METHODS if t in m.tests]
    if not only:
        return pairs
    method_pats = [p for p in only if any(fnmatch.fnmatch(m.key, p) for m in METHODS)]
    test_pats = [p for p in only if any(fnmatch.fnmatch(t, p) for t in TESTS)]
    unknown = set(only) - set(method_pats) - set(test_pats)
    if unknown:
        keys = ", ".join(m.key for m in METHODS)
        raise ValueError(
            f"--only: unknown {sorted(unknown)}; methods: {keys}; tests: {', '.join(TESTS)}"
        )
    return [
        (m, t)
        for m, t in pairs
        if (not method_pats or any(fnmatch.fnmatch(m, p) for p in method_pats))
        and (not test_pats or any(fnmatch.fnmatch(t, p) for p in test_pats))
    ]


def run(
    reps: int = 3,
    quick: bool = False,
    only: Sequence[str] | None = None,
    settings: Settings | None = None,
    progress: Callable[[str], None] | None = None,
) -> BenchResult:
    """Run the channel benchmark and return every measurement.

    Repetitions are interleaved: each one runs every selected measurement once, grouped by test
    so that the figures a ratio compares are taken close together, with the order of methods
    rotated from one repetition to the next.

    >>> result = run(reps=1, quick=True, only=["raw_unix", "procwire_unix"])  # doctest: +SKIP
    >>> print(result.to_markdown())  # doctest: +SKIP
    """
    if reps < 1:
        raise ValueError("reps must be at least 1")
    s = settings or (Settings.quick() if quick else Settings())
    pairs = select(only)
    started = time.strftime("%Y-%m-%d %H:%M:%S %z")
    t_start = time.monotonic()
    result = BenchResult(settings=s, reps=reps, machine=_machine_info(), started=started)
    _procwire_unavailable.cache_clear()
    # Short enough for sun_path (108 bytes) whatever TMPDIR is.
    base = None if len(tempfile.gettempdir()) < 40 else "/tmp"
    tmpdir = tempfile.mkdtemp(prefix="pwbench-", dir=base)
    serial = itertools.count()
    total = reps * len(pairs)
    done = 0
    try:
        for rep in range(reps):
            for test in TESTS:
                methods = [m for m, t in pairs if t == test]
                if not methods:
                    continue
                shift = rep % len(methods)
                for method in methods[shift:] + methods[:shift]:
                    spec = _Spec(method, test, s, tmpdir, f"{method}-{next(serial)}")
                    m = _measure(spec, rep)
                    result.measurements.append(m)
                    done += 1
                    if progress is not None:
                        progress(f"[{done}/{total}] rep {rep + 1} {test:<13} {method:<14} "
                                 f"{_describe(m)}")
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
        result.wall_seconds = time.monotonic() - t_start
        # Other work on the machine moves every figure; the load before and after says how much.
        with contextlib.suppress(OSError):
            load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
            result.machine["loadavg"] = f"{result.machine.get('loadavg', '?')} -> {load}"
    return result


def _describe(m: Measurement) -> str:
    if m.error is not None:
        return f"ERROR {m.error}"
    if m.p50_us is not None:
        return f"p50 {_fmt(m.p50_us)} us, p99 {_fmt(m.p99_us)} us ({m.msgs} round trips)"
    mb = f", {_fmt(m.mb_per_s)} MB/s" if m.mb_per_s is not None else ""
    return f"{_fmt(m.msgs_per_s)} msg/s{mb} ({m.msgs} msgs in {m.seconds:.3f} s)"


# --------------------------------------------------------------------------------------------
# Reporting


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if v >= 100_000:
        return f"{v / 1000:.0f}k"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def _fmt_ratio(r: RatioValue) -> str:
    if r.median is None or r.low is None or r.high is None:
        return "-"
    return f"{r.median:.2f}x [{r.low:.2f}-{r.high:.2f}] n={r.n}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> list[str]:
    align = ["---"] * left + ["---:"] * (len(header) - left)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _markdown(r: BenchResult) -> str:
    s = r.settings
    present = {(m.method, m.test) for m in r.measurements}
    out = [
        f"Channel benchmark, {r.started}: {r.reps} repetition(s), medians; "
        f"ratios taken inside each repetition (median [min-max] n). Wall time "
        f"{r.wall_seconds:.0f} s.",
        "",
        "Machine: "
        + ", ".join(f"{k} {v}" for k, v in r.machine.items() if k not in ("implementation",)),
        "",
        f"Bounds: throughput {s.tput_seconds:g} s or {', '.join(map(str, s.tput_counts))} msgs "
        f"(64 B/1 KiB/64 KiB/1 MiB; mp.Queue {', '.join(map(str, s.queue_counts))}); "
        f"small dict {s.dict_count} msgs; latency {s.lat_warmup} warm-up, then "
        f"{s.lat_count} round trips or {s.lat_seconds:g} s.",
        "",
        "### Two-process transports (payload bytes)",
        "",
    ]
    header = [
        "method", "64 B msg/s", "64 B MB/s", "1 KiB msg/s", "1 KiB MB/s", "64 KiB msg/s",
        "64 KiB MB/s", "1 MiB msg/s", "1 MiB MB/s", "RTT p50 µs", "RTT p99 µs",
    ]
    rows = []
    for meth in METHODS:
        if not any((meth.key, t) in present for t in (*TPUT_TESTS, "lat_64")):
            continue
        row = [meth.label]
        for size in SIZES:
            test = f"tput_{size}"
            row.append(_fmt_cell(r, meth.key, test, "msgs_per_s"))
            row.append(_fmt_cell(r, meth.key, test, "mb_per_s"))
        row.append(_fmt_cell(r, meth.key, "lat_64", "p50_us"))
        row.append(_fmt_cell(r, meth.key, "lat_64", "p99_us"))
        rows.append(row)
    out += _table(header, rows)
    dict_rows = []
    for meth in METHODS:
        if not any((meth.key, t) in present for t in ("dict", "dict_lat")):
            continue
        dict_rows.append(
            [
                meth.dict_label or meth.label,
                _fmt_cell(r, meth.key, "dict", "msgs_per_s"),
                _fmt_cell(r, meth.key, "dict_lat", "p50_us"),
                _fmt_cell(r, meth.key, "dict_lat", "p99_us"),
            ]
        )
    if dict_rows:
        out += [
            "",
            "### Small dict `{\"event\":\"task\",\"data\":{\"id\":123,\"name\":\"doSomething\"}}` "
            "(incl. serialization)",
            "",
        ]
        out += _table(["method", "msg/s", "RTT p50 µs", "RTT p99 µs"], dict_rows)
    ratios = r.ratios()
    targets = [x for x in ratios if x.goal is not None]
    if any(t.n for t in targets):
        out += ["", "### Targets", ""]
        out += _table(
            ["target", "ratio (median [min-max] n)", "goal", "status"],
            [
                [
                    t.label,
                    _fmt_ratio(t),
                    f"{t.goal[0]} {t.goal[1]:g}x" if t.goal else "",
                    "-" if t.met is None else ("met" if t.met else "**not met**"),
                ]
                for t in targets
            ],
            left=1,
        )
    info = [x for x in ratios if x.goal is None and x.n]
    if info:
        out += ["", "### Other ratios", ""]
        out += _table(["ratio", "value"], [[x.label, _fmt_ratio(x)] for x in info])
    errors = r.errors()
    if errors:
        out += ["", "### Errors", ""]
        seen: set[tuple[str, str, str]] = set()
        for e in errors:
            key = (e.method, e.test, e.error or "")
            if key not in seen:
                seen.add(key)
                out.append(f"- {e.method} {e.test} (rep {e.rep + 1}): {e.error}")
    return "\n".join(out) + "\n"


def _fmt_cell(r: BenchResult, method: str, test: str, metric: str) -> str:
    if not any(m.method == method and m.test == test for m in r.measurements):
        return "-"
    v = r.median(method, test, metric)
    if v is None:
        return "err" if metric != "mb_per_s" or not test.startswith("dict") else "-"
    return _fmt(v)


# --------------------------------------------------------------------------------------------
# Command line


def main(argv: Sequence[str] | None = None, default_json: Path | None = None) -> int:
    """``python benchmarks/channels.py [--quick] [--reps N] [--json out.json] [--only NAME...]``"""
    parser = argparse.ArgumentParser(
        prog="channels.py",
        description="Benchmark procwire channels against raw sockets, pipes, multiprocessing, "
        "pyzmq and Node fork() IPC. Prints markdown tables; writes all measurements as JSON.",
    )
    parser.add_argument("--quick", action="store_true", help="fewer messages, 1 repetition")
    parser.add_argument("--reps", type=int, default=None, help="repetitions (default 3; quick 1)")
    parser.add_argument("--json", type=Path, default=default_json, help="write results here")
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="NAME",
        help="glob patterns of methods (" + ", ".join(m.key for m in METHODS) + ") and/or tests ("
        + ", ".join(TESTS) + ")",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    args = parser.parse_args(argv)
    reps = args.reps if args.reps is not None else (1 if args.quick else 3)
    try:
        select(args.only)
    except ValueError as exc:
        parser.error(str(exc))

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    result = run(reps=reps, quick=args.quick, only=args.only,
                 progress=None if args.quiet else progress)
    print(result.to_markdown())
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result.to_dict(), indent=1) + "\n")
        print(f"results written to {args.json}", file=sys.stderr)
    return 1 if result.errors() else 0


if __name__ == "__main__":
    raise SystemExit(main())
