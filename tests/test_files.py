"""The file source through the file ledger: every message of a file stored once, in order, with
its place; unreadable messages stored as ERROR; re-reads after a failure skip what is stored; a
name used again never overwrites; the same content twice is not imported; upload completion."""

from __future__ import annotations

import textwrap

import pytest
from twisted.internet import defer, task

from hl7relay.channels import load_channel
from hl7relay.channels.files import archive
from hl7relay.hl7.message import Message
from hl7relay.runtime import Engine
from hl7relay.store.database import Store, StoreError
from hl7relay.store.writer import StoreWriter

ADT = ("MSH|^~\\&|PMS|CLINIC|HL7RELAY|LAB|20240105093512||ADT^A04^ADT_A01|{id}|P|2.5.1\r"
       "EVN|A04|20240105093512\rPID|1||{id}^^^CLINIC^MR||DOE^JANE\rPV1|1|O\r")


def batch(*ids, broken: int | None = None) -> bytes:
    """A batch file of ADT messages; ``broken``: that one (by position) has no readable header."""
    body = []
    for n, control_id in enumerate(ids):
        text = ADT.format(id=control_id)
        if n == broken:
            text = text.replace("MSH|^~\\&|", "MSH\r", 1)  # no field separator: not a message
        body.append(text)
    return (f"FHS|^~\\&|PMS|CLINIC\rBHS|^~\\&|PMS|CLINIC\r{''.join(body)}BTS|{len(ids)}\rFTS|1\r").encode()


class FileEngine:
    def __init__(self, tmp_path, source: str = "", body: str = "", store: Store | None = None, directory=None):
        tmp_path.mkdir(parents=True, exist_ok=True)
        self.inbox = directory or tmp_path / "inbox"
        path = tmp_path / "files.yaml"
        path.write_text(f"name: files\nsource: {{type: file, directory: '{self.inbox}', poll_interval: 2, settle: 1"
                        f"{', ' + source if source else ''}}}\n" + textwrap.dedent(body))
        channel, errors = load_channel(path, {})
        assert not errors, errors
        self.store = store or Store(f"sqlite:///{tmp_path / 's.db'}")
        self.store.migrate()
        self.clock = task.Clock()
        self.clock.advance(1_700_000_000.0)  # 2023-11-14 22:13:20 UTC: schedules and ledger times alike
        self.engine = Engine([channel], StoreWriter(self.store, executor=lambda fn, *a: defer.maybeDeferred(fn, *a)),
                             reactor=self.clock, clock=self.clock.seconds)
        self.engine.start()

    @property
    def now(self) -> float:
        return self.clock.seconds()

    def drop(self, name: str, data: bytes):
        (self.inbox / name).write_bytes(data)

    def looks(self, n: int = 2):
        for _ in range(n):
            self.clock.advance(2)

    def stored(self) -> list[tuple[str, str]]:
        return [(m["control_id"], m["status"]) for m in reversed(self.store.latest(10_000))]


def test_a_batch_is_stored_in_order_with_its_ledger_row_and_each_messages_place(tmp_path):
    files = FileEngine(tmp_path)
    files.drop("adt.hl7", batch("A1", "A2", "A3"))
    files.looks()
    assert files.stored() == [("A1", "PROCESSED"), ("A2", "PROCESSED"), ("A3", "PROCESSED")]
    [row] = files.store.files()
    assert (row["name"], row["state"], row["messages"], row["committed"], row["errors"]) == ("adt.hl7", "done", 3, 3, 0)
    assert row["archived_as"] == str(files.inbox / "processed" / "adt.hl7") and not (files.inbox / "adt.hl7").exists()
    places = files.store.file_message_rows(row["id"])
    assert [(p["ordinal"], p["line"], p["control_id"]) for p in places] == [(0, 3, "A1"), (1, 7, "A2"), (2, 11, "A3")]
    assert files.store.file_of_message(places[1]["id"])["name"] == "adt.hl7"
    files.looks(5)
    assert len(files.stored()) == 3  # read once


