"""Talking to the running engine's operations API from the CLI (same host, the local token)."""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from pathlib import Path

__all__ = ["call_engine", "engine_settings", "print_error"]


def engine_settings(args) -> dict:
    """The settings that say where the running engine is (its data folder, its admin listener)."""
    from hl7relay.cli._settings import resolve_settings

    settings, problems = resolve_settings(args)
    if problems:
        raise SystemExit("\n".join(problems))
    return settings


def call_engine(settings: dict, method: str, path: str, body: dict | None = None) -> tuple[int, object]:
    """(HTTP status, decoded JSON) from the engine; exits with one clear line when it cannot be reached."""
    from hl7relay.ops.api import ENDPOINT_FILE, LOCAL_TOKEN_FILE
    from hl7relay.ops.auth import os_actor

    admin = settings["admin"]
    if not admin.get("port"):
        raise SystemExit("the engine's admin listener is off (admin port 0): nothing to talk to")
    token_file = Path(settings["data_dir"]) / LOCAL_TOKEN_FILE
    try:
        token = token_file.read_text().strip()
    except FileNotFoundError:
        raise SystemExit(f"no running engine found: {token_file} does not exist (the engine writes it when it "
                         "starts). Is it running? Run this in its folder, or pass --data-dir or --config.") from None
    except OSError as exc:
        raise SystemExit(f"cannot read {token_file} ({exc.strerror}): run this as the user the engine runs as") from None
    host = admin.get("host") or "127.0.0.1"
    base = f"http://{'[' + host + ']' if ':' in host else host}:{admin['port']}"
    try:  # the engine says where it is bound (it may have been given port 0)
        base = (Path(settings["data_dir"]) / ENDPOINT_FILE).read_text().strip() or base
    except OSError:
        pass
    url = base + path
    data = json.dumps(body or {}).encode() if method == "POST" else None
    request = urllib.request.Request(url, data=data, method=method, headers={
        "Authorization": f"Bearer {token}", "X-Hl7relay-Actor": os_actor(), "Content-Type": "application/json"})
    context = None
    if url.startswith("https:"):
        import ssl

        # the engine's own certificate (or its CA) is what to trust; the name is not checked, since
        # the CLI reaches the engine by its address on this host
        context = ssl.create_default_context(cafile=admin.get("tls_ca") or admin.get("tls_cert"))
        context.check_hostname = False
        if admin.get("require_client_cert"):
            context.load_cert_chain(admin.get("tls_cert"), admin.get("tls_key"))
    try:
        with urllib.request.urlopen(request, timeout=30, context=context) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read() or b"null")
        except ValueError:
            return exc.code, {"error": exc.reason}
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise SystemExit(f"cannot reach the engine at {base} ({reason}): is it running?") from None


def print_error(status: int, payload) -> int:
    text = payload.get("error") if isinstance(payload, dict) else payload
    print(f"the engine answered {status}: {text}", file=sys.stderr)
    return 1
