"""``procwire listen / broker`` as real processes: several patterns see the bus's notices like
one pattern does, and bad option values are usage errors."""

from __future__ import annotations

import json
import re
from typing import Any

import redis

CLI = "import sys; sys.argv[0] = 'procwire'; from procwire.cli import main; main()"


def test_listen_with_several_patterns_shows_the_notices_they_match(
        redis_server: Any, children: Any) -> None:
    """``listen procwire.* procwire.gap good.*``: the bad-message and gap notices are printed
    (once each, though two patterns match the gap), like ``listen procwire.*`` alone prints them;
    events that match no pattern are not."""
    url = redis_server.url
    listener = children.python(
        CLI, "listen", "procwire.*", "procwire.gap", "good.*", "--url", url,
        "--channel", "cli2", "--count", "3", "--timeout", "15", stdout=-1, stderr=-1)
    assert listener.stderr.readline().strip() == b"listening"
    raw = redis.Redis.from_url(url)
    try:
        raw.publish("cli2", b"not json")
        raw.publish("cli2", json.dumps({"event": "other.1", "data": 0}))
        raw.publish("cli2", json.dumps({"event": "good.1", "data": 1}))
    finally:
        raw.close()
    # two lines printed (ends by --timeout if not): Redis has handed over what it was sent
    first = [listener.stdout.readline() for _ in range(2)]
    redis_server.stop()   # the listener's bus reconnects and reports the gap
    redis_server.start()
    out, err = listener.communicate(timeout=30)
    assert listener.returncode == 0, err
    lines = [json.loads(line) for line in [*first, *out.splitlines()] if line]
    assert sorted(line["event"] for line in lines) == [
        "good.1", "procwire.bad_message", "procwire.gap"], lines
    bad = next(line["data"] for line in lines if line["event"] == "procwire.bad_message")
    assert bad["reason"].startswith("not JSON") and bad["channel"] == "cli2"
    gap = next(line["data"] for line in lines if line["event"] == "procwire.gap")
    assert gap["reason"] in ("restarted", "connection_lost")


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
