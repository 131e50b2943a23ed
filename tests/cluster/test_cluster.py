"""Clusters of real worker processes: messaging, supervision, stop, reload on a shared port."""

from __future__ import annotations

import http.client
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import procwire
import procwire.cluster as pc

from . import _targets
from .conftest import Clusters, children_of

EXAMPLES = str(Path(__file__).resolve().parent.parent.parent / "examples")


def collect(cluster: pc.Cluster, n: int, timeout: float = 10.0) -> list[pc.Message]:
    """Exactly ``n`` messages (bounded by ``timeout`` for each)."""
    return [cluster.recv(timeout=timeout) for _ in range(n)]


def hellos(cluster: pc.Cluster) -> dict[int, int]:
    """worker id -> pid, from the hello each echo worker sends first."""
    return {m.sender: m.data["pid"] for m in collect(cluster, cluster.size)}


def test_master_workers_broadcast_unicast_relay(clusters: Clusters) -> None:
    # The master/worker example of Node's cluster docs, with procwire.
    cluster = clusters(_targets.echo, workers=3).start(timeout=30)
    pids = hellos(cluster)
    assert sorted(pids) == [1, 2, 3]
    assert [w.id for w in cluster.workers] == [1, 2, 3]
    assert {w.id: w.pid for w in cluster.workers} == pids
    assert all(w.state == "running" and w.restarts == 0 for w in cluster.workers)

    cluster.broadcast({"note": "to all ☃\n\u2028"})
    got = collect(cluster, 3)
    assert sorted(m.sender for m in got) == [1, 2, 3]
    assert all(m.data["got"] == {"note": "to all ☃\n\u2028"} and m.data["sender"] == 0
               for m in got)

    cluster.send(1, "only for 1")
    m = cluster.recv(timeout=10)
    assert m == pc.Message(1, {"worker": 1, "sender": 0, "got": "only for 1", "pid": pids[1]})

    # worker 1 -> worker 2, relayed by the primary; worker 2 reports who sent it.
    cluster.send(1, {"relay_to": 2, "payload": [1, "two"]})
    m = cluster.recv(timeout=10)
    assert m.sender == 2 and m.data["sender"] == 1
    assert m.data["got"] == {"relayed": [1, "two"], "via": 1}

    # a worker's broadcast reaches every other worker, not itself
    cluster.send(3, {"broadcast": "from three"})
    got = collect(cluster, 2)
    assert sorted(m.sender for m in got) == [1, 2]
    assert all(m.data["sender"] == 3 and m.data["got"]["payload"] == "from three" for m in got)
    with pytest.raises(procwire.Timeout):
        cluster.recv(timeout=0.3)  # and nothing else came
    st = cluster.stats()
    assert st["received"] >= 9 and st["relayed"] == 2 and st["lost"] == 0

    cluster.stop(timeout=5)
    assert all(w.state == "stopped" and w.pid is None for w in cluster.workers)
    for pid in pids.values():
        assert not os.path.exists(f"/proc/{pid}")
    with pytest.raises(procwire.ChannelClosed):
        cluster.recv(timeout=1)
    cluster.stop()  # idempotent


def test_sigkill_restarts_same_id_and_others_lose_nothing(clusters: Clusters) -> None:
    cluster = clusters(_targets.echo, workers=3).start(timeout=30)
    pids = hellos(cluster)
    os.kill(pids[1], signal.SIGKILL)
    for i in range(200):  # while worker 1 is down and being restarted
        cluster.send(2, i)
        cluster.send(3, i)
    per: dict[int, list[int]] = {2: [], 3: []}
    new_pid = None
    deadline = time.monotonic() + 20
    while (len(per[2]) < 200 or len(per[3]) < 200 or new_pid is None) \
            and time.monotonic() < deadline:
        m = cluster.recv(timeout=10)
        if m.sender == 1:
            assert "hello" in m.data  # the replacement says hello under the same id
            new_pid = m.data["pid"]
        else:
            per[m.sender].append(m.data["got"])
    assert per == {2: list(range(200)), 3: list(range(200))}
    assert new_pid is not None and new_pid != pids[1]
    w1 = cluster.workers[0]
    assert (w1.id, w1.pid, w1.restarts, w1.returncode) == (1, new_pid, 1, -9)
    assert not os.path.exists(f"/proc/{pids[1]}")  # the killed one was reaped
    cluster.send(1, "back")
    assert cluster.recv(timeout=10).data["got"] == "back"


