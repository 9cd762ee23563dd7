"""The vault's rows: one encrypted value per secret name, each change with its audit entry in the
same transaction. Encryption and keys are hl7relay.vault's; this part never sees a plain value."""

from __future__ import annotations

import time

import sqlalchemy as sa

from hl7relay.store.schema import _audit_row, audit_log, secrets


class SecretRows:
    """Part of :class:`~hl7relay.store.database.Store`; ``engine``: its SQLAlchemy engine."""

    engine: sa.Engine

    def put_secret(self, name: str, ciphertext: bytes, actor: str, audit: dict, must_exist: bool | None = None) -> str:
        """Store (or replace) a secret's ciphertext; "created" or "rotated". ``must_exist`` True
        (rotate) refuses a new name and False (set) keeps an existing one: a KeyError or a
        FileExistsError, nothing changed."""
        now = time.time()
        with self.engine.begin() as connection:
            exists = connection.execute(sa.select(secrets.c.name).where(secrets.c.name == name)).first() is not None
            if must_exist is True and not exists:
                raise KeyError(name)
            if must_exist is False and exists:
                raise FileExistsError(name)
            if exists:
                connection.execute(secrets.update().where(secrets.c.name == name).values(ciphertext=ciphertext, rotated_at=now))
            else:
                connection.execute(secrets.insert().values(name=name, ciphertext=ciphertext, created_at=now, created_by=actor))
            connection.execute(audit_log.insert().values(**_audit_row(audit)))
        return "rotated" if exists else "created"

    def secret_ciphertext(self, name: str) -> bytes | None:
        with self.engine.connect() as connection:
            return connection.execute(sa.select(secrets.c.ciphertext).where(secrets.c.name == name)).scalar()

    def mark_secrets_used(self, names) -> None:
        names = sorted(set(names))
        if names:
            with self.engine.begin() as connection:
                connection.execute(secrets.update().where(secrets.c.name.in_(names)).values(last_used_at=time.time()))

    def list_secrets(self) -> list[dict]:
        """Names and dates; never a value (not even encrypted)."""
        with self.engine.connect() as connection:
            return [dict(r) for r in connection.execute(
                sa.select(secrets.c.name, secrets.c.created_at, secrets.c.created_by, secrets.c.rotated_at,
                          secrets.c.last_used_at).order_by(secrets.c.name)).mappings()]

    def remove_secret(self, name: str, audit: dict) -> bool:
        with self.engine.begin() as connection:
            removed = connection.execute(secrets.delete().where(secrets.c.name == name)).rowcount
            if removed:
                connection.execute(audit_log.insert().values(**_audit_row(audit)))
            return bool(removed)
