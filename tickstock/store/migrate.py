"""
Schema migrations: the packaged C{migrations/NNNN_name.sql} files, applied
in order, each once and each in its own transaction, and recorded in
C{schema_migrations}. Synchronous psycopg2, because it runs before the
reactor: from C{tickstock-db migrate}, or from a daemon checking at start-up
that its database is up to date (L{pending}).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from importlib import resources

import psycopg2
from psycopg2.extensions import connection as Connection
from psycopg2.extensions import make_dsn, parse_dsn

LOCK_KEY = 0x7453_4D49
"""
The C{pg_advisory_lock} key held while migrating, so that daemons and CLIs
migrating the same database at once apply each migration once (advisory
locks are per database, so other databases on the cluster are not blocked).
"""

_FILE = re.compile(r"(\d{4})_[a-z0-9_]+\.sql")

_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version     integer PRIMARY KEY,
    name        text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
)
"""


class CannotConnect(Exception):
    """PostgreSQL is unreachable or refused the login (bad DSN, down, wrong password)."""


class MigrationError(Exception):
    """A migration failed; its transaction was rolled back and it is still pending."""


@dataclass(frozen=True)
class Migration:
    """
    One migration file.

    @ivar name: the file name without C{.sql} (C{0001_schema}), as reported.
    """

    version: int
    name: str
    sql: str


def packaged() -> list[Migration]:
    """The migrations shipped in C{tickstock.store/migrations}, by version."""
    found = []
    for entry in (resources.files("tickstock.store") / "migrations").iterdir():
        match = _FILE.fullmatch(entry.name)
        if match:
            found.append(Migration(int(match[1]), entry.name[:-4], entry.read_text("utf-8")))
    found.sort(key=lambda migration: migration.version)
    versions = [migration.version for migration in found]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"two migration files share a version: {[m.name for m in found]}")
    return found


def connect(dsn: str, application_name: str = "tickstock-db") -> Connection:
    """
    A psycopg2 connection, with a connect timeout unless the DSN has one,
    so that an unreachable server fails the command instead of hanging it.

    @raise CannotConnect: with a one-line reason (never the DSN: it may
        hold a password).
    """
    try:
        given = parse_dsn(dsn)
        defaults = {"connect_timeout": "10", "application_name": application_name}
        missing = {k: v for k, v in defaults.items() if k not in given}
        return psycopg2.connect(make_dsn(dsn, **missing))
    except (psycopg2.OperationalError, psycopg2.ProgrammingError) as error:
        raise CannotConnect(" ".join(str(error).split())) from None


def migrate(
    dsn: str,
    on_notice: Callable[[str], None] | None = None,
    migrations: Sequence[Migration] | None = None,
) -> list[str]:
    """
    Apply the migrations the database lacks. Running it again, or from
    several processes at once, applies nothing twice.

    @param on_notice: called with each NOTICE a migration raised (such as
        a step it skipped for lack of privileges), but not the server's
        C{IF [NOT] EXISTS} notes (C{... does not exist, skipping}): those
        say only that a statement written to be safe to repeat did nothing.
    @param migrations: what to apply instead of L{packaged}.
    @return: the names applied now, in order; C{[]} if it was up to date.
    @raise CannotConnect: if PostgreSQL cannot be reached.
    @raise MigrationError: if a migration failed (those before it stay applied).
    """
    todo = packaged() if migrations is None else list(migrations)
    applied: list[str] = []
    conn = connect(dsn, "tickstock-migrate")
    try:
        with conn.cursor() as cursor:
            # Session-level: it outlives the commits below, and closing releases it.
            cursor.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
            cursor.execute(_CREATE_TABLE)
            cursor.execute("SELECT version FROM schema_migrations")
            done = {row[0] for row in cursor.fetchall()}
        conn.commit()
        for migration in todo:
            if migration.version in done:
                continue
            del conn.notices[:]
            try:
                with conn, conn.cursor() as cursor:
                    cursor.execute(migration.sql)
                    cursor.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                        (migration.version, migration.name),
                    )
            except psycopg2.Error as error:
                reason = " ".join(str(error).split())
                raise MigrationError(
                    f"{migration.name} failed and was rolled back: {reason}") from error
            if on_notice is not None:
                for notice in conn.notices:
                    if not notice.rstrip().endswith(", skipping"):
                        on_notice(notice.strip())
            applied.append(migration.name)
    finally:
        conn.close()
    return applied


def status(dsn: str) -> tuple[list[tuple[str, datetime]], list[str]]:
    """
    What the database has and lacks, without changing it (a read-only
    login that can read C{schema_migrations} is enough).

    @return: C{(applied, pending)}: the applied names with when they were
        applied (including any this package does not know, from a newer
        release), and the packaged names not yet applied.
    """
    conn = connect(dsn)
    try:
        with conn.cursor() as cursor:
            cursor.execute("SELECT to_regclass('schema_migrations') IS NOT NULL")
            if cursor.fetchone()[0]:
                cursor.execute(
                    "SELECT version, name, applied_at FROM schema_migrations ORDER BY version")
                rows = cursor.fetchall()
            else:
                rows = []
    finally:
        conn.close()
    done = {row[0] for row in rows}
    return [(row[1], row[2]) for row in rows], [m.name for m in packaged() if m.version not in done]


def pending(dsn: str) -> list[str]:
    """The packaged migrations the database lacks: a daemon must not start unless this is empty."""
    return status(dsn)[1]
