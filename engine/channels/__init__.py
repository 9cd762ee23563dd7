"""Channels: YAML files declaring a source, filters, transformers, validators, response and
destinations; lint; the message pipeline shared by `run` and `test`."""

# the built-in components register themselves (spec.py) as these modules are imported
from hl7relay.channels import destinations, filters, http_destination, http_source, sources, validators  # noqa: F401
from hl7relay.channels import fhir_destination, fhir_source  # noqa: F401  (after http: it builds on it)
from hl7relay.channels import batch_destination, sftp_destination, sftp_source  # noqa: F401
from hl7relay.channels.channel import Channel, Destination, load_channel, load_channels
from hl7relay.channels.pipeline import Processed, Result, process
from hl7relay.transformers import fhir, steps  # noqa: F401
from hl7relay.yamlsource import ConfigError

__all__ = ["Channel", "Destination", "load_channel", "load_channels", "process", "Processed", "Result", "ConfigError"]
