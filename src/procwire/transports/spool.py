"""``spool:///path/dir``: a channel made of files in a watched folder.

Every message is one file, written under a temporary name in the destination folder, fsynced,
then renamed into place, so a reader only ever sees whole messages. Files are named by a
zero-padded per-sender sequence number and read in name order. A file is deleted when the
receiver comes back for the next message (or closes): a receiver that crashes before then gets
the message again when it restarts (at-least-once). See ``docs/transports/spool.md``.

Layout (``listen`` creates ``dir`` with mode 0700)::

    dir/.lock                          held (flock) by the one listener serving dir
    dir/<client-id>/                   one per client; created atomically by connect()
        to-server/00000000000000000000.msg   messages, in name order
        to-server/00000000000000000007.end   the client closed after message 6
        to-client/...                        the same, the other way
        client.lock                    held (flock) by the connected client process
        client.closed, server.closed   a side has closed; the last one removes the folder
    .tmp-<pid>-<random>                a file (or folder) being written; readers ignore it

Waiting uses inotify on Linux (no thread, no polling: one inotify instance per waiting stream)
and watchfiles elsewhere; both are backed by a full rescan every ``_RESCAN_INTERVAL`` seconds,
a safety net against a lost event, not the delivery mechanism.
"""

from __future__ import annotations

import asyncio
import ctypes
import fcntl
import os
import re
import secrets
import select
import shutil
import sys
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from .._errors import (
    AddressError,
    AddressInUse,
    ChannelClosed,
    ConnectionClosed,
    ConnectionRefused,
    FrameTooLarge,
    Timeout,
)
from .._url import Address
from ._sockstream import deadline_of, remaining
from .base import Buffer, Converter, Failed, TransportOptions

__all__ = [
    "LOCAL_ONLY",
    "AsyncSpoolListener",
    "AsyncSpoolStream",
    "SpoolListener",
    "SpoolStream",
    "aconnect",
    "alisten",
    "connect",
    "listen",
]

LOCAL_ONLY = True

TO_SERVER = "to-server"
TO_CLIENT = "to-client"
_TMP = ".tmp-"
_MSG = ".msg"
_END = ".end"
_LISTENER_LOCK = ".lock"
_CLIENT_LOCK = "client.lock"
_CLIENT_CLOSED = "client.closed"
_SERVER_CLOSED = "server.closed"
_SEQ_NAME = re.compile(r"^(\d{20})\.(?:msg|end)$")
_CLIENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,99}$")
_TMP_NAME = re.compile(r"^\.tmp-(\d+)-")
# Only a safety net: inotify/watchfiles deliver the wake-ups; this bounds the damage of a lost
# event (an inotify queue overflow is harmless anyway, it just wakes us).
_RESCAN_INTERVAL = 5.0
_CLOSE_WAIT = 2.0
# Each file counts as at least this many bytes against write_buffer, so a flood of tiny
# messages is bounded in files (inodes) too.
_MIN_COST = 256
_OPTIONS = {"client", "watcher", "fsync"}


# -- watching ---------------------------------------------------------------------------------

class _Watcher(Protocol):
    def fileno(self) -> int: ...

    def drain(self) -> None: ...

    def wait(self, timeout: float) -> None: ...

    def interrupt(self) -> None: ...

    def close(self) -> None: ...


def _nonblocking_pipe() -> tuple[int, int]:
    r, w = os.pipe()  # non-inheritable by default
    os.set_blocking(r, False)
    os.set_blocking(w, False)
    return r, w


def _drain_fd(fd: int) -> None:
    try:
        while os.read(fd, 65536):
            pass
    except (BlockingIOError, InterruptedError):
        pass


class _PollWatcher:
    """Shared part: ``fileno()`` becomes readable on a change; ``interrupt()`` wakes ``wait``."""

    _fd: int

    def __init__(self) -> None:
        self._wake_r, self._wake_w = _nonblocking_pipe()

    def fileno(self) -> int:
        return self._fd

    def wait(self, timeout: float) -> None:
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        poller.poll(max(0, int(timeout * 1000) + 1))

    def interrupt(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError):
            pass  # a wake-up is already pending, or we are closing

    def _close_pipe(self) -> None:
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass


