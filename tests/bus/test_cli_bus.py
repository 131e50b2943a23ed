"""``procwire listen / broker`` as real processes: several patterns see the bus's notices like
one pattern does, and bad option values are usage errors."""

from __future__ import annotations

import re
from typing import Any

CLI = "import sys; sys.argv[0] = 'procwire'; from procwire.cli import main; main()"


def test_listen_refuses_a_negative_count(children: Any) -> None:
    proc = children.python(CLI, "listen", "x", "--count", "-1", stdout=-1, stderr=-1)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 2, (out, err)
    assert b"Invalid value for '--count'" in err and b"greater than or equal to 0" in err
    assert out == b""


def test_broker_help_explains_every_option(children: Any, monkeypatch: Any) -> None:
    monkeypatch.setenv("COLUMNS", "250")  # one line per option
    proc = children.python(CLI, "broker", "--help", stdout=-1, stderr=-1)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    options = dict(re.findall(r"(--[\w-]+)\s+<\w+>\s+(.*?)\s*│", out.decode()))
    assert len(options) >= 8, out.decode()
    for name, text in options.items():  # a help text, not just the default
        assert text and not text.startswith("["), (name, text)
    assert "--status" in options["--timeout"], options["--timeout"]
