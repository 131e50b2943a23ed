"""``tls://``: the conformance suite over TLS on 127.0.0.1, server-verified and mutual (with
``auth=`` on top, so the shared-key handshake is covered by the suite as well).

Certificates come from ``trustme``: one throwaway CA for the module, written to a temporary
folder that is removed when the interpreter exits.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import trustme

from procwire.testing import AsyncConformance, SyncConformance, free_tcp_port

_DIR = tempfile.TemporaryDirectory(prefix="pw-tls-")
_CA = trustme.CA()
CAFILE = str(Path(_DIR.name) / "ca.pem")
SERVER = str(Path(_DIR.name) / "server.pem")
CLIENT = str(Path(_DIR.name) / "client.pem")
_CA.cert_pem.write_to_path(CAFILE)
_CA.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(SERVER)
_CA.issue_cert("client.example").private_key_and_cert_chain_pem.write_to_path(CLIENT)


class TlsHooks:
    listen_kwargs: dict[str, Any] = {"certfile": SERVER}
    connect_kwargs: dict[str, Any] = {"cafile": CAFILE}

    def url(self, tmp_path: Path) -> str:
        return f"tls://127.0.0.1:{free_tcp_port('127.0.0.1')}"


class MutualHooks(TlsHooks):
    listen_kwargs = {"certfile": SERVER, "cafile": CAFILE, "auth": b"conformance-key"}
    connect_kwargs = {"cafile": CAFILE, "certfile": CLIENT, "auth": b"conformance-key"}


class TestTls(TlsHooks, SyncConformance):
    pass


class TestTlsAsync(TlsHooks, AsyncConformance):
    pass


class TestTlsMutualAuth(MutualHooks, SyncConformance):
    pass


class TestTlsMutualAuthAsync(MutualHooks, AsyncConformance):
    pass
