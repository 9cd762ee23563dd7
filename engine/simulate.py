"""Realistic generated HL7 traffic: a practice-management system's day, repeatable by seed.

:class:`Simulation` keeps a population of patients with stable identifiers (MRN, account and
visit numbers, names, birth dates, addresses) and produces, in order, what a PMS sends about them:

- ADT: registration (A04), admission (A01), transfer to another bed (A02), discharge (A03) and
  demographic updates (A08), each only when it makes sense (a transfer or a discharge follows an
  admission, a patient is admitted once at a time);
- SIU: appointments booked (S12), rescheduled (S13) and cancelled (S15), each with its
  appointment id, slot, provider and room;
- ORU^R01: results with several observations of different value types (numeric with units,
  reference range and abnormal flag; coded; text; a date).

Messages are sans-IO bytes (segments ended by CR) in the HL7 version and character set asked for
(MSH-12, MSH-18; names with accents only where the character set can carry them); their clock is
simulated (``start`` plus a few minutes per event), so a seed gives the same messages byte for byte
wherever it runs. ``hl7relay simulate`` sends them over MLLP or writes them to files.
"""

from __future__ import annotations

import datetime
import random
from dataclasses import dataclass, field

from hl7relay.outcomes import AckCode

__all__ = ["Simulation", "SimulatedMessage", "Driver", "Summary", "VERSIONS", "CHARSETS"]

VERSIONS = ("2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6", "2.7", "2.7.1", "2.8")
# the --charset choices: MSH-18 as HL7 table 0211 spells it, and the Python codec for the bytes
CHARSETS = {"ascii": ("ASCII", "ascii"), "latin-1": ("8859/1", "latin-1"), "utf-8": ("UNICODE UTF-8", "utf-8")}

_FAMILY = ["Smith", "Johnson", "Williams", "Brown", "Jones", "Garcia", "Miller", "Davis", "Rodriguez", "Martinez",
           "Hernandez", "Lopez", "Wilson", "Anderson", "Thomas", "Taylor", "Moore", "Jackson", "Martin", "Lee",
           "Nguyen", "Clark", "Lewis", "Walker", "Young", "Allen", "King", "Wright", "Scott", "Hill"]
_FAMILY_ACCENTED = ["Müller", "Peña", "Ibáñez", "Côté", "Søndergaard", "Núñez", "Béland", "Sørensen"]
_GIVEN_F = ["Mary", "Patricia", "Jennifer", "Linda", "Elizabeth", "Susan", "Jessica", "Sarah", "Karen", "Lisa", "Ana"]
_GIVEN_M = ["James", "Robert", "John", "Michael", "David", "William", "Richard", "Joseph", "Thomas", "Daniel", "Luis"]
_GIVEN_ACCENTED = ["José", "Zoë", "René", "Inés", "Jérôme", "Åsa"]
_STREETS = ["Main St", "Oak Ave", "Maple Dr", "Cedar Ln", "Park Rd", "Elm St", "Lake View Dr", "Hill St"]
_CITIES = [("Springfield", "IL", "62701"), ("Madison", "WI", "53703"), ("Columbus", "OH", "43215"),
           ("Salem", "OR", "97301"), ("Dover", "DE", "19901")]
_PROVIDERS = [("1234567890", "Brown", "Robert"), ("2345678901", "Chen", "Linda"), ("3456789012", "Patel", "Anil"),
              ("4567890123", "Okafor", "Grace")]
_ROOMS = ["EXAM1", "EXAM2", "EXAM3", "EXAM4"]
_WARDS = [("MED", ["101", "102", "103", "104"]), ("SURG", ["201", "202", "203"]), ("PEDS", ["301", "302"])]
_APPOINTMENT_TYPES = [("ROUTINE", "Routine visit", 20), ("FOLLOWUP", "Follow-up", 15), ("PHYSICAL", "Annual physical", 40),
                      ("CONSULT", "Consultation", 30)]
