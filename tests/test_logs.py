"""The log viewer: the engine's last lines in memory, filtered, content never shown; hl7relay logs."""

import json
import socket
import subprocess
import sys
import time

from twisted.logger import LogLevel

from hl7relay.logs import LogRing


def event(text, level=LogLevel.info, **fields):
    return {"log_format": text, "log_level": level, "log_namespace": "hl7relay.test", "log_time": fields.pop("at", time.time()),
            **fields}


def test_the_ring_keeps_the_last_lines_and_filters_them():
    ring = LogRing(size=5)
    now = time.time()
    ring.add(event("old", at=now - 600))
    ring.add(event("stored {control_id}", channel="adt", message_id=7, control_id="C7"))
    ring.add(event("lab down: {error}", LogLevel.warn, channel="adt", destination="lab", error="refused"))
    ring.add(event("store failing", LogLevel.error))
    ring.add(event("other channel", channel="oru"))
    ring.add(event("content: {content}", channel="adt", content="MSH|...", trace=True))
    assert len(ring.lines) == 5 and ring.lines[0]["text"] == "stored C7" and ring.next_seq == 7  # the oldest went
    assert [line["text"] for line in ring.read(level="warn")] == ["lab down: refused", "store failing"]
    assert [line["seq"] for line in ring.read(channel="adt")] == [2, 3, 6]
    assert [line["text"] for line in ring.read(message_id=7)] == ["stored C7"]
    assert [line["seq"] for line in ring.read(after=4)] == [5, 6] and [line["seq"] for line in ring.read(limit=2)] == [5, 6]
    assert [line["text"] for line in ring.read(text="LAB DOWN")] == ["lab down: refused"]
    assert ring.read(since=now - 60)[0]["seq"] == 2
    assert ring.lines[-1]["phi"] and ring.lines[-1]["level"] == "trace" and not ring.lines[0]["phi"]


def test_hl7relay_logs_from_a_running_engine(tmp_path, running_engine):
    running = running_engine(tmp_path, "--admin-port", "auto", "--console-port", "0")
    try:
        with socket.create_connection(("127.0.0.1", running.mllp_port)) as pms:
            pms.sendall(b"junk outside any frame\x0bMSH|^~\\&|PMS|C|||20240101||ADT^A08|L1|P|2.5\rPID|1||1\r\x1c\r")
            assert b"MSA|" in pms.recv(65536)
        time.sleep(0.2)

        def logs(*args):
            return subprocess.run([sys.executable, "-m", "hl7relay", "logs", *args], cwd=tmp_path, capture_output=True,
                                  text=True, timeout=60)

        everything = logs()
        assert everything.returncode == 0 and "hl7relay" in everything.stdout
        warned = logs("--level", "warn")
        assert "WARN" in warned.stdout and "discarded 22 bytes outside MLLP frames" in warned.stdout
        assert "INFO" not in warned.stdout
        lines = [json.loads(line) for line in logs("--format", "json", "-n", "3").stdout.splitlines()]
        assert len(lines) == 3 and [line["seq"] for line in lines] == sorted(line["seq"] for line in lines)
        assert logs("--grep", "no such text anywhere").stdout == ""
        follow = subprocess.Popen([sys.executable, "-m", "hl7relay", "logs", "--follow", "-n", "0", "--level", "warn"],
                                  cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(1.0)
        with socket.create_connection(("127.0.0.1", running.mllp_port)) as pms:
            pms.sendall(b"more junk\x0bMSH|^~\\&|PMS|C|||20240101||ADT^A08|L2|P|2.5\rPID|1||1\r\x1c\r")
            assert b"MSA|" in pms.recv(65536)
        time.sleep(1.5)
        follow.terminate()
        out, err = follow.communicate(timeout=30)
        assert "discarded 9 bytes" in out and "discarded 22 bytes" not in out and "Traceback" not in err
        bad = logs("--level", "loud")
        assert bad.returncode == 2 and "invalid choice" in bad.stderr
    finally:
        assert running.stop() == 0


def test_the_log_viewer_masks_what_lines_about_messages_quote_and_nothing_else():
    """Every quoted value was masked: a lint error read "unknown key 'f***'" and nobody could fix it."""
    from twisted.logger import Logger, globalLogPublisher

    from hl7relay.logs import LogRing
    from hl7relay.ops.phi import mask_log_text

    ring = LogRing()
    globalLogPublisher.addObserver(ring.add)
    try:
        log = Logger(namespace="hl7relay.engine")
        log.error("reload refused: {problem}", problem="channels/adt.yaml:3:1: unknown key 'fitlers' (did you mean 'filters')")
        log.error("channel {channel}: message {control_id} could not be stored: {error}", channel="adt",
                  control_id="M1", error="'19800412' is not a date")
        log.warn("channel {channel}: {file} line {line}: {error}", channel="files", file="in.hl7", line=3,
                 error="PID-5 'DOE^JANE' is too long", about_message=True)
    finally:
        globalLogPublisher.removeObserver(ring.add)
    shown = [mask_log_text(line) for line in ring.read(0, 10)]
    assert shown == ["reload refused: channels/adt.yaml:3:1: unknown key 'fitlers' (did you mean 'filters')",
                     "channel adt: message M1 could not be stored: '1***' is not a date",
                     "channel files: in.hl7 line 3: PID-5 'D***' is too long"]