def test_messages_to_a_restarting_worker_wait_for_it(clusters: Clusters) -> None:
    cluster = clusters(_targets.echo, workers=1, backoff=0.5).start(timeout=30)
    hellos(cluster)
    cluster.send(1, {"exit": 1})
    deadline = time.monotonic() + 10
    while cluster.workers[0].state != "restarting" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert cluster.workers[0].state == "restarting"
    cluster.send(1, "queued while down")
    assert "hello" in cluster.recv(timeout=10).data
    assert cluster.recv(timeout=10).data["got"] == "queued while down"


def test_crash_loop_trips_the_limit(clusters: Clusters) -> None:
    cluster = clusters(_targets.crash, workers=1, max_restarts=2, restart_window=60)
    cluster.start(timeout=30)  # they do come online before crashing
    with pytest.raises(pc.CrashLoop) as info:
        cluster.wait(timeout=30)
    err = info.value
    assert isinstance(err, procwire.ProcwireError)
    assert err.returncode == 3 and err.restarts == 3 and err.worker_id == 1
    assert "crash loop" in str(err)
    assert cluster.error is err
    assert all(w.state == "stopped" and w.pid is None for w in cluster.workers)
    assert cluster.pids == []
    with pytest.raises(pc.CrashLoop):
        cluster.send(1, "x")
    with pytest.raises(pc.CrashLoop):
        cluster.recv(timeout=1)


def test_restart_backoff_doubles_up_to_the_cap(clusters: Clusters,
                                               caplog: pytest.LogCaptureFixture) -> None:
    # The primary announces each restart's delay: backoff, doubled per recent restart, at
    # most max_backoff; then the crash-loop limit.
    caplog.set_level("WARNING", logger="procwire.cluster")
    cluster = clusters(_targets.crash, workers=1, max_restarts=4, backoff=0.05,
                       max_backoff=0.15, restart_window=60).start(timeout=30)
    with pytest.raises(pc.CrashLoop):
        cluster.wait(timeout=30)
    delays = [r.getMessage().rsplit("restarting in ", 1)[1] for r in caplog.records
              if "restarting in" in r.getMessage()]
    assert delays == ["0.05 s", "0.10 s", "0.15 s", "0.15 s"]
    assert cluster.workers[0].restarts == 4


def test_restart_policies(clusters: Clusters) -> None:
    # on-failure: exit 0 is final; always: restarted under the same id; never: final.
    on_failure = clusters(_targets.once, workers=2).start(timeout=30)
    always = clusters(_targets.once, workers=1, restart="always", max_restarts=100)
    always.start(timeout=30)
    never = clusters(_targets.echo, workers=1, restart="never").start(timeout=30)
    got = collect(on_failure, 2)
    assert sorted((m.data["id"], m.data["env"]) for m in got) == [(1, "1"), (2, "2")]
    on_failure.wait(timeout=10)
    assert [(w.state, w.returncode, w.restarts) for w in on_failure.workers] \
        == [("stopped", 0, 0)] * 2
    with pytest.raises(procwire.ConnectionClosed):
        on_failure.send(1, "gone")

    pids = {always.recv(timeout=10).data["pid"] for _ in range(3)}
    assert len(pids) == 3 and always.workers[0].restarts >= 2

    never.recv(timeout=10)
    never.send(1, {"exit": 2})
    never.wait(timeout=10)
    assert (never.workers[0].state, never.workers[0].returncode) == ("stopped", 2)


def test_on_message_callback(clusters: Clusters) -> None:
    got: list[pc.Message] = []
    done = threading.Event()
    cluster = clusters(_targets.echo, workers=2)

    @cluster.on_message
    def collect_it(msg: pc.Message) -> None:
        got.append(msg)
        if len(got) == 4:
            done.set()

    cluster.start(timeout=30)
    cluster.broadcast("ping")
    assert done.wait(10)
    assert sorted(m.sender for m in got) == [1, 1, 2, 2]
    with pytest.raises(procwire.Timeout):
        cluster.recv(timeout=0.1)  # callbacks take the messages


