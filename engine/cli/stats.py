"""``hl7relay stats``: the performance analyzer, from the running engine's memory."""

from __future__ import annotations

import json
import time

from hl7relay.cli._args import number_in
from hl7relay.cli._settings import add_settings_arguments

HELP = "the last hour of the running engine: rates, ACK and stage latencies, destinations, queues, slowest messages"
DESCRIPTION = """\
  hl7relay stats [--minutes 60] [--channel NAME] [--format text|json]

Per channel: messages and messages per minute, errors, ACK latency percentiles (p50/p95/p99/max)
and where the time went (pipeline: filters, transformers, validators; store: the commit).
Per destination, slowest round trip first: deliveries, failures, retries, round-trip percentiles,
queue depth now and at most, the age of its oldest message. The store: commits, commit time,
messages per batch. The ten slowest messages with their stages. Kept in the engine's memory
since it started (at most an hour); nothing is read from the store."""


_minutes = number_in(1, 60, "minutes", whole=True, why="the analyzer keeps 1 to 60 minutes")


def add_arguments(parser) -> None:
    parser.add_argument("--minutes", type=_minutes, default=60, help="1 to 60 (default 60)")
    parser.add_argument("--channel", help="only this channel")
    parser.add_argument("--format", choices=("text", "json"), default="text")
    add_settings_arguments(parser, channels=False)


def _ms(value) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if value < 100 else f"{value:.0f}"


def _latency(p: dict) -> str:
    return f"p50 {_ms(p['p50'])} / p95 {_ms(p['p95'])} / p99 {_ms(p['p99'])} / max {_ms(p['max'])} ms"


def run(args) -> int:
    import urllib.parse

    from hl7relay.cli._api import call_engine, engine_settings, print_error

    query = {"minutes": args.minutes, **({"channel": args.channel} if args.channel else {})}
    status, view = call_engine(engine_settings(args), "GET", "/api/v1/stats?" + urllib.parse.urlencode(query))
    if status != 200:
        return print_error(status, view)
    if args.format == "json":
        print(json.dumps(view, indent=2))
        return 0
    print(f"the last {view['minutes']} minute(s), until {time.strftime('%H:%M:%S', time.localtime(view['until']))}")
    if not view["channels"] and not view["destinations"]:
        print("  no traffic yet")
    for name, c in view["channels"].items():
        print(f"{name}: {c['messages']} message(s), {c['per_minute']:g}/min, {c['errors']} error(s); ACK {_latency(c['ack_ms'])}")
        for stage, p in sorted(c["stages_ms"].items()):
            print(f"  {stage:9} {_latency(p)}")
    for d in view["destinations"]:
        queue = d["queue"]
        now = f"{queue['depth']} queued now" if "depth" in queue else "queue not reported yet"
        print(f"-> {d['channel']}/{d['destination']}: {d['sent']} sent ({d['per_minute']:g}/min), {d['failed']} failed, "
              f"{d['retried']} retried; round trip {_latency(d['round_trip_ms'])}; {now}, at most {queue['depth_max']}, "
              f"oldest waited up to {queue['oldest_age_max']:.0f}s")
    store = view["store"]
    if store["commits"]:
        print(f"store: {store['commits']} commit(s), {store['batch_average']:g} per batch; commit {_latency(store['commit_ms'])}")
    if view["slowest"]:
        print("slowest messages:")
        for row in view["slowest"]:
            stages = ", ".join(f"{k} {_ms(v)}" for k, v in row["stages_ms"].items())
            print(f"  {_ms(row['ack_ms'])} ms  #{row['message_id'] or '-'}  {row['channel']}  {row['message_type']} "
                  f"{row['control_id']}  {row['status']}" + (f"  ({stages})" if stages else ""))
    return 0
