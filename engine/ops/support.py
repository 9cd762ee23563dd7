"""What support tools show of stored messages, masked unless patient data may be seen: shared by
the CLI (``hl7relay messages``), the operations API and the console, so all mask alike; and the
store connection their reads run on."""

from __future__ import annotations

import json

from hl7relay.ops.phi import mask_known, mask_message, mask_text, mask_value, person_values

__all__ = ["message_view", "row_view", "masked_view", "segment_table", "SupportStore"]


def _plain(data: bytes) -> str:
    return data.decode("utf-8", "replace").replace("\r", "\n").rstrip()


def _ack(stored: str, show, text=None) -> str:
    """A destination's answer: the ACK message itself (shown like any message), an API's answer
    (its status line, then its body: masked as a message when it is one, else its JSON values or
    the patient's values it names), or what a file or channel destination recorded."""
    if stored.startswith("MSH"):
        return show(stored.encode("utf-8", "surrogateescape"))
    if stored.startswith("HTTP ") and text is not None:
        head, _, body = stored.partition("\n")
        if not body or show is _plain:
            return stored
        if body.startswith("MSH"):
            return head + "\n" + show(body.encode("utf-8", "surrogateescape"))
        return head + "\n" + _masked_body(body, text)
    return stored


# the keys of an API's JSON answer whose values say what happened, not whom it is about
_ANSWER_KEYS = frozenset({"id", "status", "resourceType", "code", "severity", "error", "result", "success", "ok",
                          "created", "updated", "type", "diagnostics"})


def _masked_body(body: str, text) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        return text(body)

    def walk(value, key=None):
        if isinstance(value, dict):
            return {k: walk(v, k) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v, key) for v in value]
        if isinstance(value, str) and key not in _ANSWER_KEYS:
            return mask_value(value)
        return text(value) if isinstance(value, str) else value

    return json.dumps(walk(data))


def _findings(data, text) -> list[str]:
    if not data:
        return []
    try:
        items = json.loads(data)
    except ValueError:
        return [text(data.decode("utf-8", "replace"))]
    return [text(f"{f.get('severity', '?')} {f.get('code', '')} {f.get('location', '')}: {f.get('text', '')}".strip())
            for f in items]


def message_view(stored: dict, show_phi: bool) -> dict:
    """One stored message (Store.get_message) for people: content, stages, validation findings,
    deliveries with each destination's answer; masked unless ``show_phi``."""
    show = _plain if show_phi else mask_message
    # masked: the values it quotes, and the message's own person values wherever they appear
    # (a peer's error text may name the patient without quotes)
    known = set() if show_phi else person_values(stored["raw"])
    text = (lambda value: value) if show_phi else (lambda value: mask_known(mask_text(value), known))
    out = {k: v for k, v in stored.items() if k not in ("raw", "stages", "deliveries")}
    stages = dict(stored["stages"])
    findings = stages.pop("findings", None)
    out["error"] = text(stored["error"])
    out["patient_id"] = stored["patient_id"] if show_phi else mask_value(stored["patient_id"])
    out["replay_reason"] = text(stored.get("replay_reason") or "") or None
    out["raw"] = show(stored["raw"])
    out["stages"] = {name: show(content) for name, content in stages.items()}
    out["findings"] = _findings(findings, text)
    out["deliveries"] = [dict(d, last_error=text(d["last_error"]), last_ack=_ack(d["last_ack"], show, text))
                         for d in stored["deliveries"]]
    return out


def segment_table(text: str, version: str = "") -> list[dict]:
    """A message as shown (masked or not: ``text`` is what the page shows, segments on lines) cut
    into its segments and fields, each field with its path and, where the standard of ``version``
    (MSH-12) names it, its name: a masked value keeps its field (``PID-5 Patient Name: ***``).
    Empty fields are left out; MSH-1 and MSH-2 are the delimiters themselves."""
    lines = [line for line in text.split("\n") if line]
    if not lines or not lines[0].startswith("MSH") or len(lines[0]) < 4:
        return []
    separator = lines[0][3]
    profile = None
    try:
        from hl7relay.validation.profile import definition_version, get_profile

        known = definition_version(version.split("^")[0].strip())
        profile = get_profile(known) if known else None
    except Exception:  # noqa: BLE001 - names are a help; the values are shown whatever happens
        profile = None
    rows = []
    for line in lines:
        parts = line.split(separator)
        name = parts[0][:3]
        definition = profile.segment(name) if profile is not None and name.isalnum() else None
        header = name in ("MSH", "FHS", "BHS")
        # MSH-1 is the separator itself: the field after it is MSH-2 (the encoding characters)
        fields = [(1, separator), *enumerate(parts[1:], start=2)] if header else list(enumerate(parts[1:], start=1))
        out = []
        for number, value in fields:
            if not value:
                continue
            label = ""
            if definition is not None and 0 < number <= len(definition.fields) and definition.fields[number - 1] is not None:
                label = definition.fields[number - 1].name.replace("_", " ").title()
            out.append({"path": f"{name}-{number}", "name": label, "value": value})
        rows.append({"segment": name, "fields": out})
    return rows


_PEER_TEXTS = frozenset({"last_error", "held"})  # what a peer said: it may quote the message


def masked_view(view):
    """An engine view (status, channel, destination queue) with every ``last_error`` masked: a
    peer's error text may quote the message it refused."""
    if isinstance(view, dict):
        return {k: (mask_text(v) if k in _PEER_TEXTS and isinstance(v, str) else masked_view(v)) for k, v in view.items()}
    if isinstance(view, list):
        return [masked_view(v) for v in view]
    return view


def row_view(row: dict, show_phi: bool) -> dict:
    """One row of a search, masked unless ``show_phi``."""
    row = dict(row)
    raw = row.pop("raw", None)  # only to mask a dead letter's error by the message's own person values
    if show_phi:
        return row
    view = dict(row, patient_id=mask_value(row["patient_id"]), error=mask_text(row["error"]))
    if "failed_deliveries" in row:
        known = person_values(raw) if raw is not None else set()
        view["failed_deliveries"] = [dict(d, error=mask_known(mask_text(d["error"]), known))
                                     for d in row["failed_deliveries"]]
    return view


class SupportStore:
    """Support reads and writes (search, show, replay, prune) run on a store connection of their
    own in a thread of the reactor's pool: never on the reactor, and never queued behind the
    engine's commits on its writer thread, so a large search cannot hold up an ACK."""

    def __init__(self, controls):
        self.controls = controls
        self._store = None

    def run(self, fn, *args, **kwargs):
        """A Deferred firing with ``fn(store, *args, **kwargs)``, run off the reactor."""
        from twisted.internet import threads

        def call():
            if self._store is None:
                from hl7relay.store.database import Store

                self._store = Store(self.controls.writer.store.url, create=False)
            return fn(self._store, *args, **kwargs)

        reactor = self.controls.reactor
        return threads.deferToThreadPool(reactor, reactor.getThreadPool(), call)
