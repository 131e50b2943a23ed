"""The primary of a cluster (blocking API): ``Cluster``."""

from __future__ import annotations

import atexit
import errno
import heapq
import logging
import os
import queue
import socket
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal

from .._errors import (
    AddressError,
    AddressInUse,
    ChannelClosed,
    ConnectionClosed,
    DecodeError,
    ProcwireError,
    Timeout,
)
from .._url import Address
from ..process import Child, spawn
from ..process._child import start_failed
from ..process._launch import Target, build_argv
from . import _wire
from ._errors import CrashLoop
from ._wire import Message

__all__ = ["Cluster", "WorkerInfo"]

log = logging.getLogger("procwire.cluster")

Restart = Literal["on-failure", "always", "never"]
Ready = Literal["spawn", "online", "ready"]
RESTART_POLICIES = ("on-failure", "always", "never")
READY_LEVELS = ("spawn", "online", "ready")

_STOP = object()


@dataclass(frozen=True)
class WorkerInfo:
    """One worker slot as ``Cluster.workers`` shows it.

    ``state``: ``"starting"`` (spawned, not ready yet), ``"running"``, ``"restarting"``
    (waiting out its backoff), ``"stopping"``, ``"stopped"`` (ended and not restarted).
    ``restarts``: how many times the supervisor restarted it (reloads do not count).
    ``returncode``: the last exit status of a process in this slot (negative: a signal).
    """

    id: int
    pid: int | None
    state: str
    restarts: int
    returncode: int | None


class _Proc:
    """One worker process (a slot holds one; two during a reload)."""

    def __init__(self, slot_id: int, child: Child) -> None:
        self.slot_id = slot_id
        self.child = child
        self.online = threading.Event()
        self.ready = threading.Event()
        self.exited = threading.Event()
        self.returncode: int | None = None
        self.reader: threading.Thread | None = None

    @property
    def pid(self) -> int:
        return self.child.pid


class _Slot:
    def __init__(self, slot_id: int) -> None:
        self.id = slot_id
        self.current: _Proc | None = None
        self.state = "stopped"
        self.restarts = 0
        self.returncode: int | None = None
        self.crashes: deque[float] = deque()  # times of recent restarts, for the crash-loop limit
        self.due: float | None = None  # when a restart is scheduled
        self.pending: deque[dict[str, Any]] = deque()  # messages waiting for a restart
        # Sends to this slot, and changes of slot.current, take this lock: a replacement gets
        # its greeting, then the backlog, then new messages, in that order.
        self.send_lock = threading.Lock()


class _Inbox:
    """Worker messages for ``recv``: bounded (``limit`` messages). When full, the reader of
    the sending worker waits (so that worker's sends block once its channel buffer fills),
    except while the cluster stops: then new messages are dropped and counted."""

    def __init__(self, limit: int) -> None:
        self.items: deque[Message] = deque()
        self.limit = limit
        self.cond = threading.Condition()
        self.stopping = False
        self.error: BaseException | None = None
        self.dropped = 0

    def put(self, item: Message) -> None:
        with self.cond:
            while len(self.items) >= self.limit and not self.stopping:
                self.cond.wait()
            if len(self.items) >= self.limit:
                self.dropped += 1
                return
            self.items.append(item)
            self.cond.notify_all()

    def get(self, timeout: float | None) -> Message:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.cond:
            while not self.items:
                if self.error is not None:
                    raise self.error
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise Timeout(f"no worker message within {timeout} s")
                self.cond.wait(left)
            item = self.items.popleft()
            self.cond.notify_all()
            return item

    def close(self, error: BaseException) -> None:
        with self.cond:
            if self.error is None:
                self.error = error
            self.stopping = True
            self.cond.notify_all()


_live: weakref.WeakSet[Cluster] = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    # A primary that exits without stop() must not leave its workers behind.
    for cluster in list(_live):
        try:
            cluster.stop(timeout=2.0)
        except Exception:
            pass


