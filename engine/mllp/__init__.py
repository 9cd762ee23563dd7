"""MLLP on the wire: framing (sans-IO), the listener, the sender, TLS, writing now."""