# (code, text, units, low, high, decimals): LOINC panels a clinic's lab sends back
_NUMERIC_TESTS = [("2345-7", "Glucose", "mg/dL", 70, 99, 0), ("2160-0", "Creatinine", "mg/dL", 0.6, 1.3, 2),
                  ("718-7", "Hemoglobin", "g/dL", 12.0, 17.5, 1), ("6690-2", "WBC", "10*3/uL", 4.5, 11.0, 1),
                  ("2951-2", "Sodium", "mmol/L", 135, 145, 0), ("2823-3", "Potassium", "mmol/L", 3.5, 5.1, 1)]
_PANELS = [("24323-8", "Comprehensive metabolic panel"), ("58410-2", "CBC panel"), ("4548-4", "Hemoglobin A1c")]


@dataclass(slots=True)
class _Patient:
    mrn: str
    family: str
    given: str
    middle: str
    dob: str
    sex: str
    street: str
    city: tuple
    phone: str
    account: str
    visits: int = 0
    bed: tuple | None = None  # (ward, room, bed) while admitted
    visit: str = ""
    appointments: list = field(default_factory=list)  # [appointment id, start, type index, provider index, room]


@dataclass(slots=True)
class SimulatedMessage:
    data: bytes  # segments ended by CR, in the simulation's character set
    message_type: str  # ADT^A01
    control_id: str
    patient_id: str  # MRN: a patient's messages keep their order when sent over several connections


