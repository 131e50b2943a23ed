"""The command line, run as a real separate process."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import procwire

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    return subprocess.run([sys.executable, "-m", "procwire", *args], env=env,
                          capture_output=True, text=True, timeout=60,
                          **kwargs)  # type: ignore[call-overload]


def test_version() -> None:
    out = cli("--version")
    assert out.returncode == 0
    assert out.stdout.strip() == f"procwire {procwire.__version__}"


def test_send_then_recv_prints_json_lines(sock_dir: str) -> None:
    url = f"unix://{sock_dir}/cli.sock"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    recv = subprocess.Popen([sys.executable, "-m", "procwire", "recv", url, "-n", "3",
                             "--timeout", "30"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert cli("send", url, '{"a": 1}', "--retry", "--timeout", "20").returncode == 0
        lines = '["x", 2]\n\n"é\\u2028"\n'
        assert cli("send", url, "--timeout", "20", input=lines).returncode == 0
        out, err = recv.communicate(timeout=30)
    finally:
        if recv.poll() is None:
            recv.kill()
        recv.wait(timeout=10)
    assert recv.returncode == 0, err
    assert [json.loads(line) for line in out.split("\n") if line] == [{"a": 1}, ["x", 2], "é\u2028"]
    assert "listening on" in err


def test_send_errors_are_clear(sock_dir: str) -> None:
    out = cli("send", f"unix://{sock_dir}/nobody.sock", "1", "--timeout", "1")
    assert out.returncode == 1
    assert "ConnectionRefused" in out.stderr
    bad = cli("send", f"unix://{sock_dir}/nobody.sock", "{not json")
    assert bad.returncode != 0
    assert "not valid JSON" in bad.stderr


def test_recv_timeout_exits_nonzero(sock_dir: str) -> None:
    out = cli("recv", f"unix://{sock_dir}/idle.sock", "--timeout", "0.5")
    assert out.returncode == 1
    assert "no message" in out.stderr


def test_demo_runs_every_transport_and_the_tour() -> None:
    out = cli("demo", "--json", "--messages", "2000")
    assert out.returncode == 0, out.stdout + out.stderr
    result = json.loads(out.stdout)
    rows = result["transports"]
    names = {r["transport"] for r in rows}
    assert {"unix", "tcp", "pipe", "stdio", "udp", "spool", "memory"} <= names
    for r in rows:
        assert r["ok"], r
        if r["transport"] not in ("memory",):
            assert r["child_pid"] != os.getpid()
    parts = {p["part"]: p for p in result["tour"]}
    assert set(parts) == {"child", "cluster", "bus", "queue"}
    for p in parts.values():
        assert p["ok"], p
    assert "1000/1000" in parts["bus"]["what"]
    assert _leftovers("procwire-demo-") == [], "the demo left processes running"


def _leftovers(marker: str) -> list[str]:
    """Command lines of live processes that mention ``marker`` (the demo's temp folder)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if marker in cmd:
            found.append(f"{entry.name}: {cmd}")
    return found


def test_bench_runs_a_small_comparison(tmp_path: Path) -> None:
    out_file = tmp_path / "bench.json"
    out = cli("bench", "--quick", "--only", "raw_unix", "--only", "procwire_unix",
              "--only", "tput_64", "--json", str(out_file), "-q")
    assert out.returncode == 0, out.stderr
    assert "procwire UNIX" in out.stdout and "raw UNIX socket" in out.stdout
    data = json.loads(out_file.read_text())
    rows = data["measurements"] if isinstance(data, dict) else data
    assert rows, data


def _marked(marker: str) -> list[str]:
    """Live processes whose environment carries ``PW_BENCH_TEST_MARK=marker``: everything a
    benchmark started inherits it (children, Node, redis-server, the broker)."""
    needle = f"PW_BENCH_TEST_MARK={marker}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                found.append(f"{entry.name}: {cmd[:200]}")
        except OSError:
            continue
    return found


def _bench_cli(tmp_path: Path, *args: str,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``procwire bench ...`` with a marker in its environment; afterwards no process
    carrying the marker may be left (a reaped child disappears at once; a few seconds of
    grace for ones still dying)."""
    marker = f"{os.getpid()}-{tmp_path.name}"
    full_env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "PW_BENCH_TEST_MARK": marker,
                **(env or {})}
    out = subprocess.run([sys.executable, "-m", "procwire", "bench", *args], env=full_env,
                         capture_output=True, text=True, timeout=90)
    deadline = time.monotonic() + 5
    while _marked(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _marked(marker) == [], "the benchmark left processes running"
    return out


def test_bench_help_lists_the_suites() -> None:
    out = cli("bench", "--help")
    assert out.returncode == 0, out.stderr
    for suite in ("channels", "children", "bus", "queues"):
        assert re.search(rf"^\W*{suite}\s", out.stdout, re.M), out.stdout
    wrong = cli("bench", "--quick", "children")
    assert wrong.returncode != 0
    assert "after the suite name" in wrong.stderr


def test_bench_children_runs_a_small_comparison(tmp_path: Path) -> None:
    out_file = tmp_path / "children.json"
    out = _bench_cli(tmp_path, "children", "--quick", "--only", "procwire py<->py",
                     "--only", "procwire cluster relay", "--only", "node cluster relay",
                     "--json", str(out_file))
    assert out.returncode == 0, out.stdout + out.stderr
    row = r"\| {} \| [\d.]+ \| [\d.]+ \| [\d,]+ \|"
    for name in ("procwire py<->py", "procwire cluster relay", "node cluster relay"):
        m = re.search(row.format(re.escape(name)), out.stdout)
        assert m, out.stdout
    ratio = re.search(r"\| procwire cluster relay / node cluster relay \| ([\d.]+) \[", out.stdout)
    assert ratio and float(ratio.group(1)) > 0, out.stdout
    data = json.loads(out_file.read_text())
    assert data["procwire py<->py"][0]["msgs_per_s"] > 0
    assert data["node cluster relay"][0]["p50_us"] > 0


def test_bench_bus_runs_a_small_comparison_on_its_own_redis(tmp_path: Path) -> None:
    out_file = tmp_path / "bus.json"
    out = _bench_cli(tmp_path, "bus", "--quick", "--only", "raw_redis", "--only", "broker_emit",
                     "--subs", "1", "--json", str(out_file))
    assert out.returncode == 0, out.stdout + out.stderr
    for name in ("raw_redis", "broker_emit"):
        assert re.search(rf"\| {name} \| \d+k? \| \d+ \| \d+ \|", out.stdout), out.stdout
    assert re.search(r"\| local broker \| \d+ \| \d+ \|", out.stdout), out.stdout
    assert "- broker_emit / raw_redis: 1 sub: " in out.stdout
    rows = json.loads(out_file.read_text())
    tput = [r for r in rows if r["mode"] == "tput"]
    assert {r["method"] for r in tput} == {"raw_redis", "broker_emit"}
    assert all(r["events_per_s"] > 0 and r["lost"] == 0 for r in tput), rows


def test_bench_bus_reports_a_missing_ioredis_with_the_install_hint(tmp_path: Path) -> None:
    empty = tmp_path / "node_modules"
    empty.mkdir()
    out = _bench_cli(tmp_path, "bus", "--quick", "--only", "node_ioredis", "--subs", "1",
                     env={"PROCWIRE_BENCH_NODE_MODULES": str(empty)})
    assert out.returncode == 1, out.stdout + out.stderr
    assert "| node_ioredis | error | error | error |" in out.stdout
    assert "npm install" in out.stdout and "PROCWIRE_BENCH_NODE_MODULES" in out.stdout


def test_bench_queues_runs_the_sqlite_rows(tmp_path: Path) -> None:
    out_file = tmp_path / "queues.json"
    out = _bench_cli(tmp_path, "queues", "--quick", "--only", "sqlite", "--match",
                     "procwire sqlite FULL", "--single", "1000", "--batched", "10000",
                     "--json", str(out_file))
    assert out.returncode == 0, out.stdout + out.stderr
    # system | op | batch | procs | jobs | jobs/s | [min-max]: 100 jobs one at a time and 1,000
    # in batches of 100 (--quick), every row with a figure.
    rows = re.findall(r"^\| procwire sqlite FULL \| (\S+) \| (\d+) \| (\d) \| ([\d,]+) \| "
                      r"([\d,]+) \| \[[\d,]+-[\d,]+\] \|", out.stdout, re.M)
    assert sorted((op, b, p, n) for op, b, p, n, _ in rows) == sorted([
        ("put", "1", "1", "100"), ("get+ack", "1", "1", "100"), ("process", "1", "1", "100"),
        ("get+ack", "1", "4", "100"), ("put", "100", "1", "1,000"),
        ("get+ack", "100", "1", "1,000"), ("get+ack", "100", "4", "1,000")]), out.stdout
    assert all(int(rate.replace(",", "")) > 0 for *_, rate in rows)
    assert "skipped" not in out.stdout and "error" not in out.stdout
    data = json.loads(out_file.read_text())
    assert len(data) == 7 and all(r["jobs_per_s"][0] > 0 for r in data), data


def test_bench_queues_reports_a_missing_comparison_with_the_install_hint(tmp_path: Path) -> None:
    # A package named huey that fails to import stands for huey not being installed (whether
    # or not the real one is): its rows are skipped rows with the hint, not left out.
    fake = tmp_path / "site" / "huey"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('huey stands in as not installed')\n")
    out = _bench_cli(tmp_path, "queues", "--quick", "--only", "sqlite", "--match", "huey",
                     env={"PYTHONPATH": f"{tmp_path / 'site'}{os.pathsep}{ROOT / 'src'}"})
    assert out.returncode == 1, out.stdout + out.stderr  # nothing measured
    skipped = re.findall(r"^\| huey SqliteStorage \| .* \| skipped \| - \| (.*) \|$",
                         out.stdout, re.M)
    assert len(skipped) == 3, out.stdout
    assert all("`pip install huey`" in hint for hint in skipped), skipped


def test_bench_queues_redis_rows_on_its_own_redis_server(tmp_path: Path) -> None:
    # The suite's private redis-server carries the marker too: _bench_cli checks it is gone.
    out = _bench_cli(tmp_path, "queues", "--quick", "--only", "redis", "--match",
                     "procwire redis", "--single", "1000", "--batched", "10000")
    assert out.returncode == 0, out.stdout + out.stderr
    rows = re.findall(r"^\| procwire redis \| (\S+) \| \d+ \| \d \| [\d,]+ \| ([\d,]+) \|",
                      out.stdout, re.M)
    assert len(rows) == 7 and all(int(rate.replace(",", "")) > 0 for _, rate in rows), out.stdout