_IN_MOVED_TO = 0x00000080
_IN_CREATE = 0x00000100
_IN_DELETE = 0x00000200
_IN_DELETE_SELF = 0x00000400
_IN_MOVE_SELF = 0x00000800
_IN_ONLYDIR = 0x01000000
# Messages and client folders arrive by rename only, so IN_MOVED_TO is enough; temp files
# being created and written wake nobody.
_IN_ARRIVALS = _IN_MOVED_TO | _IN_DELETE_SELF | _IN_MOVE_SELF | _IN_ONLYDIR
# A sender waiting for room watches its outbox for deletions and the client folder for the
# peer's closed flag.
_IN_DELETIONS = _IN_DELETE | _IN_DELETE_SELF | _IN_MOVE_SELF | _IN_ONLYDIR
_IN_FLAGS = _IN_CREATE | _IN_DELETE_SELF | _IN_MOVE_SELF | _IN_ONLYDIR
_libc: Any = None


def _inotify() -> Any:
    global _libc
    if _libc is None:
        lib: Any = False
        if sys.platform.startswith("linux"):
            try:
                cand = ctypes.CDLL(None, use_errno=True)
                cand.inotify_init1.argtypes = [ctypes.c_int]
                cand.inotify_init1.restype = ctypes.c_int
                cand.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
                cand.inotify_add_watch.restype = ctypes.c_int
                lib = cand
            except (OSError, AttributeError):
                pass
        _libc = lib
    return _libc or None


def _oserror(what: str) -> OSError:
    err = ctypes.get_errno()
    hint = ""
    if what == "inotify_init1" and err == 24:  # EMFILE: per-user instance limit
        hint = " (raise fs.inotify.max_user_instances, or close idle spool channels)"
    return OSError(err, f"{what}: {os.strerror(err)}{hint}")


class _InotifyWatcher(_PollWatcher):
    """An inotify instance on one folder: no thread, the fd itself is waited on."""

    def __init__(self, watches: list[tuple[str, int]]) -> None:
        lib = _inotify()
        fd = lib.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            raise _oserror("inotify_init1")
        for path, mask in watches:
            if lib.inotify_add_watch(fd, os.fsencode(path), mask) < 0:
                exc = _oserror("inotify_add_watch")
                os.close(fd)
                raise exc
        self._fd = fd
        try:
            super().__init__()
        except BaseException:
            os.close(fd)
            raise

    def drain(self) -> None:
        _drain_fd(self._fd)  # the events' content is not needed: every wake-up means rescan

    def close(self) -> None:
        os.close(self._fd)
        self._close_pipe()


class _WatchfilesWatcher(_PollWatcher):
    """watchfiles (FSEvents, kqueue, ReadDirectoryChangesW...) in a thread that writes a byte
    into a pipe per batch of changes, so waiting looks the same as with inotify."""

    def __init__(self, paths: list[str]) -> None:
        from watchfiles._rust_notify import RustNotify

        self._notify = RustNotify(paths, False, False, 300, False, False)
        super().__init__()
        self._fd = self._wake_r
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="procwire-spool-watch",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                # watchfiles groups changes; 20 ms steps keep latency low while idle costs
                # a few wake-ups a second inside the Rust thread, never a filesystem scan.
                got = self._notify.watch(20, 20, 0, self._stop)
            except Exception:
                self.interrupt()
                return  # the periodic rescan keeps the stream working
            if isinstance(got, set):
                self.interrupt()

    def drain(self) -> None:
        _drain_fd(self._fd)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(_CLOSE_WAIT)
        if not self._thread.is_alive():
            self._notify.close()
        self._close_pipe()


def _make_watcher(watches: list[tuple[str, int]], kind: str) -> _Watcher:
    if kind == "inotify" or (kind == "auto" and _inotify() is not None):
        if _inotify() is None:
            raise AddressError("watcher=inotify: inotify is not available on this system")
        return _InotifyWatcher(watches)
    return _WatchfilesWatcher([path for path, _ in watches])


