"""The asyncio twin of ``procwire.process``: ``spawn``, ``Child``, ``parent``, ``IpcChannel``.

Same names and behaviour, as coroutines; ``async for msg in child`` / ``async with``.

>>> import asyncio, procwire.process.aio as pa
>>> echo = "process.on('message', m => process.send(m))"
>>> async def main():
...     async with await pa.spawn(["node", "-e", echo]) as c:
...         await c.send([1, 2]); print(await c.recv(timeout=5))
>>> asyncio.run(main())                                 # doctest: +SKIP
[1, 2]
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import socket
import subprocess
from collections import deque
from types import TracebackType
from typing import Any

from .._errors import ChannelClosed, ConnectionClosed, EncodeError, Timeout
from ..codecs import JsonCodec
from ..protocol.framing import DEFAULT_MAX_FRAME_SIZE
from ..protocol.lines import JsonLines
from ..transports._sockstream import AsyncFramedStream, deadline_of, remaining
from ..transports.base import DEFAULT_WRITE_BUFFER, Failed, TransportOptions
from ..transports.stdio import _take_stdio, aopen_pipes
from ._channel import CodecLines
from ._child import EXIT_GRACE, claim_parent, exited_error
from ._errors import ChildExited, NoParentChannel
from ._launch import Target, build_argv, launch
from ._node import HandleProtocol, check_handle_size, make_handle_message
from ._wire import AsyncHandleStream

__all__ = ["Child", "ChildExited", "IpcChannel", "NoParentChannel", "parent", "spawn"]

log = logging.getLogger("procwire.process")


class IpcChannel:
    """The asyncio parent/child channel (see ``procwire.process.IpcChannel``)."""

    def __init__(self, stream: AsyncHandleStream | AsyncFramedStream, *,
                 max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        codec = JsonCodec()
        self._stream = stream
        self._codec = codec
        self._framing = JsonLines(max_frame_size)
        stream.set_converter(codec.fast_decode, codec.decode)
        stream.set_encoder(codec.encode)
        self._handles = stream if isinstance(stream, AsyncHandleStream) else None
        self._node = HandleProtocol(self._send_internal) if self._handles is not None else None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._internal_tasks: set[asyncio.Task[None]] = set()
        self._inbox: deque[Any] = deque()
        self._closed = False
        self.start_error: tuple[str, str] | None = None

    @property
    def local_address(self) -> str:
        return self._stream.local_address

    @property
    def remote_address(self) -> str:
        return self._stream.remote_address

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def passes_handles(self) -> bool:
        return self._handles is not None

    async def send(self, msg: Any, *, handle: Any = None, timeout: float | None = None) -> None:
        """Send one JSON value, optionally with a socket (see the blocking ``send``)."""
        if handle is None:
            await self._stream.send(msg, timeout)
            return
        if self._handles is None or self._node is None:
            raise EncodeError("this channel cannot pass handles (stdio pipes carry no file "
                              "descriptors): spawn the child with the default channel")
        envelope, fd = make_handle_message(msg, handle)
        check_handle_size(len(self._codec.encode(envelope)))
        if self._closed:
            raise ChannelClosed("channel is closed")
        await self._handles.send_with_fds(envelope, [fd], timeout)
        self._node.sent(envelope, fd)

    async def flush(self, timeout: float | None = None) -> None:
        await self._stream.flush(timeout)

    async def recv(self, timeout: float | None = None) -> Any:
        """The next message (a handle that came with it is closed, with a warning)."""
        msg, handle = await self.recv_with_handle(timeout)
        if handle is not None:
            log.warning("procwire: recv() dropped a handle that came with a message; "
                        "use recv_with_handle() to receive handles")
            handle.close()
        return msg

    async def recv_with_handle(self, timeout: float | None = None
                               ) -> tuple[Any, socket.socket | None]:
        """The next message and the socket that came with it, if any."""
        deadline = deadline_of(timeout)
        while True:
            if self._inbox:
                item = self._inbox.popleft()
            else:
                if self._closed:
                    raise ChannelClosed("channel is closed")
                items = await self._stream.receive(remaining(deadline))
                item = items[0]
                if len(items) > 1:
                    self._inbox.extend(items[1:])
            if type(item) is Failed:
                raise item.exc
            if self._node is None or type(item) is not dict:
                return item, None
            assert self._handles is not None
            self._loop = asyncio.get_running_loop()
            action = self._node.receive(item, self._handles.fds.pop)
            if action.start_error is not None:
                self.start_error = action.start_error
            if action.reply is not None:
                await self._reply(action.reply, action.resend_fd)
            if action.deliver:
                return action.message, action.handle

    def _send_internal(self, msg: dict[str, Any]) -> None:
        # From any thread (a received socket being closed): Node's socket-list answers go out
        # on the loop that received the socket.
        loop = self._loop
        if loop is None or self._closed:
            return

        def start() -> None:
            task = loop.create_task(self._reply(msg, None))
            self._internal_tasks.add(task)
            task.add_done_callback(self._internal_tasks.discard)

        try:
            loop.call_soon_threadsafe(start)
        except RuntimeError:  # the loop is closed: nobody is left to tell
            log.debug("procwire: could not answer %s: event loop closed", msg.get("cmd"))

    async def _reply(self, reply: dict[str, Any], fd: int | None) -> None:
        try:
            if fd is None:
                await self._stream.send(reply, 5.0)
            else:
                assert self._handles is not None
                await self._handles.send_with_fds(reply, [fd], 5.0)
        except (ConnectionClosed, ChannelClosed, Timeout, OSError) as exc:
            log.debug("procwire: could not answer %s: %s", reply.get("cmd"), exc)

    async def close(self, timeout: float | None = 10.0) -> None:
        """Flush (up to ``timeout``), then close. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._node is not None:
            self._node.close()
        await self._stream.close(timeout)

    def __aiter__(self) -> IpcChannel:
        return self

    async def __anext__(self) -> Any:
        try:
            return await self.recv()
        except (ConnectionClosed, ChannelClosed):
            raise StopAsyncIteration from None

    async def __aenter__(self) -> IpcChannel:
        return self

    async def __aexit__(self, et: type[BaseException] | None, ev: BaseException | None,
                        tb: TracebackType | None) -> None:
        try:
            await self.close()
        except Timeout:
            if et is None:
                raise

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<aio.IpcChannel {self.remote_address} {state}>"


