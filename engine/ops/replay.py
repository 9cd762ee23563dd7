"""Replaying stored messages through a channel's current configuration, or the one that processed
them (``as processed``: the configuration snapshot the message records).

A replay is a new message row linked to the original (``replay_of``), with the operator and
reason recorded, and QUEUED deliveries that the running engine's queues pick up. A message that
was already delivered to a chosen destination is only replayed with ``force``.
"""

from __future__ import annotations

import difflib
import re
import time
from dataclasses import dataclass, field

from hl7relay.channels.channel import Channel
from hl7relay.channels.pipeline import Result, process
from hl7relay.cluster import partition_of
from hl7relay.errors import ParseError
from hl7relay.fhir.content import parse_content
from hl7relay.hl7.message import Message
from hl7relay.outcomes import DeliveryStatus, MessageStatus
from hl7relay.store.database import AuditUpdate, DeliveryRecord, DeliveryUpdate, MessageRecord, Store, delivery_content

__all__ = ["ReplayPlan", "SnapshotChannels", "plan_replay", "commit_replay", "diff_messages"]

# what a replay goes to by default: the dead letters. Not a delivery still QUEUED: its queue
# sends it yet, and a replay beside it would deliver the message twice
_NOT_THROUGH = (DeliveryStatus.ERROR.value,)


@dataclass(slots=True)
class ReplayPlan:
    original_id: int
    channel: str
    control_id: str
    skipped: str = ""  # why it will not be replayed
    outputs: dict = field(default_factory=dict)  # destination -> bytes to send
    changes: dict = field(default_factory=dict)  # destination -> diff against what was sent before
    result: str = ""
    error: str = ""
    chosen: list = field(default_factory=list)  # the destinations it was planned for (chosen, or the default)
    delivered: list = field(default_factory=list)  # the destinations that already accepted it (SENT)
    dead: list = field(default_factory=list)  # the destinations where it is a dead letter (ERROR)
    snapshot_id: int | None = None  # the configuration it goes through (as processed: the message's)


def _plain(data: bytes) -> list[str]:
    """The segments of a message, one per line (empty lines dropped, as the message model does)."""
    return [line for line in re.split(r"\r\n|\r|\n", data.decode("utf-8", "replace")) if line]


def diff_messages(before: bytes, after: bytes, render, labels=("sent before", "now")) -> str:
    """Changed segments, before (-) and after (+). The comparison is of the real content; what is
    printed is ``render``'s lines (masked for people not asked to see patient data), so a change
    hidden by the mask still shows which segment changed."""
    raw_before, raw_after = _plain(before), _plain(after)
    shown_before, shown_after = render(before), render(after)
    if len(shown_before) != len(raw_before) or len(shown_after) != len(raw_after):
        shown_before, shown_after = ["(not shown)"] * len(raw_before), ["(not shown)"] * len(raw_after)
    separator = before[3:4].decode("latin-1") if before.startswith(b"MSH") and len(before) > 3 else "|"
    out = [f"--- {labels[0]}", f"+++ {labels[1]}"]
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, raw_before, raw_after, autojunk=False).get_opcodes():
        if tag != "equal":
            out += ["-" + line for line in shown_before[i1:i2]] + ["+" + line for line in shown_after[j1:j2]]
            # which fields changed, by name: where the mask hides the values, this is what tells
            changed = [path for old, new in zip(raw_before[i1:i2], raw_after[j1:j2])
                       for path in _changed_fields(old, new, separator)]
            if changed:
                out.append("  changed: " + ", ".join(changed))
    return "\n".join(out)


def _changed_fields(before: str, after: str, separator: str) -> list[str]:
    """``PID-7``, ``PID-11``... : the fields that differ between two versions of one segment."""
    old, new = before.split(separator), after.split(separator)
    if old[0] != new[0]:
        return []
    name = old[0]
    offset = 1 if name in ("MSH", "FHS", "BHS") else 0  # MSH-1 is the separator itself
    return [f"{name}-{index + offset}" for index in range(1, max(len(old), len(new)))
            if (old[index] if index < len(old) else "") != (new[index] if index < len(new) else "")]


class SnapshotChannels:
    """The channels as each configuration snapshot defined them (replay as processed), loaded once
    per snapshot from its files."""

    def __init__(self, store: Store, paths):
        self.store, self.paths = store, list(paths)
        self._loaded: dict[int, tuple[dict, str]] = {}

    def __call__(self, snapshot_id: int | None) -> tuple[dict[str, Channel], str]:
        """(channel name -> channel, "") or ({}, why they cannot be had)."""
        from hl7relay.snapshots import load_snapshot_channels

        if snapshot_id is None:
            return {}, "it records no configuration snapshot (stored before hl7relay recorded them)"
        if snapshot_id not in self._loaded:
            row = self.store.snapshot(snapshot_id)
            if row is None:
                self._loaded[snapshot_id] = {}, f"its configuration snapshot {snapshot_id} is not stored any more"
            else:
                channels, errors = load_snapshot_channels(row, self.paths)
                for channel in channels:
                    channel.snapshot_id = snapshot_id
                self._loaded[snapshot_id] = (({}, f"snapshot {snapshot_id} does not load now: {errors[0]}") if errors
                                             else ({c.name: c for c in channels}, ""))
        return self._loaded[snapshot_id]