class _SyncWait:
    """Blocking waits on a lazily made watcher, shared safely by several threads.

    One thread at a time polls the watcher; the others wait on a condition that the poller
    signals when it returns, so a wake-up consumed by one thread is never lost for the others.
    """

    def __init__(self, make: Callable[[], _Watcher]) -> None:
        self._make = make
        self._cond = threading.Condition()
        self._watcher: _Watcher | None = None
        self._polling = False
        self.closed = False

    def arm(self) -> None:
        """Make the watcher; call before scanning so a change after the scan wakes ``wait``."""
        with self._cond:
            if self.closed:
                raise ChannelClosed("closed")
            if self._watcher is None:
                self._watcher = self._make()

    def wait(self, timeout: float) -> None:
        with self._cond:
            if self.closed:
                raise ChannelClosed("closed")
            if self._polling:
                self._cond.wait(timeout)
                return
            watcher = self._watcher
            assert watcher is not None, "arm() first"
            self._polling = True
        try:
            watcher.wait(timeout)
            watcher.drain()
        finally:
            with self._cond:
                self._polling = False
                self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self.closed = True
            watcher = self._watcher
            if watcher is None:
                return
            watcher.interrupt()
            self._cond.wait_for(lambda: not self._polling, _CLOSE_WAIT)
            self._cond.notify_all()
            if self._polling:
                return  # a poller is stuck: leaking two fds beats closing them under it
            self._watcher = None
        watcher.close()


class _AsyncWait:
    """asyncio waits on a lazily made watcher: its fd is registered with the loop while at
    least one task waits, and every waiting task shares one future."""

    def __init__(self, make: Callable[[], _Watcher]) -> None:
        self._make = make
        self._watcher: _Watcher | None = None
        self._future: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.closed = False

    def arm(self) -> None:
        if self.closed:
            raise ChannelClosed("closed")
        if self._watcher is None:
            self._watcher = self._make()

    async def wait(self, timeout: float) -> None:
        if self.closed:
            raise ChannelClosed("closed")
        assert self._watcher is not None, "arm() first"
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._unregister()  # left registered on a loop that is gone
            loop.add_reader(self._watcher.fileno(), self._on_readable)
            self._loop = loop
        fut = self._future
        if fut is None or fut.done() or fut.get_loop() is not loop:
            fut = self._future = loop.create_future()
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(fut)
        except TimeoutError:
            pass

    def _on_readable(self) -> None:
        self._unregister()
        if self._watcher is not None:
            self._watcher.drain()
        if self._future is not None and not self._future.done():
            self._future.set_result(None)

    def _unregister(self) -> None:
        if self._loop is not None and self._watcher is not None:
            if not self._loop.is_closed():
                self._loop.remove_reader(self._watcher.fileno())
            self._loop = None

    def close_if_idle(self) -> None:
        """Close unless the watcher is registered with a loop (only that loop may unregister)."""
        if self._loop is None:
            self.close()

    def close(self) -> None:
        self.closed = True
        self._unregister()
        if self._future is not None and not self._future.done():
            self._future.set_result(None)
        if self._watcher is not None:
            self._watcher.close()
            self._watcher = None


# -- files ------------------------------------------------------------------------------------