class Simulation:
    """``next()`` the next message; ``take(n)`` n of them. Deterministic for a seed."""

    def __init__(self, seed: int = 1, version: str = "2.5.1", charset: str = "utf-8", patients: int = 200,
                 start: datetime.datetime | None = None, sending_application: str = "PMS",
                 sending_facility: str = "CLINIC", receiving_application: str = "HL7RELAY",
                 receiving_facility: str = "HOSPITAL", processing_id: str = "P", ack_mode: str = "original"):
        if version not in VERSIONS:
            raise ValueError(f"version {version!r} is not simulated; choose one of {', '.join(VERSIONS)}")
        if charset not in CHARSETS:
            raise ValueError(f"charset {charset!r} is not simulated; choose one of {', '.join(CHARSETS)}")
        if patients < 1:
            raise ValueError("patients must be at least 1")
        if ack_mode not in ("original", "enhanced"):
            raise ValueError("ack_mode is original (MSH-15/16 empty: one ACK) or enhanced (AL/AL: CA, then AA)")
        self.ack_fields = ("", "") if ack_mode == "original" else ("AL", "AL")
        self.rng = random.Random(seed)
        self.seed, self.version, self.charset = seed, version, charset
        self.msh18, self.codec = CHARSETS[charset]
        self.accents = charset != "ascii"
        self.header = (sending_application, sending_facility, receiving_application, receiving_facility, processing_id)
        self.now = start or datetime.datetime(2026, 1, 5, 8, 0, 0)
        self.count = 0
        self._next_mrn = 100000
        self._next_appointment = 5000
        self._next_order = 70000
        self.patients = [self._new_patient() for _ in range(patients)]

    # -- the population ---------------------------------------------------------------------------
    def _new_patient(self) -> _Patient:
        rng = self.rng
        self._next_mrn += rng.randint(1, 37)
        sex = rng.choice("FM")
        given_names = _GIVEN_F if sex == "F" else _GIVEN_M
        if self.accents and rng.random() < 0.15:
            given_names = _GIVEN_ACCENTED
        family = rng.choice(_FAMILY_ACCENTED if self.accents and rng.random() < 0.15 else _FAMILY)
        dob = datetime.date(1930, 1, 1) + datetime.timedelta(days=rng.randrange(365 * 92))
        return _Patient(mrn=str(self._next_mrn), family=family, given=rng.choice(given_names),
                        middle=rng.choice("ABCDEJKLMRS"), dob=dob.strftime("%Y%m%d"), sex=sex,
                        street=f"{rng.randint(1, 9999)} {rng.choice(_STREETS)}", city=rng.choice(_CITIES),
                        phone=f"555{rng.randint(0, 9999999):07d}", account=f"A{self._next_mrn}")

    # -- the stream -------------------------------------------------------------------------------
    def next(self) -> SimulatedMessage:
        rng = self.rng
        self.now += datetime.timedelta(seconds=rng.randint(20, 240))
        patient = rng.choice(self.patients)
        choices = [("A04", 3), ("A08", 4), ("S12", 6), ("ORU", 5)]
        if patient.bed is None:
            choices.append(("A01", 3))
        else:
            choices += [("A02", 2), ("A03", 4)]
        if patient.appointments:
            choices += [("S13", 2), ("S15", 2)]
        event = rng.choices([c for c, _ in choices], [w for _, w in choices])[0]
        if event == "A04" and rng.random() < 0.5:  # registrations bring new patients now and then
            patient = self._new_patient()
            self.patients.append(patient)
            if len(self.patients) > 5000:
                self.patients.pop(0)
        self.count += 1
        control_id = f"SIM{self.seed}-{self.count:07d}"
        build = {"A01": self._admit, "A02": self._transfer, "A03": self._discharge, "A04": self._register,
                 "A08": self._update, "S12": self._book, "S13": self._reschedule, "S15": self._cancel,
                 "ORU": self._result}[event]
        message_type, segments = build(patient)
        text = "\r".join([self._msh(message_type, control_id), *segments]) + "\r"
        return SimulatedMessage(text.encode(self.codec), message_type.rsplit("^", 1)[0] if message_type.count("^") > 1
                                else message_type, control_id, patient.mrn)

    def take(self, count: int) -> list[SimulatedMessage]:
        return [self.next() for _ in range(count)]

    # -- segments ---------------------------------------------------------------------------------
    def _ts(self, moment: datetime.datetime | None = None) -> str:
        return (moment or self.now).strftime("%Y%m%d%H%M%S")

    def _structure(self, code: str, event: str, structure: str) -> str:
        return f"{code}^{event}" if self.version == "2.3" else f"{code}^{event}^{structure}"

    def _msh(self, message_type: str, control_id: str) -> str:
        sending_app, sending_facility, receiving_app, receiving_facility, processing = self.header
        fields = ["MSH", "^~\\&", sending_app, sending_facility, receiving_app, receiving_facility, self._ts(), "",
                  message_type, control_id, processing, self.version, "", "", *self.ack_fields, "", self.msh18]
        return "|".join(fields)

    @staticmethod
    def _segment(name: str, values: dict) -> str:
        """A segment from {field number: value}: no miscounted pipes."""
        last = max(values) if values else 0
        return "|".join([name] + [values.get(i, "") for i in range(1, last + 1)])

    @property
    def _modern(self) -> bool:
        """2.7 and later: fields withdrawn there (EVN-1, SCH-9/10, OBR-15...) are left empty."""
        return self.version in ("2.7", "2.7.1", "2.8")

    def _coded(self, code: str, text: str, system: str) -> str:
        return f"{code}^{text}^{system}"

    def _evn(self, event: str) -> str:
        return self._segment("EVN", {1: "" if self._modern else event, 2: self._ts()})

    def _pid(self, p: _Patient) -> str:
        city, state, zip_code = p.city
        fields = ["PID", "1", "", f"{p.mrn}^^^{self.header[1]}^MR", "", f"{p.family}^{p.given}^{p.middle}^^^^L", "",
                  p.dob, p.sex, "", "", f"{p.street}^^{city}^{state}^{zip_code}^USA^H", "",
                  f"^PRN^PH^^1^{p.phone[:3]}^{p.phone[3:]}", "", "", "", "", f"{p.account}^^^{self.header[1]}^AN"]
        return "|".join(fields)

    def _pv1(self, p: _Patient, patient_class: str) -> str:
        npi, family, given = _PROVIDERS[int(p.mrn) % len(_PROVIDERS)]
        location = f"{p.bed[0]}^{p.bed[1]}^{p.bed[2]}^{self.header[1]}" if p.bed else f"{self.header[1]}^{_ROOMS[0]}^^{self.header[1]}"
        fields = ["PV1", "1", patient_class, location, "", "", "", f"{npi}^{family}^{given}^^^DR^MD", "", "", "", "", "",
                  "", "", "", "", "", "", f"{p.visit or p.account}^^^{self.header[1]}^VN"]
        fields += [""] * (44 - len(fields)) + [self._ts()]  # PV1-44 admit date/time
        return "|".join(fields)

    def _admission(self, p: _Patient) -> None:
        ward, rooms = self.rng.choice(_WARDS)
        p.bed = (ward, self.rng.choice(rooms), self.rng.choice("AB"))
        p.visits += 1
        p.visit = f"V{p.mrn}{p.visits:02d}"

    def _admit(self, p: _Patient):
        self._admission(p)
        return self._structure("ADT", "A01", "ADT_A01"), [self._evn("A01"), self._pid(p), self._pv1(p, "I")]

    def _transfer(self, p: _Patient):
        previous = p.bed
        while p.bed == previous:  # a transfer goes to another bed
            ward, rooms = self.rng.choice(_WARDS)
            p.bed = (ward, self.rng.choice(rooms), self.rng.choice("AB"))
        pv1 = self._pv1(p, "I").split("|")
        pv1 += [""] * (7 - len(pv1))
        pv1[6] = f"{previous[0]}^{previous[1]}^{previous[2]}^{self.header[1]}"  # PV1-6 prior patient location
        return self._structure("ADT", "A02", "ADT_A02"), [self._evn("A02"), self._pid(p), "|".join(pv1)]

    def _discharge(self, p: _Patient):
        pv1 = self._pv1(p, "I").split("|")
        pv1 += [""] * (46 - len(pv1))
        pv1[36] = "01"  # PV1-36 discharge disposition: discharged to home
        pv1[45] = self._ts()  # PV1-45 discharge date/time
        p.bed = None
        return self._structure("ADT", "A03", "ADT_A03"), [self._evn("A03"), self._pid(p), "|".join(pv1)]

    def _register(self, p: _Patient):
        return self._structure("ADT", "A04", "ADT_A01"), [self._evn("A04"), self._pid(p), self._pv1(p, "O")]

    def _update(self, p: _Patient):
        rng = self.rng
        if rng.random() < 0.5:
            p.street = f"{rng.randint(1, 9999)} {rng.choice(_STREETS)}"
            p.city = rng.choice(_CITIES)
        else:
            p.phone = f"555{rng.randint(0, 9999999):07d}"
        return self._structure("ADT", "A08", "ADT_A01"), [self._evn("A08"), self._pid(p),
                                                          self._pv1(p, "I" if p.bed else "O")]

    # -- scheduling --------------------------------------------------------------------------------
    def _slot(self) -> datetime.datetime:
        day = (self.now + datetime.timedelta(days=self.rng.randint(1, 30))).replace(minute=0, second=0)
        return day.replace(hour=self.rng.randint(8, 16), minute=self.rng.choice((0, 15, 30, 45)))

    def _siu(self, p: _Patient, event: str, appointment: list, status: str, reason: tuple):
        appointment_id, start, kind, provider, room = appointment
        code, text, minutes = _APPOINTMENT_TYPES[kind]
        npi, family, given = _PROVIDERS[provider]
        facility = self.header[1]
        end = start + datetime.timedelta(minutes=minutes)
        person = f"{npi}^{family}^{given}^^^DR"
        sch = {1: f"{appointment_id}^{facility}", 2: f"{appointment_id}^{facility}",
               6: self._coded(*reason, "HL70276"), 7: self._coded(code, text, "HL70276"),
               8: self._coded(code, text, "HL70277"), 16: person, 20: person,
               25: self._coded(status, status.capitalize(), "HL70278")}
        old = self.version in ("2.3", "2.3.1", "2.4")
        if not self._modern:
            sch.update({9: str(minutes), 10: "min^minutes^ISO+"})
        if old:  # SCH-11 quantity/timing; TQ1 from 2.5 on
            sch[11] = f"^^{minutes}^{self._ts(start)}^{self._ts(end)}"
        segments = [self._segment("SCH", sch)]
        if not old:
            segments.append(self._segment("TQ1", {1: "1", 7: self._ts(start), 8: self._ts(end)}))
        timing = {6: self._ts(start), 9: str(minutes), 10: "min^minutes^ISO+"}
        segments += [self._pid(p), "RGS|1|A",
                     self._segment("AIL", {1: "1", 2: "A", 3: f"{facility}^{room}^^{facility}", 4: "EXAM^Examination room",
                                           **timing}),
                     self._segment("AIP", {1: "1", 2: "A", 3: person, 4: "PRV^Provider", **timing})]
        # SIU_S12 is the structure of every appointment event; 2.4 and later name it per event (HL7's
        # own v2.8 examples: SIU^S13^SIU_S13), which is what receivers' tables expect
        structure = "SIU_S12" if self.version in ("2.3", "2.3.1") else f"SIU_{event}"
        return self._structure("SIU", event, structure), segments

    def _book(self, p: _Patient):
        self._next_appointment += 1
        appointment = [f"AP{self._next_appointment}", self._slot(), self.rng.randrange(len(_APPOINTMENT_TYPES)),
                       self.rng.randrange(len(_PROVIDERS)), self.rng.choice(_ROOMS)]
        p.appointments.append(appointment)
        return self._siu(p, "S12", appointment, "BOOKED", ("NEW", "New appointment"))

    def _reschedule(self, p: _Patient):
        appointment = self.rng.choice(p.appointments)
        appointment[1] = self._slot()
        return self._siu(p, "S13", appointment, "BOOKED", ("RESCHED", "Patient asked for another time"))

    def _cancel(self, p: _Patient):
        appointment = p.appointments.pop(self.rng.randrange(len(p.appointments)))
        return self._siu(p, "S15", appointment, "CANCELLED", ("CANCEL", "Patient cancelled"))

    # -- results -------------------------------------------------------------------------------------
    def _result(self, p: _Patient):
        rng = self.rng
        self._next_order += 1
        order = f"ORD{self._next_order}"
        panel_code, panel_text = rng.choice(_PANELS)
        collected = self.now - datetime.timedelta(hours=rng.randint(1, 24))
        coded_type = "CE" if self.version in ("2.3", "2.3.1", "2.4", "2.5", "2.5.1") else "CWE"  # CE left with 2.6
        facility = self.header[1]
        npi, family, given = _PROVIDERS[int(p.mrn) % len(_PROVIDERS)]
        orc = {1: "RE", 2: f"{order}^{facility}", 3: f"{order}^LAB", 5: "CM"}
        obr = {1: "1", 2: f"{order}^{facility}", 3: f"{order}^LAB", 4: f"{panel_code}^{panel_text}^LN",
               7: self._ts(collected), 16: f"{npi}^{family}^{given}^^^DR", 22: self._ts(), 24: "LAB", 25: "F"}
        if self.version == "2.3":  # 2.3 requires the quantity/timing that later versions leave to TQ1
            orc[7] = obr[27] = f"^^^{self._ts(collected)}"
        segments = [self._pid(p), self._segment("ORC", orc), self._segment("OBR", obr)]
        observations = []
        for code, text, units, low, high, decimals in rng.sample(_NUMERIC_TESTS, rng.randint(2, 4)):
            value = round(rng.uniform(low * 0.8, high * 1.2), decimals)
            value_text = f"{value:.{decimals}f}" if decimals else str(int(value))
            flag = "H" if value > high else "L" if value < low else "N"
            observations.append(("NM", f"{code}^{text}^LN", value_text, units, f"{low}-{high}", flag))
        observations.append((coded_type, "5778-6^Color of Urine^LN", "YEL^Yellow^L", "", "", "N"))
        observations.append(("ST", "8251-1^Service comment^LN", "Specimen received in good condition", "", "", ""))
        observations.append(("DT", "33882-2^Collection date^LN", collected.strftime("%Y%m%d"), "", "", ""))
        for index, (value_type, identifier, value, units, reference, flag) in enumerate(observations, start=1):
            segments.append(self._segment("OBX", {1: str(index), 2: value_type, 3: identifier, 4: str(index), 5: value,
                                                  6: units, 7: reference, 8: flag, 11: "F", 14: self._ts()}))
        return self._structure("ORU", "R01", "ORU_R01"), segments


