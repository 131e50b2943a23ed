"""JSON lines over pipes (``open_pipes``, what ``stdio://`` runs on): the conformance suite.

The pairs are two ``os.pipe()``s in one process; tests/test_stdio.py covers real children.
JSON lines carry text, so the tests that send arbitrary bytes with the raw codec are replaced
by the same checks with JSON strings.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import procwire
import procwire.aio as aio
from procwire import Timeout
from procwire.codecs import get_codec
from procwire.testing import AsyncConformance, SyncConformance
from procwire.transports.base import TransportOptions
from procwire.transports.stdio import aopen_pipes, open_pipes


def _opts(options: dict[str, Any]) -> TransportOptions:
    return TransportOptions(**options)


def _text(rnd: random.Random, size: int) -> str:
    # A JSON string of exactly ``size`` bytes once encoded (quotes included).
    k = max(0, size - 2)
    return rnd.randbytes(k // 2 + 1).hex()[:k]


class StdioConfig:
    supports_listener = False
    supports_reconnect = False
    codecs = ("json",)

    def message_sizes(self) -> list[int]:
        top = self.max_message_size  # type: ignore[attr-defined]
        return sorted(s for s in {2, 3, 255, 4096, 65536, 65537, 1 << 20, top - 1, top}
                      if s <= top)


class TestStdioPipes(StdioConfig, SyncConformance):
    def test_message_sizes(self, tmp_path: Path) -> None:
        """JSON strings from 2 bytes to ``max_message_size`` arrive intact."""
        with self._session():
            a, b = self.pair(tmp_path, "json")
            rnd = random.Random(1234)
            for size in self.message_sizes():
                self._roundtrip(a, b, _text(rnd, size))
            self._roundtrip(b, a, _text(rnd, self.max_message_size))

    def test_backpressure(self, tmp_path: Path) -> None:
        """A reader that does not read makes send() time out; then everything arrives."""
        filler = "x" * (16 * 1024)
        with self._session():
            a, b = self.pair(tmp_path, "json", write_buffer=64 * 1024)
            sent = 0
            for i in range(4096):
                try:
                    a.send([i, filler], timeout=0.05)
                except Timeout:
                    break
                sent += 1
            else:
                raise AssertionError("send() never blocked: the write buffer is unbounded")
            finishing = self.worker(a.send, "END", timeout=self.test_timeout)
            seqs = []
            for _ in range(sent + 2):
                msg = b.recv(timeout=self.timeout)
                if msg == "END":
                    break
                seqs.append(msg[0])
            finishing.finish(self.timeout)
            assert seqs in (list(range(sent)), list(range(sent + 1)))

    def make_pair(self, tmp_path: Path, codec: str,
                  **options: Any) -> tuple[procwire.Channel, procwire.Channel]:
        r1, w1 = os.pipe()
        r2, w2 = os.pipe()
        opts = _opts(options)
        return (procwire.Channel(open_pipes(r1, w2, opts), get_codec(codec)),
                procwire.Channel(open_pipes(r2, w1, opts), get_codec(codec)))


class TestStdioPipesAsync(StdioConfig, AsyncConformance):
    async def _t_message_sizes(self, tmp_path: Path) -> None:
        a, b = await self.pair(tmp_path, "json")
        rnd = random.Random(1234)
        for size in self.message_sizes():
            await self._roundtrip(a, b, _text(rnd, size))
        await self._roundtrip(b, a, _text(rnd, self.max_message_size))

    async def _t_backpressure(self, tmp_path: Path) -> None:
        filler = "x" * (16 * 1024)
        a, b = await self.pair(tmp_path, "json", write_buffer=64 * 1024)
        sent = 0
        for i in range(4096):
            try:
                await a.send([i, filler], timeout=0.05)
            except Timeout:
                break
            sent += 1
        else:
            raise AssertionError("send() never blocked: the write buffer is unbounded")
        finishing = self.task(a.send("END", timeout=self.test_timeout))
        seqs = []
        for _ in range(sent + 2):
            msg = await b.recv(timeout=self.timeout)
            if msg == "END":
                break
            seqs.append(msg[0])
        await self.finish(finishing)
        assert seqs in (list(range(sent)), list(range(sent + 1)))

    async def amake_pair(self, tmp_path: Path, codec: str,
                         **options: Any) -> tuple[aio.Channel, aio.Channel]:
        r1, w1 = os.pipe()
        r2, w2 = os.pipe()
        opts = _opts(options)
        return (aio.Channel(await aopen_pipes(r1, w2, opts), get_codec(codec)),
                aio.Channel(await aopen_pipes(r2, w1, opts), get_codec(codec)))
