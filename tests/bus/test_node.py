"""A Node process with ioredis and the {"event", "data"} envelope is a peer on a procwire Redis
bus: events both ways, and request/reply both ways (a Node responder; Node asking a Python
handler, finding it with PUBSUB CHANNELS as the wire format says)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from procwire.bus import Bus, Event, RemoteError

NODE_DIR = Path(__file__).resolve().parent.parent / "node"
SCRIPT = NODE_DIR / "bus_ioredis.js"


def node_or_fail() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.fail("node not found: install Node 20 (`sudo apt-get install nodejs`)")
    if not (NODE_DIR / "node_modules" / "ioredis").is_dir():
        pytest.fail("ioredis is not installed: run `npm install --prefix tests/node`")
    return node


def test_node_ioredis_peer_both_ways(redis_server: Any) -> None:
    node = node_or_fail()
    with Bus(redis_server.url, channel="interop") as bus:
        from_node = bus.subscribe("node.*", timeout=10)
        proc = subprocess.Popen([node, str(SCRIPT), redis_server.url, "interop"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == b"ready"
            assert from_node.get(10) == Event("node.hello", {"from": "ioredis", "n": [1, 2, 3]})
            for i in range(5):
                bus.emit("py.ping", {"i": i, "text": "héllo\n\u2028"})
            pongs = [from_node.get(10) for _ in range(5)]
            assert pongs == [Event("node.pong", {"got": {"i": i, "text": "héllo\n\u2028"}})
                             for i in range(5)]
            assert bus.request("node.add", {"x": 2, "y": 40}, timeout=10) == 42
            with pytest.raises(RemoteError) as info:
                bus.request("node.add", {"x": "two", "y": 1}, timeout=10)
            assert (info.value.type, info.value.message) == ("TypeError", "x must be a number")
            # Node as the requester, speaking the wire format by hand, to a Python handler
            bus.handle("py.mul", lambda d: d["a"] * d["b"])
            bus.emit("py.ask", {"name": "py.mul", "args": {"a": 6, "b": 7}})
            assert from_node.get(10) == Event("node.answer", {"result": 42})
            bus.emit("py.ask", {"name": "py.nobody", "args": {}})
            assert from_node.get(10) == Event("node.answer", {"error": {"type": "NoResponder"}})
            bus.emit("py.quit")
            assert proc.wait(timeout=10) == 0, proc.stderr.read() if proc.stderr else ""
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
            for f in (proc.stdout, proc.stderr):
                if f is not None:
                    f.close()