def plan_replay(store: Store, channels: dict[str, Channel], message_id: int, destinations=None, force=False,
                render=_plain, as_processed: SnapshotChannels | None = None) -> ReplayPlan:
    """What replaying ``message_id`` would do. ``render`` turns a message into the lines its diff
    shows (the CLI masks patient data with it unless asked not to). With ``as_processed`` the
    message goes through the configuration that processed it (its snapshot's), to destinations
    the current configuration has (their queues send it)."""
    stored = store.get_message(message_id)
    if stored is None:
        return ReplayPlan(message_id, "", "", skipped=f"no message {message_id}")
    plan = ReplayPlan(message_id, stored["channel"], stored["control_id"])
    channel = channels.get(stored["channel"])
    if channel is None:
        plan.skipped = f"channel {stored['channel']!r} is not configured any more"
        return plan
    if as_processed is not None:
        then, problem = as_processed(stored.get("snapshot_id"))
        if problem or stored["channel"] not in then:
            plan.skipped = f"not as processed: {problem or 'its snapshot has no channel ' + repr(stored['channel'])}"
            return plan
        missing = {d.name for d in then[stored["channel"]].destinations} - {d.name for d in channel.destinations}
        if destinations:
            missing &= set(destinations)
        if missing:
            plan.skipped = (f"not as processed: destination {', '.join(sorted(missing))} is not configured any more "
                            "(nothing would send it)")
            return plan
        channel = then[stored["channel"]]
        plan.snapshot_id = channel.snapshot_id
    if stored["status"] == MessageStatus.DUPLICATE:
        plan.skipped = "a duplicate; replay the original instead"
        return plan
    names = {d.name for d in channel.destinations}
    if not destinations:
        # by default what did not get through: the destinations whose delivery is a dead letter
        # (the others have it, or will), or every destination when none of them
        destinations = {d["destination"] for d in stored["deliveries"] if d["status"] in _NOT_THROUGH} & names
    chosen = set(destinations or names)
    plan.chosen = [d.name for d in channel.destinations if d.name in chosen] + sorted(chosen - names)
    unknown = chosen - names
    if unknown:
        plan.skipped = f"channel {channel.name!r} has no destination {', '.join(sorted(unknown))}"
        return plan
    plan.delivered = sorted({d["destination"] for d in stored["deliveries"] if d["status"] == DeliveryStatus.SENT})
    plan.dead = sorted({d["destination"] for d in stored["deliveries"] if d["status"] == DeliveryStatus.ERROR})
    delivered = set(plan.delivered) & chosen
    if delivered and not force:
        plan.skipped = f"already delivered to {', '.join(sorted(delivered))} (use --force to send again)"
        return plan
    # a copy still QUEUED is on its way: a replay beside it would arrive twice
    waiting = {d["destination"] for d in stored["deliveries"] if d["status"] == DeliveryStatus.QUEUED} & chosen
    if waiting and not force:
        plan.skipped = (f"still queued for {', '.join(sorted(waiting))}: its queue sends it yet "
                        "(use --force to send a copy as well)")
        return plan
    try:
        message = Message.from_bytes(stored["raw"])
    except ParseError as exc:
        plan.skipped = f"the stored message is not readable: {exc}"
        return plan
    processed = process(channel, message)
    plan.result = processed.result.value
    plan.error = processed.error
    if processed.result is not Result.PROCESSED:
        plan.skipped = f"the channel now says {processed.result.value}" + (f": {processed.error}" if processed.error else "")
        return plan
    sent = {d["destination"] for d in stored["deliveries"] if d["status"] != DeliveryStatus.FILTERED}
    for output in processed.outputs:
        if output.name in chosen and output.message is not None:
            data = output.message.to_bytes()
            plan.outputs[output.name] = data
            before = delivery_content(stored["stages"], stored["raw"], output.name) if output.name in sent else None
            if before is not None and before != data:
                plan.changes[output.name] = diff_messages(before, data, render)
    if not plan.outputs:
        plan.skipped = "no chosen destination takes it now (their filters skip it)"
    return plan


def commit_replay(store: Store, channels: dict[str, Channel], plan: ReplayPlan, reason: str, operator: str,
                  audit: dict | None = None) -> int:
    """Store the replay as a new message with QUEUED deliveries; ``audit`` (an audit entry) is
    committed in the same transaction."""
    stored = store.get_message(plan.original_id)
    channel = channels[plan.channel]
    now = time.time()
    record = MessageRecord(
        plan.channel, stored["raw"], MessageStatus.PROCESSED, now, f"replay by {operator}", stored["charset"],
        sending_application=stored["sending_application"], sending_facility=stored["sending_facility"],
        message_type=stored["message_type"], control_id=stored["control_id"], patient_id=stored["patient_id"],
        replay_of=plan.original_id, replay_reason=reason, replay_operator=operator,
        snapshot_id=plan.snapshot_id if plan.snapshot_id is not None else channel.snapshot_id,
    )
    partitions = store.cluster_partitions()  # a cluster's queues: the partition the engine would choose
    for destination in channel.destinations:
        if destination.name in plan.outputs:
            data = plan.outputs[destination.name]
            options = destination.config.queue
            key = parse_content(data).get(options.order_key) if options.order == "per_key" else None
            record.deliveries.append(DeliveryRecord(destination.name, DeliveryStatus.QUEUED, data, key,
                                                    partition=partition_of(options, key, data, partitions or 1)))
    updates = [AuditUpdate(dict(audit, target=f"message {plan.original_id}", reason=reason,
                                detail=f"to {', '.join(sorted(plan.outputs))}"))] if audit else []
    # a dead letter replayed is one no more: the replay carries it (the original keeps its history)
    updates += [DeliveryUpdate(plan.original_id, d["destination"], {"status": DeliveryStatus.REPLAYED.value, "updated_at": now})
                for d in stored["deliveries"] if d["status"] == DeliveryStatus.ERROR and d["destination"] in plan.outputs]
    [message_id] = store.commit([record], updates)
    return message_id