class Driver:
    """Sends a :class:`Simulation`'s messages through ``senders`` (one per connection; each has
    ``send(bytes) -> Deferred[SendResult]``) and measures what came back.

    A patient's messages always go through the same connection, in order, as a PMS sends them.
    With ``rate`` (messages per second) message *n* is handed over at ``n / rate`` seconds;
    with 0, each connection sends its next message as soon as the previous one is answered.
    Each connection has one message in flight. ``start()`` fires with :class:`Summary` once
    ``count`` messages (or what ``duration`` seconds allowed) are answered. Times come from
    ``clock`` (the reactor; a task.Clock in tests)."""

    def __init__(self, simulation: Simulation, senders: list, clock, count: int, rate: float = 0.0,
                 duration: float | None = None):
        if not senders:
            raise ValueError("at least one connection")
        self.simulation, self.senders, self.clock = simulation, senders, clock
        self.count, self.rate, self.duration = count, rate, duration
        self.queues = [[] for _ in senders]  # per connection: messages waiting, oldest first
        self.busy = [False] * len(senders)
        self.generated = 0
        self.summary = Summary()
        self._started = 0.0
        self._done = None
        self._timer = None
        self._running = self._again = False
        self.stopped = ""  # why it stopped early ("" when it did not)

    def start(self):
        from twisted.internet import defer

        self._done = defer.Deferred()
        self._started = self.clock.seconds()
        if self.rate > 0:
            self._tick()
        else:
            self._run()
        return self._done

    def stop(self, reason: str) -> None:
        """Generate nothing more; what is in flight is still answered."""
        self.stopped = self.stopped or reason
        for queue in self.queues:
            queue.clear()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._run()

    def _may_generate(self) -> bool:
        """Whether another message is to come: with a rate, the next one's time (n / rate) is
        within the duration, however late the reactor runs the timer; else the clock is."""
        if self.stopped or self.generated >= self.count:
            return False
        at = self.generated / self.rate if self.rate > 0 else self.clock.seconds() - self._started
        return self.duration is None or at < self.duration

    def _generate_one(self) -> None:
        message = self.simulation.next()
        self.generated += 1
        self.queues[int(message.patient_id) % len(self.senders)].append(message)

    def _tick(self) -> None:
        self._timer = None
        due = int((self.clock.seconds() - self._started) * self.rate) + 1
        while self._may_generate() and self.generated < due:
            self._generate_one()
        if self._may_generate():
            delay = max(0.0, self._started + self.generated / self.rate - self.clock.seconds())
            self._timer = self.clock.callLater(delay, self._tick)
        self._run()

    def _run(self) -> None:
        """Top up (as fast as possible), start what idle connections can send, and finish when
        all is answered: a loop, so senders that answer at once do not recurse."""
        if self._running:
            self._again = True
            return
        self._running = True
        try:
            while True:
                self._again = False
                if self.rate <= 0:
                    # every idle connection gets work; other connections' patients wait in their
                    # queues meanwhile (a few per connection)
                    limit = 4 * len(self.senders)
                    while self._may_generate() and sum(map(len, self.queues)) < limit and \
                            any(not busy and not queue for busy, queue in zip(self.busy, self.queues)):
                        self._generate_one()
                for connection, queue in enumerate(self.queues):
                    if queue and not self.busy[connection]:
                        self._send(connection, queue.pop(0))
                if not self._again:
                    break
        finally:
            self._running = False
        self._finish_if_done()

    def _send(self, connection: int, message: SimulatedMessage) -> None:
        self.busy[connection] = True
        sent_at = self.clock.seconds()
        self.senders[connection].send(message.data).addBoth(self._answered, connection, message, sent_at)

    def _answered(self, result, connection: int, message: SimulatedMessage, sent_at: float):
        self.busy[connection] = False
        code = getattr(result, "ack_code", "") or getattr(getattr(result, "status", None), "value", "failed")
        self.summary.record(message.message_type, code, self.clock.seconds() - sent_at)
        if code == "connection_failed" and not self.summary.answered:
            self.stopped = self.stopped or "no connection could be made"
            for queue in self.queues:
                queue.clear()
        self._run()
        return None

    def _finish_if_done(self) -> None:
        if self._done is None or self._done.called or any(self.busy) or any(self.queues):
            return
        if (self._timer is not None and self._timer.active()) or self._may_generate():
            return
        self.summary.elapsed = self.clock.seconds() - self._started
        self._done.callback(self.summary)


