"""The shipped ORU channel (response.when: after_delivery) end to end, in both forwarding modes:
a PMS that refuses once or is down gets the result exactly once, the lab's resend is answered,
later results keep flowing, and a restart sends nothing twice."""

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from hl7relay.mllp.framing import Frame, MLLPFramer, frame

sys.path.insert(0, str(Path(__file__).parent))
from test_runtime import READY, wait_for_line  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ORU = ("MSH|^~\\&|LAB|LABFAC|HL7RELAY|CLINIC|20240105093512||ORU^R01^ORU_R01|{id}|P|2.5.1\r"
       "PID|1||{patient}^^^CLINIC^MR||DOE^JANE\r"
       "OBR|1||ORD{id}|GLU^Glucose|||202401050900\r"
       "OBX|1|NM|GLU^Glucose||95|mg/dL|||||F\r")


class PMS:
    """A PMS on a real socket whose answers the test scripts: 'AA', 'AR', 'AE', or 'close' (the
    connection drops without an answer); after the script, AA. ``listening=False``: down."""

    def __init__(self, script=(), delay: float = 0.0):
        self.script = list(script)
        self.delay = delay
        self.received: list[str] = []
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self._lock = threading.Lock()
        self._closed = False

    def start(self):
        self._sock.listen(16)
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def _accept(self):
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        framer = MLLPFramer()
        with conn:
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                for event in framer.feed(data):
                    if not isinstance(event, Frame):
                        continue
                    control_id = event.payload.split(b"\r")[0].split(b"|")[9].decode()
                    with self._lock:
                        self.received.append(control_id)
                        answer = self.script.pop(0) if self.script else "AA"
                    if answer == "close":
                        return
                    if self.delay:
                        time.sleep(self.delay)
                    conn.sendall(frame(f"MSH|^~\\&|PMS|CLINIC|HL7RELAY|LAB|20240105||ACK^R01|A{control_id}|P|2.5.1\r"
                                       f"MSA|{answer}|{control_id}\r".encode()))

    def close(self):
        self._closed = True
        self._sock.close()


class Engine:
    """``hl7relay run`` on a copy of the shipped channels, every port explicit."""

    def __init__(self, folder: Path, pms_port: int, forwarding: str):
        self.folder = folder
        if not (folder / "channels").exists():
            shutil.copytree(ROOT / "channels", folder / "channels")
        env = dict(os.environ, PYTHONUNBUFFERED="1", ADT_PORT="0", SIU_PORT="0", ORU_PORT="0",
                   PMS_PORT=str(pms_port), LAB_PORT="9")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "hl7relay", "run", "--admin-port", "0", "--console-port", "0",
             "--forwarding", forwarding], cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        startup = "".join(wait_for_line(self.process, READY))
        self.oru_port = int(startup.split("channel oru-to-pms: MLLP on 127.0.0.1:")[1].split()[0])

    def stop(self) -> int:
        import signal

        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=30)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            self.process.stdout.close()


def send(port: int, control_id: str, patient: str = "P1", timeout: float = 30.0) -> str:
    """The MSA-1 the engine answers (one ACK: original mode)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(frame(ORU.format(id=control_id, patient=patient).encode()))
        framer = MLLPFramer()
        while True:
            data = sock.recv(65536)
            assert data, f"{control_id}: the engine closed the connection without answering"
            for event in framer.feed(data):
                if isinstance(event, Frame):
                    msa = [s for s in event.payload.split(b"\r") if s.startswith(b"MSA|")][0]
                    return msa.split(b"|")[1].decode()


@pytest.mark.parametrize("forwarding", ["inline", "process"])
@pytest.mark.parametrize("trouble", ["refused", "down", "slow"])
def test_the_shipped_oru_channel_survives_a_pms_refusal_and_sends_nothing_twice(tmp_path, forwarding, trouble):
    """Before: the PMS refused once -> AR; the lab's resend was never answered, the first copy
    stayed held for ever, every later result waited behind it, and a restart sent both copies."""
    pms = PMS(["AR"] if trouble == "refused" else [], delay=0.5 if trouble == "slow" else 0.0)
    if trouble != "down":
        pms.start()
    engine = Engine(tmp_path, pms.port, forwarding)
    try:
        # a slow PMS (within the destination's ack_timeout) is waited for: its answer is the lab's
        assert send(engine.oru_port, "R1") == ("AA" if trouble == "slow" else "AR")
        if trouble == "down":
            pms.start()
        if trouble != "slow":
            assert send(engine.oru_port, "R1") == "AA"  # the resend is answered
        assert send(engine.oru_port, "R2") == "AA"  # and later results of the patient flow
        assert send(engine.oru_port, "R3", patient="P2") == "AA"
        assert engine.stop() == 0
        engine = Engine(tmp_path, pms.port, forwarding)
        assert send(engine.oru_port, "R4") == "AA"  # the queue's first poll ran before: nothing withdrawn came back
    finally:
        code = engine.stop()
        pms.close()
    assert code == 0
    accepted = ["R1", "R2", "R3", "R4"]
    assert pms.received == (["R1"] + accepted if trouble == "refused" else accepted)  # no copy twice
