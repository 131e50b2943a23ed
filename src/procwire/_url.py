"""Endpoint URLs and the scheme registry.

An address is a URL; its scheme picks one transport module (``procwire.transports.<name>``),
imported lazily so that an unused transport costs nothing.
"""

from __future__ import annotations

import importlib
import urllib.parse
from dataclasses import dataclass, field
from types import ModuleType

from ._errors import AddressError

# scheme -> module under procwire.transports. One line per transport; nothing else to edit.
_SCHEMES: dict[str, str] = {
    "unix": "unix",
    "tcp": "tcp",
    "tls": "tls",
    "udp": "udp",
    "memory": "memory",
    "spool": "spool",
    "fd": "fd",
    "stdio": "stdio",
}


@dataclass(frozen=True)
class Address:
    """A parsed endpoint URL.

    >>> Address.parse("tcp://127.0.0.1:5000").port
    5000
    """

    scheme: str
    host: str = ""
    port: int | None = None
    path: str = ""
    query: dict[str, str] = field(default_factory=dict)
    url: str = ""

    @classmethod
    def parse(cls, url: str) -> Address:
        if not isinstance(url, str):
            raise AddressError(f"an address is a URL string, not {type(url).__name__}")
        parts = urllib.parse.urlsplit(url)
        scheme = parts.scheme.lower()
        if not scheme:
            raise AddressError(f"{url!r}: no scheme (expected e.g. unix:///path or tcp://host:port)")
        query = dict(urllib.parse.parse_qsl(parts.query))
        if scheme in ("unix", "spool"):
            # unix:///abs/path, unix://@abstract, unix://relative/path
            path = (parts.netloc + parts.path) if parts.netloc else parts.path
            if not path:
                raise AddressError(f"{url!r}: no path")
            return cls(scheme, path=urllib.parse.unquote(path), query=query, url=url)
        if scheme in ("memory",):
            name = parts.netloc + parts.path
            if not name:
                raise AddressError(f"{url!r}: no name")
            return cls(scheme, path=name, query=query, url=url)
        if scheme in ("fd", "stdio"):
            return cls(scheme, path=parts.netloc + parts.path, query=query, url=url)
        try:
            port = parts.port
        except ValueError as exc:
            raise AddressError(f"{url!r}: bad port") from exc
        host = parts.hostname or ""
        if not host:
            raise AddressError(f"{url!r}: no host")
        if port is None:
            raise AddressError(f"{url!r}: no port (use port 0 to pick a free one)")
        return cls(scheme, host=host, port=port, path=parts.path, query=query, url=url)


def format_inet(scheme: str, host: str, port: int) -> str:
    """``tcp://127.0.0.1:5000`` or ``tcp://[::1]:5000``."""
    if ":" in host:
        return f"{scheme}://[{host}]:{port}"
    return f"{scheme}://{host}:{port}"


def transport_for(scheme: str) -> ModuleType:
    """The transport module registered for ``scheme``."""
    try:
        name = _SCHEMES[scheme]
    except KeyError:
        known = ", ".join(sorted(_SCHEMES))
        raise AddressError(f"unknown scheme {scheme!r} (known: {known})") from None
    return importlib.import_module(f"procwire.transports.{name}")
