"""The shipped ORU channel (response.when: after_delivery) end to end, in both forwarding modes:
a PMS that refuses once or is down gets the result exactly once, the lab's resend is answered,
later results keep flowing, and a restart sends nothing twice."""

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from hl7relay.mllp.framing import Frame, MLLPFramer, frame

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench" / "chaos"))
from harness import Sink  # noqa: E402 - the chaos suite's destination: scripted answers, a delay, down and up
from test_runtime import READY, wait_for_line  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ORU = ("MSH|^~\\&|LAB|LABFAC|HL7RELAY|CLINIC|20240105093512||ORU^R01^ORU_R01|{id}|P|2.5.1\r"
       "PID|1||{patient}^^^CLINIC^MR||DOE^JANE\r"
       "OBR|1||ORD{id}|GLU^Glucose|||202401050900\r"
       "OBX|1|NM|GLU^Glucose||95|mg/dL|||||F\r")


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
    pms = Sink(delay=0.5 if trouble == "slow" else 0.0, script=["AR"] if trouble == "refused" else [])
    if trouble != "down":
        pms.up()
    engine = Engine(tmp_path, pms.port, forwarding)
    try:
        # a slow PMS (within the destination's ack_timeout) is waited for: its answer is the lab's
        assert send(engine.oru_port, "R1") == ("AA" if trouble == "slow" else "AR")
        if trouble == "down":
            pms.up()
        if trouble != "slow":
            assert send(engine.oru_port, "R1") == "AA"  # the resend is answered
        assert send(engine.oru_port, "R2") == "AA"  # and later results of the patient flow
        assert send(engine.oru_port, "R3", patient="P2") == "AA"
        assert engine.stop() == 0
        engine = Engine(tmp_path, pms.port, forwarding)
        assert send(engine.oru_port, "R4") == "AA"  # the queue's first poll ran before: nothing withdrawn came back
    finally:
        code = engine.stop()
        pms.down()
    assert code == 0
    accepted = ["R1", "R2", "R3", "R4"]
    assert pms.ids() == (["R1"] + accepted if trouble == "refused" else accepted)  # no copy twice
