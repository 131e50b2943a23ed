"""The udp:// transport: datagrams, demultiplexing by peer, bounds and counters, best-effort
close. Loopback only; a loss is tolerated only where the kernel could really drop a datagram."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

import procwire
import procwire.aio as aio
from procwire.transports import udp

T = 5.0  # bound on every blocking call


@pytest.fixture
def raw_sockets() -> Iterator[list[socket.socket]]:
    """Plain UDP sockets made by a test (a forged or foreign peer), closed at teardown."""
    socks: list[socket.socket] = []
    try:
        yield socks
    finally:
        for s in socks:
            s.close()


def raw_peer(socks: list[socket.socket], family: int = socket.AF_INET) -> socket.socket:
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.settimeout(T)
    socks.append(s)
    return s


def target(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("udp://").rsplit(":", 1)
    return host.strip("[]"), int(port)


def stats(obj: Any) -> dict[str, int]:
    """The transport counters behind a Channel or Listener."""
    inner = getattr(obj, "_stream", None) or obj._backend
    result: dict[str, int] = inner.stats()
    return result


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# -- blocking ---------------------------------------------------------------------------------

def test_round_trip_and_addresses() -> None:
    with procwire.listen("udp://127.0.0.1:0") as srv:
        host, port = target(srv.address)
        assert host == "127.0.0.1" and port > 0
        with procwire.connect(srv.address, timeout=T) as c:
            assert c.reliable is False
            assert c.remote_address == srv.address
            c.send({"a": 1})
            with srv.accept(timeout=T) as s:
                assert s.reliable is False
                assert s.remote_address == c.local_address
                assert s.local_address == srv.address
                assert s.recv(timeout=T) == {"a": 1}
                s.send(["reply"])
                assert c.recv(timeout=T) == ["reply"]
                assert stats(s)["received"] == 1 and stats(s)["sent"] == 1
                assert stats(c)["received"] == 1 and stats(c)["sent"] == 1


def test_many_small_messages_in_bursts() -> None:
    """Bursts of 50 small datagrams, each acknowledged, stay far below the socket buffer; a
    rare kernel drop is tolerated, corruption or duplication is not."""
    bursts, per = 20, 50
    with procwire.listen("udp://127.0.0.1:0", codec="msgpack") as srv, \
            procwire.connect(srv.address, codec="msgpack", timeout=T) as c:
        c.send(["hello"])
        with srv.accept(timeout=T) as s:
            assert s.recv(timeout=T) == ["hello"]
            got: list[int] = []
            for b in range(bursts):
                for i in range(per):
                    c.send(b * per + i, timeout=T)
                for _ in range(per):
                    try:
                        got.append(s.recv(timeout=1.0))
                    except procwire.Timeout:
                        break
                s.send("ack")
                assert c.recv(timeout=T) == "ack"
            assert len(set(got)) == len(got)
            assert all(0 <= m < bursts * per for m in got)
            assert got == sorted(got)  # one loopback socket does not reorder
            assert len(got) >= bursts * per * 0.9
            assert stats(s)["dropped_queue_full"] == 0


def test_largest_datagram_passes_one_more_byte_refused() -> None:
    with procwire.listen("udp://127.0.0.1:0", codec="raw") as srv, \
            procwire.connect(srv.address, codec="raw", timeout=T) as c:
        with pytest.raises(procwire.MessageTooLarge):
            c.send(bytes(udp.IPV4_MAX_DATAGRAM + 1))
        big = bytes(range(256)) * (udp.IPV4_MAX_DATAGRAM // 256) + b"x" * (
            udp.IPV4_MAX_DATAGRAM % 256)
        assert len(big) == udp.IPV4_MAX_DATAGRAM
        c.send(big, timeout=T)
        with srv.accept(timeout=T) as s:
            assert s.recv(timeout=T) == big
            assert stats(s)["received"] == 1  # the refused one was never sent
            with pytest.raises(procwire.MessageTooLarge):
                s.send(memoryview(bytes(udp.IPV4_MAX_DATAGRAM + 1)))


def test_max_frame_size_lowers_the_limit_and_truncated_datagrams_are_dropped(
        raw_sockets: list[socket.socket]) -> None:
    with procwire.listen("udp://127.0.0.1:0", codec="raw", max_frame_size=100) as srv, \
            procwire.connect(srv.address, codec="raw", max_frame_size=100, timeout=T) as c:
        with pytest.raises(procwire.MessageTooLarge):
            c.send(bytes(101))
        c.send(bytes(100), timeout=T)
        with srv.accept(timeout=T) as s:
            assert s.recv(timeout=T) == bytes(100)
        # A sender that ignores the limit: its datagram is dropped, never delivered cut.
        rogue = raw_peer(raw_sockets)
        rogue.sendto(b"hello", target(srv.address))
        with srv.accept(timeout=T) as s:
            assert s.recv(timeout=T) == b"hello"
            rogue.sendto(bytes(101), target(srv.address))
            rogue.sendto(b"after", target(srv.address))
            assert s.recv(timeout=T) == b"after"
            assert stats(s)["dropped_truncated"] == 1
            assert stats(srv)["dropped_truncated"] == 1


def test_empty_message_is_refused_not_sent() -> None:
    with procwire.listen("udp://127.0.0.1:0", codec="raw") as srv, \
            procwire.connect(srv.address, codec="raw", timeout=T) as c:
        with pytest.raises(procwire.EncodeError):
            c.send(b"")
        c.send(b"x")
        with srv.accept(timeout=T) as s:
            assert s.recv(timeout=T) == b"x"  # the channel was not closed by it


def test_two_clients_get_two_channels() -> None:
    with procwire.listen("udp://127.0.0.1:0") as srv, \
            procwire.connect(srv.address, timeout=T) as c1, \
            procwire.connect(srv.address, timeout=T) as c2:
        c1.send("one-a")
        c2.send("two-a")
        c1.send("one-b")
        c2.send("two-b")
        with srv.accept(timeout=T) as s1, srv.accept(timeout=T) as s2:
            by_peer = {s1.remote_address: s1, s2.remote_address: s2}
            assert set(by_peer) == {c1.local_address, c2.local_address}
            a, b = by_peer[c1.local_address], by_peer[c2.local_address]
            assert [a.recv(timeout=T), a.recv(timeout=T)] == ["one-a", "one-b"]
            assert [b.recv(timeout=T), b.recv(timeout=T)] == ["two-a", "two-b"]
            a.send("to one")
            b.send("to two")
            assert c1.recv(timeout=T) == "to one"
            assert c2.recv(timeout=T) == "to two"
            with pytest.raises(procwire.Timeout):
                srv.accept(timeout=0.1)
            assert stats(srv)["peers"] == 2


def test_receivers_in_two_threads_share_the_socket() -> None:
    """Each thread waits on its own channel; whichever reads the socket routes for both."""
    with procwire.listen("udp://127.0.0.1:0") as srv, \
            procwire.connect(srv.address, timeout=T) as c1, \
            procwire.connect(srv.address, timeout=T) as c2:
        c1.send(1)
        c2.send(2)
        chans = {}
        for _ in range(2):
            ch = srv.accept(timeout=T)
            chans[ch.remote_address] = ch
        try:
            for ch in chans.values():
                ch.recv(timeout=T)
            results: dict[str, Any] = {}

            def wait(name: str, ch: procwire.Channel) -> None:
                try:
                    results[name] = ch.recv(timeout=T)
                except Exception as exc:
                    results[name] = exc

            threads = [threading.Thread(target=wait, args=(n, ch), daemon=True)
                       for n, ch in chans.items()]
            for t in threads:
                t.start()
            c2.send("for two")
            c1.send("for one")
            for t in threads:
                t.join(T + 1)
            assert results == {c1.local_address: "for one", c2.local_address: "for two"}
        finally:
            for ch in chans.values():
                ch.close()


def test_per_peer_queue_overflow_is_counted() -> None:
    with procwire.listen("udp://127.0.0.1:0", queue=4) as srv, \
            procwire.connect(srv.address, timeout=T) as c1, \
            procwire.connect(srv.address, timeout=T) as c2:
        c1.send(0)
        with srv.accept(timeout=T) as s1:
            for i in range(1, 10):
                c1.send(i)
            c2.send("marker")
            # accept() reads the socket in arrival order: all of c1's datagrams come first.
            with srv.accept(timeout=T) as s2:
                assert s2.recv(timeout=T) == "marker"
                assert [s1.recv(timeout=T) for _ in range(4)] == [0, 1, 2, 3]
                with pytest.raises(procwire.Timeout):
                    s1.recv(timeout=0.1)
                assert stats(s1)["dropped_queue_full"] == 6
                assert stats(srv)["dropped_queue_full"] == 6
                c1.send("room again")
                assert s1.recv(timeout=T) == "room again"


def test_max_peers_drops_extra_peers() -> None:
    with procwire.listen("udp://127.0.0.1:0", max_peers=1) as srv, \
            procwire.connect(srv.address, timeout=T) as c1, \
            procwire.connect(srv.address, timeout=T) as c2:
        c1.send("in")
        c2.send("no room")
        c1.send("marker")
        with srv.accept(timeout=T) as s1:
            assert s1.recv(timeout=T) == "in"
            assert s1.recv(timeout=T) == "marker"
            assert stats(srv)["dropped_max_peers"] == 1
            with pytest.raises(procwire.Timeout):
                srv.accept(timeout=0.1)
        # The slot is free once that channel is closed.
        c2.send("now")
        with srv.accept(timeout=T) as s2:
            assert s2.recv(timeout=T) == "now"


def test_close_notification_both_ways() -> None:
    with procwire.listen("udp://127.0.0.1:0") as srv:
        c = procwire.connect(srv.address, timeout=T)
        c.send("before close")
        c.close()
        with srv.accept(timeout=T) as s:
            assert s.recv(timeout=T) == "before close"
            with pytest.raises(procwire.ConnectionClosed) as info:
                s.recv(timeout=T)
            assert info.value.reason == "eof"
            with pytest.raises(procwire.ConnectionClosed):
                s.recv(timeout=T)  # sticky
            with pytest.raises(procwire.ConnectionClosed):
                s.send("too late")
        with procwire.connect(srv.address, timeout=T) as c2:
            c2.send("hi")
            s2 = srv.accept(timeout=T)
            assert s2.recv(timeout=T) == "hi"
            s2.close()
            with pytest.raises(procwire.ConnectionClosed):
                c2.recv(timeout=T)
            with pytest.raises(procwire.ConnectionClosed):
                c2.send("anyone?")
            assert list(c2) == []  # iteration ends at the close notification


def test_same_peer_after_close_is_a_new_channel(raw_sockets: list[socket.socket]) -> None:
    with procwire.listen("udp://127.0.0.1:0") as srv:
        peer = raw_peer(raw_sockets)  # a plain UDP program: it ignores close notifications
        peer.sendto(b"1", target(srv.address))
        s = srv.accept(timeout=T)
        assert s.recv(timeout=T) == 1
        s.close()
        assert peer.recv(100) == b""  # the close notification
        peer.sendto(b"2", target(srv.address))
        with srv.accept(timeout=T) as again:
            assert again.remote_address == s.remote_address
            assert again.recv(timeout=T) == 2


def test_nobody_listening_raises_refused() -> None:
    port = free_udp_port()
    with procwire.connect(f"udp://127.0.0.1:{port}", timeout=T) as c:
        c.send("anyone?")
        with pytest.raises(procwire.ConnectionClosed) as info:
            c.recv(timeout=T)
        assert info.value.reason == "refused"
        assert isinstance(info.value, procwire.ConnectionRefused)
        with pytest.raises(procwire.ConnectionRefused):
            c.send("still?")


def test_garbage_datagram_gives_decode_error_then_next_message(
        raw_sockets: list[socket.socket]) -> None:
    with procwire.listen("udp://127.0.0.1:0") as srv:
        peer = raw_peer(raw_sockets)
        peer.sendto(b"\xff{not json", target(srv.address))
        peer.sendto(b'{"ok": true}', target(srv.address))
        with srv.accept(timeout=T) as s:
            with pytest.raises(procwire.DecodeError):
                s.recv(timeout=T)
            assert s.recv(timeout=T) == {"ok": True}
            s.send("reply")
            assert peer.recv(100) == b'"reply"'  # plain UDP peers get plain JSON


def test_ipv6_loopback() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        srv = procwire.listen("udp://[::1]:0", codec="raw")
    except procwire.AddressError as exc:
        pytest.skip(f"::1 not configured: {exc}")
    with srv, procwire.connect(srv.address, codec="raw", timeout=T) as c:
        assert srv.address.startswith("udp://[::1]:")
        big = b"6" * udp.IPV6_MAX_DATAGRAM
        c.send(big)
        with pytest.raises(procwire.MessageTooLarge):
            c.send(big + b"!")
        with srv.accept(timeout=T) as s:
            assert s.recv(timeout=T) == big
            assert s.remote_address == c.local_address
            s.send(b"back")
            assert c.recv(timeout=T) == b"back"


def test_timeouts_and_local_close() -> None:
    with procwire.listen("udp://127.0.0.1:0") as srv, \
            procwire.connect(srv.address, timeout=T) as c:
        with pytest.raises(procwire.Timeout):
            srv.accept(timeout=0.05)
        with pytest.raises(procwire.Timeout):
            c.recv(timeout=0)
        errors: list[BaseException] = []

        def wait() -> None:
            try:
                c.recv(timeout=T * 2)
            except BaseException as exc:
                errors.append(exc)

        t = threading.Thread(target=wait, daemon=True)
        t.start()
        t.join(0.1)
        c.close()
        t.join(T)
        assert not t.is_alive()
        assert len(errors) == 1 and isinstance(errors[0], procwire.ChannelClosed)
        with pytest.raises(procwire.ChannelClosed):
            c.send("x")
    with pytest.raises(procwire.ChannelClosed):
        srv.accept(timeout=0.1)


def test_listener_close_keeps_accepted_channels() -> None:
    srv = procwire.listen("udp://127.0.0.1:0")
    with procwire.connect(srv.address, timeout=T) as c, \
            procwire.connect(srv.address, timeout=T) as late:
        c.send("hi")
        s = srv.accept(timeout=T)
        late.send("not accepted yet")
        c.send("sync")
        assert s.recv(timeout=T) == "hi"
        assert s.recv(timeout=T) == "sync"  # read after "late": that peer now awaits accept()
        srv.close()
        with pytest.raises(procwire.ConnectionClosed):
            late.recv(timeout=T)  # the listener told the peer it never accepted
        c.send("still there")
        assert s.recv(timeout=T) == "still there"
        s.send("yes")
        assert c.recv(timeout=T) == "yes"
        s.close()
    with procwire.listen(srv.address):
        pass  # the port was released with the last channel


def test_option_and_security_errors() -> None:
    with pytest.raises(procwire.AddressError, match="auth"):
        procwire.listen("udp://127.0.0.1:0", auth="key")
    with pytest.raises(procwire.AddressError, match="auth"):
        procwire.connect("udp://127.0.0.1:9", auth="key", timeout=T)
    with pytest.raises(procwire.InsecureError):
        procwire.listen("udp://127.0.0.1:0", codec="pickle")
    with pytest.raises(procwire.InsecureError):
        procwire.connect("udp://127.0.0.1:9", codec="pickle", timeout=T)
    with pytest.raises(procwire.InsecureError):
        procwire.listen("udp://0.0.0.0:0")
    with pytest.raises(procwire.AddressError, match="bogus"):
        procwire.listen("udp://127.0.0.1:0", bogus=1)
    with pytest.raises(procwire.AddressError, match="queue"):
        procwire.listen("udp://127.0.0.1:0", queue=0)
    with procwire.listen("udp://127.0.0.1:0") as srv:
        with pytest.raises(procwire.AddressInUse):
            procwire.listen(srv.address)


def test_address_name_resolves() -> None:
    with procwire.listen("udp://127.0.0.1:0") as srv:
        _, port = target(srv.address)
        with procwire.connect(f"udp://localhost:{port}", timeout=T) as c:
            c.send("by name")
            with srv.accept(timeout=T) as s:
                assert s.recv(timeout=T) == "by name"
                s.send("ok")
                assert c.recv(timeout=T) == "ok"


# -- asyncio ----------------------------------------------------------------------------------

def run(coro: Any) -> Any:
    async def bounded() -> Any:
        async with asyncio.timeout(30):
            return await coro
    return asyncio.run(bounded())


def test_async_round_trip_and_close_notification() -> None:
    async def main() -> None:
        async with await aio.listen("udp://127.0.0.1:0") as srv:
            async with await aio.connect(srv.address, timeout=T) as c:
                assert c.reliable is False
                await c.send({"n": 1})
                s = await srv.accept(timeout=T)
                async with s:
                    assert s.reliable is False
                    assert s.remote_address == c.local_address
                    assert await s.recv(timeout=T) == {"n": 1}
                    await s.send("back")
                    assert await c.recv(timeout=T) == "back"
                    await c.send("last")
                    await c.close()
                    assert [m async for m in s] == ["last"]
                    with pytest.raises(procwire.ConnectionClosed):
                        await s.send("gone")
            with pytest.raises(procwire.Timeout):
                await srv.accept(timeout=0.05)
        with pytest.raises(procwire.ChannelClosed):
            await srv.accept(timeout=0.05)

    run(main())


def test_async_demux_queue_overflow_and_refusals() -> None:
    async def main() -> None:
        async with await aio.listen("udp://127.0.0.1:0", queue=3, max_peers=2) as srv:
            c1 = await aio.connect(srv.address, timeout=T)
            c2 = await aio.connect(srv.address, timeout=T)
            c3 = await aio.connect(srv.address, timeout=T)
            try:
                for i in range(8):
                    await c1.send(i)
                await c2.send("two")
                s1 = await srv.accept(timeout=T)
                s2 = await srv.accept(timeout=T)
                assert s1.remote_address == c1.local_address
                assert await s2.recv(timeout=T) == "two"  # c1's datagrams came first
                assert [await s1.recv(timeout=T) for _ in range(3)] == [0, 1, 2]
                assert s1._stream.stats()["dropped_queue_full"] == 5  # type: ignore[attr-defined]
                await c3.send("third peer")
                await c2.send("marker")
                assert await s2.recv(timeout=T) == "marker"
                assert srv._backend.stats()["dropped_max_peers"] == 1  # type: ignore[attr-defined]
                with pytest.raises(procwire.MessageTooLarge):
                    await c1.send("x" * udp.IPV4_MAX_DATAGRAM)
                await s2.send("r2")
                await s1.send("r1")
                assert await c2.recv(timeout=T) == "r2"
                assert await c1.recv(timeout=T) == "r1"
                await s1.close()
                await s2.close()
            finally:
                for c in (c1, c2, c3):
                    await c.close()

    run(main())


def test_async_refused_garbage_and_ipv6(raw_sockets: list[socket.socket]) -> None:
    async def main() -> None:
        c = await aio.connect(f"udp://127.0.0.1:{free_udp_port()}", timeout=T)
        async with c:
            await c.send("anyone?")
            with pytest.raises(procwire.ConnectionRefused):
                await c.recv(timeout=T)
        async with await aio.listen("udp://127.0.0.1:0") as srv:
            peer = raw_peer(raw_sockets)
            peer.sendto(b"garbage", target(srv.address))
            peer.sendto(b"[1]", target(srv.address))
            async with await srv.accept(timeout=T) as s:
                with pytest.raises(procwire.DecodeError):
                    await s.recv(timeout=T)
                assert await s.recv(timeout=T) == [1]
        if not socket.has_ipv6:
            return
        try:
            srv6 = await aio.listen("udp://[::1]:0")
        except procwire.AddressError:
            return
        async with srv6, await aio.connect(srv6.address, timeout=T) as c6:
            await c6.send("v6")
            async with await srv6.accept(timeout=T) as s6:
                assert await s6.recv(timeout=T) == "v6"

    run(main())


def test_async_local_close_wakes_receiver_and_accept() -> None:
    async def main() -> None:
        srv = await aio.listen("udp://127.0.0.1:0")
        c = await aio.connect(srv.address, timeout=T)
        receiving = asyncio.ensure_future(c.recv(timeout=T * 2))
        accepting = asyncio.ensure_future(srv.accept(timeout=T * 2))
        await asyncio.sleep(0.05)
        await c.close()
        await srv.close()
        with pytest.raises(procwire.ChannelClosed):
            await receiving
        with pytest.raises(procwire.ChannelClosed):
            await accepting

    run(main())


def test_sync_and_async_interoperate() -> None:
    """A blocking client talks to an asyncio listener in another thread."""
    ready = threading.Event()
    address: list[str] = []
    errors: list[BaseException] = []

    async def server() -> None:
        async with await aio.listen("udp://127.0.0.1:0") as srv:
            address.append(srv.address)
            ready.set()
            async with await srv.accept(timeout=T) as s:
                for _ in range(3):
                    await s.send(await s.recv(timeout=T))

    def serve() -> None:
        try:
            run(server())
        except BaseException as exc:
            errors.append(exc)
            ready.set()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        assert ready.wait(T) and address
        with procwire.connect(address[0], timeout=T) as c:
            for i in range(3):
                c.send({"i": i})
                assert c.recv(timeout=T) == {"i": i}
    finally:
        t.join(T)
    assert not errors
