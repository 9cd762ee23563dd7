"""The ``fhir`` transformer: the message becomes a FHIR R4 Bundle for one destination.

It converts rather than edits, so it is the last of a destination's transformers, and the
destination sends or writes what it made (``http`` with ``application/fhir+json``, ``file``).
"""

from __future__ import annotations

from pathlib import Path

from hl7relay.fhir.content import FHIRContent
from hl7relay.fhir.convert import BUNDLE_TYPES, ConversionError, Converter
from hl7relay.fhir.maps import MapError, default_maps, load_maps
from hl7relay.spec import Option, register
from hl7relay.transformers.steps import Step, TransformError

__all__ = ["FHIRStep", "fhir_step"]


class FHIRStep(Step):
    converts = True  # the pipeline calls convert(), not apply()

    def __init__(self, converter: Converter):
        self.converter = converter

    def apply(self, message):  # pragma: no cover - the pipeline converts; nothing edits in place
        raise TransformError("the fhir transformer converts the message: it must be a destination's last transformer")

    def convert(self, message) -> FHIRContent:
        try:
            conversion = self.converter.convert(message)
        except ConversionError as exc:
            raise TransformError(str(exc)) from exc
        return FHIRContent.from_json(conversion.bundle, conversion.problems)


@register("transformer", "fhir", "convert the message to a FHIR R4 Bundle (a destination's last transformer)", [
    Option("map", "str", "", "the message map (ADT_A01, SIU_S12, ORU_R01...; default: chosen by MSH-9)"),
    Option("bundle", "enum", "transaction", "the Bundle's type", BUNDLE_TYPES),
    Option("maps", "str", None, "a map file adding to or replacing the shipped maps (relative to the channel file)"),
    Option("timezone", "str", None, "for DTM values without an offset (default: the channel's timezone)"),
])
def fhir_step(options, context=None) -> FHIRStep:
    maps = default_maps()
    if options["maps"]:
        base = Path(getattr(context, "base_dir", ".") or ".")
        path = Path(options["maps"])
        try:
            maps = load_maps(path if path.is_absolute() else base / path, maps)
        except MapError as exc:
            raise ValueError("maps: " + "; ".join(str(p) for p in exc.problems)) from exc
    timezone = options["timezone"] or getattr(context, "timezone", "UTC") or "UTC"
    return FHIRStep(Converter(maps, bundle=options["bundle"], timezone=timezone, map_name=options["map"]))
