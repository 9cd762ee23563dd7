"""The benchmarks keep working: bench_pipeline runs the benchmark channel end to end in one process and
checks that every message was stored, ACKed and delivered (its own assertions), so it cannot rot unseen."""

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"


def test_bench_pipeline_stores_acks_and_delivers_every_message():
    result = subprocess.run([sys.executable, str(BENCH / "bench_pipeline.py"), "--rounds", "3", "--repeat", "1"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "validation off:" in result.stdout and "µs CPU per message" in result.stdout


def test_the_durable_baseline_commits_before_it_acks(tmp_path):
    import socket
    import sqlite3

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    database = tmp_path / "durable.db"
    server = subprocess.Popen([sys.executable, str(BENCH / "mllp_durable.py"), str(port), str(database)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "ready"
        messages = [b"MSH|^~\\&|A|B|C|D|20240101||ADT^A01|CTRL%d|P|2.5.1\rPID|1||%d\r" % (i, i) for i in range(3)]
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            client.sendall(b"".join(b"\x0b" + m + b"\x1c\r" for m in messages))  # three in one read: one batch
            answer = b""
            while answer.count(b"\x1c\r") < 3:
                answer += client.recv(65536)
            with sqlite3.connect(database) as db:  # what was ACKed is in the file, readable from outside
                assert [row[0] for row in db.execute("SELECT raw FROM messages ORDER BY id")] == messages
                assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert [a.split(b"MSA|")[1].split(b"\r")[0] for a in answer.split(b"\x1c\r")[:3]] == [
            b"AA|CTRL0", b"AA|CTRL1", b"AA|CTRL2"]
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_bench_store_measures_both_backends():
    import os

    result = subprocess.run([sys.executable, str(BENCH / "bench_store.py"), "--messages", "64", "--batch", "8"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines()[2:]}
    assert float(rows["sqlite"][0]) > 0
    if os.environ.get("CI"):  # .ci/run starts PostgreSQL: its row must be there
        assert float(rows["postgresql"][0]) > 0, result.stderr


def test_bench_engine_states_each_target_of_issue_15_met_or_not():
    sys.path.insert(0, str(BENCH))
    from bench_engine import targets

    def row(msgs, p99, cpu, vs_durable, vs_relay=None, rss=70.0):
        r = {"msgs_per_s": msgs, "p99_ms": p99, "cpu_us_per_msg": cpu, "vs_durable": vs_durable, "rss_peak_mb": rss}
        if vs_relay is not None:
            r["vs_relay"] = vs_relay
        return r

    summary = {"durable_baseline": row(5000, 8.0, 100, 1.0), "relay_baseline": row(6000, 4.0, 120, None, 1.0),
               "engine_validation_off": row(2600, 15.0, 400, 0.52, 0.41),
               "engine_validation_on": row(2000, 17.0, 600, 0.4, 0.3),
               "engine_forwarder": row(2000, 20.0, 500, 0.4, 0.3, rss=151.0),
               "engine_no_destination": row(3000, 10.0, 300, 0.6),
               "engine_postgresql": row(1000, 20.0, 500, 0.2, 0.2)}
    met = {what: ok for what, _, _, ok in targets(summary)}
    assert met["stored+ACKed vs raw durable (inline)"] and met["end to end vs raw relay (inline)"]
    assert met["ACK p99 vs raw durable p99 (inline)"] and not met["ACK p99 vs raw durable p99 (forwarder process)"]
    assert not met["stored+ACKed vs raw durable (forwarder process)"]
    assert not met["stored+ACKed, no destination, vs raw durable"]  # 60% < 65%
    assert not met["validation on: extra CPU per message"]  # +200 µs
    assert met["PostgreSQL store: msgs/s"]
    assert not met["RSS of all engine processes (peak)"]  # 151 MB
    assert "a trace open: throughput lost (issue #16)" not in met  # no tracing row: no target line

    def traced(*pairs):  # (validation off, tracing) msgs/s, round by round
        rounds = [{key: r for key, r in summary.items()} | {"engine_validation_off": row(off, 15.0, 400, 0.5, 0.4),
                                                              "engine_tracing": row(on, 15.0, 410, 0.5, 0.4)}
                  for off, on in pairs]
        return {what: ok for what, _, _, ok in targets(summarize(rounds))}["a trace open: throughput lost (issue #16)"]

    from bench_engine import summarize

    assert traced((2600, 2500), (2000, 1960), (3000, 2900))  # 3.8%, 2%, 3.3%
    assert not traced((2600, 2400), (2000, 1960), (3000, 2800))  # 7.7%, 2%, 6.7%
    # the ratio of the medians says 0% here (2,600 and 2,600); round by round, 10% is lost twice
    assert not traced((2000, 2600), (2600, 2340), (3000, 2700))


def _explain_searches():
    import importlib.util

    spec = importlib.util.spec_from_file_location("explain_searches", BENCH / "explain_searches.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_search_of_the_console_and_cli_is_answered_by_an_index(tmp_path):
    # the 10M-row run is by hand (README); here the same calls on a small store, SQLite (whose
    # planner does not change its mind with the row count the way PostgreSQL's does)
    from hl7relay.store.database import Store

    explain = _explain_searches()
    store = Store(f"sqlite:///{tmp_path / 'plans.db'}")
    store.migrate()
    explain.fill(store, 5000)
    results = explain.explain_calls(store, 5000)
    assert {r["name"] for r in results} == {name for name, _, _ in explain.calls(5000)}
    for r in results:
        assert r["statements"], r["name"]  # each call was seen sending its SQL
        if r["kind"] == "search":
            assert explain._verdict(r) != "FULL SCAN", (r["name"], r["statements"])
    store.close()
    # and the check can fail: a search no index answers, a sort of every match
    assert explain.classify("sqlite", "SELECT id FROM messages WHERE raw = ? LIMIT 5", ["SCAN messages"]) == "FULL SCAN"
    assert explain.classify("sqlite", "SELECT id FROM messages WHERE channel = ? ORDER BY patient_id LIMIT 5", [
        "SEARCH messages USING INDEX ix_messages_channel_time (channel=?)", "USE TEMP B-TREE FOR ORDER BY"]) == "FULL SCAN"
    assert explain.classify("sqlite", "SELECT id FROM messages ORDER BY id DESC LIMIT 5", ["SCAN messages"]) == "ordered"
    assert explain.classify("postgresql", "SELECT id FROM messages WHERE raw = %(raw)s",
                            ["Seq Scan on messages  (cost=0.00..1.00 rows=1 width=8)"]) == "FULL SCAN"
    assert explain.main(["--rows", "5000", "--backend", "sqlite", "--only", "^status"]) == 0


def test_bench_transformers_compares_the_same_edits():
    result = subprocess.run([sys.executable, str(BENCH / "bench_transformers.py"), "--results", "3"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert [line.split()[:2] for line in result.stdout.splitlines()[1:]] == [["map", "3"], ["set", "3"], ["upper", "3"]]


def test_bench_fhir_measures_each_message_with_and_without_the_conversion():
    result = subprocess.run([sys.executable, str(BENCH / "bench_fhir.py")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert [line.split()[0] for line in result.stdout.splitlines()[1:]] == ["ADT_A01", "SIU_S12", "ORU_R01"]


def test_bench_fhir_destination_sends_every_bundle_both_ways():
    result = subprocess.run([sys.executable, str(BENCH / "bench_fhir_destination.py"), "--messages", "40", "--repeat", "1"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr  # (it asserts every Patient cross-referenced)
    assert "fhir / http:" in result.stdout


def test_bench_files_imports_the_batch_beside_the_mllp_path():
    result = subprocess.run([sys.executable, str(BENCH / "bench_files.py"), "--messages", "300", "--mllp-messages", "100",
                             "--connections", "1"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "file, 300 messages" in result.stdout and "file import vs the fastest MLLP row" in result.stdout
