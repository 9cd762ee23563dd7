"""Argument types shared by the verbs: each refuses a bad value with one clear line (argparse
prints it with the usage and exits 2), never a traceback."""

from __future__ import annotations

import argparse

__all__ = ["port", "seconds", "count", "row_id", "number_in"]


def port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is out of range: a port is 0 to 65535 (0: any free port)")
    return value


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= value <= 86400 * 365:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of seconds, 0 or more")
    return value


def count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be 0 or more")
    return value


def row_id(text: str) -> int:
    """A message's or an audit entry's number: 1 up to the largest a database row id can be."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a message or entry number") from None
    from hl7relay.store.database import MAX_ROW_ID

    if not 1 <= value <= MAX_ROW_ID:
        raise argparse.ArgumentTypeError(f"{text!r} is not a message or entry number (1 or more, up to 2**63-1)")
    return value


def number_in(low: float, high: float, unit: str, whole: bool = False, why: str = ""):
    """An argument type: a number of ``unit`` from ``low`` to ``high`` (``whole``: an int);
    ``why`` ends the refusal ("a trace lasts 1 to 60 minutes")."""
    kind = int if whole else float

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{' whole' if whole else ''} number"
                                             + (f" of {unit}" if unit else "")) from None
        if not low <= value <= high:  # (NaN fails this too)
            raise argparse.ArgumentTypeError(why or f"{low:g} to {high:g} {unit}, not {text}")
        return value

    return parse
