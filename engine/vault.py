"""The vault: secrets (client secrets, API keys, passwords) kept encrypted in the store and named
by channels as ``${secret:NAME}``, so no secret value is ever written in a YAML file.

Values are encrypted with ``cryptography``'s Fernet (AES-128-CBC and HMAC-SHA256, a fresh IV per
value; no cryptography of our own). The key comes from ``HL7RELAY_VAULT_KEY`` (for several engines
on one PostgreSQL store, each given the same key), or from the key file, ``vault.key`` in the data
folder by default (``vault_key_file`` in the settings), created with mode 0600 by the first
``hl7relay secret set``. Without the key the ciphertext in the store is of no use, so a copy of the
store alone reveals no secret; losing the key loses the secrets (set them again).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from hl7relay.errors import HL7RelayError

__all__ = ["Vault", "VaultError", "KEY_ENV", "valid_secret_name", "open_vault", "secret_resolver"]

KEY_ENV = "HL7RELAY_VAULT_KEY"
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}")


class VaultError(HL7RelayError):
    """The vault cannot do what was asked (no key, a wrong key, no such secret); the text says which."""


def valid_secret_name(name: str) -> bool:
    return bool(_NAME.fullmatch(name))


def key_file(settings: dict) -> Path:
    return Path(settings.get("vault_key_file") or Path(settings["data_dir"]) / "vault.key")


def _load_key(settings: dict, create: bool) -> bytes:
    from cryptography.fernet import Fernet

    from_env = os.environ.get(KEY_ENV)
    if from_env:
        key = from_env.strip().encode("ascii", "replace")
        where = f"${KEY_ENV}"
    else:
        path = key_file(settings)
        where = str(path)
        try:
            key = path.read_bytes().strip()
        except FileNotFoundError:
            if not create:
                raise VaultError(f"no vault key: {path} does not exist and {KEY_ENV} is not set "
                                 "(the first `hl7relay secret set` creates the key file)") from None
            key = Fernet.generate_key()
            path.parent.mkdir(parents=True, exist_ok=True)
            try:  # created 0600 from the start: no moment where another user may read it
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:  # another process made it first: use that one
                return _load_key(settings, create=False)
            with os.fdopen(fd, "wb") as out:
                out.write(key + b"\n")
        except OSError as exc:
            raise VaultError(f"cannot read the vault key {path}: {exc.strerror}") from None
    try:
        Fernet(key)
    except (ValueError, TypeError):
        raise VaultError(f"the vault key in {where} is not a Fernet key (32 url-safe base64-encoded bytes)") from None
    return key


class Vault:
    """Secrets in ``store`` under ``key``. Values pass through here only: they are never logged."""

    def __init__(self, store, key: bytes):
        from cryptography.fernet import Fernet

        self.store = store
        self._fernet = Fernet(key)

    def set(self, name: str, value: str, actor: str, audit: dict, rotate: bool | None = None) -> str:
        """Encrypt and store; "created" or "rotated". ``rotate`` True: the name must exist; False:
        it must not; None: either."""
        if not valid_secret_name(name):
            raise VaultError(f"{name!r} is not a secret name: a letter, then letters, digits and . _ -, up to 64")
        if not value:
            raise VaultError(f"{name}: an empty value (nothing was read)")
        ciphertext = self._fernet.encrypt(value.encode("utf-8"))
        try:
            return self.store.put_secret(name, ciphertext, actor, audit, must_exist=rotate)
        except KeyError:
            raise VaultError(f"no secret {name!r} to rotate (hl7relay secret set {name})") from None
        except FileExistsError:
            raise VaultError(f"secret {name!r} exists: `hl7relay secret rotate {name}` replaces its value") from None

    def reveal(self, name: str) -> str | None:
        """The plain value, or None when there is no such secret."""
        from cryptography.fernet import InvalidToken

        ciphertext = self.store.secret_ciphertext(name)
        if ciphertext is None:
            return None
        try:
            return self._fernet.decrypt(ciphertext).decode("utf-8")
        except InvalidToken:
            raise VaultError(f"secret {name!r} cannot be decrypted with this vault key (it was set under "
                             "another one: set it again, or give the key it was set with)") from None


def open_vault(settings: dict, create_key: bool = False, store=None) -> Vault:
    """The vault of these settings (their store, their key)."""
    key = _load_key(settings, create_key)
    if store is None:
        from hl7relay.store.database import Store

        url = settings["store"]
        if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).exists():
            raise VaultError(f"no store at {url[len('sqlite:///'):]}, so no secrets (hl7relay secret set NAME)")
        store = Store(url)
    return Vault(store, key)


def secret_resolver(settings: dict):
    """For the YAML loader: name -> value, or None when there is none; a VaultError says why the
    vault cannot be read. Opens the vault on first use only (most configurations name no secret)
    and notes the names used (``last used`` in `secret list`)."""
    opened: list[Vault] = []

    def resolve(name: str) -> str | None:
        from hl7relay.store.database import StoreError

        if not opened:
            opened.append(open_vault(settings))
        vault = opened[0]
        try:
            value = vault.reveal(name)
        except VaultError:
            raise
        except (StoreError, OSError) as exc:
            raise VaultError(f"the vault's store cannot be read: {exc}") from None
        except Exception as exc:  # SQLAlchemy: a store made before the vault existed, not migrated
            raise VaultError(f"the vault's store cannot be read ({type(exc).__name__}): run `hl7relay verify` "
                             "or start the engine once to bring it up to date") from None
        if value is not None:
            try:
                vault.store.mark_secrets_used([name])
            except Exception:  # noqa: BLE001 - a read-only store still serves the value
                pass
        return value

    return resolve
