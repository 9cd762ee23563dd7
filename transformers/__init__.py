"""Channel transformer steps (set, copy, map, format...), registered by name.

Installed as ``hl7relay.transformers``; the steps arrive with the channel format.
"""

__all__: list[str] = []