def test_an_unreadable_message_is_an_error_row_with_its_bytes_file_and_line_and_the_rest_is_stored(tmp_path):
    files = FileEngine(tmp_path)
    data = batch("B1", "B2", "B3", broken=1)
    files.drop("adt.hl7", data)
    files.looks()
    stored = files.store.latest(10)
    assert [m["status"] for m in reversed(stored)] == ["PROCESSED", "ERROR", "PROCESSED"]
    error = files.store.get_message(stored[1]["id"])
    assert error["raw"] == ADT.format(id="B2").replace("MSH|^~\\&|", "MSH\r", 1).encode()
    assert error["error"].startswith("adt.hl7 line 7: ") and error["peer"] == "file:adt.hl7"
    [row] = files.store.files()
    assert (row["state"], row["committed"], row["errors"]) == ("errors", 3, 1)
    # a file with a problem goes to the error folder, never deleted, whatever `after` says
    assert (files.inbox / "error" / "adt.hl7").read_bytes() == data


def test_a_failed_store_leaves_the_file_and_the_next_look_stores_only_the_rest(tmp_path):
    files = FileEngine(tmp_path)
    commit, calls = files.store.commit, []

    def fails_after_two(records, updates):
        if any(r.source_file for r in records):
            calls.append(1)
            if len(calls) > 2:
                raise StoreError("disk full")
        return commit(records, updates)

    files.store.commit = fails_after_two
    files.drop("adt.hl7", batch("C1", "C2", "C3", "C4"))
    files.looks()
    assert files.stored() == [("C1", "PROCESSED"), ("C2", "PROCESSED")]
    assert (files.inbox / "adt.hl7").exists() and files.store.files()[0]["state"] == "reading"
    files.store.commit = commit  # the disk has room again
    files.looks()
    assert files.stored() == [("C1", "PROCESSED"), ("C2", "PROCESSED"), ("C3", "PROCESSED"), ("C4", "PROCESSED")]
    [row] = files.store.files()
    assert (row["state"], row["messages"], row["committed"]) == ("done", 4, 4)


def test_a_restart_resumes_a_file_after_what_is_stored_even_without_duplicates(tmp_path):
    first = FileEngine(tmp_path)
    first.drop("adt.hl7", batch("D1", "D2", "D3"))
    commit = first.store.commit
    first.store.commit = lambda records, updates: (commit(records, updates) if not any(
        r.control_id == "D2" for r in records) else (_ for _ in ()).throw(StoreError("a fault of that message's")))
    first.looks()
    # D3 could be stored but is not: a file's messages are stored in its order or not at all
    assert first.stored() == [("D1", "PROCESSED")] and first.store.files()[0]["committed"] == 1
    first.engine.stop()
    again = FileEngine(tmp_path, store=Store(first.store.url))
    again.looks()
    assert again.stored() == [("D1", "PROCESSED"), ("D2", "PROCESSED"), ("D3", "PROCESSED")]


def test_a_name_used_again_with_new_content_is_a_new_file_archived_beside_the_first(tmp_path):
    files = FileEngine(tmp_path, "glob: '*.txt'")
    files.drop("ADT.txt", batch("N1"))
    files.looks()
    files.drop("ADT.txt", batch("N2"))  # the next night's export, same name
    files.looks()
    assert files.stored() == [("N1", "PROCESSED"), ("N2", "PROCESSED")]
    processed = files.inbox / "processed"
    assert sorted(p.name for p in processed.iterdir()) == ["ADT.1.txt", "ADT.txt"]
    assert b"|N1^" in (processed / "ADT.txt").read_bytes() and b"|N2^" in (processed / "ADT.1.txt").read_bytes()
    assert [r["state"] for r in files.store.files()] == ["done", "done"]


