"""The asyncio twin: procwire.cluster.aio.Cluster driving asyncio workers."""

from __future__ import annotations

import asyncio

import pytest

import procwire
import procwire.cluster.aio as pca

from . import _targets
from .conftest import Clusters


def test_aio_cluster_and_workers(clusters: Clusters) -> None:
    async def main() -> None:
        cluster = pca.Cluster(_targets.async_echo, workers=2, backoff=0.05)
        clusters.made.append(cluster.sync)  # stopped by the fixture whatever happens
        async with cluster:
            got = sorted([(await cluster.recv(timeout=10)).sender for _ in range(2)])
            assert got == [1, 2]
            await cluster.send(1, {"relay_to": 2, "payload": "via 1"})
            m = await cluster.recv(timeout=10)
            assert m == pca.Message(2, {"sender": 1, "got": "via 1"})
            await cluster.broadcast("all")
            got2 = sorted([(await cluster.recv(timeout=10)).sender for _ in range(2)])
            assert got2 == [1, 2]
            # A cancelled recv loses nothing.
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.2):
                    await cluster.recv()
            await cluster.send(2, "after cancel")
            m = await cluster.recv(timeout=10)
            assert m.data == {"sender": 0, "got": "after cancel"}
            with pytest.raises(procwire.Timeout):
                await cluster.recv(timeout=0.2)
        assert all(w.state == "stopped" for w in cluster.workers)

    asyncio.run(main())
