"""``tls://``: round trips, big messages, bursts, mutual TLS and failures that spare the listener.

Certificates come from ``trustme`` (a throwaway CA per test module).
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme

import procwire
import procwire.aio as aio
from procwire._errors import AddressError, AuthenticationError
from procwire.transports import tls
from procwire.transports.base import TransportOptions

BIG = 5 * 1024 * 1024
BURST = 20000


@dataclass
class Certs:
    ca: str            # CA bundle that signed everything below
    server: str        # server key + chain for 127.0.0.1 / localhost
    client: str        # client key + chain
    other_ca: str      # an unrelated CA
    other_client: str  # a client certificate from the unrelated CA
    ca_obj: trustme.CA


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    d: Path = tmp_path_factory.mktemp("tls")
    ca, other = trustme.CA(), trustme.CA()

    def write(name: str, blob: Any) -> str:
        path = d / name
        blob.write_to_path(str(path))
        return str(path)

    return Certs(
        ca=write("ca.pem", ca.cert_pem),
        server=write("server.pem", ca.issue_cert("127.0.0.1", "localhost")
                     .private_key_and_cert_chain_pem),
        client=write("client.pem", ca.issue_cert("client.example")
                     .private_key_and_cert_chain_pem),
        other_ca=write("other-ca.pem", other.cert_pem),
        other_client=write("other-client.pem", other.issue_cert("client.example")
                           .private_key_and_cert_chain_pem),
        ca_obj=ca,
    )


@contextmanager
def in_thread(fn: Callable[[], Any]) -> Iterator[dict[str, Any]]:
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["result"] = fn()
        except BaseException as exc:
            out["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        yield out
    finally:
        t.join(30)
        assert not t.is_alive(), "server thread did not finish"


def echo(listener: procwire.Listener) -> Callable[[], int]:
    """Accept one client and echo until it closes; returns the message count."""
    def serve() -> int:
        n = 0
        with listener.accept(timeout=15) as ch:
            for msg in ch:
                ch.send(msg, timeout=15)
                n += 1
        return n
    return serve


def server_opts(certs: Certs, **kw: Any) -> dict[str, Any]:
    return {"certfile": certs.server, **kw}


# -- blocking -------------------------------------------------------------------------------

def test_round_trip_big_and_burst(certs: Certs) -> None:
    with procwire.listen("tls://127.0.0.1:0", codec="raw", **server_opts(certs)) as server:
        assert server.address.startswith("tls://127.0.0.1:")
        with in_thread(echo(server)) as out:
            with procwire.connect(server.address, codec="raw", cafile=certs.ca,
                                  timeout=10) as ch:
                ch.send(b"hello")
                assert ch.recv(timeout=10) == b"hello"
                big = os.urandom(BIG)
                ch.send(big, timeout=15)
                assert ch.recv(timeout=15) == big
                for i in range(BURST):
                    ch.send(i.to_bytes(4, "big"), timeout=15)
                for i in range(BURST):
                    assert ch.recv(timeout=15) == i.to_bytes(4, "big")
        assert out.get("result") == BURST + 2, out.get("error")


def test_concurrent_send_and_receive(certs: Certs) -> None:
    # Two threads on one channel: a writer (with its flusher) while the main thread reads.
    n = 2000
    payload = os.urandom(40_000)
    with procwire.listen("tls://127.0.0.1:0", codec="raw", **server_opts(certs)) as server:
        with in_thread(echo(server)):
            with procwire.connect(server.address, codec="raw", cafile=certs.ca,
                                  timeout=10) as ch:
                def write() -> None:
                    for _ in range(n):
                        ch.send(payload, timeout=15)

                with in_thread(write) as wout:
                    for _ in range(n):
                        assert ch.recv(timeout=15) == payload
                assert "error" not in wout, wout.get("error")


def test_peer_close_is_eof(certs: Certs) -> None:
    def serve() -> None:
        with server.accept(timeout=10) as ch:
            ch.send("bye")

    with procwire.listen("tls://localhost:0", **server_opts(certs)) as server:
        with in_thread(serve):
            with procwire.connect(server.address, cafile=certs.ca, timeout=10) as ch:
                assert list(ch) == ["bye"]  # iteration ends at the close_notify


def test_wrong_ca_rejected_and_listener_goes_on(certs: Certs) -> None:
    with procwire.listen("tls://127.0.0.1:0", **server_opts(certs)) as server:
        with in_thread(echo(server)) as out:
            with pytest.raises(AuthenticationError):
                procwire.connect(server.address, cafile=certs.other_ca, timeout=10)
            with procwire.connect(server.address, cafile=certs.ca, timeout=10) as ch:
                ch.send("ok")
                assert ch.recv(timeout=10) == "ok"
        assert out.get("result") == 1


def test_wrong_hostname_rejected(certs: Certs) -> None:
    with procwire.listen("tls://127.0.0.1:0", **server_opts(certs)) as server:
        with in_thread(echo(server)):
            with pytest.raises(AuthenticationError):
                procwire.connect(server.address, cafile=certs.ca, timeout=10,
                                 server_hostname="elsewhere.example")
            with procwire.connect(server.address, cafile=certs.ca, timeout=10,
                                  server_hostname="localhost") as ch:
                ch.send(1)
                assert ch.recv(timeout=10) == 1


def test_mutual_tls(certs: Certs) -> None:
    opts = server_opts(certs, cafile=certs.ca)
    with procwire.listen("tls://127.0.0.1:0", **opts) as server:
        with in_thread(echo(server)) as out:
            # No client certificate, then one from another CA: both refused at connect.
            with pytest.raises(AuthenticationError):
                procwire.connect(server.address, cafile=certs.ca, timeout=10)
            with pytest.raises(AuthenticationError):
                procwire.connect(server.address, cafile=certs.ca, certfile=certs.other_client,
                                 timeout=10)
            with procwire.connect(server.address, cafile=certs.ca, certfile=certs.client,
                                  timeout=10) as ch:
                ch.send({"mtls": True})
                assert ch.recv(timeout=10) == {"mtls": True}
        assert out.get("result") == 1


def test_plain_tcp_client_to_tls_listener(certs: Certs) -> None:
    url = "tls://127.0.0.1:0"
    with procwire.listen(url, tls_timeout=2, **server_opts(certs)) as server:
        tcp_url = server.address.replace("tls://", "tcp://")
        with in_thread(echo(server)) as out:
            with procwire.connect(tcp_url, timeout=10) as plain:
                plain.send("not TLS")
                with pytest.raises(procwire.ProcwireError):
                    plain.recv(timeout=10)
            with procwire.connect(server.address, cafile=certs.ca, timeout=10) as ch:
                ch.send("ok")
                assert ch.recv(timeout=10) == "ok"
        assert out.get("result") == 1


def test_tls_client_to_plain_tcp_listener(certs: Certs) -> None:
    def serve() -> None:
        ch = server.accept(timeout=10)
        try:
            ch.recv(timeout=10)
        except procwire.ProcwireError:
            pass
        finally:
            ch.close(0)

    with procwire.listen("tcp://127.0.0.1:0") as server:
        tls_url = server.address.replace("tcp://", "tls://")
        with in_thread(serve):
            with pytest.raises((AuthenticationError, procwire.ConnectionClosed)):
                procwire.connect(tls_url, cafile=certs.ca, timeout=10)


def test_silent_client_dropped_after_tls_timeout(certs: Certs) -> None:
    with procwire.listen("tls://127.0.0.1:0", tls_timeout=0.5, **server_opts(certs)) as server:
        host, port = server.address.removeprefix("tls://").rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=5):
            with in_thread(echo(server)) as out:
                with procwire.connect(server.address, cafile=certs.ca, timeout=10) as ch:
                    ch.send("next")
                    assert ch.recv(timeout=10) == "next"
            assert out.get("result") == 1


def test_ssl_context_option(certs: Certs) -> None:
    sctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    sctx.load_cert_chain(certs.server)
    cctx = ssl.create_default_context(cafile=certs.ca)
    with procwire.listen("tls://127.0.0.1:0", ssl_context=sctx) as server:
        with in_thread(echo(server)):
            with procwire.connect(server.address, ssl_context=cctx, timeout=10) as ch:
                ch.send([1, 2])
                assert ch.recv(timeout=10) == [1, 2]


def test_auth_on_top_of_tls(certs: Certs) -> None:
    key = b"k" * 16
    with procwire.listen("tls://127.0.0.1:0", auth=key, **server_opts(certs)) as server:
        with in_thread(echo(server)):
            with pytest.raises(AuthenticationError):
                procwire.connect(server.address, auth=b"wrong", cafile=certs.ca, timeout=10)
            with procwire.connect(server.address, auth=key, cafile=certs.ca, timeout=10) as ch:
                ch.send("both")
                assert ch.recv(timeout=10) == "both"


def test_pickle_needs_mutual_tls_or_auth(certs: Certs) -> None:
    with pytest.raises(procwire.InsecureError):
        procwire.listen("tls://127.0.0.1:0", codec="pickle", **server_opts(certs))
    with pytest.raises(procwire.InsecureError):
        procwire.connect("tls://127.0.0.1:9", codec="pickle", cafile=certs.ca, timeout=1)
    opts = server_opts(certs, cafile=certs.ca)
    with procwire.listen("tls://127.0.0.1:0", codec="pickle", **opts) as server:
        with in_thread(echo(server)):
            with procwire.connect(server.address, codec="pickle", cafile=certs.ca,
                                  certfile=certs.client, timeout=10) as ch:
                ch.send(frozenset({1, 2}))
                assert ch.recv(timeout=10) == frozenset({1, 2})


def test_peer_authenticated() -> None:
    def opts(**extra: Any) -> TransportOptions:
        return TransportOptions(extra=extra)

    assert not tls.peer_authenticated(opts())
    assert not tls.peer_authenticated(opts(certfile="s.pem"))
    assert not tls.peer_authenticated(opts(cafile="ca.pem"))
    assert tls.peer_authenticated(opts(certfile="s.pem", cafile="ca.pem"))
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    assert not tls.peer_authenticated(opts(ssl_context=server_ctx))
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    assert tls.peer_authenticated(opts(ssl_context=server_ctx))


def test_bad_options(certs: Certs, tmp_path: Path) -> None:
    with pytest.raises(AddressError):
        procwire.listen("tls://127.0.0.1:0")  # no certificate
    with pytest.raises(AddressError):
        procwire.listen("tls://127.0.0.1:0", certfile=certs.server, colour="blue")
    with pytest.raises(AddressError):
        procwire.listen("tls://127.0.0.1:0", certfile=str(tmp_path / "missing.pem"))
    with pytest.raises(AddressError):
        procwire.listen("tls://127.0.0.1:0", certfile=certs.server, tls_timeout=0)
    with pytest.raises(AddressError):
        procwire.connect("tls://127.0.0.1:9", cafile=certs.ca,
                         ssl_context=ssl.create_default_context(), timeout=1)


def test_non_loopback_listen_allowed_with_tls(certs: Certs) -> None:
    # TLS counts as protection: no auth= needed. Only listen; no traffic goes there.
    with procwire.listen("tls://0.0.0.0:0", **server_opts(certs)) as server:
        assert server.address.startswith("tls://0.0.0.0:")


def test_connect_refused(certs: Certs) -> None:
    from procwire.testing import free_tcp_port

    with pytest.raises(procwire.ConnectionRefused):
        procwire.connect(f"tls://127.0.0.1:{free_tcp_port()}", cafile=certs.ca, timeout=5)


# -- asyncio --------------------------------------------------------------------------------

async def aecho(listener: aio.AsyncListener) -> int:
    n = 0
    async with await listener.accept(timeout=15) as ch:
        async for msg in ch:
            await ch.send(msg, timeout=15)
            n += 1
    return n


def test_async_round_trip_big_and_burst(certs: Certs) -> None:
    async def main() -> None:
        server = await aio.listen("tls://127.0.0.1:0", codec="raw", **server_opts(certs))
        async with server:
            task = asyncio.create_task(aecho(server))
            try:
                async with await aio.connect(server.address, codec="raw", cafile=certs.ca,
                                             timeout=10) as ch:
                    await ch.send(b"hello")
                    assert await ch.recv(timeout=10) == b"hello"
                    big = os.urandom(BIG)
                    await ch.send(big, timeout=15)
                    assert await ch.recv(timeout=15) == big
                    for i in range(BURST):
                        await ch.send(i.to_bytes(4, "big"), timeout=15)
                    for i in range(BURST):
                        assert await ch.recv(timeout=15) == i.to_bytes(4, "big")
                assert await asyncio.wait_for(task, 15) == BURST + 2
            finally:
                task.cancel()

    asyncio.run(main())


def test_async_mutual_tls_and_failures(certs: Certs) -> None:
    async def main() -> None:
        opts = server_opts(certs, cafile=certs.ca)
        server = await aio.listen("tls://127.0.0.1:0", **opts)
        async with server:
            task = asyncio.create_task(aecho(server))
            try:
                with pytest.raises(AuthenticationError):
                    await aio.connect(server.address, cafile=certs.other_ca, timeout=10)
                with pytest.raises(AuthenticationError):
                    await aio.connect(server.address, cafile=certs.ca,
                                      certfile=certs.other_client, timeout=10)
                async with await aio.connect(server.address, cafile=certs.ca,
                                             certfile=certs.client, timeout=10) as ch:
                    await ch.send("m")
                    assert await ch.recv(timeout=10) == "m"
                assert await asyncio.wait_for(task, 15) == 1
            finally:
                task.cancel()

    asyncio.run(main())


def test_async_client_without_cert_to_mutual_tls(certs: Certs) -> None:
    async def main() -> None:
        opts = server_opts(certs, cafile=certs.ca)
        server = await aio.listen("tls://127.0.0.1:0", **opts)
        async with server:
            task = asyncio.create_task(aecho(server))
            try:
                with pytest.raises(AuthenticationError):
                    await aio.connect(server.address, cafile=certs.ca, timeout=10)
                async with await aio.connect(server.address, cafile=certs.ca,
                                             certfile=certs.client, timeout=10) as ch:
                    await ch.send("m")
                    assert await ch.recv(timeout=10) == "m"
                assert await asyncio.wait_for(task, 15) == 1
            finally:
                task.cancel()

    asyncio.run(main())


def test_async_listener_survives_plain_and_silent_clients(certs: Certs) -> None:
    async def main() -> None:
        server = await aio.listen("tls://127.0.0.1:0", tls_timeout=0.5, **server_opts(certs))
        async with server:
            host, port = server.address.removeprefix("tls://").rsplit(":", 1)
            task = asyncio.create_task(aecho(server))
            _, silent = await asyncio.open_connection(host, int(port))
            plain = await aio.connect(server.address.replace("tls://", "tcp://"), timeout=10)
            try:
                await plain.send("not TLS")
                async with await aio.connect(server.address, cafile=certs.ca,
                                             timeout=10) as ch:
                    await ch.send("ok")
                    assert await ch.recv(timeout=10) == "ok"
                assert await asyncio.wait_for(task, 15) == 1
            finally:
                task.cancel()
                silent.close()
                await plain.close(0)

    asyncio.run(main())


def test_sync_server_async_client(certs: Certs) -> None:
    async def client(address: str) -> Any:
        async with await aio.connect(address, cafile=certs.ca, certfile=certs.client,
                                     timeout=10) as ch:
            await ch.send({"a": 1})
            return await ch.recv(timeout=10)

    opts = server_opts(certs, cafile=certs.ca)
    with procwire.listen("tls://127.0.0.1:0", **opts) as server:
        with in_thread(echo(server)):
            assert asyncio.run(client(server.address)) == {"a": 1}
