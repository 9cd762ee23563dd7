"""The shared corpus of real public messages: nothing crashes, every message gets a verdict, and
verdicts agree with MANIFEST.tsv's ``expected`` column except for the reviewed disagreements in
corpus_disagreements.tsv (each with its reason)."""

import csv
import re
from pathlib import Path

import hl7
import pytest

from hl7relay.hl7.batch import split_messages
from hl7relay.cli.validate import check_bytes
from hl7relay.hl7.message import Message
from hl7relay.validation import Validator

DISAGREEMENTS = Path(__file__).with_name("corpus_disagreements.tsv")


def _manifest(corpus):
    with open(corpus / "MANIFEST.tsv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def _verdict(result) -> str:
    if not result.readable:
        return "unreadable"
    return "valid" if result.valid else "invalid"


@pytest.fixture(scope="module")
def results(corpus):
    validator = Validator()
    return {row["file"]: check_bytes(row["file"], (corpus / row["file"]).read_bytes(), validator)
            for row in _manifest(corpus)}


def test_every_file_gets_a_verdict_for_every_message(corpus, results):
    for row in _manifest(corpus):
        result = results[row["file"]]
        if row["message_type"] != "-":
            assert result.readable and result.messages, row["file"]
        for message in result.messages:
            assert isinstance(message["valid"], bool)


def test_verdicts_match_the_manifest_or_a_reviewed_disagreement(corpus, results):
    with open(DISAGREEMENTS, newline="", encoding="utf-8") as f:
        reviewed = {row["file"]: row for row in csv.DictReader(f, delimiter="\t")}
    found = {}
    for row in _manifest(corpus):
        expected, ours = row["expected"], _verdict(results[row["file"]])
        if expected != "unknown" and (expected == "valid") != (ours == "valid"):
            found[row["file"]] = (expected, ours)
    new = {f: v for f, v in found.items() if f not in reviewed}
    assert not new, f"unreviewed disagreements with MANIFEST.tsv: {new}"
    changed = {f: (r["expected"], r["ours"]) for f, r in reviewed.items()
               if f in found and found[f] != (r["expected"], r["ours"])}
    assert not changed, f"verdicts changed for reviewed files: {changed}"
    stale = sorted(set(reviewed) - set(found))
    assert not stale, f"these files now agree with MANIFEST.tsv; drop them from {DISAGREEMENTS.name}: {stale}"
    assert all(r["reason"].strip() for r in reviewed.values())


def test_fields_read_like_python_hl7(corpus):
    """python-hl7 is the reference reader: every field of every parseable message reads the same."""
    compared = 0
    for row in _manifest(corpus):
        for chunk in split_messages((corpus / row["file"]).read_bytes()).messages:
            message = Message.from_bytes(chunk.data)
            if (message.decode_problems or "\n" in message.text or len(message.delimiters.encoding_characters) < 4
                    or not all(re.fullmatch("[A-Z][A-Z0-9]{2}", name) for name in message.segment_names())):
                continue  # fuzzer-made inputs: python-hl7 is no reference for those
            try:
                reference = hl7.parse(message.text.rstrip("\r"))
            except Exception:
                continue
            ours = message.segments
            assert len(ours) == len(reference), row["file"]
            for position, segment in enumerate(reference):
                # python-hl7 trims blanks before each delimiter and at the end; we keep them
                trim = re.compile("\\s+(?=[" + re.escape(message.delimiters.encoding_characters) + "]|$)")
                fields = [trim.sub("", f) for f in message.fields(position)]
                assert [trim.sub("", str(f)) for f in segment] == fields, (row["file"], position)
            compared += 1
    assert compared > 150


def test_unmodified_corpus_messages_round_trip_exactly(corpus):
    for row in _manifest(corpus):
        for chunk in split_messages((corpus / row["file"]).read_bytes()).messages:
            assert Message.from_bytes(chunk.data).to_bytes() == chunk.data
