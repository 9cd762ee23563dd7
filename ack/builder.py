"""Building ACK messages for a received message.

Header: MSH-1/2 copied; sending and receiving application/facility swapped; MSH-7 now; MSH-9
``ACK^<trigger>^ACK`` from v2.5 and ``ACK^<trigger>`` before; MSH-10 new and unique; MSH-11/12 (and
MSH-18) copied; MSA-2 is the received MSH-10. Errors: from v2.5 one ERR per problem with ERR-2
location, ERR-3 ``code^text^HL70357``, ERR-4 severity and ERR-8 the sentence; before v2.5, MSA-3
text and ERR-1.
"""

from __future__ import annotations

import functools
import itertools
import random
import time

from hl7relay.outcomes import ErrorCode, Severity
from hl7relay.hl7.escape import DEFAULT_DELIMITERS, Delimiters, escape, unescape
from hl7relay.hl7.message import Message

__all__ = ["build_ack", "ControlIds", "MAX_ERR_SEGMENTS"]

MAX_ERR_SEGMENTS = 20  # an ACK stays small even for a message with hundreds of findings
_DEFAULT_VERSION = "2.5.1"


class ControlIds:
    """MSH-10 values for our own messages: unique, also for two ACKs in the same second.

    ``YYMMDDHHMMSS`` plus a 5-digit counter that starts at a random value, so a restart within the
    same second does not repeat ids: 17 characters, inside v2.3's 20-character limit.
    """

    def __init__(self, clock=time.time):
        self._clock = clock
        self._counter = itertools.count(random.randrange(100000))
        self._second, self._stamp = None, ""

    def __call__(self) -> str:
        second = int(self._clock())
        if second != self._second:  # formatting the time is most of the cost: once per second
            self._second, self._stamp = second, time.strftime("%y%m%d%H%M%S", time.gmtime(second))
        return f"{self._stamp}{next(self._counter) % 100000:05d}"


_control_ids = ControlIds()


@functools.lru_cache(maxsize=4)
def _timestamp_of_second(second: int) -> str:
    local = time.localtime(second)
    offset = -time.altzone if local.tm_isdst > 0 else -time.timezone
    sign = "+" if offset >= 0 else "-"
    offset = abs(offset) // 60
    return time.strftime("%Y%m%d%H%M%S", local) + f"{sign}{offset // 60:02d}{offset % 60:02d}"


def _timestamp(now: float) -> str:
    return _timestamp_of_second(int(now))  # MSH-7 to the second: formatted once per second


@functools.lru_cache(maxsize=64)
def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split(".") if p.isdigit()) or (2, 5)


def build_ack(
    received: Message | None,
    code: str,
    text: str = "",
    error: ErrorCode | None = None,
    findings=(),
    *,
    sending_application: str = "HL7RELAY",
    sending_facility: str = "",
    now: float | None = None,
    control_id=None,
) -> bytes:
    """The ACK (``code`` = AA/AE/AR/CA/CE/CR) for ``received``, as bytes in its character set.

    ``received`` is None for a payload that could not be read as HL7: the ACK then uses standard
    delimiters, our own application name and v2.5.1, and MSA-2 stays empty.
    """
    now = time.time() if now is None else now
    control_id = (control_id or _control_ids)()
    if received is None:
        d: Delimiters = DEFAULT_DELIMITERS
        header, version, trigger, acked = ("",) * 19, _DEFAULT_VERSION, "", ""
    else:
        d = received.delimiters
        fields = received.fields(0)
        header = fields if len(fields) >= 19 else fields + [""] * (19 - len(fields))
        if not _usable(d):
            # the sender's delimiters cannot carry an ACK (missing, repeated, or characters our own
            # timestamps and ids are made of): answer in the standard ones, its header re-encoded
            old, d = d, DEFAULT_DELIMITERS
            header = [_recode(value, old, d) if n in (3, 4, 5, 6, 11, 12, 18) else value for n, value in enumerate(header)]
        version = received.msh(12, 1) or _DEFAULT_VERSION
        trigger, acked = received.msh(9, 2), received.msh(10)
    fs = d.field
    # everything in MSH but MSH-7 and MSH-10 depends only on the sender's header: built once per sender
    before_time, before_id, after_id = _header_template(
        d, header[3], header[4], header[5], header[6], header[11], header[12], header[18],
        version, trigger, sending_application, sending_facility)
    segments = [before_time + _timestamp(now) + before_id + escape(control_id, d) + after_id]
    modern = _version_key(version) >= (2, 5)
    msa = ["MSA", code, escape(acked, d)]
    if text and not modern:
        msa.append(escape(text[:80], d))
    segments.append(fs.join(msa))
    problems = list(findings)[:MAX_ERR_SEGMENTS]
    if error is not None and not problems:
        problems = [None]
    for finding in problems:
        segments.append(_err_segment(finding, error, text, d, modern))
    text_out = "\r".join(segments) + "\r"
    codec = received.codec if received is not None else "utf_8"
    return text_out.encode(codec, "surrogateescape")


