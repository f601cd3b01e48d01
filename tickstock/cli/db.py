"""
C{tickstock-db}: bring a TickStock database up to date, show its migration
status, and create the read-only logins the UI's queries use. The DSN comes
from C{--postgres} or C{TICKSTOCK_POSTGRES}; a login's password only from a
file, never from the command line (where C{ps} and shell history see it).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Mapping

import psycopg2
from psycopg2 import sql
from psycopg2.extensions import encrypt_password

from tickstock.store.migrate import (
    CannotConnect,
    MigrationError,
    connect,
    migrate,
    status,
)

POSTGRES_ENV = "TICKSTOCK_POSTGRES"
READER_ROLE = "tickstock_reader"

_LOGIN = re.compile(r"[a-z_][a-z0-9_]{0,62}")

DESCRIPTION = (
    "Bring a TickStock database up to date, show its migration status, and create the "
    "read-only logins the UI's queries use. The DSN comes from --postgres or "
    f"${POSTGRES_ENV}; a login's password only from a file, never from the command line."
)
"""The C{--help} text: plain sentences, since argparse shows it as it is."""

EPILOG = ("Exit status: 0 done, 1 a migration or command failed, 2 PostgreSQL unreachable or a "
          "usage error.")


class ReaderError(Exception):
    """The login cannot be made a read-only login as asked."""


def create_reader(dsn: str, login: str, password: str) -> bool:
    """
    Create, or update, C{login} as a LOGIN role that is a member of
    L{READER_ROLE}, read-only by default, with this password (sent only as
    a SCRAM or MD5 verifier, per the server's C{password_encryption}, so it
    never reaches the server's logs). Refuses an existing role with powers
    beyond reading (superuser, CREATEROLE, ..., or the connected user) and
    checks, before committing, that the login can write no TickStock table.

    @return: whether the role was created (else it existed and was updated).
    @raise ReaderError: on a bad name, or a role that cannot be made a reader.
    """
    if not _LOGIN.fullmatch(login) or login.startswith("pg_") or login == READER_ROLE:
        raise ReaderError(f"--login {login!r}: use lower-case letters, digits and _ "
                          f"(not starting with a digit or pg_, not {READER_ROLE})")
    if not password:
        raise ReaderError("the password file is empty")
    name = sql.Identifier(login)
    conn = connect(dsn)
    try:
        with conn, conn.cursor() as cursor:
            cursor.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (READER_ROLE,))
            if cursor.fetchone() is None:
                raise ReaderError(f"role {READER_ROLE} does not exist: run `tickstock-db migrate` "
                                  "as a user with CREATEROLE")
            cursor.execute(
                "SELECT rolsuper OR rolcreaterole OR rolcreatedb OR rolreplication OR rolbypassrls"
                " OR rolname = session_user FROM pg_roles WHERE rolname = %s",
                (login,),
            )
            existing = cursor.fetchone()
            if existing is not None and existing[0]:
                raise ReaderError(f"role {login} has rights beyond reading: refusing to change it")
            verifier = encrypt_password(password, login, conn)
            verb = sql.SQL("ALTER" if existing else "CREATE")
            cursor.execute(sql.SQL("{} ROLE {} LOGIN INHERIT PASSWORD %s").format(verb, name),
                           (verifier,))
            cursor.execute(sql.SQL("GRANT {} TO {}").format(sql.Identifier(READER_ROLE), name))
            cursor.execute(
                sql.SQL("ALTER ROLE {} SET default_transaction_read_only = on").format(name))
            writable = _writable(cursor, login)
            if writable:
                raise ReaderError(f"role {login} could still write {', '.join(writable)}: "
                                  "revoke those rights first (nothing was changed)")
    finally:
        conn.close()
    return existing is None


def _writable(cursor: psycopg2.extensions.cursor, login: str) -> list[str]:
    """
    The tables of this schema that C{login} may change, and the functions
    it may call that could change them for it: C{update_etf_universe}, and
    any SECURITY DEFINER one (the others run with the caller's rights).
    """
    cursor.execute(
        """
        SELECT c.relname FROM pg_class c
        WHERE c.relnamespace = (SELECT oid FROM pg_namespace WHERE nspname = current_schema())
          AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
          AND has_table_privilege(%(login)s, c.oid, %(writes)s)
        UNION ALL
        SELECT p.proname || '()' FROM pg_proc p
        WHERE p.pronamespace = (SELECT oid FROM pg_namespace WHERE nspname = current_schema())
          AND (p.proname = 'update_etf_universe' OR p.prosecdef)
          AND has_function_privilege(%(login)s, p.oid, 'EXECUTE')
        ORDER BY 1
        """,
        {"login": login, "writes": "INSERT, UPDATE, DELETE, TRUNCATE, REFERENCES, TRIGGER"},
    )
    return [row[0] for row in cursor.fetchall()]


def _run_migrate(args: argparse.Namespace) -> None:
    """
    The result on stdout, then the server's notices on stderr, each one line
    after the result is flushed, so that a terminal or C{2>&1} never runs a
    notice into a result line. If a migration fails, the notices of those
    applied before it still come out, ahead of the error.
    """
    notices: list[str] = []
    try:
        applied = migrate(args.postgres, on_notice=notices.append)
        print("\n".join(f"applied {name}" for name in applied) if applied else "up to date",
              flush=True)
    finally:
        for notice in notices:
            sys.stderr.write(f"tickstock-db: {' '.join(notice.split())}\n")


def _run_status(args: argparse.Namespace) -> None:
    applied, pending = status(args.postgres)
    for name, when in applied:
        print(f"applied  {name}  {when.isoformat()}")
    for name in pending:
        print(f"pending  {name}")
    if not pending:
        print("up to date")


def _run_create_reader(args: argparse.Namespace) -> None:
    with open(args.password_file, "rb") as handle:
        password = handle.read().strip().decode("utf-8")
    created = create_reader(args.postgres, args.login, password)
    print(f"{'created' if created else 'updated'} read-only login {args.login}")


def parse_args(argv: list[str] | None, environ: Mapping[str, str]) -> argparse.Namespace:
    """The command line, with the DSN from C{environ} when not given."""
    parser = argparse.ArgumentParser(prog="tickstock-db", description=DESCRIPTION, epilog=EPILOG)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--postgres", default=environ.get(POSTGRES_ENV),
                        help=f"libpq DSN or postgresql:// URI (default: ${POSTGRES_ENV})")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser(
        "migrate", parents=[common], epilog=EPILOG, help="apply the migrations the database lacks",
        description="Apply the migrations the database lacks, each in its own transaction, and "
                    "print their names (or \"up to date\"). Run it as the role the daemon "
                    "writes with: it owns what the migrations create.",
    ).set_defaults(run=_run_migrate)
    commands.add_parser(
        "status", parents=[common], epilog=EPILOG, help="list applied and pending migrations",
        description="List the applied migrations, with when, and the pending ones. It changes "
                    "nothing, so a read-only login may run it.",
    ).set_defaults(run=_run_status)
    reader = commands.add_parser(
        "create-reader", parents=[common], epilog=EPILOG,
        help=f"create or update a read-only login (member of {READER_ROLE})",
        description=f"Create a login that is a member of {READER_ROLE} and read-only by default, "
                    "or update its password. Run it as a role with CREATEROLE.",
    )
    reader.add_argument("--login", required=True, help="the login role's name")
    reader.add_argument("--password-file", required=True, help="file holding its password")
    reader.set_defaults(run=_run_create_reader)
    args = parser.parse_args(argv)
    if not args.postgres:
        parser.error(f"give --postgres DSN or set {POSTGRES_ENV}")
    return args


def main(argv: list[str] | None = None) -> None:
    """Console entry point: exit 0 on success, 2 if PostgreSQL cannot be reached, else 1."""
    args = parse_args(argv, os.environ)
    try:
        args.run(args)
    except CannotConnect as error:
        sys.stderr.write(f"tickstock-db: cannot connect to PostgreSQL: {error}\n")
        raise SystemExit(2) from None
    except (MigrationError, ReaderError, OSError, UnicodeDecodeError) as error:
        sys.stderr.write(f"tickstock-db: {error}\n")
        raise SystemExit(1) from None
    except psycopg2.Error as error:
        sys.stderr.write(f"tickstock-db: {' '.join(str(error).split())}\n")
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
