"""``procwire cluster``: the foreground runner, as a real process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from .conftest import SRC, Clusters

TESTS = str(Path(__file__).resolve().parent.parent)
RUN = [sys.executable, "-m", "procwire", "cluster"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_cli_runs_until_ctrl_c(clusters: Clusters) -> None:
    proc = subprocess.Popen([*RUN, "-n", "2", "cluster._targets:echo"], cwd=TESTS, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        lines = [json.loads(proc.stdout.readline()) for _ in range(2)]
        assert sorted(m["worker"] for m in lines) == [1, 2]
        pids = [m["data"]["pid"] for m in lines]
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err
        assert "workers 2/2 running · restarts 0 · " in err and " msg/s" in err
        assert "stopped" in err
        assert not any(os.path.exists(f"/proc/{p}") for p in pids)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_cli_crash_loop_exits_1(clusters: Clusters) -> None:
    out = subprocess.run([*RUN, "-n", "1", "--max-restarts", "1", "--duration", "30",
                          "cluster._targets:crash"], cwd=TESTS, env=_env(),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1, out.stderr
    assert "crash loop" in out.stderr


def test_cli_bad_target(clusters: Clusters) -> None:
    out = subprocess.run([*RUN, "-n", "0", "x:y"], cwd=TESTS, env=_env(),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2


def test_cli_unimportable_target_exits_1_at_once(clusters: Clusters) -> None:
    out = subprocess.run([*RUN, "-n", "2", "--duration", "30", "procwire_no_such_module:main"],
                         cwd=TESTS, env=_env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 1, out.stderr
    assert "could not start procwire_no_such_module:main" in out.stderr
    assert "ModuleNotFoundError" in out.stderr
    assert "restarting" not in out.stderr  # not put through the crash-loop limit
