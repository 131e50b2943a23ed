"""A cluster of HTTP servers sharing one port (standard library only, besides procwire).

    python examples/cluster_http.py [--workers 4] [--port 8000]

The primary opens 127.0.0.1:PORT and passes the listening socket to every worker; each worker
serves it with ``http.server`` and answers which worker (and pid) served the request:

    curl http://127.0.0.1:8000/      ->  served by worker 3 (pid 12345)

Send the primary SIGHUP to reload the workers one by one (no connection is refused meanwhile);
Ctrl-C stops them all. ``serve`` is the worker; the tests run it too.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import procwire.cluster as pc


class Handler(BaseHTTPRequestHandler):
    worker_id = 0

    def do_GET(self) -> None:  # http.server calls do_<METHOD>
        body = f"served by worker {self.worker_id} (pid {os.getpid()})\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: one line per request would drown the terminal


def serve() -> None:
    """The worker: serve the cluster's shared socket until SIGTERM, finishing the request at
    hand first (so a rolling reload drops nothing)."""
    w = pc.worker()
    assert w.listener is not None, "start the cluster with listen="
    Handler.worker_id = w.id
    server = HTTPServer(w.listener.getsockname()[:2], Handler, bind_and_activate=False)
    server.socket.close()
    server.socket = w.listener
    # Every worker waits on the same socket and only one wins each connection: the others
    # must not block in accept(), or they could not notice SIGTERM. (The flag is shared by all
    # copies of the socket; socketserver takes the resulting BlockingIOError in its stride.)
    w.listener.setblocking(False)

    def on_term(signum: int, frame: Any) -> None:
        # shutdown() waits for serve_forever() to return: call it from another thread.
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_term)
    w.ready()
    try:
        server.serve_forever(poll_interval=0.1)
    finally:
        server.server_close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--port", type=int, default=8000)
    opts = parser.parse_args()
    cluster = pc.Cluster(serve, workers=opts.workers, listen=("127.0.0.1", opts.port),
                         ready="ready")
    with cluster:
        host, port = cluster.address or ("", 0)
        print(f"{opts.workers} workers serving http://{host}:{port}/ (SIGHUP: reload, "
              "Ctrl-C: stop)", flush=True)
        reload = threading.Event()
        signal.signal(signal.SIGHUP, lambda *_: reload.set())
        try:
            while True:
                if reload.wait(1.0):
                    reload.clear()
                    cluster.reload()
                    print("reloaded:", [w.pid for w in cluster.workers], flush=True)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
