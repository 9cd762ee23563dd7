"""Shared pieces of the benchmarks: the 1 KB ADT^A01 they all use, and a timer."""

from __future__ import annotations

import time
from pathlib import Path

SAMPLES = Path(__file__).resolve().parent.parent / "samples"


def adt_a01_1kb() -> bytes:
    """samples/adt_a01.hl7 with more next of kin, an observation and a diagnosis: about 1 KB."""
    data = (SAMPLES / "adt_a01.hl7").read_bytes()
    kin = (b"NK1|2|DOE^JIM^^^^^L|CHD^Child^HL70063|123 MAIN ST^^SPRINGFIELD^IL^62701^USA^H|^PRN^PH^^1^217^5550125\r"
           b"NK1|3|ROE^ANN^^^^^L|MTH^Mother^HL70063|9 ELM ST^^DECATUR^IL^62521^USA^H|^PRN^PH^^1^217^5550199\r")
    observation = b"OBX|1|NM|8302-2^Body height^LN||172|cm^cm^UCUM|||||F\rOBX|2|NM|29463-7^Body weight^LN||68|kg^kg^UCUM|||||F\r"
    data = data.replace(b"\rPV1|", b"\r" + kin + b"PV1|", 1)
    data = data.replace(b"\rAL1|", b"\r" + observation + b"AL1|", 1)
    return data


def per_call_us(func, repeat: int = 9, number: int = 2000) -> float:
    """Best of ``repeat`` runs of the mean µs per call of ``func``.

    The minimum, as timeit advises: other load on the machine only ever adds time, so the
    fastest run is the closest to what the code itself costs.
    """
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(number):
            func()
        runs.append((time.perf_counter() - start) / number * 1e6)
    return min(runs)