def test_the_same_content_again_is_a_duplicate_said_and_not_imported(tmp_path):
    files = FileEngine(tmp_path)
    files.drop("monday.hl7", batch("S1", "S2"))
    files.looks()
    files.drop("resent.hl7", batch("S1", "S2"))
    files.looks()
    assert files.stored() == [("S1", "PROCESSED"), ("S2", "PROCESSED")]
    newest, first = files.store.files()
    assert (newest["name"], newest["state"], newest["duplicate_of"]) == ("resent.hl7", "duplicate", first["id"])
    assert "read before: not imported" in newest["problems"]
    assert (files.inbox / "error" / "resent.hl7").exists()


def test_archive_names_take_the_time_and_never_overwrite(tmp_path):
    files = FileEngine(tmp_path, "glob: '*.txt', archive_name: '{stem}-{date}{suffix}'")
    files.drop("ADT.txt", batch("T1"))
    files.looks()
    files.drop("ADT.txt", batch("T2"))
    files.looks()
    assert sorted(p.name for p in (files.inbox / "processed").iterdir()) == ["ADT-20231114.1.txt", "ADT-20231114.txt"]


def test_archive_across_file_systems_copies_to_a_claimed_name(tmp_path, monkeypatch):
    import errno
    import os

    def no_links(source, target):
        raise OSError(errno.EXDEV, "cross-device link")

    monkeypatch.setattr(os, "link", no_links)
    (tmp_path / "a").write_bytes(b"one")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a").write_bytes(b"earlier")
    target = archive(tmp_path / "a", tmp_path / "out", "a")
    assert target.name == "a.1" and target.read_bytes() == b"one" and (tmp_path / "out" / "a").read_bytes() == b"earlier"
    assert not (tmp_path / "a").exists()


def test_complete_rename_reads_at_once_and_marker_waits_for_its_marker(tmp_path):
    renamed = FileEngine(tmp_path / "r", "complete: rename, glob: '*.hl7'")
    renamed.drop("upload.hl7.part", batch("R1"))  # still uploading: the glob does not match it
    renamed.looks(1)
    assert renamed.stored() == []
    (renamed.inbox / "upload.hl7.part").rename(renamed.inbox / "upload.hl7")
    renamed.looks(1)
    assert renamed.stored() == [("R1", "PROCESSED")]

    marked = FileEngine(tmp_path / "m", "complete: marker, glob: '*'")
    marked.drop("export.hl7", batch("M1"))
    marked.looks(3)
    assert marked.stored() == []
    marked.drop("export.hl7.done", b"")
    marked.looks(1)
    assert marked.stored() == [("M1", "PROCESSED")] and not (marked.inbox / "export.hl7.done").exists()


def test_after_keep_leaves_the_file_and_never_reads_it_again_even_after_a_restart(tmp_path):
    files = FileEngine(tmp_path, "after: keep")
    files.drop("adt.hl7", batch("K1"))
    files.looks(4)
    assert files.stored() == [("K1", "PROCESSED")] and (files.inbox / "adt.hl7").exists()
    files.engine.stop()
    again = FileEngine(tmp_path, "after: keep", store=Store(files.store.url))
    again.looks(4)
    assert again.stored() == [("K1", "PROCESSED")] and [r["state"] for r in again.store.files()] == ["done"]


def test_a_message_past_max_message_bytes_is_stored_cut_as_error_and_the_next_one_whole(tmp_path):
    files = FileEngine(tmp_path, "max_message_bytes: 1024")
    huge = ADT.format(id="H1") + "OBX|1|TX|NOTE||" + "x" * 5000 + "\r"
    files.drop("big.hl7", (huge + ADT.format(id="H2")).encode())
    files.looks()
    first, second = reversed(files.store.latest(10))
    assert first["status"] == "ERROR" and second["control_id"] == "H2" and second["status"] == "PROCESSED"
    stored = files.store.get_message(first["id"])
    assert len(stored["raw"]) == 1024 and "more than max_message_bytes (1024)" in stored["error"]


def test_segments_outside_any_message_are_kept_as_the_files_problems(tmp_path):
    files = FileEngine(tmp_path)
    files.drop("adt.hl7", b"PID|1||LOST\r" + ADT.format(id="O1").encode())
    files.looks()
    assert files.stored() == [("O1", "PROCESSED")]
    [row] = files.store.files()
    assert row["state"] == "errors" and "segment 'PID' is outside any message" in row["problems"]
    assert (files.inbox / "error" / "adt.hl7").exists()