class Cluster:
    """A supervised group of worker processes (Node's ``cluster``, PM2's fork mode).

    ``target``: ``"pkg.mod:func"`` or a module-level function (run as ``func(*args)`` in a
    fresh interpreter per worker), or a command list (``["node", "worker.js"]``). Each worker
    gets a stable id 1..``workers``, kept across restarts, in ``$PROCWIRE_WORKER_ID`` and in the
    greeting ``procwire.cluster.worker()`` reads.

    Supervision: a worker that ends is restarted under the same id (``restart="on-failure"``:
    when its exit status is not 0, ``"always"``, ``"never"``), after an exponential backoff
    (``backoff`` s, doubled per recent restart, at most ``max_backoff``). More than
    ``max_restarts`` restarts of one worker within ``restart_window`` seconds is a crash
    loop: the cluster stops every worker and raises ``CrashLoop`` from ``wait``, ``recv``,
    ``send``...

    Messages (JSON values): ``broadcast(msg)``, ``send(worker_id, msg)``; from workers:
    ``recv(timeout=)`` / ``messages(timeout=)`` / ``for m in cluster`` give
    ``Message(sender, data)``, or ``on_message(callback)``. Workers talk to each other through
    the primary (``worker().send_to(id, msg)``, ``worker().broadcast(msg)``).

    Buffers: worker messages wait in an inbox of ``inbox`` messages (when full, the primary
    stops reading that worker, whose sends then block); messages to a worker that is being
    restarted wait in a backlog of ``pending`` messages per worker (when full, the oldest is
    dropped and counted in ``stats()``). A message sent to a worker that dies before reading
    it is lost, as in Node.

    ``listen="tcp://127.0.0.1:8000"`` (or ``(host, port)``, or a listening socket): the primary
    opens that socket and passes it to every worker (``worker().listener``): all workers accept
    on one port, and since the primary keeps it open, a connection is never refused, even while
    workers restart or ``reload()`` replaces them.

    ``ready``: when a worker counts as running (``start`` and ``reload`` wait for it):
    ``"spawn"`` at once, ``"online"`` when it calls ``worker()`` (default for Python functions),
    ``"ready"`` when it calls ``worker().ready()`` (use it for servers). Command lists default
    to ``"spawn"``.

    >>> with Cluster("myapp.worker:main", workers=4) as cluster:   # doctest: +SKIP
    ...     cluster.broadcast({"config": 1}); print(cluster.recv(timeout=5))
    """

    def __init__(self, target: Target, *args: Any, workers: int | None = None,
                 restart: Restart = "on-failure", listen: Any = None,
                 ready: Ready | None = None, max_restarts: int = 5,
                 restart_window: float = 60.0, backoff: float = 0.1, max_backoff: float = 10.0,
                 inbox: int = 10_000, pending: int = 1_000, stop_timeout: float = 5.0,
                 env: dict[str, str] | None = None, cwd: Any = None,
                 **spawn_kwargs: Any) -> None:
        n = (os.cpu_count() or 1) if workers is None else workers
        if type(n) is not int or n < 1:
            raise ValueError(f"workers must be a positive int, not {workers!r}")
        if restart not in RESTART_POLICIES:
            raise ValueError(f"restart must be one of {RESTART_POLICIES}, not {restart!r}")
        is_command = isinstance(target, list | tuple)
        ready = ready or ("spawn" if is_command else "online")
        if ready not in READY_LEVELS:
            raise ValueError(f"ready must be one of {READY_LEVELS}, not {ready!r}")
        if max_restarts < 0 or restart_window <= 0 or backoff < 0 or max_backoff < backoff:
            raise ValueError("need max_restarts >= 0, restart_window > 0, "
                             "0 <= backoff <= max_backoff")
        if inbox < 1 or pending < 0:
            raise ValueError("need inbox >= 1 and pending >= 0")
        build_argv(target, args, spawn_kwargs.get("executable"))  # bad targets fail here
        self._target = target
        self._args = args
        self.size = n
        self.restart = restart
        self.ready_level: Ready = ready
        self.max_restarts = max_restarts
        self.restart_window = restart_window
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.stop_timeout = stop_timeout
        self._pending_limit = pending
        self._env = env
        self._cwd = cwd
        self._spawn_kwargs = spawn_kwargs
        self._listen_spec = listen
        self._listener: socket.socket | None = None
        self._own_listener = False
        self._slots = [_Slot(i) for i in range(1, n + 1)]
        self._procs: set[_Proc] = set()  # every process not yet reaped and cleaned up
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._events: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._inbox = _Inbox(inbox)
        self._callbacks: list[Callable[[Message], Any]] = []
        self._supervisor: threading.Thread | None = None
        self._reload_lock = threading.Lock()
        self._started = False
        self._starting = False  # start() has not returned yet (see StartFailed)
        self._stopping = False
        self._stopped = False
        self._error: BaseException | None = None
        self._counts = {"received": 0, "relayed": 0, "sent": 0, "dropped": 0, "lost": 0}

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self, *, timeout: float | None = 30.0) -> Cluster:
        """Start every worker and wait until each is running (see ``ready``). ``Timeout``
        (the cluster is then stopped); ``OSError`` when the program cannot be started;
        ``CrashLoop``; ``StartFailed`` at once when a worker cannot import its target
        (``"pkg.mod:func"`` or a function: a missing module or name, an error at import),
        which restarting would not cure. Returns the cluster."""
        with self._lock:
            if self._started:
                raise ProcwireError("this cluster was already started")
            self._started = self._starting = True
        _live.add(self)
        try:
            self._open_listener()
            self._supervisor = threading.Thread(target=self._supervise, daemon=True,
                                                name="procwire-cluster-supervisor")
            self._supervisor.start()
            for slot in self._slots:
                self._start_slot(slot)
            self._wait_running(timeout)
        except BaseException:
            self.stop(timeout=1.0)
            raise
        finally:
            with self._lock:
                self._starting = False
        return self

    def _open_listener(self) -> None:
        spec = self._listen_spec
        if spec is None:
            return
        if isinstance(spec, socket.socket):
            self._listener = spec
            return
        if isinstance(spec, str):
            addr = Address.parse(spec)
            if addr.scheme != "tcp":
                raise AddressError(f"listen={spec!r}: a cluster shares a tcp:// port")
            host, port = addr.host, addr.port or 0
        elif isinstance(spec, tuple) and len(spec) == 2:
            host, port = spec
        else:
            raise AddressError(f"listen= takes 'tcp://host:port', (host, port) or a listening "
                               f"socket, not {spec!r}")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            self._listener = socket.create_server((host, port), family=family, backlog=1024)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise AddressInUse(f"{host}:{port} is in use") from exc
            raise
        self._own_listener = True

    def _wait_running(self, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                if self._error is not None:
                    raise self._error
                if all(s.state in ("running", "stopped") for s in self._slots):
                    return
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    waiting = [s.id for s in self._slots if s.state != "running"]
                    raise Timeout(f"workers {waiting} not {self.ready_level} within {timeout} s")
                self._cond.wait(left)

    def wait(self, timeout: float | None = None) -> None:
        """Wait until no worker runs and none will be restarted (every one ended under the
        restart policy, or ``stop()`` was called). Raises ``CrashLoop`` if that is why, and
        ``Timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                # After a crash loop, return only once stop() has ended every process.
                if self._error is not None and self._stopped:
                    raise self._error
                if self._error is None and (self._stopped or
                                            all(s.state == "stopped" for s in self._slots)):
                    return
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise Timeout(f"cluster still running after {timeout} s")
                self._cond.wait(left)

    def stop(self, timeout: float | None = None) -> None:
        """Stop every worker: SIGTERM, up to ``timeout`` seconds (default ``stop_timeout``)
        for them to exit, then SIGKILL. Every process is reaped; messages already received
        stay readable. Idempotent; safe from any thread."""
        grace = self.stop_timeout if timeout is None else timeout
        with self._cond:
            if self._stopped:
                return
            self._stopping = True
            for slot in self._slots:
                slot.due = None
                if slot.state != "stopped":
                    slot.state = "stopping"
            self._cond.notify_all()
        self._inbox.stopping = True  # a reader blocked on a full inbox must not hold us up
        with self._inbox.cond:
            self._inbox.cond.notify_all()
        self._events.put(_STOP)
        sup = self._supervisor
        if sup is not None and sup is not threading.current_thread():
            sup.join(10.0)
        # The reload lock: a reload in progress sees _stopping and gives up its new worker.
        with self._lock:
            procs = list(self._procs)
        _end_procs(procs, grace)
        for proc in procs:
            if proc.reader is not None and proc.reader is not threading.current_thread():
                proc.reader.join(5.0)
            self._cleanup(proc)
        if self._listener is not None and self._own_listener:
            self._listener.close()
        with self._cond:
            for slot in self._slots:
                slot.state = "stopped"
                slot.current = None
            self._stopped = True
            self._cond.notify_all()
        self._inbox.close(self._error or ChannelClosed("the cluster was stopped"))
        _live.discard(self)

    def __enter__(self) -> Cluster:
        if not self._started:
            self.start()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- processes ----------------------------------------------------------------------------
    def _spawn(self, slot: _Slot) -> _Proc:
        """A new process for ``slot`` (not yet its current one), greeted, with its reader."""
        env = dict(os.environ if self._env is None else self._env)
        env[_wire.ID_ENV] = str(slot.id)
        env[_wire.COUNT_ENV] = str(self.size)
        child = spawn(self._target, *self._args, env=env, cwd=self._cwd, **self._spawn_kwargs)
        proc = _Proc(slot.id, child)
        if self.ready_level == "spawn":
            proc.online.set()
            proc.ready.set()
        with self._lock:
            self._procs.add(proc)
        try:
            child.send(_wire.hello(slot.id, self.size), handle=self._listener, timeout=5.0)
        except (ConnectionClosed, Timeout) as exc:
            log.debug("procwire cluster: could not greet worker %d: %s", slot.id, exc)
        proc.reader = threading.Thread(target=self._read, args=(proc,), daemon=True,
                                       name=f"procwire-cluster-worker-{slot.id}")
        proc.reader.start()
        return proc

    def _start_slot(self, slot: _Slot) -> None:
        """Give ``slot`` a new current process, then its backlog."""
        with slot.send_lock:
            proc = self._spawn(slot)
            self._install(slot, proc)

    def _install(self, slot: _Slot, proc: _Proc) -> None:
        # slot.send_lock held.
        while slot.pending:
            try:
                proc.child.send(slot.pending[0], timeout=5.0)
            except (ConnectionClosed, Timeout):
                break  # it died already: the backlog waits for the next one
            slot.pending.popleft()
        with self._cond:
            slot.current = proc
            slot.due = None
            slot.state = "running" if proc.ready.is_set() else "starting"
            self._cond.notify_all()

    def _read(self, proc: _Proc) -> None:
        """One worker's reader thread: its messages, then its exit."""
        ch = proc.child.channel
        while True:
            try:
                obj = ch.recv(None)
            except DecodeError as exc:
                log.warning("procwire cluster: worker %d sent a bad message: %s",
                            proc.slot_id, exc)
                continue
            except (ConnectionClosed, ChannelClosed, OSError):
                break
            try:
                self._on_worker_message(proc, obj)
            except Exception:
                log.exception("procwire cluster: handling a message of worker %d",
                              proc.slot_id)
        # The channel ends when the process does (or when it closed the channel: then it
        # ends when stop() or the supervisor ends it).
        proc.returncode = proc.child.wait(None)
        proc.exited.set()
        self._events.put(proc)

    def _on_worker_message(self, proc: _Proc, obj: Any) -> None:
        kind, to, data = _wire.from_worker(obj)
        if kind == _wire.MSG:
            self._counts["received"] += 1
            self._deliver(Message(proc.slot_id, data))
        elif kind == _wire.TO:
            self._counts["relayed"] += 1
            try:
                _wire.check_worker_id(to, self.size)
                self._send_to_slot(self._slots[to - 1], _wire.to_worker(proc.slot_id, data))
            except (ValueError, ProcwireError) as exc:
                self._counts["lost"] += 1
                log.warning("procwire cluster: message of worker %d to %r not relayed: %s",
                            proc.slot_id, to, exc)
        elif kind == _wire.ALL:
            self._counts["relayed"] += 1
            env = _wire.to_worker(proc.slot_id, data)
            for slot in self._slots:
                if slot.id != proc.slot_id:
                    self._relay_quietly(slot, env)
        elif kind in (_wire.ONLINE, _wire.READY):
            proc.online.set()
            if kind == _wire.READY or self.ready_level != "ready":
                proc.ready.set()
                with self._cond:
                    slot = self._slots[proc.slot_id - 1]
                    if slot.current is proc and slot.state == "starting":
                        slot.state = "running"
                    self._cond.notify_all()
        else:
            log.debug("procwire cluster: worker %d sent an unknown control message %r",
                      proc.slot_id, obj)

    def _deliver(self, msg: Message) -> None:
        callbacks = self._callbacks
        if not callbacks:
            self._inbox.put(msg)
            return
        for cb in callbacks:
            try:
                cb(msg)
            except Exception:
                log.exception("procwire cluster: on_message callback %r raised", cb)

    def _relay_quietly(self, slot: _Slot, env: dict[str, Any]) -> None:
        try:
            self._send_to_slot(slot, env)
        except ProcwireError as exc:
            self._counts["lost"] += 1
            log.debug("procwire cluster: not relayed to worker %d: %s", slot.id, exc)

    def _send_to_slot(self, slot: _Slot, env: dict[str, Any],
                      timeout: float | None = None) -> None:
        with slot.send_lock:
            proc = slot.current
            if proc is not None and not proc.exited.is_set():
                try:
                    proc.child.channel.send(env, timeout=timeout)
                    return
                except ConnectionClosed:
                    pass  # it just died: the supervisor restarts it, the message waits
            with self._lock:
                if self._error is not None:
                    raise self._error
                if self._stopping:
                    raise ChannelClosed("the cluster was stopped")
                if slot.state == "stopped":
                    raise ConnectionClosed(f"worker {slot.id} has stopped", reason="stopped")
            if len(slot.pending) >= self._pending_limit:
                if not slot.pending:
                    self._counts["dropped"] += 1
                    return
                slot.pending.popleft()
                self._counts["dropped"] += 1
            slot.pending.append(env)

    # -- supervision --------------------------------------------------------------------------
    def _supervise(self) -> None:
        due: list[tuple[float, int]] = []  # (when, slot id) heap of scheduled restarts
        while True:
            timeout = None if not due else max(0.0, due[0][0] - time.monotonic())
            try:
                ev = self._events.get(timeout=timeout)
            except queue.Empty:
                ev = None
            if ev is _STOP:
                return
            if isinstance(ev, _Proc):
                when = self._on_exit(ev)
                if when is not None:
                    heapq.heappush(due, (when, ev.slot_id))
                if self._error is not None:
                    # A crash loop: stop everything from here (stop() knows not to join us).
                    self.stop()
                    return
            now = time.monotonic()
            while due and due[0][0] <= now:
                _, slot_id = heapq.heappop(due)
                when = self._restart(self._slots[slot_id - 1], now)
                if when is not None:
                    heapq.heappush(due, (when, slot_id))
                if self._error is not None:
                    self.stop()
                    return

    def _on_exit(self, proc: _Proc) -> float | None:
        """A process ended: clean it up and, if it was a slot's current one, decide (restart
        at the returned time, or not)."""
        slot = self._slots[proc.slot_id - 1]
        with slot.send_lock, self._cond:
            is_current = slot.current is proc
            if is_current:
                slot.current = None
                slot.returncode = proc.returncode
        self._cleanup(proc)
        if not is_current:
            return None  # replaced by reload(), or already being stopped
        rc = proc.returncode
        start_error = proc.child.channel.start_error
        with self._cond:
            try:
                if self._stopping:
                    slot.state = "stopped"
                    return None
                if start_error is not None and rc is not None:
                    if self._starting:
                        # A target that cannot be imported will not import on a retry:
                        # fail start() now rather than crash-loop into the limit.
                        self._error = start_failed(f"worker {slot.id}", start_error, rc,
                                                   proc.pid, slot.id,
                                                   "; the cluster was stopped")
                        log.error("procwire cluster: %s", self._error)
                        slot.state = "stopped"
                        return None
                    # After start-up (a deploy in progress?): restarted like any failure.
                    log.error("procwire cluster: worker %d could not start %s: %s",
                              slot.id, *start_error)
                if self.restart == "never" or (self.restart == "on-failure" and rc == 0):
                    log.info("procwire cluster: worker %d (pid %d) exited with %s; not "
                             "restarted (restart=%r)", slot.id, proc.pid, rc, self.restart)
                    slot.state = "stopped"
                    self._counts["lost"] += len(slot.pending)
                    slot.pending.clear()
                    return None
                return self._schedule(slot, rc)
            finally:
                self._cond.notify_all()

    def _schedule(self, slot: _Slot, rc: int | None) -> float | None:
        # self._cond held.
        now = time.monotonic()
        slot.crashes.append(now)
        while slot.crashes and slot.crashes[0] < now - self.restart_window:
            slot.crashes.popleft()
        n = len(slot.crashes)
        if n > self.max_restarts:
            self._error = CrashLoop(
                f"worker {slot.id} ended {n} times within {self.restart_window:g} s "
                f"(last exit status {rc}): crash loop (max_restarts={self.max_restarts}), "
                f"so the cluster was stopped", worker_id=slot.id, returncode=rc, restarts=n)
            log.error("procwire cluster: %s", self._error)
            slot.state = "stopped"
            return None
        delay = min(self.max_backoff, self.backoff * 2 ** (n - 1))
        log.warning("procwire cluster: worker %d exited with %s; restarting in %.2f s",
                    slot.id, rc, delay)
        slot.state = "restarting"
        slot.due = now + delay
        return slot.due

    def _restart(self, slot: _Slot, now: float) -> float | None:
        with self._cond:
            if self._stopping or slot.due is None or slot.due > now or slot.current is not None:
                return None  # cancelled (stop, or a reload replaced it meanwhile)
        try:
            with slot.send_lock:
                proc = self._spawn(slot)
                with self._cond:
                    slot.restarts += 1
                self._install(slot, proc)
        except OSError as exc:
            log.error("procwire cluster: cannot restart worker %d: %s", slot.id, exc)
            with self._cond:
                return self._schedule(slot, None)
        return None

    def _cleanup(self, proc: _Proc) -> None:
        try:
            proc.child.channel.close(0)
        except (Timeout, ProcwireError, OSError):
            pass
        with self._lock:
            self._procs.discard(proc)

    # -- messaging ----------------------------------------------------------------------------
    def _check(self) -> None:
        if self._error is not None:
            raise self._error
        if not self._started:
            raise ProcwireError("the cluster is not started: call start()")
        if self._stopping:
            raise ChannelClosed("the cluster was stopped")

    def send(self, worker_id: int, msg: Any, *, timeout: float | None = None) -> None:
        """Send one JSON value to worker ``worker_id`` (1..N); its ``worker().recv()`` gives
        ``Message(0, msg)``. To a worker being restarted it is delivered once the new process
        is up. ``ValueError`` for an unknown id, ``ConnectionClosed`` when that worker has
        stopped for good, ``Timeout`` when its channel buffer stays full."""
        _wire.check_worker_id(worker_id, self.size)
        self._check()
        self._send_to_slot(self._slots[worker_id - 1], _wire.to_worker(_wire.PRIMARY, msg),
                           timeout)
        self._counts["sent"] += 1

    def broadcast(self, msg: Any, *, timeout: float | None = None) -> None:
        """Send one JSON value to every worker (those stopped for good are skipped)."""
        self._check()
        env = _wire.to_worker(_wire.PRIMARY, msg)
        for slot in self._slots:
            try:
                self._send_to_slot(slot, env, timeout)
                self._counts["sent"] += 1
            except ConnectionClosed:
                continue

    def recv(self, timeout: float | None = None) -> Message:
        """The next worker message, ``Message(sender, data)``. ``Timeout``; once the cluster
        has stopped and every message was read, ``ChannelClosed`` (``CrashLoop`` if a crash
        loop stopped it). Messages go here only while no ``on_message`` callback is set."""
        return self._inbox.get(timeout)

    def messages(self, timeout: float | None = None) -> Iterator[Message]:
        """Worker messages until none comes within ``timeout`` (or the cluster stops)."""
        while True:
            try:
                yield self._inbox.get(timeout)
            except (Timeout, ChannelClosed):
                return

    def __iter__(self) -> Iterator[Message]:
        return self.messages()

    def on_message(self, callback: Callable[[Message], Any]) -> Callable[[Message], Any]:
        """Call ``callback(Message(sender, data))`` for each worker message (from that
        worker's reader thread: keep it short; what it raises is logged). While a callback is
        set, messages no longer go to ``recv``. Usable as a decorator."""
        self._callbacks = [*self._callbacks, callback]
        return callback

    # -- reload -------------------------------------------------------------------------------
    def reload(self, *, timeout: float = 30.0) -> None:
        """Replace every worker, one at a time: a new process for id k is started and waited
        for (until it is ``ready``, up to ``timeout``), then the old one gets SIGTERM (and
        SIGKILL after ``stop_timeout``). With ``listen=``, the port keeps accepting throughout.
        If a new worker fails to come up, it is killed, the old one keeps running, and
        ``ProcwireError`` (``Timeout`` if it was slow) is raised; workers already replaced
        stay replaced."""
        with self._reload_lock:
            for slot in self._slots:
                self._check()
                self._reload_slot(slot, timeout)

    def _reload_slot(self, slot: _Slot, timeout: float) -> None:
        new = self._spawn(slot)
        deadline = time.monotonic() + timeout
        while not new.ready.is_set():
            if new.exited.is_set() or self._stopping or time.monotonic() > deadline:
                died = new.exited.is_set()
                _end_procs([new], 0.5)
                self._cleanup(new)
                if self._error is not None:
                    raise self._error
                start_error = new.child.channel.start_error
                if died and start_error is not None and new.returncode is not None:
                    raise start_failed(f"reload: the new worker {slot.id}", start_error,
                                       new.returncode, new.pid, slot.id,
                                       "; the old one keeps running")
                if died:
                    raise ProcwireError(f"reload: the new worker {slot.id} exited with "
                                        f"{new.returncode} before it was ready; the old one "
                                        "keeps running")
                if self._stopping:
                    raise ChannelClosed("the cluster was stopped during reload()")
                raise Timeout(f"reload: the new worker {slot.id} was not ready within "
                              f"{timeout} s; the old one keeps running")
            new.ready.wait(0.05)
        with slot.send_lock:
            old = slot.current
            self._install(slot, new)
        if old is not None:
            # No longer the slot's current process: its exit is not a crash (see _on_exit).
            _end_procs([old], self.stop_timeout)

    # -- inspection ---------------------------------------------------------------------------
    @property
    def workers(self) -> list[WorkerInfo]:
        """Each worker slot: id, pid, state, restarts, last exit status."""
        with self._lock:
            return [WorkerInfo(s.id, s.current.pid if s.current else None, s.state,
                               s.restarts, s.returncode) for s in self._slots]

    @property
    def pids(self) -> list[int]:
        """The pids of every worker process that runs now (during a reload, old and new)."""
        with self._lock:
            return sorted(p.pid for p in self._procs if not p.exited.is_set())

    @property
    def listener(self) -> socket.socket | None:
        """The shared listening socket (``listen=``), or None."""
        return self._listener

    @property
    def address(self) -> tuple[str, int] | None:
        """``(host, port)`` of the shared listening socket, or None."""
        if self._listener is None:
            return None
        host, port = self._listener.getsockname()[:2]
        return host, port

    @property
    def error(self) -> BaseException | None:
        """Why the cluster stopped by itself (``CrashLoop``), or None."""
        return self._error

    def stats(self) -> dict[str, int]:
        """Counters: ``received`` (worker messages to the primary), ``relayed`` (worker to
        worker), ``sent`` (primary to worker), ``restarts``, ``dropped`` (backlog or inbox
        full), ``lost`` (relays to a worker that has stopped or does not exist)."""
        out = dict(self._counts)
        out["restarts"] = sum(s.restarts for s in self._slots)
        out["dropped"] += self._inbox.dropped
        return out

    def __repr__(self) -> str:
        states = ",".join(s.state for s in self._slots)
        return f"<Cluster {self._target!r} workers={self.size} [{states}]>"


def _end_procs(procs: list[_Proc], grace: float) -> None:
    """SIGTERM every process, wait up to ``grace`` s in all, SIGKILL the rest; reap all."""
    for p in procs:
        p.child.terminate()
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.child.wait(max(0.0, deadline - time.monotonic()))
        except Timeout:
            p.child.kill()
    for p in procs:
        try:
            p.child.wait(10.0)
        except Timeout:
            log.error("procwire cluster: worker pid %d survived SIGKILL for 10 s", p.pid)
