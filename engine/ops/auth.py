"""Users, roles, API tokens and who did what: what every way into the engine checks.

There is no default account: ``hl7relay user add NAME --role ROLE`` makes the first one. Roles:

- ``viewer``: counters, states, queues, masked messages;
- ``operator``: a viewer who may also pause, resume and retry destinations, enable and disable
  channels, and replay messages;
- ``admin``: an operator who may also reload channels, prune, manage users and tokens, read the
  audit log, and see patient data unmasked. An operator may be given that last permission on its
  own (``hl7relay user phi NAME on``): the support engineer who must read a rejected message.

Seeing unmasked patient data (``phi``) is a permission of its own: it takes a reason and always
writes an audit entry. Passwords are hashed with scrypt (memory-hard, in the standard library);
API tokens are 256-bit random strings shown once and stored as their SHA-256 (a token has no
dictionary to guess from, so a slow hash would only slow every request).
"""

from __future__ import annotations

import base64
import getpass
import hashlib
import hmac
import os
import re
import secrets
import socket

from hl7relay.store.accounts import SENDER_ROLE, token_hash  # noqa: F401 - what the API and the CLI check tokens with

__all__ = ["ROLES", "SENDER_ROLE", "PERMISSIONS", "PHI_GRANTABLE", "can", "hash_password", "verify_password", "new_token", "token_hash",
           "valid_name", "os_actor", "cli_source", "cli_audit"]

ROLES = ("viewer", "operator", "admin")
# permission -> the least role that has it
PERMISSIONS = {
    "read": "viewer",
    "control": "operator",  # pause / resume / retry destinations, enable / disable channels
    "replay": "operator",
    "reload": "admin",
    "prune": "admin",
    "users": "admin",
    "audit": "admin",
    "credentials": "admin",  # test a credential's authentication now (console Credentials page)
    "phi": "admin",  # and always a reason and an audit entry
}

MIN_PASSWORD = 10  # characters: the one rule for a password, from the CLI and the console alike
PHI_GRANTABLE = "operator"  # the least role that `hl7relay user phi NAME on` may give the PHI permission to

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
# scrypt with 16 MiB of memory per hash (n=2**14, r=8): slow to guess on any hardware
_SCRYPT = {"n": 2 ** 14, "r": 8, "p": 1}


def can(role: str, permission: str, phi: bool = False) -> bool:
    """Whether ``role`` has ``permission`` (unknown roles and permissions have nothing). ``phi``:
    the user was given the PHI permission, which lets an operator see patient data unmasked."""
    least = PERMISSIONS.get(permission)
    if least is None or role not in ROLES:
        return False
    if permission == "phi" and phi and ROLES.index(role) >= ROLES.index(PHI_GRANTABLE):
        return True
    return ROLES.index(role) >= ROLES.index(least)


def valid_name(name: str) -> bool:
    return bool(_NAME.fullmatch(name or ""))


def hash_password(password: str) -> str:
    salt = os.urandom(16)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, dklen=32, maxmem=64 * 1024 * 1024, **_SCRYPT)
    encode = lambda data: base64.b64encode(data).decode("ascii")  # noqa: E731
    return f"scrypt${_SCRYPT['n']}${_SCRYPT['r']}${_SCRYPT['p']}${encode(salt)}${encode(digest)}"


def verify_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(digest)
        actual = hashlib.scrypt(password.encode("utf-8"), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p),
                                dklen=len(expected), maxmem=64 * 1024 * 1024)
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)


def new_token() -> str:
    return "hl7r_" + secrets.token_urlsafe(32)


def os_actor() -> str:
    """Who runs a CLI verb that works on the store directly: the operating system's user."""
    try:
        return "os:" + getpass.getuser()
    except (KeyError, OSError):
        return f"os:uid{os.getuid()}"


def cli_source() -> str:
    return f"cli@{socket.gethostname()}"


def cli_audit(action: str, target: str = "", **fields) -> dict:
    """An audit entry for an action taken from the command line on this host (role ``host``: the
    operating-system user's own access to the store, not a role of the engine's)."""
    return {"actor": os_actor(), "role": "host", "source": cli_source(), "action": action, "target": target, **fields}