async def _wait_exit(proc: subprocess.Popen[bytes], timeout: float | None) -> int:
    """Wait for ``proc`` to exit without blocking the loop: a pidfd when the kernel has them
    (woken by the exit itself), else polling with a growing interval (1 ms to 50 ms)."""
    rc = proc.poll()
    if rc is not None:
        return rc
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            pidfd = -1
            try:
                pidfd = os.pidfd_open(proc.pid)
            except (AttributeError, OSError):
                pass
            if pidfd >= 0:
                fut: asyncio.Future[None] = loop.create_future()
                def _exited() -> None:
                    if not fut.done():
                        fut.set_result(None)

                loop.add_reader(pidfd, _exited)
                try:
                    await fut
                finally:
                    loop.remove_reader(pidfd)
                    os.close(pidfd)
            delay = 0.001
            while (rc := proc.poll()) is None:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.05)
            return rc
    except TimeoutError:
        raise Timeout(f"child {proc.pid} still running after {timeout} s") from None


class Child:
    """The asyncio twin of ``procwire.process.Child``."""

    def __init__(self, proc: subprocess.Popen[bytes], channel: IpcChannel) -> None:
        self._proc = proc
        self.channel = channel

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        return self._proc.poll()

    @property
    def args(self) -> Any:
        return self._proc.args

    async def send(self, msg: Any, *, handle: Any = None, timeout: float | None = None) -> None:
        try:
            await self.channel.send(msg, handle=handle, timeout=timeout)
        except ChannelClosed:
            raise
        except ConnectionClosed as exc:
            raise await self._exited(exc) from None

    async def recv(self, timeout: float | None = None) -> Any:
        try:
            return await self.channel.recv(timeout)
        except ChannelClosed:
            raise
        except ConnectionClosed as exc:
            raise await self._exited(exc) from None

    async def recv_with_handle(self, timeout: float | None = None
                               ) -> tuple[Any, socket.socket | None]:
        try:
            return await self.channel.recv_with_handle(timeout)
        except ChannelClosed:
            raise
        except ConnectionClosed as exc:
            raise await self._exited(exc) from None

    async def _exited(self, exc: ConnectionClosed) -> ConnectionClosed:
        if isinstance(exc, ChildExited):
            return exc
        try:
            rc: int | None = await _wait_exit(self._proc, EXIT_GRACE)
        except Timeout:
            rc = None
        return exited_error(self._proc, exc, rc, self.channel.start_error)

    def __aiter__(self) -> Child:
        return self

    async def __anext__(self) -> Any:
        try:
            return await self.recv()
        except (ConnectionClosed, ChannelClosed):
            raise StopAsyncIteration from None

    async def close(self, timeout: float | None = 10.0) -> None:
        await self.channel.close(timeout)

    async def wait(self, timeout: float | None = None) -> int:
        return await _wait_exit(self._proc, timeout)

    def terminate(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()

    def kill(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()

    async def stop(self, timeout: float = 5.0) -> int:
        """Close the channel, wait, SIGTERM, wait, SIGKILL (see the blocking ``stop``)."""
        try:
            await self.channel.close(timeout)
        except (Timeout, ConnectionClosed, OSError):
            pass
        for step in (None, self._proc.terminate, self._proc.kill):
            if self._proc.poll() is not None:
                break
            if step is not None:
                step()
            try:
                return await _wait_exit(self._proc, timeout if step is not self._proc.kill
                                        else None)
            except Timeout:
                continue
        return self._proc.wait()

    async def __aenter__(self) -> Child:
        return self

    async def __aexit__(self, et: type[BaseException] | None, ev: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    def __repr__(self) -> str:
        rc = self._proc.poll()
        state = "running" if rc is None else f"exited {rc}"
        return f"<aio.Child pid={self.pid} {state} {self._proc.args!r}>"


async def spawn(target: Target, *args: Any, channel: str = "node",
                env: dict[str, str] | None = None, cwd: Any = None,
                executable: str | None = None, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
                write_buffer: int = DEFAULT_WRITE_BUFFER, **popen_kwargs: Any) -> Child:
    """Start a child with a message channel (see ``procwire.process.spawn``)."""
    argv = build_argv(target, args, executable)
    launched = launch(argv, channel=channel, env=env, cwd=cwd, popen_kwargs=popen_kwargs)
    opts = TransportOptions(max_frame_size=max_frame_size, write_buffer=write_buffer)
    name = f"child://{launched.proc.pid}"
    try:
        stream: AsyncHandleStream | AsyncFramedStream
        if launched.sock is not None:
            stream = AsyncHandleStream(launched.sock, opts, CodecLines(max_frame_size),
                                       local_address="parent://", remote_address=name)
        else:
            assert launched.read_fd is not None and launched.write_fd is not None
            stream = await aopen_pipes(launched.read_fd, launched.write_fd, opts,
                                       local_address="parent://", remote_address=name)
    except BaseException:
        launched.proc.kill()
        launched.proc.wait()
        raise
    return Child(launched.proc, IpcChannel(stream, max_frame_size=max_frame_size))


_parent: IpcChannel | None = None
_parent_pid = 0


async def parent(*, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
                 write_buffer: int = DEFAULT_WRITE_BUFFER) -> IpcChannel:
    """The channel to the parent process (see ``procwire.process.parent``); the same one on
    every call. Close it (or use ``async with``) before the loop ends so queued messages are
    delivered."""
    global _parent, _parent_pid
    if _parent is not None and _parent_pid == os.getpid():
        return _parent
    if _parent is not None:
        raise NoParentChannel(f"the parent channel belongs to process {_parent_pid}, which "
                              "forked this one")
    kind, sock = claim_parent("asyncio")
    opts = TransportOptions(max_frame_size=max_frame_size, write_buffer=write_buffer)
    stream: AsyncHandleStream | AsyncFramedStream
    if kind == "stdio":
        rfd, wfd = _take_stdio()
        stream = await aopen_pipes(rfd, wfd, opts, local_address="stdio://",
                                   remote_address="parent://")
    else:
        assert sock is not None
        stream = AsyncHandleStream(sock, opts, CodecLines(max_frame_size),
                                   local_address="child://", remote_address="parent://")
    ch = IpcChannel(stream, max_frame_size=max_frame_size)
    _parent, _parent_pid = ch, os.getpid()
    atexit.register(_drop_parent, ch)
    return ch


def _drop_parent(ch: IpcChannel) -> None:
    # The loop is gone at exit: nothing can be flushed any more, only the socket released.
    stream = ch._stream
    if isinstance(stream, AsyncHandleStream) and not stream._closed:
        stream._closed = True
        stream.sock.close()
