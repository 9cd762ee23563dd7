"""Format checks for HL7 primitive datatypes (SI, NM, DT, TM, DTM/TS).

Each check takes the leaf's text and returns ``None`` when it conforms, else a short reason.
"""

from __future__ import annotations

import re

__all__ = ["PRIMITIVE_CHECKS", "BASE_MAX_LENGTH"]

_SI = re.compile(r"\d+", re.ASCII)
_NM = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)", re.ASCII)
_DT = re.compile(r"(\d{4})(?:(\d{2})(?:(\d{2}))?)?", re.ASCII)
_TM = re.compile(r"(\d{2})(?:(\d{2})(?:(\d{2})(?:\.\d{1,4})?)?)?([+-]\d{4})?", re.ASCII)
_DTM = re.compile(
    r"(\d{4})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:\.\d{1,4})?)?)?)?)?)?([+-]\d{4})?", re.ASCII
)

# Maximum lengths hl7apy gives its base datatypes (hl7apy.base_datatypes); per-field lengths are
# not in its tables, so these are the limits a receiver can rely on.
BASE_MAX_LENGTH = {"ST": 199, "IS": 20, "NM": 16, "SI": 4, "GTS": 199, "TN": 199, "FT": 65536, "TX": 65536}


def _check_si(value: str) -> str | None:
    return None if _SI.fullmatch(value) else "is not a sequence id (SI: digits only)"


def _check_nm(value: str) -> str | None:
    return None if _NM.fullmatch(value) else "is not a number (NM)"


_DAYS_IN_MONTH = (0, 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


def _leap(year: int) -> bool:
    return year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)


def _date_problem(year: str, month: str | None, day: str | None) -> str | None:
    if month is None:
        return None
    m = int(month)
    if not 1 <= m <= 12:
        return f"has month {month}"
    if day is not None:
        last = _DAYS_IN_MONTH[m]
        if m == 2 and _leap(int(year)):
            last = 29
        if not 1 <= int(day) <= last:
            return f"has day {day}, which {year}-{month} does not have"
    return None


def _time_problem(hour, minute, second, offset) -> str | None:
    if hour is None and offset is None:
        return None
    if hour is not None and int(hour) > 23:
        return f"has hour {hour}"
    if minute is not None and int(minute) > 59:
        return f"has minute {minute}"
    if second is not None and int(second) > 59:
        return f"has second {second}"
    if offset is not None and (int(offset[1:3]) > 14 or int(offset[3:5]) > 59):
        return f"has time zone offset {offset}"
    return None


def _check_dt(value: str) -> str | None:
    match = _DT.fullmatch(value)
    if match is None:
        return "is not a date (DT: YYYY[MM[DD]])"
    problem = _date_problem(*match.groups())
    return f"is not a date (DT): it {problem}" if problem else None


def _check_tm(value: str) -> str | None:
    match = _TM.fullmatch(value)
    if match is None:
        return "is not a time (TM: HH[MM[SS[.S[S[S[S]]]]]][+/-ZZZZ])"
    problem = _time_problem(*match.groups())
    return f"is not a time (TM): it {problem}" if problem else None


def _check_dtm(value: str) -> str | None:
    n = len(value)
    if n in (8, 12, 14) and value.isdigit() and value.isascii():
        # the usual forms (YYYYMMDD, ...HHMM, ...HHMMSS), checked without the regex
        m = int(value[4:6])
        if 1 <= m <= 12:
            d = int(value[6:8])
            last = 29 if m == 2 and _leap(int(value[:4])) else _DAYS_IN_MONTH[m]
            if 1 <= d <= last:
                if n == 8 or (int(value[8:10]) <= 23 and int(value[10:12]) <= 59 and (n == 12 or int(value[12:14]) <= 59)):
                    return None
    match = _DTM.fullmatch(value)
    if match is None:
        return "is not a date/time (DTM: YYYY[MM[DD[HH[MM[SS[.S[S[S[S]]]]]]]]][+/-ZZZZ])"
    year, month, day, hour, minute, second, offset = match.groups()
    problem = _date_problem(year, month, day) or _time_problem(hour, minute, second, offset)
    return f"is not a date/time (DTM): it {problem}" if problem else None


PRIMITIVE_CHECKS = {
    "SI": _check_si,
    "NM": _check_nm,
    "DT": _check_dt,
    "TM": _check_tm,
    "DTM": _check_dtm,
    "TS": _check_dtm,  # TS as a leaf (and TS.1 of the composite) holds a DTM value
}