def test_messages_iterator(clusters: Clusters) -> None:
    cluster = clusters(_targets.echo, workers=2).start(timeout=30)
    got = []
    for msg in cluster:  # for m in cluster: every worker message, until the cluster stops
        got.append(msg)
        if len(got) == 2:
            break
    assert sorted(m.sender for m in got) == [1, 2] and all("hello" in m.data for m in got)
    cluster.broadcast("ping")
    # messages(timeout=): until none comes within the timeout
    answers = list(cluster.messages(timeout=2))
    assert sorted((m.sender, m.data["got"]) for m in answers) == [(1, "ping"), (2, "ping")]
    cluster.stop()
    assert list(cluster) == []  # stopped, nothing left: the iteration ends


def test_stop_kills_what_ignores_sigterm(clusters: Clusters) -> None:
    cluster = clusters(_targets.stubborn, workers=2).start(timeout=30)
    pids = [m.data["pid"] for m in collect(cluster, 2)]
    t0 = time.monotonic()
    cluster.stop(timeout=0.5)
    assert time.monotonic() - t0 < 5
    assert all(w.state == "stopped" for w in cluster.workers)
    assert not any(os.path.exists(f"/proc/{p}") for p in pids)
    assert not children_of(os.getpid()) & set(pids)


def test_shared_port_reload_refuses_nothing(clusters: Clusters,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(EXAMPLES)
    import cluster_http

    cluster = clusters(cluster_http.serve, workers=2, listen="tcp://127.0.0.1:0",
                       ready="ready").start(timeout=30)
    assert cluster.address is not None
    host, port = cluster.address
    old = set(cluster.pids)
    served: set[str] = set()
    errors: list[str] = []
    count = [0]
    stop = threading.Event()

    def client() -> None:
        t0 = time.monotonic()
        while not stop.is_set() and time.monotonic() - t0 < 30 and count[0] < 50_000:
            conn = http.client.HTTPConnection(host, port, timeout=5)
            try:
                conn.request("GET", "/")
                resp = conn.getresponse()
                body = resp.read().decode()
                if resp.status != 200:
                    errors.append(f"status {resp.status}")
                served.add(body.rsplit("pid ", 1)[1].rstrip(")\n"))
                count[0] += 1
            except Exception as exc:  # refused, reset, timeout: all failures here
                errors.append(repr(exc))
            finally:
                conn.close()

    thread = threading.Thread(target=client)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while count[0] < 20 and not errors and time.monotonic() < deadline:
            time.sleep(0.01)
        cluster.reload(timeout=20)
        before = count[0]
        while count[0] < before + 20 and not errors and time.monotonic() < deadline + 10:
            time.sleep(0.01)
    finally:
        stop.set()
        thread.join(35)
    new = set(cluster.pids)
    assert errors == []
    assert len(new) == 2 and not new & old
    assert {str(p) for p in old | new} >= served and served & {str(p) for p in new}
    assert [w.restarts for w in cluster.workers] == [0, 0]  # a reload is not a restart


def test_reload_keeps_the_old_worker_when_the_new_one_fails(clusters: Clusters) -> None:
    cluster = clusters(_targets.slow_ready, 5.0, workers=1, ready="ready")
    with pytest.raises(procwire.Timeout):
        cluster.start(timeout=0.5)
    assert cluster.pids == []
    cluster = clusters(_targets.slow_ready, 0.0, workers=1, ready="ready").start(timeout=30)
    old = cluster.pids
    cluster._args = (30.0,)  # the next generation is slow to get ready
    with pytest.raises(procwire.Timeout):
        cluster.reload(timeout=0.5)
    assert cluster.pids == old and cluster.workers[0].state == "running"


def test_bad_input() -> None:
    with pytest.raises(ValueError):
        pc.Cluster(_targets.echo, workers=0)
    with pytest.raises(ValueError):
        pc.Cluster(_targets.echo, restart="sometimes")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        pc.Cluster(lambda: None, workers=1)
    with pytest.raises(ValueError):
        pc.Cluster("no-colon", workers=1)
    with pytest.raises(procwire.AddressError):
        pc.Cluster(_targets.echo, workers=1, listen="udp://127.0.0.1:0").start()
    cluster = pc.Cluster(_targets.echo, workers=1)
    with pytest.raises(procwire.ProcwireError):
        cluster.send(1, "not started")
    with pytest.raises(ValueError):
        cluster.send(2, "no such worker")


def test_worker_outside_a_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROCWIRE_WORKER_ID", raising=False)
    with pytest.raises(procwire.NoParentChannel, match="not a cluster worker"):
        pc.worker()


def test_command_list_target(clusters: Clusters) -> None:
    # A program that only knows Node's IPC (here Python's parent()): it sees the protocol.
    code = ("import procwire.process as pp, os\nch = pp.parent()\n"
            "hello = ch.recv(timeout=10)\n"
            "ch.send({'procwire': 'msg', 'data': [hello['id'], os.environ['PROCWIRE_WORKER_ID']]})"
            "\nch.send('plain')\nfor m in ch: pass\n")
    cluster = clusters([sys.executable, "-c", code], workers=2).start(timeout=30)
    got = sorted(map(repr, collect(cluster, 4)))
    assert got == sorted(map(repr, [pc.Message(1, [1, "1"]), pc.Message(2, [2, "2"]),
                                    pc.Message(1, "plain"), pc.Message(2, "plain")]))


def test_unimportable_target_fails_start_at_once(clusters: Clusters, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "pw_broken_at_import.py").write_text(
        "def main():\n    pass\n\nraise RuntimeError('broken on purpose')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for target, error in [
            ("procwire_no_such_module:main",
             "ModuleNotFoundError: No module named 'procwire_no_such_module'"),
            (f"{_targets.__name__}:no_such_function", "AttributeError"),
            ("pw_broken_at_import:main", "RuntimeError: broken on purpose")]:
        cluster = clusters(target, workers=2, max_restarts=5, stderr=subprocess.DEVNULL)
        with pytest.raises(pc.StartFailed) as info:
            cluster.start(timeout=30)
        err = info.value
        assert err.target == target and err.error.startswith(error), err
        assert target in str(err) and error in str(err) and "cluster was stopped" in str(err)
        assert err.worker_id in (1, 2) and err.returncode == 122
        assert cluster.error is err
        # failed at once: no worker went through a restart
        assert [(w.state, w.restarts) for w in cluster.workers] == [("stopped", 0)] * 2
        assert cluster.pids == []
        with pytest.raises(pc.StartFailed):
            cluster.send(1, "x")
        with pytest.raises(pc.StartFailed):
            cluster.wait(timeout=10)


def test_start_failure_after_start_up_is_restarted(clusters: Clusters, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # A module that breaks after the cluster started (a deploy in progress): reload() keeps
    # the old worker and says why; a crashed worker goes through restarts up to the limit.
    mod = tmp_path / "pw_deployed.py"
    mod.write_text("import procwire.cluster as pc\n\ndef main():\n    w = pc.worker()\n"
                   "    w.send('up')\n    for _ in w:\n        pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cluster = clusters("pw_deployed:main", workers=1, max_restarts=2,
                       stderr=subprocess.DEVNULL).start(timeout=30)
    assert cluster.recv(timeout=10).data == "up"
    old = cluster.pids
    mod.write_text("raise ImportError('half-deployed, on purpose')\n")
    with pytest.raises(pc.StartFailed) as info:
        cluster.reload(timeout=20)
    assert "half-deployed" in info.value.error and "old one keeps running" in str(info.value)
    assert cluster.pids == old and cluster.workers[0].state == "running"
    os.kill(old[0], signal.SIGKILL)
    with pytest.raises(pc.CrashLoop) as crash:
        cluster.wait(timeout=30)
    assert crash.value.restarts == 3 and crash.value.returncode == 122
    assert cluster.workers[0].restarts == 2 and cluster.pids == []
