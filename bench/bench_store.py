"""The store's commit path alone, per backend: client CPU and wall time per message.

    python bench/bench_store.py [--messages 20000] [--batch 32] [--postgres URL]

What the engine's writer thread does for each message, in batches as its group commit makes them:
one message row with two stages (transformed, ack) and one QUEUED delivery; then, in a later
batch, the delivery's result (SENT) and the message's ACK code. Reported per message: the CPU
this process spent (user + system: the client's cost; the database server's own CPU is not in
it) and the wall time. SQLite in a temporary folder; PostgreSQL on --postgres (default: the
test database on 127.0.0.1), in a schema of its own that is dropped afterwards.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hl7relay.store.database import DeliveryRecord, DeliveryUpdate, MessageRecord, MessageUpdate, Store  # noqa: E402

RAW = (Path(__file__).resolve().parent.parent / "samples" / "adt_a01.hl7").read_bytes()


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run(store: Store, messages: int, batch: int) -> dict:
    store.migrate()
    ids: list[int] = []
    started_cpu, started = cpu(), time.perf_counter()
    for start in range(0, messages, batch):
        records = []
        for i in range(start, min(messages, start + batch)):
            record = MessageRecord("adt", RAW, "PROCESSED", 1_700_000_000.0 + i, "10.0.0.1:5000", "UTF-8",
                                   sending_application="PMS", sending_facility="CLINIC", message_type="ADT^A01",
                                   control_id=f"B{i:08d}", patient_id=f"P{i % 5000:06d}", ack_code="AA")
            record.stages["transformed"] = RAW.replace(b"|LAB|", b"|LAB2|")
            record.stages["ack"] = b"MSH|^~\\&|HL7RELAY|LAB|PMS|CLINIC|20240105||ACK^A01^ACK|X|P|2.5.1\rMSA|AA|M"
            record.deliveries.append(DeliveryRecord("lab", "QUEUED", None, None))
            records.append(record)
        # the results of the previous batch's deliveries ride in this one, as the writer batches them
        updates = [DeliveryUpdate(message_id, "lab", {"status": "SENT", "attempts": 1, "last_ack": "MSA|AA",
                                                      "updated_at": 1_700_000_100.0}) for message_id in ids[-batch:]]
        updates += [MessageUpdate(message_id, {"ack_code": "AA"}) for message_id in ids[-batch:][:1]]
        ids += store.commit(records, updates)
    elapsed, spent = time.perf_counter() - started, cpu() - started_cpu
    return {"messages": messages, "cpu_us": spent / messages * 1e6, "wall_us": elapsed / messages * 1e6,
            "msgs_per_s": messages / elapsed}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--postgres", default=os.environ.get("HL7RELAY_TEST_POSTGRES_URL",
                                                            "postgresql+psycopg://postgres@127.0.0.1:5432/test"))
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        results["sqlite"] = run(Store(f"sqlite:///{folder}/bench.db"), args.messages, args.batch)
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    try:
        import sqlalchemy as sa

        admin = sa.create_engine(args.postgres)
        with admin.begin() as connection:
            connection.exec_driver_sql(f"CREATE SCHEMA {schema}")
        url = args.postgres + ("&" if "?" in args.postgres else "?") + f"options=-csearch_path%3D{schema}"
        try:
            results["postgresql"] = run(Store(url), args.messages, args.batch)
        finally:
            with admin.begin() as connection:
                connection.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
    except Exception as exc:  # noqa: BLE001 - no server: the SQLite row alone
        print(f"postgresql: not measured ({type(exc).__name__}: {str(exc).splitlines()[0]})", file=sys.stderr)
    print(f"{args.messages} messages in batches of {args.batch} (2 stages and 1 delivery each; results a batch later)")
    print(f"{'store':<12} {'client CPU µs/msg':>18} {'wall µs/msg':>12} {'msgs/s':>9}")
    for name, r in results.items():
        print(f"{name:<12} {r['cpu_us']:>18.0f} {r['wall_us']:>12.0f} {r['msgs_per_s']:>9.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
