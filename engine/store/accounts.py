"""The console's users and the API's tokens, each change with its audit entry in the same
transaction."""

from __future__ import annotations

import time

import sqlalchemy as sa

from hl7relay.store.schema import users, api_tokens, audit_log, _audit_row
from hl7relay.store.records import LastAdminError, StoreError


class Accounts:
    """Part of :class:`~hl7relay.store.database.Store`; ``engine``: its SQLAlchemy engine."""

    engine: sa.Engine

    def add_user(self, name: str, role: str, password_hash: str, audit: dict) -> None:
        """A new user; StoreError when the name is taken. ``audit`` is committed with it."""
        now = time.time()
        try:
            with self.engine.begin() as connection:
                if connection.execute(sa.select(users.c.name).where(users.c.name == name)).first() is not None:
                    raise StoreError(f"user {name!r} exists already")
                connection.execute(users.insert().values(name=name, role=role, password_hash=password_hash,
                                                         created_at=now, updated_at=now))
                connection.execute(audit_log.insert().values(**_audit_row(audit)))
        except sa.exc.SQLAlchemyError as exc:
            raise StoreError(f"could not add user {name!r}: {getattr(exc, 'orig', exc)}") from exc

    def update_user(self, name: str, audit: dict, **values) -> bool:
        """Change a user's role, password hash, PHI permission or disabled state; False when there
        is no such user; LastAdminError (nothing changed) when it would leave no active admin."""
        with self.engine.begin() as connection:
            admins = self._active_admins(connection)
            changed = connection.execute(users.update().where(users.c.name == name)
                                         .values(updated_at=time.time(), **values)).rowcount
            self._keep_an_admin(connection, admins, name)
            if changed:
                connection.execute(audit_log.insert().values(**_audit_row(audit)))
            return bool(changed)

    def remove_user(self, name: str, audit: dict) -> bool:
        """Remove a user; LastAdminError (nothing removed) when it is the last active admin."""
        with self.engine.begin() as connection:
            admins = self._active_admins(connection)
            removed = connection.execute(users.delete().where(users.c.name == name)).rowcount
            self._keep_an_admin(connection, admins, name)
            if removed:
                connection.execute(audit_log.insert().values(**_audit_row(audit)))
            return bool(removed)

    @staticmethod
    def _active_admins(connection) -> int:
        return connection.execute(sa.select(sa.func.count()).select_from(users)
                                  .where(users.c.role == "admin", users.c.disabled.is_(False))).scalar() or 0

    def _keep_an_admin(self, connection, before: int, name: str) -> None:
        # raised inside the transaction: the change is rolled back with it
        if before and not self._active_admins(connection):
            raise LastAdminError(name)

    def get_user(self, name: str) -> dict | None:
        with self.engine.connect() as connection:
            row = connection.execute(sa.select(users).where(users.c.name == name)).mappings().first()
            return dict(row) if row else None

    def list_users(self) -> list[dict]:
        with self.engine.connect() as connection:
            return [dict(r) for r in connection.execute(
                sa.select(users.c.name, users.c.role, users.c.phi, users.c.disabled, users.c.created_at, users.c.updated_at,
                          users.c.last_login_at).order_by(users.c.name)).mappings()]

    def record_login(self, name: str, now: float, audit: dict) -> None:
        """A console sign-in: when, and its audit entry, in one transaction."""
        with self.engine.begin() as connection:
            connection.execute(users.update().where(users.c.name == name).values(last_login_at=now))
            connection.execute(audit_log.insert().values(**_audit_row(audit)))

    def add_token(self, name: str, role: str, token_hash: str, created_by: str, audit: dict) -> None:
        try:
            with self.engine.begin() as connection:
                if connection.execute(sa.select(api_tokens.c.name).where(api_tokens.c.name == name)).first() is not None:
                    raise StoreError(f"token {name!r} exists already")
                connection.execute(api_tokens.insert().values(name=name, role=role, token_hash=token_hash,
                                                              created_at=time.time(), created_by=created_by))
                connection.execute(audit_log.insert().values(**_audit_row(audit)))
        except sa.exc.SQLAlchemyError as exc:
            raise StoreError(f"could not add token {name!r}: {getattr(exc, 'orig', exc)}") from exc

    def find_token(self, token_hash: str) -> dict | None:
        with self.engine.connect() as connection:
            row = connection.execute(sa.select(api_tokens).where(api_tokens.c.token_hash == token_hash)).mappings().first()
            return dict(row) if row else None

    def list_tokens(self) -> list[dict]:
        with self.engine.connect() as connection:
            return [dict(r) for r in connection.execute(
                sa.select(api_tokens.c.name, api_tokens.c.role, api_tokens.c.created_at, api_tokens.c.created_by,
                          api_tokens.c.last_used_at).order_by(api_tokens.c.name)).mappings()]

    def touch_token(self, name: str, now: float) -> None:
        with self.engine.begin() as connection:
            connection.execute(api_tokens.update().where(api_tokens.c.name == name).values(last_used_at=now))

    def revoke_token(self, name: str, audit: dict) -> bool:
        with self.engine.begin() as connection:
            removed = connection.execute(api_tokens.delete().where(api_tokens.c.name == name)).rowcount
            if removed:
                connection.execute(audit_log.insert().values(**_audit_row(audit)))
            return bool(removed)


# a token of this role may only post messages to the http sources that name it: no other permission
SENDER_ROLE = "sender"


def token_hash(token: str) -> str:
    """What the store keeps of an API token: its SHA-256 (the token itself is shown once, at creation)."""
    import hashlib

    return hashlib.sha256(token.encode("utf-8")).hexdigest()