@pytest.mark.parametrize("source, expected", [
    ("complete: whenever", "complete must be one of settle, rename, marker"),
    ("archive_name: '{nme}'", "archive_name: '{nme}' is not a name pattern"),
    ("archive_name: 'a/{name}'", "archive_name: 'a/{name}' is not a name pattern"),
    ("after: shred", "after must be one of move, delete, keep"),
])
def test_wrong_file_source_options_are_lint_errors(tmp_path, source, expected):
    path = tmp_path / "files.yaml"
    path.write_text(f"name: files\nsource: {{type: file, directory: in, {source}}}\n")
    _channel, errors = load_channel(path, {})
    assert errors and expected in str(errors[0]), errors


def test_the_message_of_a_file_keeps_the_original_parse(tmp_path):
    """What the file source stores is the file's bytes, as an MLLP source would store a frame."""
    files = FileEngine(tmp_path)
    text = ADT.format(id="P1")
    files.drop("one.hl7", text.encode())
    files.looks()
    stored = files.store.get_message(files.store.latest(1)[0]["id"])
    assert stored["raw"] == text.encode() and Message.from_bytes(stored["raw"]).control_id == "P1"


def test_prune_takes_a_finished_files_ledger_row_with_its_messages_and_keeps_one_being_read(tmp_path):
    files = FileEngine(tmp_path)
    files.drop("old.hl7", batch("P1", "P2"))
    files.looks()
    from hl7relay.store.database import FileSeenUpdate

    files.store.commit([], [FileSeenUpdate("files", "file:///elsewhere", "half.hl7", 1, 1.0, "b" * 64, files.now - 10)])
    assert files.store.prune(older_than=files.now + 1) == 2
    assert [r["name"] for r in files.store.files()] == ["half.hl7"]  # still being read: kept, whatever its age


