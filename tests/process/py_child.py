"""A Python child for a Node parent (tests/node/fork_python.js): run by child_process.fork()."""

from __future__ import annotations

import os
import socket

import procwire
import procwire.process as pp


def main() -> None:
    ch = pp.parent()
    ch.send({"ready": True})
    held: list[socket.socket] = []  # connections a Node server passed on ("hold")
    while True:
        try:
            msg, handle = ch.recv_with_handle(timeout=30)
        except procwire.ConnectionClosed:
            return  # the parent disconnected or died: exit 0
        cmd = msg.get("cmd") if isinstance(msg, dict) else None
        if cmd == "serve":
            assert isinstance(handle, socket.socket), handle
            handle.settimeout(10)
            conn, _ = handle.accept()
            with conn:
                conn.sendall(b"hello from python " + str(os.getpid()).encode())
            handle.close()
            ch.send({"served": msg["port"]})
        elif cmd == "give":
            with socket.create_server(("127.0.0.1", 0)) as srv:
                port = srv.getsockname()[1]
                ch.send({"port": port}, handle=srv)
            ch.send({"gave": port})
        elif cmd == "hold":
            assert isinstance(handle, socket.socket), handle
            held.append(handle)
            ch.send({"held": len(held)})
        elif cmd == "drop":
            for conn in held:
                with conn:
                    conn.sendall(b"bye")
            ch.send({"dropped": len(held)})
            held.clear()
        elif cmd == "nan":
            try:
                ch.send({"x": float("nan")})
            except procwire.EncodeError as exc:
                ch.send({"refused": type(exc).__name__})
        else:
            ch.send(msg)


if __name__ == "__main__":
    main()
