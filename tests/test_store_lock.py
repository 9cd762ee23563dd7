"""One engine per store: a second ``hl7relay run`` on the same store is refused (or waits for the
one that is stopping); a taken admin or console port stops the start; the forwarder dies with its
engine, and a restart waits for the old one."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_runtime import READY, wait_for_line  # noqa: E402


def run(folder: Path, *arguments, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hl7relay", "run", "--admin-port", "0", "--console-port", "0",
                           *arguments], cwd=folder, capture_output=True, text=True, timeout=timeout)


def test_a_second_engine_on_the_same_store_is_refused_in_one_line(tmp_path, running_engine):
    """Before: it started without a word and delivered the same queued messages twice."""
    first = running_engine(tmp_path, "--admin-port", "0", "--console-port", "0")
    try:
        second = run(tmp_path, "--lock-wait", "0.5")
    finally:
        assert first.stop() == 0
    assert second.returncode == 1 and "Traceback" not in second.stderr
    [line] = second.stderr.strip().splitlines()[-1:]
    assert line.startswith("not starting: another hl7relay engine is using the store")
    assert f"pid {first.process.pid}" in line and "hl7relay.db" in line


def test_a_restart_waits_for_the_engine_that_is_stopping(tmp_path, running_engine):
    first = running_engine(tmp_path, "--admin-port", "0", "--console-port", "0")
    second = subprocess.Popen([sys.executable, "-m", "hl7relay", "run", "--admin-port", "0", "--console-port", "0",
                               "--lock-wait", "60"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        assert "waiting up to 60s for the engine holding the store to stop" in wait_for_line(second, "waiting up to")[-1]
        assert first.stop() == 0
        wait_for_line(second, READY)
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=30) == 0
        second.stdout.close()


@pytest.mark.parametrize("which", ["--admin-port", "--console-port"])
def test_a_taken_admin_or_console_port_stops_the_start(tmp_path, which):
    """Before: a warning, and the CLI then talked to whatever held the port (a stale engine)."""
    (tmp_path / "channels").mkdir()
    (tmp_path / "channels" / "ch.yaml").write_text("name: ch\nsource: {type: mllp, port: 0}\n")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        result = run(tmp_path, which, port)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("not starting: ") and port in last and "in use" in last
    assert "ready" not in result.stdout


def test_the_forwarder_dies_with_a_killed_engine_and_a_restart_finds_the_store_free(tmp_path, running_engine):
    """Before: the forwarder outlived a kill -9 and kept sending while the restarted engine sent
    the same rows (76 duplicate deliveries in one round)."""
    engine = running_engine(tmp_path, "--admin-port", "0", "--console-port", "0", "--forwarding", "process")
    children = Path(f"/proc/{engine.process.pid}/task/{engine.process.pid}/children").read_text().split()
    assert len(children) == 1
    child = int(children[0])
    engine.process.kill()
    engine.process.wait(timeout=30)
    engine.process.stdout.close()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{child}").exists() and time.monotonic() < deadline:
        try:  # a zombie until reaped by init: gone for our purposes once it no longer runs
            if Path(f"/proc/{child}/stat").read_text().split(") ")[1].startswith("Z"):
                break
        except (FileNotFoundError, IndexError):
            break
        time.sleep(0.02)
    stat = Path(f"/proc/{child}/stat")
    assert not stat.exists() or stat.read_text().split(") ")[1].startswith("Z"), "the forwarder outlived its engine"
    again = subprocess.Popen([sys.executable, "-m", "hl7relay", "run", "--admin-port", "0", "--console-port", "0",
                              "--forwarding", "process", "--lock-wait", "5"], cwd=tmp_path, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        wait_for_line(again, READY)
    finally:
        again.send_signal(signal.SIGTERM)
        assert again.wait(timeout=30) == 0
        again.stdout.close()


def test_postgresql_refuses_a_second_engine_on_the_same_schema(tmp_path):
    import uuid

    from test_store import POSTGRES_URL, _postgres_store

    admin = _postgres_store()  # skips (or fails under CI) when no server answers
    admin.close()
    url = POSTGRES_URL + ("&" if "?" in POSTGRES_URL else "?") + f"options=-csearch_path%3Dlock_{uuid.uuid4().hex[:8]}"
    from hl7relay.store.lock import StoreLock, StoreLocked

    first, second = StoreLock(url), StoreLock(url)
    first.acquire()
    try:
        with pytest.raises(StoreLocked, match="another hl7relay engine is using the store"):
            second.acquire(0.3)
    finally:
        first.release()
    second.acquire()  # free again once the first lets go
    second.release()
