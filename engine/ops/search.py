"""The message search that the CLI (``hl7relay messages``), the operations API and the console all
use: one set of filters, and one rule for what a search itself reveals.

Which messages hold a name, a birth date or a phone number is patient data in itself, so a search
of message content (``text``) needs whoever searches to be allowed it (the PHI permission in the
API and the console; a reason on the command line, where the operating-system user reaches the
store anyway) and is written to the audit log with its text; a search by patient id is audited
too. What the rows show (masked or not) stays with the caller, who knows whether PHI was asked for.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hl7relay.store.messages import SearchRows

__all__ = ["SEARCH_FILTERS", "MessageQuery", "Searcher", "SearchRefused", "search_messages"]

# the indexed filters (Store.search keyword arguments); ``failed`` is a flag beside them
SEARCH_FILTERS = ("channel", "status", "message_type", "control_id", "patient_id", "facility", "delivery_status")


class SearchRefused(Exception):
    """A content search by someone not allowed one."""


@dataclass(slots=True)
class MessageQuery:
    filters: dict = field(default_factory=dict)  # SEARCH_FILTERS that are set
    failed: bool = False  # a message stored as ERROR, or with a delivery in ERROR
    since: float | None = None
    until: float | None = None
    before: int | None = None  # keyset paging: the last id of the page before (older ones)
    after: int | None = None  # or the first id of the page after (newer ones; not with text)
    limit: int = 50
    text: str | None = None  # a substring of the raw message (scans, bounded)
    count_most: int = 0  # also count the matches, up to this many (not with text)


@dataclass(slots=True)
class Searcher:
    """Who searches, as the audit log names them, and whether they may search message content."""

    actor: str
    role: str
    source: str
    may_search_content: bool = False
    reason: str = ""


def search_messages(store, query: MessageQuery, searcher: Searcher) -> SearchRows:
    """Newest first, ``query.limit`` rows (store.search's); audited as the module says. Runs on a
    thread of the caller's (the store blocks)."""
    if query.text:
        if not searcher.may_search_content:
            raise SearchRefused(f"{searcher.actor} ({searcher.role}) may not search message content: it needs the "
                                "permission to see patient data")
        store.audit(_entry(searcher, "messages.search_text", "message content", f"text {query.text[:200]!r}"))
    if query.filters.get("patient_id"):
        store.audit(_entry(searcher, "messages.search", "patient_id", "search by patient id"))
    text = query.text.encode("utf-8", "surrogateescape") if query.text else None
    return store.search(**query.filters, failed=query.failed, since=query.since, until=query.until,
                        before_id=query.before, after_id=query.after if not text else None, limit=query.limit, text=text,
                        count_most=query.count_most)


def _entry(searcher: Searcher, action: str, target: str, detail: str) -> dict:
    return {"actor": searcher.actor, "role": searcher.role, "source": searcher.source, "action": action,
            "target": target, "reason": searcher.reason[:500], "detail": detail}
