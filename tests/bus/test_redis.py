"""The Bus on a real redis-server: across processes, request/reply, a Redis restart mid-test,
bad input on the channel, and Redis disconnecting a subscriber that reads too slowly."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
import redis

import procwire
from procwire.bus import AsyncBus, Bus, Event, NoResponder, RemoteError

CHILD = r"""
import sys
from procwire.bus import Bus
url, channel = sys.argv[1], sys.argv[2]
with Bus(url, channel=channel) as bus:
    pings = bus.subscribe("ping.*", timeout=15)
    bus.handle("mul", lambda d: d["a"] * d["b"])
    print("ready", flush=True)
    for ev in pings:
        if ev.name == "ping.stop":
            break
        bus.emit("pong", {"seen": ev.name, "data": ev.data})
"""


def drain_until(sub: Any, pred: Any, timeout: float = 10.0) -> list[Event]:
    """Read ``sub`` until an event satisfies ``pred``; everything read, in order."""
    seen: list[Event] = []
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        assert left > 0, f"no matching event in {timeout} s; saw {seen[-5:]}"
        ev = sub.get(timeout=left)
        seen.append(ev)
        if pred(ev):
            return seen


def test_two_processes_exchange_events_and_requests(redis_server: Any, children: Any) -> None:
    with Bus(redis_server.url, channel="app1") as bus:
        pongs = bus.subscribe("pong", timeout=10)
        child = children.python(CHILD, redis_server.url, "app1", stdout=-1)
        assert child.stdout.readline().strip() == b"ready"
        for i in range(20):
            bus.emit(f"ping.{i}", {"i": i})
        got = [pongs.get(10).data for _ in range(20)]
        assert got == [{"seen": f"ping.{i}", "data": {"i": i}} for i in range(20)]
        assert bus.request("mul", {"a": 6, "b": 7}, timeout=5) == 42
        with pytest.raises(RemoteError) as info:
            bus.request("mul", {"a": 1}, timeout=5)
        assert info.value.type == "KeyError"
        bus.emit("ping.stop")
        assert child.wait(timeout=10) == 0
        with pytest.raises(NoResponder):  # the child is gone: nobody subscribes any more
            bus.request("mul", {"a": 1, "b": 2}, timeout=5)


def test_wire_format_is_the_json_envelope(redis_server: Any) -> None:
    raw = redis.Redis.from_url(redis_server.url)
    ps = raw.pubsub()
    try:
        ps.subscribe("my_app_channel")
        assert ps.get_message(timeout=5)["type"] == "subscribe"
        with Bus(redis_server.url, channel="my_app_channel") as bus:
            seen = bus.subscribe("*", timeout=5)
            assert bus.emit("user.created", {"id": 1}) == 2  # the raw client and the bus
            msg = ps.get_message(timeout=5)
            assert json.loads(msg["data"]) == {"event": "user.created", "data": {"id": 1}}
            raw.publish("my_app_channel", json.dumps({"event": "from.raw", "data": [1]}))
            raw.publish("my_app_channel", json.dumps({"event": "no.data"}))
            assert [seen.get(5) for _ in range(3)] == [
                Event("user.created", {"id": 1}), Event("from.raw", [1]), Event("no.data", None)]
    finally:
        ps.close()
        raw.close()


def test_channels_are_separate_and_the_url_can_name_one(redis_server: Any) -> None:
    with Bus(redis_server.url, channel="one") as one, \
            Bus(redis_server.url + "?channel=two") as two:
        s1, s2 = one.subscribe("*"), two.subscribe("*")
        one.emit("a", 1)
        two.emit("b", 2)
        assert s1.get(5) == Event("a", 1) and s2.get(5) == Event("b", 2)
        time.sleep(0.05)
        assert s1.get_nowait() is None and s2.get_nowait() is None
        assert two.stats()["backend"]["channel"] == "two"


def test_restart_mid_test_reconnects_resubscribes_and_reports_the_gap(
        redis_server: Any) -> None:
    with Bus(redis_server.url, channel="r") as a, Bus(redis_server.url, channel="r") as b:
        events = b.subscribe("e", timeout=10)
        gaps = b.subscribe("procwire.gap", timeout=15)
        b.handle("echo", lambda d: d)
        a.emit("e", 1)
        assert events.get(5).data == 1

        redis_server.stop()
        t0 = time.monotonic()
        with pytest.raises(procwire.Timeout, match="unreachable"):
            a.emit("e", "lost?", timeout=0.3)  # never a silent drop
        assert time.monotonic() - t0 < 3
        redis_server.start()

        gap = gaps.get(15)
        assert gap.data["reason"] in ("restarted", "connection_lost")
        assert gap.data["down_for"] >= 0
        a.emit("e", 2)  # the publisher's pool reconnects by itself
        assert drain_until(events, lambda ev: ev.data == 2)[-1].data == 2
        assert a.request("echo", {"back": True}, timeout=10) == {"back": True}
        assert b.stats()["backend"]["reconnects"] >= 1
        assert b.stats()["notices"]["procwire.gap"] >= 1


def test_bad_input_is_reported_and_skipped(redis_server: Any) -> None:
    raw = redis.Redis.from_url(redis_server.url)
    try:
        with Bus(redis_server.url, channel="b", max_message_size=1000) as bus:
            good = bus.subscribe("good.*", timeout=5)
            bad = bus.subscribe("procwire.bad_message", timeout=5)
            for i, junk in enumerate([
                b"not json at all",
                b'{"data": 1}',                                   # no "event"
                b'{"event": 5, "data": 1}',                       # "event" not a string
                json.dumps({"event": "big", "data": "x" * 2000}).encode(),  # oversized
                b'{"event": "procwire.gap", "data": {}}',        # a forged notice
                b'["event", "good.fake"]',                        # not an object
            ]):
                raw.publish("b", junk)
                raw.publish("b", json.dumps({"event": f"good.{i}", "data": i}))
            assert [good.get(5).data for _ in range(6)] == list(range(6))
            reasons = [bad.get(5).data["reason"] for _ in range(6)]
            assert reasons[0].startswith("not JSON")
            assert "event" in reasons[1] and "event" in reasons[2]
            assert "max_message_size" in reasons[3]
            assert "not allowed" in reasons[4]
            assert bus.stats()["backend"]["bad_messages"] == 6
            with pytest.raises(procwire.MessageTooLarge):
                bus.emit("big", "x" * 2000)
    finally:
        raw.close()


def test_redis_dropping_a_slow_subscriber_is_detected_and_reported(redis_server: Any) -> None:
    raw = redis.Redis.from_url(redis_server.url)
    try:
        raw.config_set("client-output-buffer-limit", "pubsub 262144 0 0")
        with Bus(redis_server.url, channel="slow") as bus:
            flood = bus.subscribe("flood", maxsize=1, policy="block")
            gaps = bus.subscribe("procwire.gap")
            chunk = json.dumps({"event": "flood", "data": "x" * 100_000})
            pipe = raw.pipeline(transaction=False)
            for _ in range(300):  # 30 MB: more than the socket buffers and the 256 KiB limit
                pipe.publish("slow", chunk)
            pipe.execute()
            # Now read: the bus drains what the kernel held, then finds the connection closed.
            deadline = time.monotonic() + 20
            gap = None
            while gap is None:
                assert time.monotonic() < deadline, "no procwire.gap after the overflow"
                try:
                    flood.get(timeout=0.01)
                except procwire.Timeout:
                    pass
                gap = gaps.get_nowait()
            assert gap.data["reason"] == "dropped_by_server"
            assert "client-output-buffer-limit" in gap.data["detail"]
            assert bus.stats()["backend"]["server_disconnects"] == 1
            assert flood.stats()["blocked"] >= 1
            bus.emit("flood", "after")  # flowing again
            assert drain_until(flood, lambda ev: ev.data == "after")[-1].data == "after"
    finally:
        raw.close()


def test_connecting_to_nothing_fails_fast() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(procwire.ConnectionRefused):
        Bus(f"redis://127.0.0.1:{port}/0", timeout=2)


def test_async_bus_over_redis(redis_server: Any) -> None:
    async def main() -> None:
        async with AsyncBus(redis_server.url, channel="aio") as a, \
                AsyncBus(redis_server.url, channel="aio") as b:
            sub = b.subscribe("n.*", timeout=5)
            got: list[Any] = []
            b.on("n.*", lambda name, data: got.append(name), with_event=True)

            async def double(d: int) -> int:
                return d * 2

            await b.handle("double", double)
            for i in range(5):
                await a.emit(f"n.{i}", i)
            assert [(await sub.get(5)).data for _ in range(5)] == list(range(5))
            assert await a.request("double", 21, timeout=5) == 42
            with pytest.raises(NoResponder):
                await a.request("triple", 1, timeout=5)
            for _ in range(100):
                if len(got) == 5:
                    break
                await asyncio.sleep(0.02)
            assert got == [f"n.{i}" for i in range(5)]

    asyncio.run(asyncio.wait_for(main(), 30))


def test_emit_many_pipelines_in_order(redis_server: Any) -> None:
    with Bus(redis_server.url, channel="many") as bus:
        sub = bus.subscribe("*", timeout=5)
        bus.emit_many([(f"e.{i}", i) for i in range(500)])
        assert [sub.get(5).data for _ in range(500)] == list(range(500))
        with pytest.raises(procwire.EncodeError):
            bus.emit_many([("ok", 1), ("bad", object())])
        assert sub.get_nowait() is None


def test_cli_emit_listen_request(redis_server: Any, children: Any) -> None:
    from typer.testing import CliRunner

    from procwire.bus.cli import app

    url = redis_server.url
    listener = children.python(
        "from procwire.bus.cli import app; app()", "listen", "a.*", "c", "--url", url,
        "--channel", "cli", "--count", "2", "--timeout", "10", stdout=-1, stderr=-1)
    assert listener.stderr.readline().strip() == b"listening"
    runner = CliRunner()
    for name in ("a.1", "b.1", "c"):
        result = runner.invoke(app, ["emit", name, '{"n": 1}', "--url", url, "--channel", "cli"])
        assert result.exit_code == 0, result.output
    out, _ = listener.communicate(timeout=10)
    assert [json.loads(line) for line in out.splitlines()] == [
        {"event": "a.1", "data": {"n": 1}}, {"event": "c", "data": {"n": 1}}]
    with Bus(url, channel="cli") as bus:
        bus.handle("add", lambda d: d["x"] + d["y"])
        result = runner.invoke(app, ["request", "add", '{"x": 1, "y": 2}', "--url", url,
                                     "--channel", "cli"])
        assert result.exit_code == 0 and result.stdout.strip() == "3"
    result = runner.invoke(app, ["request", "add", "{}", "--url", url, "--channel", "cli"])
    assert result.exit_code == 1 and "no responder" in result.output
    result = runner.invoke(app, ["emit", "x", "{bad", "--url", url])
    assert result.exit_code != 0
