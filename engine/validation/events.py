"""HL7 table 0354: which message structure a message type and trigger event use.

From v2.3 on, many events share one structure (ADT^A04 is laid out as ADT_A01). hl7apy knows the
structures but not this table, so it is kept here, in the standard's own form: a structure, then
the events that use it. ``TYPE^EVENT`` names an event of another message type (LSR^U13 uses
LSU_U12). ``[-2.6]`` / ``[2.7-]`` limit an entry to the versions where the standard had it.
"""

from __future__ import annotations

__all__ = ["resolve_structure"]

_TABLE_0354 = """
ADT_A01: A01 A04 A08 A13
ADT_A05: A05 A14 A28 A31
ADT_A06: A06 A07
ADT_A09: A09 A10 A11
ADT_A21: A21 A22 A23 A25 A26 A27 A29 A32 A33
ADT_A30[-2.6]: A30 A34 A35 A36 A46 A47 A48 A49
ADT_A39: A39 A40 A41 A42
ADT_A43[-2.6]: A43 A44
ADT_A43[2.7-]: A43 A49
ADT_A44[2.7-]: A44 A47
ADT_A50: A50 A51
ADT_A52[-2.6]: A52 A53 A55
ADT_A52[2.7-]: A52 A53
ADT_A54[2.7-]: A54 A55
ADT_A61: A61 A62
CCR_I16: I16 I17 I18
CRM_C01: C01 C02 C03 C04 C05 C06 C07 C08
CSU_C09: C09 C10 C11 C12
LSU_U12: U12 LSR^U13
MDM_T01: T01 T03 T05 T07 T09 T11
MDM_T02: T02 T04 T06 T08 T10
MFN_Znn: M14
MFQ_M01: M01 M02 M03 M04 M05 M06 M07 M08 M09 M10 M11 M12 M13 M14
ORU_R01: R01 R40
ORU_R30: R30 R31 R32
PEX_P07: P07 P08
PGL_PC6: PC6 PC7 PC8
PMU_B01: B01 B02
PMU_B04: B04 B05 B06
PPG_PCG: PCG PCH PCJ
PPP_PCB: PCB PCC PCD
PPR_PC1: PC1 PC2 PC3
QBP_Q11: Q11 Q31 Z81 Z85 Z87 Z89
QBP_Q13: Q13 Z75 Z77 Z91 Z93 Z95 Z99
QBP_Q15: Q15 Z79 Z97
QBP_Q21: Q21 Q22 Q23 Q24 Q25 Q32
QBP_O33: Q33
QBP_O34: Q34
QBP_Qnn: Znn
QCN_J01: J01 QSX^J02
QRY_PC4: PC4 PC9 PCE PCK
QRY_Q01: Q01 Q26 Q27 Q28 Q29 Q30
QRY: T12
QSB_Q16: Q16 Z83
RDE_O11: O11 O25
RDY_K15: K15 Z98
REF_I12: I12 I13 I14 I15
RQA_I08: I08 I09 I10 I11
RQC_I05: I05 I06
RQI_I01: I01 I02 I03 PIN^I07
RRE_O12: O12 O26
RSP_K11: K11 RDY^Z80 RSP^Z84
RSP_K21[-2.6]: K21 K22
RSP_K23: K23 K24
RSP_O33: K33
RSP_O34: K34
RTB_K13: K13 Z76 Z78 Z92 Z94 Z96
SDR_S31: SDN^S36
SDR_S32: SMD^S32 SCN^S37
SIU_S12: S12 S13 S14 S15 S16 S17 S18 S19 S20 S21 S22 S23 S24 S26 S27
SLR_S28: S28 S29 SLN^S34 SLN^S35 STI^S30
SRM_S01: S01 S02 S03 S04 S05 S06 S07 S08 S09 S10 S11
TCU_U10: U10 TCR^U11
"""


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split(".") if p.isdigit())


def _load() -> dict[tuple[str, str], list[tuple[str, tuple, tuple]]]:
    table: dict[tuple[str, str], list[tuple[str, tuple, tuple]]] = {}
    for line in _TABLE_0354.strip().splitlines():
        head, events = line.split(":")
        low, high = (), (99,)
        if "[" in head:
            head, bounds = head.rstrip("]").split("[")
            lo, hi = bounds.split("-")
            low = _version_key(lo) if lo else ()
            high = _version_key(hi) + (99,) if hi else (99,)
        message_type = head.split("_")[0]
        for token in events.split():
            kind, _, event = token.rpartition("^")
            table.setdefault((kind or message_type, event), []).append((head, low, high))
    return table


_MAP = _load()


def resolve_structure(message_type: str, event: str, version: str, known: "set[str] | dict") -> str | None:
    """The structure name for ``message_type^event`` in ``version``, among the ``known`` ones.

    A structure named after the event itself wins when the version defines it (v2.1/2.2 define one
    per event, and later versions split some events off); then table 0354; else ``None``.
    """
    if message_type == "ACK" and "ACK" in known:
        return "ACK"
    own = f"{message_type}_{event}"
    if own in known:
        return own
    key = _version_key(version)
    for structure, low, high in _MAP.get((message_type, event), ()):
        if low <= key <= high and structure in known:
            return structure
    return None