_ACK_CODES = frozenset(code.value for code in AckCode)  # an answer, whatever it said (else: no answer)


@dataclass(slots=True)
class Summary:
    """What a run sent and got back."""

    sent: int = 0
    answered: int = 0  # messages that got an ACK (any code)
    codes: dict = field(default_factory=dict)  # ACK code (or connection_failed, timed_out) -> count
    types: dict = field(default_factory=dict)  # message type -> count
    latencies: list = field(default_factory=list)  # seconds from hand-over to answer, answered ones
    elapsed: float = 0.0

    def record(self, message_type: str, code: str, latency: float) -> None:
        self.sent += 1
        self.types[message_type] = self.types.get(message_type, 0) + 1
        self.codes[code] = self.codes.get(code, 0) + 1
        if code in _ACK_CODES or code.startswith("http_"):  # an ACK, or an API's answer without one
            self.answered += 1
            self.latencies.append(latency)

    def percentile(self, fraction: float) -> float | None:
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]

    @property
    def accepted(self) -> bool:
        """Every message answered AA or CA (or, by an API without ACKs, 2xx)."""
        good = sum(n for code, n in self.codes.items() if code in (AckCode.AA, AckCode.CA) or code.startswith("http_2"))
        return self.sent > 0 and good == self.sent

    def to_dict(self) -> dict:
        return {"sent": self.sent, "answered": self.answered, "codes": self.codes, "types": self.types,
                "elapsed_seconds": self.elapsed, "messages_per_second": self.sent / self.elapsed if self.elapsed else None,
                "latency_ms": {name: (None if (v := self.percentile(q)) is None else v * 1000)
                               for name, q in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99), ("max", 1.0))}}


