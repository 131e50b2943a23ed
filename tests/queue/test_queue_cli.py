"""``procwire queue ...`` (the typer app in procwire.queue.cli), run as real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def qcli(tmp_path: Path, *args: str, input: str | None = None
         ) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=f"{ROOT / 'src'}{os.pathsep}{tmp_path}",
               PROCWIRE_QUEUE_URL=f"sqlite:///{tmp_path}/q.db", COLUMNS="200")
    return subprocess.run([sys.executable, "-c",
                           "from procwire.queue.cli import app; app(prog_name='procwire queue')",
                           *args], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=60, input=input)


def test_put_get_stats_dead_requeue_purge(tmp_path: Path) -> None:
    assert qcli(tmp_path, "put", "jobs", '{"n": 1}').stdout.strip() == "1"
    out = qcli(tmp_path, "put", "jobs", input='{"n": 2}\n\n{"n": 3}\n')
    assert out.stdout.split() == ["2", "3"]
    assert qcli(tmp_path, "put", "jobs", "{bad").returncode != 0
    got = qcli(tmp_path, "get", "jobs")
    assert got.returncode == 0
    assert json.loads(got.stdout) == {"id": 1, "data": {"n": 1}, "attempts": 1}
    s = json.loads(qcli(tmp_path, "stats", "jobs", "--json").stdout)
    assert (s["ready"], s["acked"]) == (2, 1)
    table = qcli(tmp_path, "stats", "jobs").stdout
    assert "ready" in table and "acked" in table
    # A worker function that fails on n == 3: retried after the default 1 s backoff.
    (tmp_path / "myjobs.py").write_text(
        "def handle(data):\n"
        "    if data['n'] == 3:\n"
        "        raise ValueError('three')\n")
    out = qcli(tmp_path, "work", "jobs", "myjobs:handle", "-c", "2", "--max-jobs", "2", "-q")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"acked": 1, "failed": 1, "lost": 0}
    assert qcli(tmp_path, "dead", "jobs", "--json").stdout == ""  # retried, not dead yet
    again = qcli(tmp_path, "get", "jobs", "--no-ack", "--timeout", "20")  # after its backoff
    assert json.loads(again.stdout) == {"id": 3, "data": {"n": 3}, "attempts": 2}
    assert qcli(tmp_path, "purge", "jobs", "-y").stdout.strip() == "1"
    assert qcli(tmp_path, "get", "jobs").returncode == 1  # nothing left
    assert qcli(tmp_path, "work", "jobs", "nosuch:fn").returncode != 0


def test_dead_and_requeue(tmp_path: Path) -> None:
    from procwire.queue import Queue

    with Queue("d", f"sqlite:///{tmp_path}/q.db", max_attempts=1) as q:
        q.put({"x": 1})
        job = q.get(timeout=0)
        assert job is not None
        job.nack(error="broken")
    rows = [json.loads(line) for line in qcli(tmp_path, "dead", "d", "--json").stdout.split()]
    assert rows == [{"id": 1, "data": {"x": 1}, "attempts": 1, "error": "broken"}]
    assert "broken" in qcli(tmp_path, "dead", "d").stdout
    assert qcli(tmp_path, "requeue", "d").stdout.strip() == "1"
    assert json.loads(qcli(tmp_path, "get", "d").stdout)["data"] == {"x": 1}


def test_work_progress_line(tmp_path: Path) -> None:
    (tmp_path / "slowjobs.py").write_text("import time\n"
                                          "def handle(data):\n"
                                          "    time.sleep(0.1)\n")
    assert qcli(tmp_path, "put", "w", input="1\n2\n3\n4\n5\n6\n").returncode == 0
    out = qcli(tmp_path, "work", "w", "slowjobs:handle", "--max-jobs", "6")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"acked": 6, "failed": 0, "lost": 0}
    # (text mode turns the "\r" that rewrites the line into a line break)
    lines = [part.strip() for part in out.stderr.splitlines() if part.strip()]
    assert len(lines) >= 2  # updated while it ran (at most 4 times a second), then the tally
    assert lines[0].startswith("w: 1 done, 0 failed, 0 lost (")
    assert lines[-1].startswith("w: 6 done, 0 failed, 0 lost (") and lines[-1].endswith("/s)")


def test_unreachable_redis_fails_fast_with_a_message(tmp_path: Path) -> None:
    """Every command gives up on a store it cannot reach after --timeout (default 10 s, not
    the library's 30 s), with the reason on stderr and exit status 1."""
    import socket

    with socket.socket() as s:  # a loopback port where nothing listens
        s.bind(("127.0.0.1", 0))
        url = f"redis://127.0.0.1:{s.getsockname()[1]}/0"
        for cmd in (["stats", "x"], ["put", "x", "1"], ["dead", "x"], ["requeue", "x"],
                    ["purge", "x", "-y"], ["work", "x", "json:dumps"]):
            out = qcli(tmp_path, *cmd, "--url", url, "--timeout", "0.5")
            assert out.returncode == 1, (cmd, out.stdout, out.stderr)
            assert "Timeout" in out.stderr and "Redis" in out.stderr, (cmd, out.stderr)
        # get: "no job" must not hide "no store".
        out = qcli(tmp_path, "get", "x", "--url", url)
        assert out.returncode == 1 and "Timeout" in out.stderr, out.stderr