def _bool_option(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise AddressError(f"spool://: expected a boolean, got {value!r}")


def _options(addr: Address, opts: TransportOptions, allowed: set[str]) -> dict[str, Any]:
    merged: dict[str, Any] = {**addr.query, **opts.extra}
    unknown = set(merged) - allowed
    if unknown:
        raise AddressError(f"unknown option(s) for spool://: {', '.join(sorted(unknown))}")
    kind = str(merged.get("watcher", "auto"))
    if kind not in ("auto", "inotify", "watchfiles"):
        raise AddressError(f"spool:// watcher must be auto, inotify or watchfiles, not {kind!r}")
    merged["watcher"] = kind
    merged["fsync"] = _bool_option(merged.get("fsync", True))
    return merged


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_temps(folder: str) -> None:
    """Remove temp files and folders whose writer process is gone (left by a crash)."""
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        m = _TMP_NAME.match(name)
        if m is None or _pid_alive(int(m.group(1))):
            continue
        path = os.path.join(folder, name)
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.unlink(path)
        except OSError:
            pass


def _temp_name() -> str:
    return f"{_TMP}{os.getpid()}-{secrets.token_hex(6)}"


def _next_seq(folder: str) -> int:
    """One past the highest sequence number still in ``folder`` (a restarted sender goes on
    from there; when the reader deleted everything, starting again at 0 keeps the order)."""
    top = -1
    try:
        for name in os.listdir(folder):
            m = _SEQ_NAME.match(name)
            if m is not None:
                top = max(top, int(m.group(1)))
    except FileNotFoundError:
        pass
    return top + 1


def _has_end(folder: str) -> bool:
    try:
        return any(n.endswith(_END) for n in os.listdir(folder) if not n.startswith("."))
    except FileNotFoundError:
        return False


def _touch(path: str) -> None:
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
    except FileNotFoundError:
        pass  # the folder is already gone


def _lock(path: str) -> int | None:
    """An exclusive flock on ``path`` (created), or None when another process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _identity(b: Buffer) -> bytes:
    return bytes(b)


class _Side:
    """One end of one client folder: writes into one subfolder, reads the other.

    Thread-safe: sends hold ``_send_lock`` from sequence number to rename, so files appear in
    sequence order (the reader's scan relies on it); receive state is under ``_lock``.
    """

    def __init__(self, root: str, cid: str, *, server: bool, opts: TransportOptions,
                 options: dict[str, Any], lock_fd: int | None = None,
                 on_close: Callable[[], None] | None = None) -> None:
        self.folder = os.path.join(root, cid)
        self.outbox = os.path.join(self.folder, TO_CLIENT if server else TO_SERVER)
        self.inbox = os.path.join(self.folder, TO_SERVER if server else TO_CLIENT)
        self._my_flag = os.path.join(self.folder, _SERVER_CLOSED if server else _CLIENT_CLOSED)
        self._peer_flag = os.path.join(self.folder, _CLIENT_CLOSED if server else _SERVER_CLOSED)
        here, there = f"spool://{root}", f"spool://{root}?client={cid}"
        self.local_address, self.remote_address = (here, there) if server else (there, here)
        self.watcher_kind: str = options["watcher"]
        self._fsync: bool = options["fsync"]
        self._max = opts.max_frame_size
        self._lock_fd = lock_fd
        self._on_close = on_close
        self._pid = os.getpid()
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._convert: Converter = _identity
        self._safe_convert: Converter = _identity
        self._pending: deque[str] = deque()
        self._handed: str | None = None  # returned by receive(), deleted at the next one
        self._unreceived: deque[Any] = deque()
        self._ended = False
        self.closed = False
        _clean_temps(self.outbox)
        self._seq = _next_seq(self.outbox)
        self._limit = max(opts.write_buffer, _MIN_COST)
        self._unread: deque[tuple[str, int]] = deque()  # our files the peer may not have read
        self._unread_bytes = 0
        for name in sorted(os.listdir(self.outbox)):
            if _SEQ_NAME.match(name) and name.endswith(_MSG):
                try:
                    self._count(name, os.stat(os.path.join(self.outbox, name)).st_size)
                except FileNotFoundError:
                    pass

    def make_watcher(self) -> _Watcher:
        try:
            return _make_watcher([(self.inbox, _IN_ARRIVALS)], self.watcher_kind)
        except FileNotFoundError as exc:
            raise ConnectionClosed("the spool folder was removed", reason="removed") from exc

    def make_room_watcher(self) -> _Watcher:
        try:
            return _make_watcher([(self.outbox, _IN_DELETIONS), (self.folder, _IN_FLAGS)],
                                 self.watcher_kind)
        except FileNotFoundError as exc:
            raise ConnectionClosed("the spool folder was removed", reason="removed") from exc

    def _check(self) -> None:
        if self.closed:
            raise ChannelClosed("channel is closed")
        if os.getpid() != self._pid:
            raise ChannelClosed("spool channel used in a forked child; connect again there")

    # sending

    def check_send(self, payload: Buffer) -> int:
        """The message's size, after the checks that need no waiting."""
        self._check()
        size = memoryview(payload).nbytes
        if size > self._max:
            raise FrameTooLarge(size, self._max)
        if os.path.exists(self._peer_flag):
            raise ConnectionClosed("the peer closed the spool channel")
        return size

    def _count(self, name: str, size: int) -> None:
        cost = max(size, _MIN_COST)
        self._unread.append((name, cost))
        self._unread_bytes += cost

    def has_room(self, size: int) -> bool:
        """True when a message of ``size`` bytes fits in the bound on unread bytes. The
        reader deletes files in name order, so checking from the oldest one is enough."""
        cost = max(size, _MIN_COST)
        if self._unread_bytes + cost <= self._limit or not self._unread:
            return True
        while self._unread and not os.path.exists(
                os.path.join(self.outbox, self._unread[0][0])):
            self._unread_bytes -= self._unread.popleft()[1]
        return self._unread_bytes + cost <= self._limit or not self._unread

    def send(self, payload: Buffer, timeout: float | None,
             room: _SyncWait | None = None) -> None:
        """Write one message; with ``room``, first wait (up to ``timeout``) until the peer
        has read enough that at most ``write_buffer`` bytes stay unread."""
        deadline = deadline_of(timeout)
        size = self.check_send(payload)
        if not self._send_lock.acquire(timeout=-1 if timeout is None else timeout):
            raise Timeout(f"send did not get its turn within {timeout} s")
        try:
            if room is not None:
                while not self.has_room(size):
                    room.arm()
                    if self.has_room(size):
                        break
                    self.check_send(payload)
                    left = remaining(deadline)
                    if left is not None and left <= 0:
                        raise Timeout(f"the reader is {self._unread_bytes} bytes behind "
                                      f"(write_buffer={self._limit}) for {timeout} s")
                    room.wait(_RESCAN_INTERVAL if left is None else min(left, _RESCAN_INTERVAL))
            self._put(payload, _MSG)
        finally:
            self._send_lock.release()

    def _put(self, payload: Buffer, suffix: str) -> None:
        tmp = os.path.join(self.outbox, _temp_name())
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileNotFoundError as exc:
            raise ConnectionClosed("the spool folder was removed", reason="removed") from exc
        try:
            with open(fd, "wb", closefd=True) as f:
                f.write(payload)
                f.flush()
                if self._fsync:
                    os.fsync(f.fileno())
            name = f"{self._seq:020d}{suffix}"
            os.rename(tmp, os.path.join(self.outbox, name))
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        self._seq += 1
        if suffix == _MSG:
            self._count(name, memoryview(payload).nbytes)

    # receiving

    def set_converter(self, convert: Converter, safe: Converter | None = None) -> None:
        self._convert = convert
        self._safe_convert = safe or convert

    def _decode(self, data: bytes) -> Any:
        try:
            return self._convert(data)
        except Exception:
            pass
        try:  # the codec's own decode gives the typed error (DecodeError)
            return self._safe_convert(data)
        except Exception as exc:
            return Failed(exc)

    def unreceive(self, items: list[Any]) -> None:
        with self._lock:
            self._unreceived.extendleft(reversed(items))

    def _ack(self) -> None:
        if self._handed is not None:
            try:
                os.unlink(os.path.join(self.inbox, self._handed))
            except FileNotFoundError:
                pass
            self._handed = None

    def _scan(self) -> list[str] | None:
        try:
            names = os.listdir(self.inbox)
        except FileNotFoundError:
            return None
        return [n for n in names
                if not n.startswith(".") and n.endswith((_MSG, _END)) and n != self._handed]

    def _refill(self) -> bool:
        """Queue the files ready in name order; False when the folder is gone.

        Two listings: a readdir running while files are renamed in may return a later file
        but miss an earlier one. Any file the first listing saw was renamed in after all lower
        ones, so the second listing holds every one of those.
        """
        first = self._scan()
        if first is None:
            return False
        if first:
            top = max(first)
            second = self._scan()
            if second is None:
                return False
            self._pending.extend(sorted(n for n in second if n <= top))
        return True

    def next_item(self) -> list[Any] | None:
        """``[item]``, or None when nothing is ready yet. One item per call: the channel asks
        again only when it handed the previous one over, which is when its file is deleted."""
        with self._lock:
            self._check()
            if self._unreceived:
                return [self._unreceived.popleft()]
            self._ack()
            if self._ended:
                raise ConnectionClosed("the peer closed the spool channel")
            while True:
                if not self._pending:
                    if not self._refill():
                        self._ended = True
                        raise ConnectionClosed("the spool folder was removed", reason="removed")
                    if not self._pending:
                        return None
                name = self._pending.popleft()
                if name.endswith(_END):
                    self._ended = True
                    raise ConnectionClosed("the peer closed the spool channel")
                path = os.path.join(self.inbox, name)
                try:
                    f = open(path, "rb")
                except FileNotFoundError:
                    continue  # removed behind our back: nothing to deliver
                with f:
                    size = os.fstat(f.fileno()).st_size
                    if size > self._max:
                        item: Any = Failed(FrameTooLarge(size, self._max))
                    else:
                        item = self._decode(f.read())
                self._handed = name
                return [item]

    # closing

    def mark_closed(self) -> bool:
        """Stop sending and receiving; False when it was already closed."""
        with self._lock:
            if self.closed:
                return False
            self.closed = True
            if not self._unreceived:
                self._ack()  # closing after a recv() is the handover of that message
            return True

    def finish_close(self, timeout: float | None) -> None:
        """Write the end marker and the closed flag; the side that closes last removes the
        folder. Skipped in a forked child, which does not own the channel."""
        try:
            if os.getpid() != self._pid:
                return
            if self._send_lock.acquire(timeout=-1 if timeout is None else timeout):
                try:
                    self._put(b"", _END)
                except (ConnectionClosed, OSError):
                    pass
                finally:
                    self._send_lock.release()
            _touch(self._my_flag)
            if self._on_close is not None:
                self._on_close()
            if os.path.exists(self._peer_flag):
                shutil.rmtree(self.folder, ignore_errors=True)
        finally:
            self.release()

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


# -- streams ----------------------------------------------------------------------------------

class SpoolStream:
    """Blocking, thread-safe message stream over one client folder (see the module doc)."""

    reliable = True

    def __init__(self, side: _Side) -> None:
        self._side = side
        self._wait = _SyncWait(side.make_watcher)
        self._room = _SyncWait(side.make_room_watcher)
        self.local_address = side.local_address
        self.remote_address = side.remote_address

    def set_converter(self, convert: Converter, safe: Converter | None = None) -> None:
        self._side.set_converter(convert, safe)

    def unreceive(self, items: list[Any]) -> None:
        self._side.unreceive(items)

    def send(self, payload: Buffer, timeout: float | None = None) -> None:
        """Write one message file (durable when this returns, with fsync on). Waits while
        ``write_buffer`` bytes of this side's messages are unread."""
        self._side.send(payload, timeout, self._room)

    def receive(self, timeout: float | None = None) -> list[Any]:
        deadline = deadline_of(timeout)
        while True:
            self._wait.arm()
            items = self._side.next_item()
            if items is not None:
                return items
            left = remaining(deadline)
            if left is not None and left <= 0:
                raise Timeout(f"no message within {timeout} s")
            self._wait.wait(_RESCAN_INTERVAL if left is None else min(left, _RESCAN_INTERVAL))

    def flush(self, timeout: float | None = None) -> None:
        """Nothing to do: every ``send`` has renamed its file into place before returning."""

    def close(self, timeout: float | None = None) -> None:
        if not self._side.mark_closed():
            return
        self._room.close()  # wakes a send waiting for room: it then sees the stream closed
        try:
            self._side.finish_close(timeout)
        finally:
            self._wait.close()

    def __del__(self) -> None:
        side = getattr(self, "_side", None)
        if side is not None and not side.closed:
            warnings.warn(f"unclosed {self!r}", ResourceWarning, stacklevel=1)
            side.closed = True
            side.release()
            self._wait.close()
            self._room.close()

    def __repr__(self) -> str:
        return f"<SpoolStream {self.local_address} -> {self.remote_address}>"


class AsyncSpoolStream:
    """The asyncio twin of ``SpoolStream``. File writes (with their fsync) run in a worker
    thread; reads are small and done on the loop."""

    reliable = True

    def __init__(self, side: _Side) -> None:
        self._side = side
        self._wait = _AsyncWait(side.make_watcher)
        self._room = _AsyncWait(side.make_room_watcher)
        self.local_address = side.local_address
        self.remote_address = side.remote_address

    def set_converter(self, convert: Converter, safe: Converter | None = None) -> None:
        self._side.set_converter(convert, safe)

    def unreceive(self, items: list[Any]) -> None:
        self._side.unreceive(items)

    async def send(self, payload: Buffer, timeout: float | None = None) -> None:
        # Waiting for room happens here, so a cancelled send never writes its file later.
        # Concurrent tasks may each pass the check: the bound can be exceeded by one
        # message per sending task.
        deadline = deadline_of(timeout)
        size = self._side.check_send(payload)
        while not self._side.has_room(size):
            self._room.arm()
            if self._side.has_room(size):
                break
            left = remaining(deadline)
            if left is not None and left <= 0:
                raise Timeout(f"the reader is behind by write_buffer bytes for {timeout} s")
            await self._room.wait(_RESCAN_INTERVAL if left is None
                                  else min(left, _RESCAN_INTERVAL))
            self._side.check_send(payload)
        await asyncio.to_thread(self._side.send, payload, remaining(deadline))

    async def receive(self, timeout: float | None = None) -> list[Any]:
        deadline = deadline_of(timeout)
        while True:
            self._wait.arm()
            items = self._side.next_item()
            if items is not None:
                return items
            left = remaining(deadline)
            if left is not None and left <= 0:
                raise Timeout(f"no message within {timeout} s")
            await self._wait.wait(_RESCAN_INTERVAL if left is None
                                  else min(left, _RESCAN_INTERVAL))

    async def flush(self, timeout: float | None = None) -> None:
        """Nothing to do: every ``send`` has renamed its file into place before returning."""

    async def close(self, timeout: float | None = None) -> None:
        if not self._side.mark_closed():
            return
        self._wait.close()  # wakes waiting tasks, which then see the stream closed
        self._room.close()
        await asyncio.to_thread(self._side.finish_close, timeout)

    def __del__(self) -> None:
        side = getattr(self, "_side", None)
        if side is not None and not side.closed:
            warnings.warn(f"unclosed {self!r}", ResourceWarning, stacklevel=1)
            side.closed = True
            side.release()
            self._wait.close_if_idle()
            self._room.close_if_idle()

    def __repr__(self) -> str:
        return f"<AsyncSpoolStream {self.local_address} -> {self.remote_address}>"


# -- listening --------------------------------------------------------------------------------

class _Root:
    """The listening end of a spool folder: finds client folders not yet accepted."""

    def __init__(self, addr: Address, opts: TransportOptions) -> None:
        self._options = _options(addr, opts, _OPTIONS - {"client"})
        self._opts = opts
        self.root = os.path.abspath(addr.path)
        try:
            os.makedirs(self.root, mode=0o700, exist_ok=True)
        except FileExistsError as exc:
            raise AddressInUse(f"{self.root} exists and is not a folder") from exc
        if not os.path.isdir(self.root):
            raise AddressInUse(f"{self.root} exists and is not a folder")
        lock_fd = _lock(os.path.join(self.root, _LISTENER_LOCK))
        if lock_fd is None:
            raise AddressInUse(f"another process listens on spool://{self.root}")
        self._lock_fd: int | None = lock_fd
        self.address = f"spool://{self.root}"
        self._accepted: set[str] = set()
        self._mutex = threading.Lock()
        self.closed = False
        _clean_temps(self.root)
        for name in os.listdir(self.root):
            if _CLIENT_ID.match(name):
                for sub in (TO_SERVER, TO_CLIENT):
                    _clean_temps(os.path.join(self.root, name, sub))

    def make_watcher(self) -> _Watcher:
        return _make_watcher([(self.root, _IN_ARRIVALS)], self._options["watcher"])

    def next_client(self) -> _Side | None:
        with self._mutex:
            if self.closed:
                raise ChannelClosed("listener is closed")
            try:
                names = sorted(os.listdir(self.root))
            except FileNotFoundError:
                raise ChannelClosed(f"the spool folder {self.root} was removed") from None
            for name in names:
                if name in self._accepted or not _CLIENT_ID.match(name):
                    continue
                folder = os.path.join(self.root, name)
                if not os.path.isdir(os.path.join(folder, TO_SERVER)):
                    continue
                if os.path.exists(os.path.join(folder, _SERVER_CLOSED)):
                    continue
                if _has_end(os.path.join(folder, TO_CLIENT)):
                    _touch(os.path.join(folder, _SERVER_CLOSED))  # we crashed while closing
                    continue
                self._accepted.add(name)
                try:
                    return _Side(self.root, name, server=True, opts=self._opts,
                                 options=self._options, on_close=self._forget(name))
                except OSError:
                    self._accepted.discard(name)
                    continue  # removed meanwhile
            return None

    def _forget(self, name: str) -> Callable[[], None]:
        # Runs after server.closed exists, so the next scan skips the folder until it is
        # removed, and a client that reuses the name afterwards is accepted again.
        def forget() -> None:
            with self._mutex:
                self._accepted.discard(name)
        return forget

    def close(self) -> None:
        with self._mutex:
            self.closed = True
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None


class SpoolListener:
    """Accepts a channel per client folder, including those left from before a restart."""

    def __init__(self, root: _Root) -> None:
        self._root = root
        self._wait = _SyncWait(root.make_watcher)
        self.address = root.address

    def accept(self, timeout: float | None = None) -> SpoolStream:
        deadline = deadline_of(timeout)
        while True:
            self._wait.arm()
            side = self._root.next_client()
            if side is not None:
                return SpoolStream(side)
            left = remaining(deadline)
            if left is not None and left <= 0:
                raise Timeout(f"no client within {timeout} s")
            self._wait.wait(_RESCAN_INTERVAL if left is None else min(left, _RESCAN_INTERVAL))

    def close(self) -> None:
        """Stop accepting. The folder and accepted channels stay; messages keep arriving."""
        self._root.close()
        self._wait.close()


class AsyncSpoolListener:
    """The asyncio twin of ``SpoolListener``."""

    def __init__(self, root: _Root) -> None:
        self._root = root
        self._wait = _AsyncWait(root.make_watcher)
        self.address = root.address

    async def accept(self, timeout: float | None = None) -> AsyncSpoolStream:
        deadline = deadline_of(timeout)
        while True:
            self._wait.arm()
            side = self._root.next_client()
            if side is not None:
                return AsyncSpoolStream(side)
            left = remaining(deadline)
            if left is not None and left <= 0:
                raise Timeout(f"no client within {timeout} s")
            await self._wait.wait(_RESCAN_INTERVAL if left is None
                                  else min(left, _RESCAN_INTERVAL))

    async def close(self) -> None:
        self._root.close()
        self._wait.close()


# -- connecting -------------------------------------------------------------------------------

def _open_client(addr: Address, opts: TransportOptions) -> _Side:
    options = _options(addr, opts, _OPTIONS)
    root = os.path.abspath(addr.path)
    if not os.path.isdir(root):
        raise ConnectionRefused(f"no spool folder at {root} (start the listener first)")
    explicit = "client" in options
    if explicit:
        cid = str(options["client"])
        if not _CLIENT_ID.match(cid):
            raise AddressError(f"spool:// client id must match {_CLIENT_ID.pattern}: {cid!r}")
    else:
        # time first: accept() then serves clients roughly in connection order
        cid = f"{time.time_ns():020d}-{os.getpid()}-{secrets.token_hex(4)}"
    folder = os.path.join(root, cid)
    if not (explicit and os.path.isdir(folder)):
        tmp = os.path.join(root, _temp_name())
        try:
            os.mkdir(tmp, 0o700)
            for sub in (TO_SERVER, TO_CLIENT):
                os.mkdir(os.path.join(tmp, sub), 0o700)
            os.rename(tmp, folder)  # the listener sees the folder complete or not at all
        except PermissionError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise ConnectionRefused(f"no permission to write in {root}") from exc
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not (explicit and os.path.isdir(folder)):
                raise
    lock_fd = _lock(os.path.join(folder, _CLIENT_LOCK))
    if lock_fd is None:
        raise AddressInUse(f"client id {cid!r} is in use by another process")
    try:
        if os.path.exists(os.path.join(folder, _CLIENT_CLOSED)) or \
                _has_end(os.path.join(folder, TO_SERVER)):
            raise AddressInUse(f"client id {cid!r}: its previous channel was closed and the "
                               "listener has not finished with it yet")
        return _Side(root, cid, server=False, opts=opts, options=options, lock_fd=lock_fd)
    except BaseException:
        os.close(lock_fd)
        raise


def listen(addr: Address, opts: TransportOptions) -> SpoolListener:
    return SpoolListener(_Root(addr, opts))


def connect(addr: Address, opts: TransportOptions, timeout: float | None) -> SpoolStream:
    return SpoolStream(_open_client(addr, opts))


async def alisten(addr: Address, opts: TransportOptions) -> AsyncSpoolListener:
    return AsyncSpoolListener(_Root(addr, opts))


async def aconnect(addr: Address, opts: TransportOptions,
                   timeout: float | None) -> AsyncSpoolStream:
    return AsyncSpoolStream(_open_client(addr, opts))