class HTTPPoster:
    """A :class:`Driver` sender that POSTs each message (``application/hl7-v2``) to an http source
    (or ``hl7relay listen --http``), with a sender token; its answer's ACK code, or ``http_NNN``
    for an answer without one, or ``connection_failed`` / ``timed_out``."""

    def __init__(self, url: str, reactor, token: str | None = None, tls=None, timeout: float = 30.0,
                 connect_timeout: float = 10.0):
        from hl7relay.apiclient.http import HTTPClient

        self.url, self.token, self.timeout = url, token, timeout
        self.client = HTTPClient(reactor, tls, connect_timeout, connections=1)

    def send(self, data: bytes):
        from hl7relay.apiclient.http import HTTPFailure

        headers = {"Content-Type": "application/hl7-v2", "User-Agent": "hl7relay-simulate"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        d = self.client.request("POST", self.url, headers, data, self.timeout)

        def answered(answer):
            at = answer.body.find(b"MSA|")
            code = answer.body[at + 4:at + 6].decode("ascii", "replace") if at >= 0 else ""
            if code not in _ACK_CODES:
                code = f"http_{answer.status}"
            return _Posted(code)

        def failed(failure):
            failure.trap(HTTPFailure)
            return _Posted("connection_failed" if failure.value.unreachable else "timed_out")

        return d.addCallbacks(answered, failed)

    def close(self) -> None:
        self.client.close()


@dataclass(slots=True)
class _Posted:
    ack_code: str