def test_hl7relay_files_lists_the_ledger_and_a_files_messages(tmp_path, capsys):
    import json

    from hl7relay.cli import main

    files = FileEngine(tmp_path)
    files.drop("a.hl7", batch("L1", "L2"))
    files.looks()
    files.drop("b.hl7", batch("L3", "L4", broken=1))
    files.looks()
    url = ["--store", files.store.url]
    code = main(["files", "--since", "2023-11-01", *url])
    out = capsys.readouterr().out.splitlines()
    assert code == 1  # a file with errors: for monitoring
    assert out[0].startswith("file 2      files            b.hl7") and "errors" in out[0] and "2/2 stored, 1 ERROR" in out[0]
    assert "a.hl7" in out[1] and "done" in out[1] and out[1].endswith(str(files.inbox / "processed" / "a.hl7"))
    assert out[-1].endswith(": 0 reading, 1 done, 1 errors, 0 duplicate")
    assert main(["files", "--since", "2023-11-01", "--state", "done", *url]) == 0
    capsys.readouterr()
    assert main(["files", "--file", "2", *url]) == 0
    detail = capsys.readouterr().out.splitlines()
    assert detail[1].startswith("  #0      line 3       message 3") and "PROCESSED" in detail[1] and "L3" in detail[1]
    assert "ERROR" in detail[2] and "b.hl7 line 7:" in detail[2]
    assert main(["files", "--file", "2", "--format", "json", *url]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [m["status"] for m in data["messages"]] == ["PROCESSED", "ERROR"] and data["file"]["state"] == "errors"
    assert main(["files", "--file", "99", *url]) == 2
    assert "no file 99 in the ledger" in capsys.readouterr().err


# -- kill -9 of a real engine in the middle of a file ----------------------------------------------
@pytest.mark.parametrize("duplicates", [False, True], ids=["plain", "with-duplicates"])
def test_kill_9_mid_file_then_restart_stores_every_message_once_in_file_order(tmp_path, duplicates):
    import os
    import signal
    import sqlite3
    import subprocess
    import sys
    import time

    count = 6000
    inbox, channels, data = tmp_path / "inbox", tmp_path / "channels", tmp_path / "data"
    inbox.mkdir()
    channels.mkdir()
    (channels / "files.yaml").write_text(
        f"name: files\nsource: {{type: file, directory: '{inbox}', glob: '*.hl7', complete: rename, poll_interval: 0.2}}\n"
        + ("duplicates: {window: 86400}\n" if duplicates else ""))
    ids = [f"F{n:05d}" for n in range(count)]
    (inbox / "night.part").write_bytes(batch(*ids))
    (inbox / "night.part").rename(inbox / "night.hl7")
    db = data / "hl7relay.db"

    def stored():
        if not db.exists():
            return []
        try:
            with sqlite3.connect(db, timeout=30) as connection:
                return [row[0] for row in connection.execute("SELECT control_id FROM messages ORDER BY id")]
        except sqlite3.OperationalError:  # the engine is still making its store
            return []

    def start(log):
        return subprocess.Popen([sys.executable, "-m", "hl7relay", "run", "--channels", str(channels), "--data-dir",
                                 str(data), "--admin-port", "0", "--console-port", "0"], cwd=tmp_path,
                                stdout=open(tmp_path / log, "w"), stderr=subprocess.STDOUT,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))

    def wait(predicate, what, timeout=120):
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.05)

    engine = start("engine1.log")
    try:
        wait(lambda: len(stored()) >= 500, "500 messages stored")
        engine.send_signal(signal.SIGKILL)  # mid-file: no shutdown, no flush
        engine.wait(timeout=30)
        at_kill = stored()
        assert 500 <= len(at_kill) < count, len(at_kill)
        assert at_kill == ids[:len(at_kill)]  # what was committed is the file's first messages, in order
        engine = start("engine2.log")
        wait(lambda: not (inbox / "night.hl7").exists(), "the file to be finished and archived")
        assert stored() == ids  # every message once, in file order: nothing lost, nothing twice
        with sqlite3.connect(db) as connection:
            [(state, messages, committed)] = connection.execute("SELECT state, messages, committed FROM file_ledger")
        assert (state, messages, committed) == ("done", count, count)
    finally:
        engine.send_signal(signal.SIGTERM)
        assert engine.wait(timeout=60) == 0


