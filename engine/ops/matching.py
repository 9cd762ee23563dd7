"""Messages held for matching (a fhir destination found several patients that could be theirs):
shown to a person, who picks one or says none; the message then goes again, to that patient.
One implementation for ``hl7relay fhir holds/resolve`` and the console's Held for matching page."""

from __future__ import annotations

import json
import time

from hl7relay.ops.phi import MASK

__all__ = ["held", "resolve_hold", "ResolveError"]


class ResolveError(ValueError):
    """What stops a resolution, said for the person who asked (``usage``: their words were wrong)."""

    def __init__(self, text: str, usage: bool = False):
        super().__init__(text)
        self.usage = usage


def held(store, show_phi: bool) -> list[dict]:
    """The open holds, their candidates' names, birth dates and identifiers masked unless ``show_phi``."""
    out = []
    for row in store.match_holds():
        candidates = json.loads(row["candidates"])
        if not show_phi:
            candidates = [{"id": c.get("id"), "name": MASK, "birthDate": MASK, "gender": c.get("gender"),
                           "identifiers": [MASK for _ in c.get("identifiers") or ()]} for c in candidates]
        out.append({**{k: row[k] for k in ("channel", "destination", "message_id", "held_at")}, "candidates": candidates})
    return out


def resolve_hold(store, channels: dict, message_id: int, destination: str | None, patient: str | None, new: bool,
                 reason: str, audit: dict) -> tuple[int, str]:
    """Send the held message again to ``patient`` (a candidate's id) or as a new patient: a replay
    with its Bundle pointed there, the hold marked resolved; both audited. (replay id, what was done)."""
    from hl7relay.channels.fhir_destination import with_patient
    from hl7relay.ops.replay import commit_replay, plan_replay

    if not reason.strip():
        raise ResolveError("say why (the reason is written to the audit log)", usage=True)
    if (patient is None) == (not new):
        raise ResolveError("pick one candidate or say it is a new patient", usage=True)
    holds = store.match_holds(message_id=message_id, destination=destination)
    if not holds:
        raise ResolveError(f"message {message_id} is not held for matching"
                           + (f" for {destination}" if destination else "") + " (hl7relay fhir holds lists them)")
    if len(holds) > 1:
        raise ResolveError(f"message {message_id} is held for {', '.join(h['destination'] for h in holds)}: "
                           "say which destination", usage=True)
    [hold] = holds
    candidates = {str(c.get("id")): c for c in json.loads(hold["candidates"])}
    if patient is not None and patient not in candidates:
        raise ResolveError(f"Patient/{patient} is not one of the candidates "
                           f"({', '.join('Patient/' + i for i in sorted(candidates))})", usage=True)
    plan = plan_replay(store, channels, message_id, {hold["destination"]}, force=True)
    if plan.skipped or hold["destination"] not in plan.outputs:
        raise ResolveError(f"message {message_id} cannot be sent again: {plan.skipped or 'no output'}")
    try:
        bundle = json.loads(plan.outputs[hold["destination"]])
    except ValueError:
        bundle = None
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        raise ResolveError(f"{hold['channel']} -> {hold['destination']} no longer sends FHIR Bundles "
                           "(its channel changed): the message cannot go to a patient")
    entry = next((e for e in bundle.get("entry") or () if (e.get("resource") or {}).get("resourceType") == "Patient"
                  and str(e.get("fullUrl", "")).removeprefix("urn:uuid:") == hold["local_key"]), None)
    if entry is None:
        raise ResolveError(f"message {message_id} no longer makes that patient (its channel changed)")
    if new:
        decision, server_id, existing = "new", hold["local_key"], None  # under our own id: none of the candidates
    else:
        decision = server_id = str(patient)
        existing = {"identifier": [dict(zip(("system", "value"), i.split("|", 1)))
                                   for i in candidates[server_id].get("identifiers") or () if "|" in i]}
    plan.outputs[hold["destination"]] = json.dumps(with_patient(bundle, entry, server_id, existing)).encode()
    said = "a new patient" if new else f"Patient/{patient}"
    target = f"message {message_id}"
    replay_id = commit_replay(store, channels, plan, f"fhir resolve: {reason}", audit["actor"],
                              audit=dict(audit, action="replay", target=target, reason=f"fhir resolve: {reason}"))
    store.resolve_match_hold(hold["channel"], hold["destination"], message_id, decision, audit["actor"], time.time(),
                             dict(audit, action="fhir.match.resolve", target=target, reason=reason,
                                  detail=f"{hold['channel']} -> {hold['destination']}: {said}; replay {replay_id}"))
    return replay_id, f"sent again as {replay_id} to {hold['destination']} for {said}"
