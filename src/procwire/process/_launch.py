"""Starting a child process with a channel, and finding the channel inside a child.

Shared by the blocking and asyncio APIs: no I/O beyond ``Popen`` and descriptor juggling.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .._errors import EncodeError
from ._errors import NoParentChannel

__all__ = ["Launched", "adopt_parent_fd", "build_argv", "launch"]

Target = Sequence[str] | Callable[..., Any] | str

CHANNEL_ENV = "NODE_CHANNEL_FD"
MODE_ENV = "NODE_CHANNEL_SERIALIZATION_MODE"
#: Set to "stdio" in a child started with ``channel="stdio"``, so its ``parent()`` knows.
PROCWIRE_ENV = "PROCWIRE_CHANNEL"
#: Exit status of a ``spawn(fn)`` child whose function could not be imported (see ``_boot``).
START_FAILED = 122

_BOOT = ("import sys,json;sys.path[:0]=json.loads(sys.argv[1]);"
         "from procwire.process._boot import main;main()")


def _callable_spec(fn: Callable[..., Any]) -> dict[str, Any]:
    """``{"module", "qualname"}`` (or ``"file"`` for ``__main__``) naming ``fn`` so that a fresh
    interpreter can import it; refuses what cannot be found that way."""
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None)
    if not module or not qualname or "<" in qualname:
        raise TypeError(f"spawn() runs a function in a fresh interpreter, which imports it by "
                        f"name: {fn!r} has none (a lambda or a function defined inside "
                        f"another one); define it at module level")
    spec: dict[str, Any] = {"module": module, "qualname": qualname}
    if module == "__main__":
        main_file = getattr(sys.modules["__main__"], "__file__", None)
        if not main_file:
            raise TypeError(f"{qualname} is defined in an interactive session; spawn() needs "
                            "it in a file (put it in a module and import it)")
        spec["file"] = os.path.abspath(main_file)
    else:
        obj: Any = sys.modules.get(module)
        for part in qualname.split("."):
            obj = getattr(obj, part, None)
        if obj is not fn:
            raise TypeError(f"{module}:{qualname} does not name {fn!r}; spawn() needs a "
                            "function reachable by its module and name")
    return spec


def build_argv(target: Target, args: tuple[Any, ...], executable: str | None) -> list[str]:
    """The command line for ``target``: a command list as is, or the bootstrap that imports and
    calls a Python function (``fn`` or ``"pkg.mod:func"``) with JSON ``args``."""
    if isinstance(target, list | tuple):
        if args:
            raise TypeError("spawn(cmd_list) takes no extra positional arguments: put them "
                            "in the command list")
        argv = [os.fspath(a) for a in target]
        if not argv:
            raise ValueError("spawn() needs a non-empty command")
        return argv
    if isinstance(target, str):
        module, sep, qualname = target.partition(":")
        if not sep or not module or not qualname:
            raise ValueError(f"spawn({target!r}): a string target is 'pkg.module:function'; "
                             "a command is a list, e.g. ['node', 'worker.js']")
        spec: dict[str, Any] = {"module": module, "qualname": qualname}
    elif callable(target):
        spec = _callable_spec(target)
    else:
        raise TypeError(f"spawn() takes a command list, a function or 'pkg.mod:func', "
                        f"not {type(target).__name__}")
    try:
        spec["args"] = list(args)
        payload = json.dumps(spec, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise EncodeError(f"spawn() passes arguments as JSON: {exc}") from exc
    path = json.dumps([p for p in sys.path if isinstance(p, str)])
    return [executable or sys.executable, "-c", _BOOT, path, payload]


@dataclass
class Launched:
    proc: subprocess.Popen[bytes]
    sock: socket.socket | None  # the parent's end of the Node IPC socketpair
    read_fd: int | None  # stdio channel: the child's stdout (ours now)
    write_fd: int | None  # stdio channel: the child's stdin


def launch(argv: list[str], *, channel: str, env: dict[str, str] | None, cwd: Any,
           popen_kwargs: dict[str, Any]) -> Launched:
    """Start ``argv`` with a channel: ``"node"`` (a socketpair whose child end is named by
    ``NODE_CHANNEL_FD``) or ``"stdio"`` (JSON lines on its stdin/stdout)."""
    full_env = dict(os.environ if env is None else env)
    for name in (CHANNEL_ENV, MODE_ENV, PROCWIRE_ENV):
        full_env.pop(name, None)  # never hand our own parent's channel down
    if channel == "node":
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            full_env[CHANNEL_ENV] = str(theirs.fileno())
            full_env[MODE_ENV] = "json"
            pass_fds = (*popen_kwargs.pop("pass_fds", ()), theirs.fileno())
            proc = subprocess.Popen(argv, env=full_env, cwd=cwd, pass_fds=pass_fds,
                                    **popen_kwargs)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()  # the child has its copy; ours would hide its exit (no EOF)
        return Launched(proc, ours, None, None)
    if channel == "stdio":
        for name in ("stdin", "stdout"):
            if name in popen_kwargs:
                raise ValueError(f"channel='stdio' uses the child's stdin and stdout; "
                                 f"{name}= cannot be given")
        full_env[PROCWIRE_ENV] = "stdio"
        proc = subprocess.Popen(argv, env=full_env, cwd=cwd, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, **popen_kwargs)
        assert proc.stdin is not None and proc.stdout is not None
        # The channel owns private duplicates; the originals must close, or the child would
        # never see end of file on its stdin.
        rfd, wfd = os.dup(proc.stdout.fileno()), os.dup(proc.stdin.fileno())
        proc.stdout.close()
        proc.stdin.close()
        proc.stdout = proc.stdin = None
        return Launched(proc, None, rfd, wfd)
    raise ValueError(f"channel must be 'node' or 'stdio', not {channel!r}")


def adopt_parent_fd() -> tuple[str, socket.socket | None]:
    """Inside a child: the kind of parent channel (``"node"`` or ``"stdio"``) and, for
    ``"node"``, its socket. Removes the variables from the environment (as Node does), so a
    grandchild does not mistake some other descriptor for a channel."""
    if os.environ.get(PROCWIRE_ENV) == "stdio":
        os.environ.pop(PROCWIRE_ENV, None)
        return "stdio", None
    raw = os.environ.get(CHANNEL_ENV)
    if raw is None:
        raise NoParentChannel("this process has no parent channel: it was not started by "
                              "procwire.spawn() or Node's child_process.fork() "
                              "(NODE_CHANNEL_FD is not set)")
    mode = os.environ.get(MODE_ENV, "json") or "json"
    if mode != "json":
        raise NoParentChannel(f"the parent channel uses Node's {mode!r} serialization, which "
                              "procwire does not speak: fork with {serialization: 'json'} "
                              "(the default)")
    try:
        fd = int(raw)
        st = os.fstat(fd)
    except (ValueError, OSError) as exc:
        raise NoParentChannel(f"NODE_CHANNEL_FD={raw!r} does not name an open descriptor "
                              f"({exc}); was it inherited from a grandparent?") from exc
    if not stat.S_ISSOCK(st.st_mode):
        raise NoParentChannel(f"NODE_CHANNEL_FD={fd} is not a socket")
    sock = socket.socket(fileno=fd)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise NoParentChannel(f"NODE_CHANNEL_FD={fd} is not a UNIX stream socket")
    os.set_inheritable(fd, False)
    os.environ.pop(CHANNEL_ENV, None)
    os.environ.pop(MODE_ENV, None)
    return "node", sock