def test_a_200_mb_batch_is_imported_in_bounded_memory(tmp_path):
    """The file is split as a stream and stored a window of messages at a time: the engine's peak
    RSS stays far below the file's size (measured from /proc while the engine runs)."""
    import os
    import signal
    import sqlite3
    import subprocess
    import sys
    import time

    inbox, channels, data = tmp_path / "inbox", tmp_path / "channels", tmp_path / "data"
    inbox.mkdir()
    channels.mkdir()
    (channels / "files.yaml").write_text(
        f"name: files\nsource: {{type: file, directory: '{inbox}', glob: '*.hl7', complete: rename, poll_interval: 0.2}}\n")
    note = "OBX|1|TX|NOTE^Note^L||" + "x" * 9_900 + "||||||F\r"
    count = 20_000
    with open(inbox / "big.part", "wb") as out:
        for n in range(count):
            out.write((ADT.format(id=f"B{n:05d}") + note).encode())
    size = (inbox / "big.part").stat().st_size
    assert size > 200_000_000
    engine = subprocess.Popen([sys.executable, "-m", "hl7relay", "run", "--channels", str(channels), "--data-dir",
                               str(data), "--admin-port", "0", "--console-port", "0"], cwd=tmp_path,
                              stdout=open(tmp_path / "engine.log", "w"), stderr=subprocess.STDOUT,
                              env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        deadline = time.monotonic() + 60
        while "ready" not in (tmp_path / "engine.log").read_text():
            assert time.monotonic() < deadline and engine.poll() is None, (tmp_path / "engine.log").read_text()
            time.sleep(0.05)
        (inbox / "big.part").rename(inbox / "big.hl7")
        deadline = time.monotonic() + 600
        while (inbox / "big.hl7").exists():
            assert time.monotonic() < deadline and engine.poll() is None, "the import did not finish"
            time.sleep(0.2)
        status = dict(line.split(":", 1) for line in open(f"/proc/{engine.pid}/status").read().splitlines())
        peak_mb = int(status["VmHWM"].split()[0]) / 1024
        with sqlite3.connect(data / "hl7relay.db") as connection:
            [(stored,)] = connection.execute("SELECT count(*) FROM messages")
        print(f"{size / 1e6:.0f} MB batch: {stored} messages stored, engine peak RSS {peak_mb:.0f} MB")
        assert stored == count and peak_mb < 200  # the file alone is 200 MB
    finally:
        engine.send_signal(signal.SIGTERM)
        assert engine.wait(timeout=60) == 0


def test_the_readme_file_section_works_as_written(tmp_path, capsys):
    """The README's channel lints; its source, run, archives as the README says and `hl7relay files`
    prints lines of the README's shape."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    from hl7relay.cli import main

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### Batch files: the file source and its ledger")[1].split("\n### ")[0]
    text = section.split("```yaml\n")[1].split("```", 1)[0]
    export = tmp_path / "pms-export"
    text = text.replace("/srv/pms-export", str(export))
    (tmp_path / "channels").mkdir()
    (tmp_path / "channels" / "nightly-adt.yaml").write_text(text)
    done = subprocess.run([sys.executable, "-m", "hl7relay", "lint", "channels"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "1 channel OK: nightly-adt", done.stdout + done.stderr
    source = yaml.safe_load(text)["source"]
    options = ", ".join(f"{k}: '{v}'" for k, v in source.items() if k not in ("type", "directory"))
    files = FileEngine(tmp_path / "run", options, directory=export)
    inbox = files.inbox
    (inbox / "ADT.txt.part").write_bytes(batch("R1", "R2"))
    files.looks(1)
    assert files.stored() == []  # still named .part
    (inbox / "ADT.txt.part").rename(inbox / "ADT.txt")
    files.looks(1)
    assert files.stored() == [("R1", "PROCESSED"), ("R2", "PROCESSED")]
    [archived] = list((export / "done").iterdir())
    assert re.fullmatch(r"ADT-\d{8}-\d{6}\.txt", archived.name)
    assert main(["files", "--since", "2023-11-01", "--store", files.store.url]) == 0
    out = capsys.readouterr().out.splitlines()
    shown = [line for line in section.splitlines() if re.match(r"file \d+ ", line)]
    assert re.sub(r"\S+", "W", out[0].split("first seen")[0]).split() == \
        re.sub(r"\S+", "W", shown[1].split("first seen")[0]).split()
    assert re.sub(r"\d+", "N", out[-1].split(" since ")[1].split(": ", 1)[1]) == \
        re.sub(r"\d+", "N", [line for line in section.splitlines() if " files since " in line][0].split(": ", 1)[1])


# -- schedules and files that are due -------------------------------------------------------------
def test_a_cron_schedule_looks_at_its_times_and_again_while_a_file_settles(tmp_path):
    import datetime

    files = FileEngine(tmp_path, "schedule: {cron: '5 2 * * *', timezone: UTC}")
    files.drop("adt.hl7", batch("C1"))
    files.clock.advance(3600)  # 23:13: nothing looks before 02:05
    assert files.stored() == []
    [view] = files.engine.source_views().values()
    assert view["schedule"] == "at '5 2 * * *' (UTC)"
    assert datetime.datetime.fromtimestamp(view["next_look"], datetime.timezone.utc).strftime("%H:%M") == "02:05"
    files.clock.advance(view["next_look"] - files.now)  # 02:05: the file is seen...
    assert files.stored() == []
    files.clock.advance(2)  # ...and, unchanged a poll_interval later, read
    assert files.stored() == [("C1", "PROCESSED")]
    [view] = files.engine.source_views().values()
    assert datetime.datetime.fromtimestamp(view["next_look"], datetime.timezone.utc).strftime("%d %H:%M") == "16 02:05"


def test_every_says_how_often_it_looks(tmp_path):
    files = FileEngine(tmp_path, "schedule: {every: 300}")
    files.drop("adt.hl7", batch("E1"))
    files.clock.advance(299)
    assert files.stored() == []
    files.clock.advance(1)  # seen at 300 s...
    files.clock.advance(2)  # ...settling: looked at again after poll_interval
    assert files.stored() == [("E1", "PROCESSED")]


def test_a_file_due_that_has_not_come_is_missing_until_one_comes(tmp_path):
    files = FileEngine(tmp_path, "glob: '*', expect: {cron: '0 3 * * *', within: 3600}")
    [view] = files.engine.source_views().values()
    assert view["missing_since"] is None and view["expect"] == "a file at '0 3 * * *' (UTC) within 3600s"
    files.clock.advance(4 * 3600 + 2 * 60)  # 02:15 the next day: its window (02:00-04:00) is open
    assert files.engine.source_views()["files"]["missing_since"] is None
    files.clock.advance(2 * 3600)  # 04:15: none came
    missing = files.engine.source_views()["files"]["missing_since"]
    assert missing is not None and files.now - missing == 3600 + 15 * 60 + 20  # due 03:00, now 04:15:20
    files.drop("late.hl7", batch("X1"))  # a late file answers it
    files.looks()
    assert files.stored() == [("X1", "PROCESSED")] and files.engine.source_views()["files"]["missing_since"] is None


@pytest.mark.parametrize("source, expected", [
    ("schedule: {every: 60, cron: '* * * * *'}", "schedule: give either every (seconds) or cron"),
    ("schedule: {cron: 'nightly'}", "cron: 'nightly' is not a cron expression"),
    ("schedule: {cron: '5 2 * * *', timezone: Mars/Olympus}", "timezone: 'Mars/Olympus' is not a time zone"),
    ("expect: {within: 60}", "cron"),
    ("poll_interval: 0", "poll_interval: a number of seconds above 0"),
])
def test_wrong_schedules_are_lint_errors(tmp_path, source, expected):
    path = tmp_path / "files.yaml"
    path.write_text(f"name: files\nsource: {{type: file, directory: in, {source}}}\n")
    _channel, errors = load_channel(path, {})
    assert errors and expected in str(errors[0]), errors


def test_a_duplicate_imported_anyway_by_an_operator_is_read_again_and_audited(tmp_path, capsys):
    from hl7relay.cli import main

    files = FileEngine(tmp_path)
    files.drop("monday.hl7", batch("R1", "R2"))
    files.looks()
    files.drop("again.hl7", batch("R1", "R2"))  # the PMS sent it again, on purpose this time
    files.looks()
    duplicate = files.store.files()[0]
    assert duplicate["state"] == "duplicate" and (files.inbox / "error" / "again.hl7").exists()
    arguments = ["files", "--reimport", str(duplicate["id"]), "--store", files.store.url, "--channels",
                 str(tmp_path / "files.yaml")]
    assert main(arguments) == 2 and "--reimport needs --reason" in capsys.readouterr().err
    assert main([*arguments, "--reason", "PMS resent after their restore (ticket 88)"]) == 0
    assert capsys.readouterr().out.startswith(f"again.hl7 is back in {files.inbox}")
    assert (files.inbox / "again.hl7").exists() and files.store.file(duplicate["id"])["state"] == "reimport"
    files.looks()
    assert files.stored() == [("R1", "PROCESSED"), ("R2", "PROCESSED"), ("R1", "PROCESSED"), ("R2", "PROCESSED")]
    assert files.store.file(duplicate["id"])["state"] == "done"
    [entry] = files.store.audit_entries(action="file.reimport")
    assert entry["target"] == f"file {duplicate['id']}" and "ticket 88" in entry["reason"]
    assert main([*arguments, "--reason", "again"]) == 1  # done now: only a duplicate is imported again
    assert "only a duplicate is imported again" in capsys.readouterr().err