@functools.lru_cache(maxsize=256)
def _header_template(d: Delimiters, f3: str, f4: str, f5: str, f6: str, f11: str, f12: str, f18: str, version: str,
                     trigger: str, sending_application: str, sending_facility: str) -> tuple[str, str, str]:
    """The ACK's MSH around MSH-7 and MSH-10: (up to MSH-7, MSH-8..9, after MSH-10)."""
    fs, cs = d.field, d.component
    if _version_key(version) >= (2, 5):
        message_type = cs.join(["ACK", trigger, "ACK"]) if trigger else cs.join(["ACK", "", "ACK"])
    elif _version_key(version) >= (2, 3):
        message_type = cs.join(["ACK", trigger]) if trigger else "ACK"
    else:
        message_type = "ACK"
    before_time = fs.join(["MSH" + fs + d.encoding_characters, f5 or escape(sending_application, d),
                           f6 or escape(sending_facility, d), f3, f4, ""])
    after_id = fs + fs.join([f11 or "P", f12 or _DEFAULT_VERSION])
    if f18:
        after_id += fs * 6 + f18  # MSH-13..17 empty, MSH-18 copied so the reply decodes alike
    return before_time, fs + fs + message_type + fs, after_id


@functools.lru_cache(maxsize=64)
def _usable(d: Delimiters) -> bool:
    chars = [c for c in d if c]
    return bool(d.component and d.escape and len(set(chars)) == len(chars)
                and not any(c.isalnum() or c in "+-. \t\x00" for c in chars))


def _recode(value: str, old: Delimiters, new: Delimiters) -> str:
    """One field from the sender's delimiters into ``new`` ones (components and subcomponents kept)."""
    if not value:
        return value
    components = value.split(old.component) if old.component else [value]
    out = []
    for component in components:
        subs = component.split(old.subcomponent) if old.subcomponent else [component]
        out.append(new.subcomponent.join(escape(unescape(sub, old), new) for sub in subs))
    return new.component.join(out)


def _err_segment(finding, error: ErrorCode | None, text: str, d: Delimiters, modern: bool) -> str:
    fs, cs, ss = d.field, d.component, d.subcomponent or "&"
    if finding is not None:
        code, severity, message = finding.code, finding.severity, finding.text
        segment, sequence, field_number = finding.segment or "", finding.sequence, finding.field
        location = finding.location
    else:
        code, severity, message = error, Severity.ERROR, text
        segment, sequence, field_number, location = "", None, None, ""
    code = ErrorCode(code)
    if modern:
        err3 = cs.join([str(int(code)), escape(code.text, d), "HL70357"])
        location = location.replace("^", cs)
        # ERR-8 (user message) carries the sentence a person reads
        return fs.join(["ERR", "", location, err3, Severity(severity).value, "", "", "", escape(message[:200], d)])
    # ERR-1 (ELD): segment^sequence^field^code&text&HL70357
    eld = cs.join([segment, "" if sequence is None else str(sequence), "" if field_number is None else str(field_number),
                   ss.join([str(int(code)), escape(code.text, d), "HL70357"])])
    return fs.join(["ERR", eld])
