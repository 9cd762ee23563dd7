"""Channel tests: ``channels/<name>.test.yaml`` beside ``channels/<name>.yaml``.

```yaml
cases:
  - name: an A01 goes to the lab with the mapped patient class
    message: samples/adt_a01.hl7          # a file (beside the test, else from the working folder)
    expect:
      ack: AA                              # the ACK code the sender would get (on_store)
      filtered: false
      destinations:
        lab: {PV1-2: INPATIENT, PID-5.1: DOE}
        archive: {skipped: true}           # its destination filter keeps it out
  - name: inline messages work too (one segment per line)
    message: |
      MSH|^~\\&|PMS|CLINIC|||20240101||ORM^O01|1|P|2.5.1
    expect: {filtered: true, ack: AR}
```
Tests run the channel's pipeline and ACK policy: no network, no store. With ``response.when:
after_delivery`` they assume every destination accepts.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path

from hl7relay.ack import AckPolicy
from hl7relay.channels.channel import Channel, load_channel
from hl7relay.channels.pipeline import Result, process, stored_outcome
from hl7relay.spec import did_you_mean
from hl7relay.yamlsource import ConfigError, load_document
from hl7relay.errors import HL7RelayError
from hl7relay.hl7.message import Message
from hl7relay.hl7.path import parse_path

__all__ = ["CaseResult", "run_test_file", "find_test_files"]

_CASE_KEYS = {"name", "message", "expect"}
_EXPECT_KEYS = {"ack", "filtered", "error", "destinations", "status"}


@dataclass(slots=True)
class CaseResult:
    file: str
    name: str
    passed: bool
    problems: list = field(default_factory=list)


def find_test_files(paths) -> list[Path]:
    files = []
    for item in paths:
        item = Path(item)
        files += sorted(item.glob("*.test.yaml")) + sorted(item.glob("*.test.yml")) if item.is_dir() else [item]
    return files


def _channel_for(test_file: Path, declared) -> Path:
    if declared:
        return (test_file.parent / declared).resolve()
    stem = test_file.name.rsplit(".test.", 1)[0]
    for suffix in (".yaml", ".yml"):
        candidate = test_file.parent / (stem + suffix)
        if candidate.exists():
            return candidate
    return test_file.parent / (stem + ".yaml")


def _load_message(value, test_file: Path) -> Message:
    if not isinstance(value, str):
        raise HL7RelayError("message is a file name or the message text")
    text = value.strip("\n")
    if text.startswith("MSH"):
        return Message("\r".join(line.rstrip("\r") for line in text.splitlines()) + "\r")
    for base in (test_file.parent, Path.cwd()):
        candidate = base / value
        if candidate.is_file():
            return Message.from_bytes(candidate.read_bytes())
    raise HL7RelayError(f"message file {value!r} not found beside {test_file.name} or in {Path.cwd()}")


def run_test_file(test_file: Path, environ=None) -> tuple[list[CaseResult], list[ConfigError]]:
    doc = load_document(test_file, environ)
    if doc.errors:
        return [], doc.errors
    data = doc.data
    if not isinstance(data, dict) or not isinstance(data.get("cases"), list):
        doc.error((), "a channel test file has 'cases:', a list of {name, message, expect}")
        return [], doc.errors
    channel_path = _channel_for(test_file, data.get("channel"))
    channel, errors = load_channel(channel_path, environ)
    if channel is None:
        return [], errors or [ConfigError(doc.mark(()), f"channel file {channel_path} could not be loaded")]
    results = []
    for index, case in enumerate(data["cases"]):
        path = ("cases", index)
        if not isinstance(case, dict):
            doc.error(path, "a case is a mapping: name, message, expect")
            continue
        for key in case:
            if key not in _CASE_KEYS:
                doc.error(path + (key,), f"unknown key {key!r}{did_you_mean(key, _CASE_KEYS)}", key=True)
        expect = case.get("expect") or {}
        for key in expect if isinstance(expect, dict) else ():
            if key not in _EXPECT_KEYS:
                doc.error(path + ("expect", key), f"unknown expectation {key!r}{did_you_mean(key, _EXPECT_KEYS)}", key=True)
        name = str(case.get("name") or f"case {index + 1}")
        try:
            message = _load_message(case.get("message"), test_file)
        except HL7RelayError as exc:
            doc.error(path + ("message",), str(exc))
            continue
        results.append(CaseResult(str(test_file), name, *_run_case(channel, message, expect)))
    return results, doc.errors


def _run_case(channel: Channel, message: Message, expect: dict) -> tuple[bool, list]:
    problems = []
    original = message.header()  # the ACK answers what was received, before any transformer
    processed = process(channel, message)
    status = processed.result.value
    if "status" in expect and str(expect["status"]).upper() != status:
        problems.append(f"status: expected {expect['status']}, got {status}" + (f" ({processed.error})" if processed.error else ""))
    if "filtered" in expect and bool(expect["filtered"]) != (processed.result is Result.FILTERED):
        problems.append(f"filtered: expected {expect['filtered']}, got {processed.result is Result.FILTERED}")
    if "error" in expect and str(expect["error"]) not in processed.error:
        problems.append(f"error: expected a text containing {expect['error']!r}, got {processed.error!r}")
    if "ack" in expect:

        _, _, outcome = stored_outcome(processed)  # the same mapping the engine uses
        policy = AckPolicy(channel.response.filtered, channel.response.application, channel.response.facility)
        codes = policy.codes(original, outcome)
        expected = expect["ack"] if isinstance(expect["ack"], list) else [expect["ack"]]
        if codes != [str(c) for c in expected]:
            problems.append(f"ack: expected {'+'.join(map(str, expected)) or 'none'}, got {'+'.join(codes) or 'none'}")
    outputs = {o.name: o for o in processed.outputs}
    for name, wanted in (expect.get("destinations") or {}).items():
        if name not in {d.name for d in channel.destinations}:
            problems.append(f"destination {name!r} is not in channel {channel.name!r}")
            continue
        output = outputs.get(name)
        wanted = wanted or {}
        skipped = output is None or output.message is None
        if "skipped" in wanted:
            if bool(wanted["skipped"]) != skipped:
                problems.append(f"{name}: expected {'skipped' if wanted['skipped'] else 'delivered'}, got "
                                f"{'skipped' if skipped else 'delivered'}")
            continue
        if skipped:
            problems.append(f"{name}: expected a message, but it was {'not processed' if output is None else 'skipped by its filter'}")
            continue
        for key, value in wanted.items():
            if key == "output":
                expected_text = "\r".join(str(value).strip("\n").splitlines()) + "\r"
                got = output.message.to_text()
                if got.replace("\n", "\r") != expected_text:
                    diff = difflib.unified_diff(expected_text.split("\r"), got.split("\r"), "expected", "got", lineterm="")
                    problems.append(f"{name}: output differs:\n    " + "\n    ".join(diff))
                continue
            try:
                parse_path(key)
            except HL7RelayError as exc:
                problems.append(f"{name}: {exc}")
                continue
            got = output.message.get(key)
            if got != ("" if value is None else str(value)):
                problems.append(f"{name}: {key} expected {value!r}, got {got!r}")
    return not problems, problems
