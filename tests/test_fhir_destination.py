"""The ``fhir`` destination against a FHIR server that behaves like one (tests/fhirserver.py, over
HTTPS on loopback): Bundles built by the channel's maps, conditional updates so a resent message
changes nothing twice, the server's OperationOutcome as the delivery's error, conflicts, and the
queue's retries; the channel is loaded from YAML and the queue runs over a real store."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from twisted.internet import defer
from twisted.internet.epollreactor import EPollReactor

from apiserver import serve, spin
from fhirserver import FakeFHIR, outcome
from hl7relay.channels import load_channel, process
from hl7relay.hl7.message import Message
from hl7relay.queues import DestinationQueue
from hl7relay.resources import Resources
from hl7relay.store.database import DeliveryRecord, MessageRecord, Store
from hl7relay.store.writer import StoreWriter

from pathlib import Path

SAMPLES = Path(__file__).resolve().parents[1] / "samples"


@pytest.fixture(scope="module")
def pki(make_pki):
    return make_pki()


class World:
    def __init__(self, tmp_path, pki):
        self.reactor = EPollReactor()
        self.reactor.startRunning(installSignalHandlers=False)
        self.server = FakeFHIR(self.reactor)
        self.port = serve(self.reactor, self.server, pki["server"], pki["server_key"])
        self.store = Store(f"sqlite:///{tmp_path / 'h.db'}")
        self.store.migrate()
        self.writer = StoreWriter(self.store, executor=lambda fn, *a: defer.maybeDeferred(fn, *a))
        self.tmp_path, self.pki = tmp_path, pki
        self.running = []
        self.count = 0

    def channel(self, options: str = "", extra: str = ""):
        (self.tmp_path / "ch.yaml").write_text(
            f"name: ch\ntimezone: America/New_York\nsource: {{type: mllp, port: 0}}\n{extra}destinations:\n"
            f"  - {{name: ehr, type: fhir, url: 'https://127.0.0.1:{self.port}/fhir', tls_ca: '{self.pki['ca']}'"
            + (f", {options}" if options else "") + "}\n")
        channel, errors = load_channel(self.tmp_path / "ch.yaml", {})
        assert not errors, [str(e) for e in errors]
        config = channel.destinations[0].config
        delivery = config.runner(config, Resources(self.reactor, self.writer, time.time))
        queue = DestinationQueue("ch", "ehr", delivery.deliver, config.queue, self.writer, self.reactor, time.time,
                                 poll_interval=0.2, keyed=delivery.keyed)
        queue.start()
        self.running.append((queue, delivery))
        self.queue = queue
        return channel

    def send(self, channel, data: bytes) -> None:
        """What the engine does: the pipeline, then the message and its delivery committed."""
        message = Message.from_bytes(data)
        output = process(channel, message).outputs[0].message
        self.count += 1
        self.store.commit([MessageRecord("ch", data, "PROCESSED", received_at=time.time(), control_id=f"M{self.count}",
                                         deliveries=[DeliveryRecord("ehr", "QUEUED", output.to_bytes(), None)])], [])
        self.queue.nudge()
        self.queue._poll()

    def site(self) -> Path:
        """A folder where hl7relay's commands find this world's channel and store."""
        import shutil

        folder = self.tmp_path / "site"
        (folder / "channels").mkdir(parents=True)
        (folder / "config").mkdir()
        shutil.copy(self.tmp_path / "ch.yaml", folder / "channels" / "ch.yaml")
        (folder / "config" / "hl7relay.yaml").write_text(f"store: {{url: 'sqlite:///{self.tmp_path / 'h.db'}'}}\n")
        return folder

    def deliveries(self) -> list:
        return [self.store.get_message(r["id"])["deliveries"][0] for r in sorted(self.store.latest(100), key=lambda r: r["id"])]

    def settle(self, count: int, status: str = "SENT", limit: float = 30.0) -> None:
        spin(self.reactor, lambda: [d["status"] for d in self.deliveries()].count(status) >= count, limit,
             lambda: f"{[(d['status'], d.get('last_error')) for d in self.deliveries()]} {self.queue.view()}")

    def close(self) -> None:
        for queue, delivery in self.running:
            queue.stop()
            delivery.close()
        for _ in range(20):
            self.reactor.iterate(0)
        self.reactor.stop()
        for _ in range(20):
            self.reactor.iterate(0)
        self.reactor.removeAll()
        self.store.close()


@pytest.fixture
def world(tmp_path, pki):
    made = World(tmp_path, pki)
    yield made
    made.close()


def test_the_same_adt_sent_twice_is_one_patient_in_its_second_version(world):
    channel = world.channel()
    data = (SAMPLES / "adt_a01.hl7").read_bytes()
    world.send(channel, data)
    world.settle(1)
    world.send(channel, data.replace(b"|MSG00001|", b"|MSG00002|"))  # a resend: a new control id
    world.settle(2)
    patients = world.server.of_type("Patient")
    assert len(patients) == 1 and patients[0].version == 2
    assert patients[0].resource["name"][0]["family"] == "DOE"
    assert len(world.server.of_type("Encounter")) == 1
    # references resolved by the server to its own ids
    encounter = world.server.of_type("Encounter")[0].resource
    assert encounter["subject"]["reference"] == f"Patient/{patients[0].resource['id']}"
    method, path, body = world.server.requests[0]
    assert (method, path) == ("POST", "/fhir") and json.loads(body)["type"] == "transaction"
    first = world.deliveries()[0]
    assert first["last_ack"].startswith("HTTP 200 POST https://127.0.0.1:")  # the answer is stored, like an ACK
    assert '"transaction-response"' in first["last_ack"]


def test_an_appointment_and_its_patient_arrive_together(world):
    channel = world.channel()
    world.send(channel, (SAMPLES / "siu_s12.hl7").read_bytes())
    world.settle(1)
    [appointment] = world.server.of_type("Appointment")
    [patient] = world.server.of_type("Patient")
    actors = [p["actor"]["reference"] for p in appointment.resource["participant"]]
    assert f"Patient/{patient.resource['id']}" in actors
    assert appointment.resource["status"] == "booked" and appointment.resource["start"] == "2024-01-15T10:00:00-05:00"


def test_a_refused_resource_is_a_dead_letter_in_the_servers_own_words(world):
    world.server.script.append((422, {}, outcome("invalid", "Patient.birthDate: 1980-13-40 is not a date",
                                                 expression="Patient.birthDate")))
    channel = world.channel()
    world.send(channel, (SAMPLES / "adt_a01.hl7").read_bytes())
    world.settle(1, "ERROR")
    [delivery] = world.deliveries()
    assert delivery["last_error"] == "HTTP 422: error invalid Patient.birthDate: Patient.birthDate: 1980-13-40 is not a date"
    assert len(world.server.requests) == 1  # not retried: the message is at fault


def test_a_412_is_a_conflict_and_a_503_is_waited_out(world):
    world.server.script.extend([(503, {"Retry-After": "1"}, outcome("transient", "busy")),
                                (412, {}, outcome("multiple-matches", "2 Patient resources match"))])
    channel = world.channel()
    world.send(channel, (SAMPLES / "adt_a01.hl7").read_bytes())
    world.settle(1, "ERROR", limit=20)
    [delivery] = world.deliveries()
    assert "conflict" in delivery["last_error"] and "2 Patient resources match" in delivery["last_error"]
    assert len(world.server.requests) == 2


def test_a_batch_entry_that_fails_fails_the_delivery(world):
    (world.tmp_path / "maps.yaml").write_text(  # a map that writes what the server refuses
        'segments:\n  PV1[Encounter]:\n    resource: Encounter\n    fields:\n'
        '      - {v2: PV1-2, fhir: period.start, value: not-a-date}\n')
    channel = world.channel("bundle: batch, maps: maps.yaml")
    world.send(channel, (SAMPLES / "adt_a01.hl7").read_bytes())
    world.settle(1, "ERROR")
    [delivery] = world.deliveries()
    assert "entries failed" in delivery["last_error"] or "entry failed" in delivery["last_error"]
    assert "422" in delivery["last_error"] and "Encounter" in delivery["last_error"]
    assert world.server.of_type("Patient")  # a batch keeps what succeeded


def test_the_fhir_destination_lints_its_url_and_bundle(tmp_path):
    for options, expected in (("url: 'https://fhir.example/r4/{PID-3.1}'", "a FHIR server's base URL"),
                              ("url: 'https://fhir.example/r4', bundle: collection", "bundle"),
                              ("url: 'ftp://fhir.example/r4'", "is not an http(s) URL")):
        (tmp_path / "ch.yaml").write_text(f"name: ch\nsource: {{type: mllp, port: 0}}\n"
                                          f"destinations:\n  - {{name: ehr, type: fhir, {options}}}\n")
        channel, errors = load_channel(tmp_path / "ch.yaml", {})
        assert channel is None and any(expected in str(e) for e in errors), [str(e) for e in errors]


def test_each_resource_sent_is_cross_referenced_with_the_servers_id_and_version(world):
    channel = world.channel()
    data = (SAMPLES / "adt_a01.hl7").read_bytes()
    world.send(channel, data)
    world.settle(1)
    world.send(channel, data.replace(b"|MSG00001|", b"|MSG00002|"))
    world.settle(2)
    spin(world.reactor, lambda: len(world.store.xrefs(resource_type="Patient")) == 1
         and world.store.xrefs(resource_type="Patient")[0]["version_id"] == "2")
    [patient] = world.store.xrefs(resource_type="Patient")
    [stored] = world.server.of_type("Patient")
    assert (patient["channel"], patient["destination"]) == ("ch", "ehr")
    assert patient["identifier"] == "CLINIC|100234" and patient["fhir_id"] == stored.resource["id"]
    assert patient["message_id"] == max(r["id"] for r in world.store.latest(10))  # the latest message that wrote it
    assert len(patient["content_hash"]) == 64
    kinds = {x["resource_type"] for x in world.store.xrefs()}
    assert {"Patient", "Encounter", "RelatedPerson", "Condition", "AllergyIntolerance", "Practitioner"} <= kinds
    for row in world.store.xrefs():  # every row names what the server really has
        assert (row["resource_type"], row["fhir_id"]) in world.server.resources


def _cli(world, folder, *args):
    import subprocess
    import sys

    process = subprocess.Popen([sys.executable, "-m", "hl7relay", *args], cwd=folder, text=True,
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    spin(world.reactor, lambda: process.poll() is not None, limit=60)
    return process.returncode, process.stdout.read()


def test_verify_xref_finds_missing_merged_changed_and_duplicated_resources_and_requeues_the_missing(world):
    channel = world.channel()
    world.send(channel, (SAMPLES / "adt_a01.hl7").read_bytes())
    world.settle(1)
    spin(world.reactor, lambda: len(world.store.xrefs(resource_type="Patient")) == 1)
    folder = world.site()
    code, out = _cli(world, folder, "verify", "--xref")
    assert code == 0, out
    assert out.strip().splitlines()[-1].endswith("every one agrees with its server")

    server = world.server
    [patient] = server.of_type("Patient")
    [encounter] = server.of_type("Encounter")
    condition = server.of_type("Condition")[0]
    del server.resources[("Encounter", encounter.resource["id"])]  # deleted on the server
    patient.resource["meta"]["versionId"] = "7"  # edited there since
    condition.resource["link"] = []  # (not a Patient: a link means nothing for it)
    twin = dict(patient.resource, id="twin")  # a second Patient with the PMS's identifier
    server.resources[("Patient", "twin")] = type(patient)(twin, 1, patient.updated)
    code, out = _cli(world, folder, "verify", "--xref")
    assert code == 2, out
    lines = out.strip().splitlines()
    assert any(line.startswith("PROBLEM  missing") and f"Encounter/{encounter.resource['id']}" in line for line in lines), out
    assert any(line.startswith("WARNING  changed") and "version 7 on the server, 1 written by us" in line for line in lines)
    assert any(line.startswith("PROBLEM  duplicate-identifier") and "2 Patient resources carry CLINIC|100234" in line
               for line in lines), out

    del server.resources[("Patient", "twin")]  # (a twin would make the resend's conditional update fail: 412)
    code, out = _cli(world, folder, "verify", "--xref", "--repair")
    assert "queued again for ch -> ehr" in out, out
    [entry] = world.store.audit_entries(action="replay")
    assert "Encounter/" in entry["reason"] and "missing on the server" in entry["reason"]
    replays = [r for r in world.store.latest(10) if r["id"] != 1]
    assert len(replays) == 1
    world.queue.nudge()
    world.queue._poll()
    world.settle(2)  # the engine's queue sends the replay: the Encounter is back, one Patient still
    assert len(server.of_type("Encounter")) == 1 and len(server.of_type("Patient")) == 1


def _someone(server, rid: str, system: str, value: str):
    from fhirserver import Stored

    resource = {"resourceType": "Patient", "id": rid, "identifier": [{"system": system, "value": value}],
                "name": [{"family": "DOE", "given": ["JANE"]}], "birthDate": "1980-04-12", "gender": "female",
                "meta": {"versionId": "1", "lastUpdated": "2023-01-01T00:00:00+00:00"}}
    server.resources[("Patient", rid)] = Stored(resource, 1, "2023-01-01T00:00:00+00:00")


MATCH = "match: {fallback: [family, given, birthDate, gender]}"


def test_one_patient_found_by_demographics_is_updated_and_keeps_its_own_identifiers(world):
    _someone(world.server, "hospital-7", "urn:hospital", "H-7")
    channel = world.channel(MATCH)
    world.send(channel, (SAMPLES / "adt_a01.hl7").read_bytes())
    world.settle(1)
    [patient] = world.server.of_type("Patient")
    assert patient.resource["id"] == "hospital-7" and patient.version == 2
    systems = {(i.get("system"), i["value"]) for i in patient.resource["identifier"]}
    assert ("CLINIC", "100234") in systems and ("urn:hospital", "H-7") in systems
    searches = [path for method, path, _ in world.server.requests if method == "GET"]
    assert searches[-1] == "/fhir/Patient?family=DOE&given=JANE&birthdate=1980-04-12&gender=female"


def test_an_ambiguous_patient_is_held_for_a_person_and_resolved_by_one(world):
    _someone(world.server, "a", "urn:hospital", "H-1")
    _someone(world.server, "b", "urn:other", "O-2")
    channel = world.channel(MATCH)
    world.send(channel, (SAMPLES / "adt_a01.hl7").read_bytes())
    world.settle(1, "ERROR")
    [delivery] = world.deliveries()
    assert delivery["last_error"].startswith("held for matching: 2 patients on the server match by demographics")
    assert not [m for m, _, _ in world.server.requests if m == "POST"]  # nothing was written: never a guess
    spin(world.reactor, lambda: len(world.store.match_holds()) == 1)
    [hold] = world.store.match_holds()
    assert {c["id"] for c in json.loads(hold["candidates"])} == {"a", "b"}

    folder = world.site()
    code, out = _cli(world, folder, "fhir", "holds")
    assert code == 0 and "message 1  ch -> ehr" in out and "Patient/a  ***" in out and "JANE" not in out, out
    code, out = _cli(world, folder, "fhir", "holds", "--show-phi")
    assert code == 2 and "--show-phi needs --reason" in out
    code, out = _cli(world, folder, "fhir", "holds", "--show-phi", "--reason", "matching ticket 12")
    assert code == 0 and "JANE DOE  born 1980-04-12" in out
    code, out = _cli(world, folder, "fhir", "resolve", "1", "--patient", "zzz", "--reason", "x")
    assert code == 2 and "not one of the candidates" in out
    code, out = _cli(world, folder, "fhir", "resolve", "1", "--patient", "b", "--reason", "same DOB, phone matches")
    assert code == 0 and "sent again as 2 to ehr for Patient/b" in out, out
    world.queue.nudge()
    world.queue._poll()
    world.settle(1)
    assert len(world.server.of_type("Patient")) == 2
    b = world.server.resources[("Patient", "b")]
    assert b.version == 2 and {i["value"] for i in b.resource["identifier"]} == {"100234", "987-65-4320", "O-2"}
    assert world.store.match_holds() == [] and world.store.match_holds(resolved=True)[0]["decision"] == "b"
    [resolved] = world.store.audit_entries(action="fhir.match.resolve")
    assert resolved["reason"] == "same DOB, phone matches" and "Patient/b" in resolved["detail"]
    [viewed] = world.store.audit_entries(action="phi.view")
    assert viewed["reason"] == "matching ticket 12"
    code, out = _cli(world, folder, "fhir", "resolve", "1", "--new", "--reason", "again")
    assert code == 1 and "not held for matching" in out


def test_no_patient_found_is_a_new_one(world):
    _someone(world.server, "x", "urn:hospital", "H-9")
    world.server.resources[("Patient", "x")].resource["birthDate"] = "1990-01-01"
    channel = world.channel(MATCH)
    world.send(channel, (SAMPLES / "adt_a01.hl7").read_bytes())
    world.settle(1)
    assert len(world.server.of_type("Patient")) == 2


def _status(world, folder):
    return _cli(world, folder, "status")


def _mllp_send(port: int, data: bytes) -> bytes:
    """One message over MLLP, its ACK back."""
    import socket

    from hl7relay.mllp.framing import MLLPFramer, frame

    with socket.create_connection(("127.0.0.1", port)) as pms:
        pms.sendall(frame(data))
        framer, got = MLLPFramer(), []
        while not got:
            got = framer.feed(pms.recv(65536))
    return got[0].payload


@contextlib.contextmanager
def _engine(world, folder, *arguments):
    """``hl7relay run`` in ``folder`` while this test's reactor serves the FHIR server: its startup
    lines; stopped with SIGTERM after, and it must stop cleanly."""
    from test_runtime import READY, wait_for_line

    engine = subprocess.Popen([sys.executable, "-m", "hl7relay", "run", "--admin-port", "0", *arguments], cwd=folder,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        yield "".join(wait_for_line(engine, READY))
    finally:
        engine.send_signal(signal.SIGTERM)
        spin(world.reactor, lambda: engine.poll() is not None, limit=30)
        output = engine.stdout.read().decode()
        engine.stdout.close()
    assert engine.returncode == 0, output


ADT = ("MSH|^~\\&|PMS|CLINIC|EHR|HOSP|20240105093512||ADT^A04^ADT_A01|K{n}|P|2.5.1\r"
       "PID|1||P{n}^^^CLINIC^MR||DOE^JANE{n}||19800412|F\rPV1|1|O|CLINIC^EXAM3^1^CLINIC||||||||||||||||V{n}^^^CLINIC^VN\r")


def test_kill_9_during_fhir_delivery_loses_nothing_and_makes_no_duplicate(world):
    """The engine killed while Bundles are on their way: restarted, it sends what was not
    recorded as sent again; conditional updates make the resends change nothing twice."""
    import os
    import signal
    import subprocess
    import sys

    from test_runtime import READY, wait_for_line

    folder = world.tmp_path / "site"
    (folder / "channels").mkdir(parents=True)
    (folder / "channels" / "adt.yaml").write_text(
        "name: adt\ntimezone: America/New_York\nsource: {type: mllp, port: 0}\ndestinations:\n"
        f"  - {{name: ehr, type: fhir, url: 'https://127.0.0.1:{world.port}/fhir', tls_ca: '{world.pki['ca']}', "
        "parallel: 4, order: none, retry_initial: 0.2, retry_max: 1}\n")
    world.server.script.extend([("slow", 2.0)] * 6)  # the first Bundles answered late: on the wire at the kill

    def start():
        engine = subprocess.Popen([sys.executable, "-m", "hl7relay", "run", "--admin-port", "0", "--console-port", "0"],
                                  cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  env=dict(os.environ, PYTHONUNBUFFERED="1"))
        startup = "".join(wait_for_line(engine, READY))
        return engine, int(startup.split("MLLP on 127.0.0.1:")[1].split()[0])

    engine, port = start()
    count = 30
    try:
        for n in range(count):
            assert b"MSA|AA" in _mllp_send(port, ADT.format(n=n).encode())
        spin(world.reactor, lambda: len(world.server.requests) >= 4, limit=30)
        engine.send_signal(signal.SIGKILL)  # Bundles in flight, results not recorded
        engine.wait()
        engine.stdout.close()
        engine, port = start()
        store = Store(f"sqlite:///{folder / 'data' / 'hl7relay.db'}")

        def statuses():
            return [store.get_message(r["id"])["deliveries"][0]["status"] for r in store.latest(100)]

        spin(world.reactor, lambda: statuses().count("SENT") == count, limit=60, describe=lambda: str(statuses()))
        store.close()
    finally:
        engine.send_signal(signal.SIGTERM)
        spin(world.reactor, lambda: engine.poll() is not None, limit=30)
        engine.stdout.close()
    patients = world.server.of_type("Patient")
    identifiers = [p.resource["identifier"][0]["value"] for p in patients]
    assert sorted(identifiers) == sorted(f"P{n}" for n in range(count))  # each once: none lost, none twice
    assert len(world.server.of_type("Encounter")) == count
    posts = [m for m, _, _ in world.server.requests if m == "POST"]
    assert len(posts) > count  # some Bundles went twice (sent before the kill, not recorded): no harm done


def test_an_appointment_changed_on_the_server_is_one_s13_to_the_pms_and_our_own_write_no_echo(world):
    """One engine, two channels: the PMS's SIU to the FHIR server, and the server's appointments
    back to the PMS (a file destination standing for it)."""
    folder = world.tmp_path / "site"
    (folder / "channels").mkdir(parents=True)
    server_url = f"https://127.0.0.1:{world.port}/fhir"
    (folder / "channels" / "siu-in.yaml").write_text(
        "name: siu-in\ntimezone: America/New_York\nsource: {type: mllp, port: 0}\ndestinations:\n"
        f"  - {{name: ehr, type: fhir, url: '{server_url}', tls_ca: '{world.pki['ca']}'}}\n")
    (folder / "channels" / "from-ehr.yaml").write_text(
        f"name: from-ehr\nsource: {{type: fhir, url: '{server_url}', tls_ca: '{world.pki['ca']}', poll_interval: 0.2, "
        "since: '2000-01-01T00:00:00Z', receiving_application: PMS}\n"
        "destinations:\n  - {name: pms, type: file, directory: out}\n")
    with _engine(world, folder, "--console-port", "0") as startup:
        assert "FHIR appointments from https://127.0.0.1:" in startup
        port = int(startup.split("MLLP on 127.0.0.1:")[1].split()[0])
        _mllp_send(port, (SAMPLES / "siu_s12.hl7").read_bytes())
        store = Store(f"sqlite:///{folder / 'data' / 'hl7relay.db'}")
        spin(world.reactor, lambda: len(store.xrefs(resource_type="Appointment")) == 1, limit=30,
             describe=lambda: str([(r[0], r[1]) for r in world.server.requests][-5:]))
        [appointment] = world.server.of_type("Appointment")
        polls = len([r for r in world.server.requests if r[1].startswith("/fhir/Appointment?")])
        spin(world.reactor, lambda: len([r for r in world.server.requests if r[1].startswith("/fhir/Appointment?")])
             >= polls + 3, limit=30)
        out = folder / "out"

        def told():  # the files written (a file destination writes a hidden temporary first, then renames it)
            return sorted(p for p in out.glob("*") if not p.name.startswith(".")) if out.exists() else []

        assert told() == []  # our own write is not told back

        changed = json.loads(json.dumps(appointment.resource))
        changed.update(start="2024-01-15T11:00:00-05:00", end="2024-01-15T11:30:00-05:00")
        changed.pop("_start", None)
        world.server._write("PUT", f"Appointment/{changed['id']}", changed, None, {})  # a person moved it
        spin(world.reactor, lambda: len(told()) == 1, limit=30)
        [first] = told()
        siu = Message.from_bytes(first.read_bytes())
        assert siu.msh(9, 1) == "SIU" and siu.msh(9, 2) == "S13" and siu.get("MSH-5") == "PMS"
        assert siu.get("SCH-11.4") == "20240115110000-0500" and siu.get("SCH-1.1") == "APT1001"
        assert siu.get("PID-3.1") == "100234" and siu.get("AIP-3.1") == "1234567890"

        cancelled = dict(world.server.resources[("Appointment", changed["id"])].resource, status="cancelled")
        world.server._write("PUT", f"Appointment/{changed['id']}", cancelled, None, {})
        spin(world.reactor, lambda: len(told()) == 2, limit=30)
        events = sorted(Message.from_bytes(p.read_bytes()).msh(9, 2) for p in told())
        assert events == ["S13", "S15"]
        polls = len(world.server.requests)
        spin(world.reactor, lambda: len(world.server.requests) >= polls + 3, limit=30)
        assert len(told()) == 2  # told once each
        store.close()


def test_the_console_shows_what_is_held_for_matching_and_an_operator_resolves_it(world):
    """The console's Held for matching page: candidates masked for everyone, shown to a person with
    the PHI permission who says why (audited); an operator picks the patient; the engine sends it."""
    import re

    from hl7relay.ops.auth import hash_password
    from test_console import PASSWORD, Browser

    _someone(world.server, "a", "urn:hospital", "H-1")
    _someone(world.server, "b", "urn:other", "O-2")
    folder = world.tmp_path / "site"
    (folder / "channels").mkdir(parents=True)
    (folder / "channels" / "adt.yaml").write_text(
        "name: adt\nsource: {type: mllp, port: 0}\ndestinations:\n"
        f"  - {{name: ehr, type: fhir, url: 'https://127.0.0.1:{world.port}/fhir', tls_ca: '{world.pki['ca']}', "
        f"{MATCH}}}\n")
    (folder / "data").mkdir()
    users = Store(f"sqlite:///{folder / 'data' / 'hl7relay.db'}")
    users.migrate()
    for name, role in (("admin", "admin"), ("viewer", "viewer"), ("op", "operator")):
        users.add_user(name, role, hash_password(PASSWORD), {"actor": "test", "action": "user.add", "target": name})
    users.close()

    def call(fn, *args):
        return call_in_thread(world, fn, *args)

    with _engine(world, folder, "--console-port", "auto", "--admin-port", "auto") as startup:
        port = int(startup.split("MLLP on 127.0.0.1:")[1].split()[0])
        console = re.search(r"console: (https?://[^/\s]+)/", startup).group(1)
        _mllp_send(port, (SAMPLES / "adt_a01.hl7").read_bytes())
        store = Store(f"sqlite:///{folder / 'data' / 'hl7relay.db'}")
        spin(world.reactor, lambda: len(store.match_holds()) == 1, limit=30)
        viewer, operator, admin = Browser(console), Browser(console), Browser(console)
        for browser, name in ((viewer, "viewer"), (operator, "op"), (admin, "admin")):
            assert call(browser.login, name)[0] == 303
        status, _, page = call(viewer.get, "/matching")
        assert status == 200 and 'id="held-1-ehr"' in page and "Patient/a" in page and "JANE" not in page
        assert "Send it to this patient" not in page  # a viewer sees, an operator resolves
        assert call(viewer.post, "/matching/1/resolve", {"patient": "b", "reason": "x", "destination": "ehr"})[0] == 403
        assert call(operator.post, "/matching/show", {"reason": "to check"})[0] == 403  # no PHI permission
        assert call(admin.post, "/matching/show", {"reason": ""})[0] == 400
        status, _, page = call(admin.post, "/matching/show", {"reason": "ticket 4411"})
        assert status == 200 and "JANE DOE" in page and "1980-04-12" in page
        [viewed] = store.audit_entries(action="phi.view")
        assert viewed["actor"] == "user:admin" and viewed["reason"] == "ticket 4411"
        status, _, page = call(operator.post, "/matching/1/resolve", {"patient": "zzz", "reason": "x", "destination": "ehr"})
        assert status == 400 and "not one of the candidates" in page
        status, _, page = call(operator.post, "/matching/1/resolve", {"patient": "b", "reason": "same phone",
                                                                      "destination": "ehr"})
        assert status == 200 and "sent again as 2 to ehr for Patient/b" in page, page
        spin(world.reactor, lambda: world.server.resources[("Patient", "b")].version == 2, limit=30)
        status, _, page = call(viewer.get, "/sync")  # the sync status says what matching came to
        assert status == 200 and "patients matched 0, new 0, <a href=\"/matching\">held 1</a>" in page, page
        code, out = _status(world, folder)
        assert code == 0 and "FHIR transaction:" in out and "held 1 (hl7relay fhir holds)" in out, out
        assert len(world.server.of_type("Patient")) == 2
        [resolved] = store.audit_entries(action="fhir.match.resolve")
        assert resolved["actor"] == "user:op" and resolved["reason"] == "same phone"
        store.close()


def test_if_match_never_overwrites_a_change_made_on_the_server_since_our_write(world):
    channel = world.channel("if_match: true")
    siu = (SAMPLES / "siu_s12.hl7").read_bytes()
    world.send(channel, siu)
    world.settle(1)
    spin(world.reactor, lambda: len(world.store.xrefs(resource_type="Appointment")) == 1)
    world.send(channel, siu.replace(b"|MSG00005|", b"|MSG00006|").replace(b"SIU^S12", b"SIU^S14"))
    world.settle(2)  # the version we wrote is still there: updated, by its id, If-Match
    [appointment] = world.server.of_type("Appointment")
    assert appointment.version == 2
    method, path, body = world.server.requests[-1]
    entry = next(e for e in json.loads(body)["entry"] if e["resource"]["resourceType"] == "Appointment")
    assert entry["request"] == {"method": "PUT", "url": f"Appointment/{appointment.resource['id']}", "ifMatch": 'W/"1"'}
    spin(world.reactor, lambda: world.store.xrefs(resource_type="Appointment")[0]["version_id"] == "2")

    edited = dict(appointment.resource, comment="moved to room 4 by the front desk")
    world.server._write("PUT", f"Appointment/{appointment.resource['id']}", edited, None, {})  # version 3, not ours
    world.send(channel, siu.replace(b"|MSG00005|", b"|MSG00007|").replace(b"SIU^S12", b"SIU^S14"))
    world.settle(1, "ERROR")
    failed = [d for d in world.deliveries() if d["status"] == "ERROR"]
    assert len(failed) == 1 and failed[0]["last_error"].startswith("HTTP 412: conflict:"), failed
    kept = world.server.resources[("Appointment", appointment.resource["id"])]
    assert kept.version == 3 and kept.resource["comment"] == "moved to room 4 by the front desk"  # not overwritten


def test_a_stored_bundle_is_shown_masked_in_the_message_view(world):
    from hl7relay.ops.support import message_view

    channel = world.channel()
    world.send(channel, (SAMPLES / "adt_a01.hl7").read_bytes())
    world.settle(1)
    stored = world.store.get_message(1)
    assert b'"resourceType":"Bundle"' in stored["stages"]["destination:ehr"]  # the Bundle sent is what is kept
    shown = message_view(stored, False)
    bundle = shown["stages"]["destination:ehr"]
    assert '"resourceType": "Patient"' in bundle and "Patient?identifier=***" in bundle
    for value in ("DOE", "JANE", "1980-04-12", "100234", "MAIN ST"):
        assert value not in bundle, value
    assert "DOE" in message_view(stored, True)["stages"]["destination:ehr"]  # shown to whoever may see it


def test_a_rest_hook_notification_makes_the_fhir_source_poll_at_once(world):
    """A Subscription's rest-hook POSTs to the source (with its token): the change goes to the PMS
    now, not at the next poll an hour later; a POST without the token is refused."""
    import urllib.error
    import urllib.request

    from fhirserver import Stored

    appointment = {"resourceType": "Appointment", "id": "ap1", "status": "booked",
                   "start": "2024-02-01T09:00:00+00:00", "end": "2024-02-01T09:30:00+00:00",
                   "identifier": [{"system": "urn:ehr", "value": "A-1"}], "participant": [],
                   "meta": {"versionId": "1", "lastUpdated": "2023-11-14T22:13:21+00:00"}}
    # (the server's next write gets the same instant: ge finds it all the same)
    world.server.resources[("Appointment", "ap1")] = Stored(appointment, 1, "2023-11-14T22:13:21+00:00")
    folder = world.tmp_path / "site"
    (folder / "channels").mkdir(parents=True)
    (folder / "channels" / "from-ehr.yaml").write_text(
        f"name: from-ehr\nsource: {{type: fhir, url: 'https://127.0.0.1:{world.port}/fhir', tls_ca: '{world.pki['ca']}', "
        "poll_interval: 3600, since: '2000-01-01T00:00:00Z', notify_port: 0, notify_token: '${env:EHR_HOOK_TOKEN}'}\n"
        "destinations:\n  - {name: pms, type: file, directory: out}\n")
    out = folder / "out"

    def told():
        return sorted(p for p in out.glob("*") if not p.name.startswith(".")) if out.exists() else []

    def post(url, token):
        request = urllib.request.Request(url, data=b"{}", method="POST", headers={"Authorization": f"Bearer {token}"})
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:
                return answer.status
        except urllib.error.HTTPError as exc:
            return exc.code

    os.environ["EHR_HOOK_TOKEN"] = "hook-token-4f2a"
    try:
        with _engine(world, folder, "--console-port", "0") as startup:
            hook = startup.split("notifications on ")[1].split()[0]
            spin(world.reactor, lambda: len(told()) == 1, limit=30)  # the first poll: a new booking, S12
            moved = dict(world.server.resources[("Appointment", "ap1")].resource, start="2024-02-01T10:00:00+00:00",
                         end="2024-02-01T10:30:00+00:00")
            world.server._write("PUT", "Appointment/ap1", moved, None, {})
            assert call_in_thread(world, post, hook, "wrong") == 401
            assert call_in_thread(world, post, hook, "hook-token-4f2a") == 202
            spin(world.reactor, lambda: len(told()) == 2, limit=30)  # not in an hour: now
            events = [Message.from_bytes(p.read_bytes()).msh(9, 2) for p in told()]
            assert sorted(events) == ["S12", "S13"]
    finally:
        del os.environ["EHR_HOOK_TOKEN"]


def call_in_thread(world, fn, *args):
    import threading

    out = []
    worker = threading.Thread(target=lambda: out.append(fn(*args)))
    worker.start()
    spin(world.reactor, lambda: not worker.is_alive(), limit=30)
    return out[0]
