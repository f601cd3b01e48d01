"""
Tests for L{tickstock.store.migrate}, the packaged migrations and
C{tickstock-db}, against a real PostgreSQL: migrations apply once (also when
two processes race), the docs/contract.md §6 tables and functions exist and behave,
and a login made with C{create-reader} can read but not write.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg2
import psycopg2.errors
import pytest
from psycopg2.extensions import parse_dsn

from tests.servers import PostgresServer, free_port, poll, run_sql
from tickstock.cli.db import ReaderError, create_reader, main
from tickstock.store.migrate import (
    LOCK_KEY,
    CannotConnect,
    Migration,
    MigrationError,
    migrate,
    packaged,
    pending,
    status,
)

ROOT = Path(__file__).resolve().parent.parent
ALL = [migration.name for migration in packaged()]
TABLES = ("symbols", "ohlcv_1min", "ohlcv_1min_parts", "events", "jobs", "cache_entries",
          "schema_migrations")
UPDATE = "update_etf_universe(text,text[],text,jsonb)"

_names = itertools.count(1)




@pytest.fixture
def empty(postgres_cluster: PostgresServer) -> Iterator[str]:
    """The DSN of a new database that nothing has migrated."""
    name = f"m{next(_names)}"
    postgres_cluster.sql(f"CREATE DATABASE {name}")
    yield postgres_cluster.dsn(name)
    postgres_cluster.sql(f"DROP DATABASE {name} WITH (FORCE)")


def snapshot(dsn: str) -> list[list[Any]]:
    """
    The schema as the catalogs hold it, with each catalog row's xmin, so any
    rewrite of a table, column, function or grant shows even if it changes
    nothing visible.
    """
    return [
        run_sql(dsn, """
            SELECT c.relname, c.relkind, c.xmin::text, c.relacl::text, a.attname,
                   format_type(a.atttypid, a.atttypmod), a.attnotnull, a.xmin::text
            FROM pg_class c
            LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0
            WHERE c.relnamespace = 'public'::regnamespace ORDER BY 1, 5"""),
        run_sql(dsn, """
            SELECT p.oid::regprocedure::text, p.xmin::text, md5(p.prosrc), p.proacl::text
            FROM pg_proc p WHERE p.pronamespace = 'public'::regnamespace ORDER BY 1"""),
        run_sql(dsn, "SELECT version, name, applied_at FROM schema_migrations ORDER BY 1"),
        run_sql(dsn, "SELECT xmin::text, setconfig FROM pg_db_role_setting"),
    ]


# ---------------------------------------------------------------- running migrations


def test_migrate_applies_every_packaged_migration_in_order(empty: str) -> None:
    """A new database has everything pending; migrate applies and records each in order."""
    assert ALL[:4] == ["0001_schema", "0002_universe_functions", "0003_timescale",
                       "0004_reader_role"]
    assert pending(empty) == ALL
    assert migrate(empty) == ALL
    assert pending(empty) == []
    rows = run_sql(empty, "SELECT version, name FROM schema_migrations ORDER BY version")
    assert rows == [(int(name[:4]), name) for name in ALL]
    applied, left = status(empty)
    assert [name for name, _ in applied] == ALL and left == []


def test_migrate_again_changes_nothing(postgres: str) -> None:
    """On a migrated database, migrate applies nothing and rewrites no catalog row."""
    before = snapshot(postgres)
    assert migrate(postgres) == []
    assert snapshot(postgres) == before


def test_concurrent_migrations_apply_each_once(empty: str) -> None:
    """
    Two migrations started together, both made to wait at the advisory lock,
    apply everything exactly once between them, and neither fails.
    """
    holder = psycopg2.connect(empty)
    holder.autocommit = True
    with holder.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
    with ThreadPoolExecutor(2) as pool:
        runs = [pool.submit(migrate, empty) for _ in range(2)]
        poll(lambda: run_sql(empty, """
            SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted
              AND objid = %s AND database = (SELECT oid FROM pg_database
                                             WHERE datname = current_database())""",
                           (LOCK_KEY,))[0][0] == 2,
             10, "both migrations waiting for the lock")
        with holder.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))
        results = sorted((run.result(timeout=30) for run in runs), key=len)
    holder.close()
    assert results == [[], ALL]
    assert run_sql(empty, "SELECT count(*), count(DISTINCT version) FROM schema_migrations") == [
        (len(ALL), len(ALL))]


def test_failed_migration_is_rolled_back_and_stays_pending(empty: str) -> None:
    """
    A migration that fails leaves none of its statements behind and is not
    recorded; those before it stay applied, and it applies once fixed.
    """
    first = packaged()[0]
    broken = Migration(2, "0002_broken", "CREATE TABLE half (x int); SELECT no_such_function();")
    with pytest.raises(MigrationError, match="0002_broken failed and was rolled back"):
        migrate(empty, migrations=[first, broken])
    assert run_sql(empty, "SELECT name FROM schema_migrations") == [(first.name,)]
    assert run_sql(empty, "SELECT to_regclass('half')") == [(None,)]
    fixed = Migration(2, "0002_broken", "CREATE TABLE half (x int);")
    assert migrate(empty, migrations=[first, fixed]) == ["0002_broken"]


def test_migration_notices_but_not_if_exists_notes(empty: str) -> None:
    """
    A migration's NOTICEs reach on_notice; the server's notes that an IF
    [NOT] EXISTS statement did nothing do not.
    """
    noisy = Migration(1, "0001_noisy", """
        DROP TABLE IF EXISTS nothing_here;
        CREATE TABLE IF NOT EXISTS schema_migrations (version integer);
        DO $$ BEGIN RAISE NOTICE 'step % skipped', 2; END $$;""")
    notices: list[str] = []
    assert migrate(empty, on_notice=notices.append, migrations=[noisy]) == ["0001_noisy"]
    assert notices == ["NOTICE:  step 2 skipped"]


def test_unreachable_server_is_cannot_connect() -> None:
    """Migrating or asking status of a server nobody listens on fails fast with L{CannotConnect}."""
    dsn = f"host=127.0.0.1 port={free_port()} dbname=x user=x connect_timeout=3"
    with pytest.raises(CannotConnect, match="Connection refused"):
        migrate(dsn)
    with pytest.raises(CannotConnect):
        pending(dsn)


# ---------------------------------------------------------------- the schema


def test_contract_tables_and_columns_exist(postgres: str) -> None:
    """The docs/contract.md §6 tables exist with the columns and types the original system used."""
    columns = {
        (table, column): kind
        for table, column, kind in run_sql(postgres, """
            SELECT table_name, column_name, data_type FROM information_schema.columns
            WHERE table_schema = 'public'""")
    }
    expected = {
        ("symbols", "symbol"): "text",
        ("ohlcv_1min", "symbol"): "text",
        ("ohlcv_1min", "timestamp"): "timestamp with time zone",
        ("events", "symbol"): "text",
        ("events", "pattern"): "text",
        ("events", "confidence"): "double precision",
        ("events", "timestamp"): "timestamp with time zone",
        ("events", "created_at"): "timestamp with time zone",
        ("events", "details"): "jsonb",
        ("cache_entries", "type"): "text",
        ("cache_entries", "key"): "text",
        ("cache_entries", "value"): "jsonb",
        ("cache_entries", "universe_category"): "character varying",
        ("cache_entries", "liquidity_filter"): "jsonb",
        ("cache_entries", "universe_metadata"): "jsonb",
        ("cache_entries", "last_universe_update"): "timestamp without time zone",
    }
    for name in ("open", "high", "low", "close", "volume"):
        expected[("ohlcv_1min", name)] = "double precision"
    assert {key: columns.get(key) for key in expected} == expected


def test_contract_functions_exist(postgres: str) -> None:
    """The four universe functions exist with the documented signatures and results."""
    rows = run_sql(postgres, """
        SELECT p.oid::regprocedure::text, pg_get_function_result(p.oid) FROM pg_proc p
        WHERE p.proname LIKE '%etf_universe%' ORDER BY 1""")
    assert rows == [
        ("get_etf_universe(text)", "jsonb"),
        ("get_etf_universes_summary()",
         "TABLE(key text, category text, symbol_count integer,"
         " last_update timestamp without time zone)"),
        (UPDATE, "boolean"),
        ("validate_etf_universe_symbols(text[])",
         "TABLE(symbol text, valid_format boolean, known boolean)"),
    ]


def test_ohlcv_stays_a_plain_table_without_timescale(postgres: str) -> None:
    """Where TimescaleDB is not available, 0003 leaves C{ohlcv_1min} a plain table."""
    if run_sql(postgres, "SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'"):
        pytest.skip("TimescaleDB is installed here")
    assert run_sql(postgres, "SELECT relkind FROM pg_class WHERE relname = 'ohlcv_1min'") \
        == [("r",)]
    assert run_sql(postgres, "SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'") == []


# ---------------------------------------------------------------- universe functions


def test_update_and_get_etf_universe(postgres: str) -> None:
    """
    update_etf_universe creates the row (symbols in order, duplicates
    dropped, category and metadata set), and get_etf_universe returns its
    value; a missing key, or a stock universe, is NULL.
    """
    assert run_sql(postgres, "SELECT update_etf_universe('core', %s, 'Sector', %s)",
                 (["SPY", "QQQ", "SPY", "BRK.B"], '{"name": "Core ETFs"}')) == [(True,)]
    assert run_sql(postgres, "SELECT get_etf_universe('core')") == [
        ({"symbols": ["SPY", "QQQ", "BRK.B"]},)]
    row = run_sql(postgres, """
        SELECT name, universe_category, universe_metadata, environment,
               last_universe_update IS NOT NULL, updated_at > now() - interval '1 minute'
        FROM cache_entries WHERE type = 'etf_universe' AND key = 'core'""")
    assert row == [("Core ETFs", "Sector", {"name": "Core ETFs"}, "DEFAULT", True, True)]
    run_sql(postgres, """INSERT INTO cache_entries (type, name, key, value)
                       VALUES ('stock_universe', 'big', 'big', '{"symbols": ["AAPL"]}')""")
    assert run_sql(postgres, "SELECT get_etf_universe('missing'), get_etf_universe('big')") == [
        (None, None)]


def test_update_etf_universe_replaces_symbols_and_keeps_the_rest(postgres: str) -> None:
    """
    Updating replaces the symbol list but keeps the value's other keys, the
    metadata keys not given, and (with a NULL category) the category.
    """
    run_sql(postgres, """
        INSERT INTO cache_entries (type, name, key, value, universe_category, universe_metadata)
        VALUES ('etf_universe', 'Old', 'old', '{"symbols": ["XLF"], "note": "kept"}',
                'Sector', '{"focus": "rotation"}')""")
    run_sql(postgres, "SELECT update_etf_universe("
                      "'old', ARRAY['XLE', 'XLK'], NULL, '{\"criteria\": \"AUM\"}')")
    assert run_sql(postgres, """
        SELECT value, universe_category, universe_metadata, name FROM cache_entries
        WHERE key = 'old'""") == [
        ({"symbols": ["XLE", "XLK"], "note": "kept"}, "Sector",
         {"focus": "rotation", "criteria": "AUM"}, "Old")]


@pytest.mark.parametrize("symbols",
                         [["SPY", "spy"], ["TOOLONGSYMBOL"], ["SPY", None], ["A B"], [""]])
def test_update_etf_universe_rejects_bad_symbols(postgres: str, symbols: list[str | None]) -> None:
    """A symbol that does not look like a ticker fails the whole call, writing nothing."""
    with pytest.raises(psycopg2.errors.InvalidParameterValue, match="not a valid symbol"):
        run_sql(postgres, "SELECT update_etf_universe('core', %s::text[])", (symbols,))
    assert run_sql(postgres, "SELECT count(*) FROM cache_entries") == [(0,)]


def test_update_etf_universe_requires_key_and_list(postgres: str) -> None:
    """A NULL or empty key, or a NULL symbol list, is refused."""
    for key, symbols in (("", ["SPY"]), (None, ["SPY"]), ("core", None)):
        with pytest.raises(psycopg2.errors.InvalidParameterValue, match="are required"):
            run_sql(postgres, "SELECT update_etf_universe(%s, %s::text[])", (key, symbols))


def test_get_etf_universes_summary(postgres: str) -> None:
    """One row per ETF universe by key, with its symbol count; stock universes are left out."""
    run_sql(postgres, "SELECT update_etf_universe('b', ARRAY['SPY', 'QQQ'])")
    run_sql(postgres, "SELECT update_etf_universe('a', ARRAY['XLF'], 'Sector')")
    run_sql(postgres, """INSERT INTO cache_entries (type, name, key, value) VALUES
        ('stock_universe', 's', 's', '{"symbols": ["AAPL"]}'),
        ('etf_universe', 'c', 'c', '{"no": "symbols"}')""")
    rows = run_sql(postgres, "SELECT key, category, symbol_count, last_update IS NOT NULL "
                           "FROM get_etf_universes_summary()")
    assert rows == [("a", "Sector", 1, True), ("b", "ETF", 2, True), ("c", None, 0, True)]


def test_validate_etf_universe_symbols(postgres: str) -> None:
    """Each symbol, in the order given, with whether it looks right and is in C{symbols}."""
    run_sql(postgres, "INSERT INTO symbols (symbol) VALUES ('SPY'), ('QQQ')")
    rows = run_sql(postgres, "SELECT * FROM validate_etf_universe_symbols(%s::text[])",
                 (["QQQ", "ZZZZ", "bad!", None, "SPY"],))
    assert rows == [("QQQ", True, True), ("ZZZZ", True, False), ("bad!", False, False),
                    (None, False, False), ("SPY", True, True)]


# ---------------------------------------------------------------- the reader role


@pytest.fixture
def reader(postgres: str, postgres_cluster: PostgresServer,
           tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Iterator[tuple[str, str]]:
    """
    A login made by C{tickstock-db create-reader} on a migrated database
    holding a universe, as C{(login, DSN)}; dropped afterwards.
    """
    run_sql(postgres, "INSERT INTO symbols (symbol) VALUES ('SPY')")
    run_sql(postgres, "SELECT update_etf_universe('core', ARRAY['SPY'])")
    dbname = parse_dsn(postgres)["dbname"]
    login = f"ui_{dbname}"
    secret = tmp_path / "password"
    secret.write_text("correct horse battery\n")
    main(["create-reader", "--postgres", postgres, "--login", login,
          "--password-file", str(secret)])
    assert capsys.readouterr().out == f"created read-only login {login}\n"
    yield login, postgres_cluster.dsn(dbname, user=login)
    postgres_cluster.sql(f"DROP ROLE {login}")


def write_errors(dsn: str, read_write: bool) -> dict[str, type[Exception] | None]:
    """
    Try every kind of write on every TickStock table (and a universe
    update) on one connection; what each raised, by statement.
    """
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    outcome: dict[str, type[Exception] | None] = {}
    try:
        with conn.cursor() as cursor:
            if read_write:
                cursor.execute("SET default_transaction_read_only = off")
            statements = [f"SELECT {UPDATE.split('(')[0]}('core', ARRAY['QQQ'])"]
            for table in TABLES:
                cursor.execute("SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass "
                               "AND attnum = 1", (table,))
                column = cursor.fetchone()[0]
                statements += [f"INSERT INTO {table} DEFAULT VALUES",
                               f"UPDATE {table} SET {column} = {column}",
                               f"DELETE FROM {table}", f"TRUNCATE {table}"]
            for statement in statements:
                try:
                    cursor.execute(statement)
                    outcome[statement] = None
                except psycopg2.Error as error:
                    outcome[statement] = type(error)
    finally:
        conn.close()
    return outcome


def test_reader_can_read_everything(reader: tuple[str, str]) -> None:
    """The reader selects from every table and calls the three reading functions."""
    _, dsn = reader
    for table in TABLES:
        run_sql(dsn, f"SELECT * FROM {table} LIMIT 1")
    assert run_sql(dsn, "SELECT get_etf_universe('core')") == [({"symbols": ["SPY"]},)]
    assert run_sql(dsn, "SELECT key, symbol_count FROM get_etf_universes_summary()") == [
        ("core", 1)]
    assert run_sql(dsn, "SELECT * FROM validate_etf_universe_symbols(ARRAY['SPY'])") == [
        ("SPY", True, True)]
    assert pending(dsn) == []


def test_reader_cannot_write_by_default(reader: tuple[str, str]) -> None:
    """
    In its default read-only transactions, every write is refused as
    read-only; calling update_etf_universe is refused for lack of EXECUTE.
    """
    outcome = write_errors(reader[1], read_write=False)
    expected = {statement: psycopg2.errors.ReadOnlySqlTransaction for statement in outcome}
    expected[next(iter(outcome))] = psycopg2.errors.InsufficientPrivilege
    assert outcome == expected


def test_reader_cannot_write_even_with_read_only_off(reader: tuple[str, str],
                                                     postgres: str) -> None:
    """
    The read-only default is a soft guard: with it turned off, the grants
    still refuse every write, and nothing was changed.
    """
    before = run_sql(postgres, "SELECT count(*), max(value::text) FROM cache_entries")
    outcome = write_errors(reader[1], read_write=True)
    assert outcome == {statement: psycopg2.errors.InsufficientPrivilege for statement in outcome}
    assert run_sql(postgres, "SELECT count(*), max(value::text) FROM cache_entries") == before


def test_reader_password_is_stored_hashed(reader: tuple[str, str],
                                          postgres_cluster: PostgresServer) -> None:
    """The password from the file reaches the server only as a SCRAM verifier."""
    login, _ = reader
    [(stored,)] = postgres_cluster.sql("SELECT rolpassword FROM pg_authid WHERE rolname = %s",
                                       params=(login,))
    assert stored.startswith("SCRAM-SHA-256$") and "horse" not in stored


def test_create_reader_again_updates_the_password(reader: tuple[str, str], postgres: str,
                                                  postgres_cluster: PostgresServer) -> None:
    """Running create-reader for an existing reader updates it instead of failing."""
    login, _ = reader
    sql = "SELECT rolpassword FROM pg_authid WHERE rolname = %s"
    before = postgres_cluster.sql(sql, params=(login,))
    assert create_reader(postgres, login, "another password") is False
    assert postgres_cluster.sql(sql, params=(login,)) != before


@pytest.mark.parametrize("login", ['x"; DROP ROLE postgres; --', "Upper", "1abc", "pg_ui",
                                   "tickstock_reader", "a" * 64])
def test_create_reader_refuses_bad_names(postgres: str, login: str) -> None:
    """A login that is not a plain lower-case identifier, or is reserved, is refused."""
    with pytest.raises(ReaderError, match="--login"):
        create_reader(postgres, login, "password")


def test_create_reader_refuses_privileged_role(postgres: str,
                                               postgres_cluster: PostgresServer) -> None:
    """An existing superuser is not turned into a reader (nor has its password changed)."""
    with pytest.raises(ReaderError, match="beyond reading"):
        create_reader(postgres, "postgres", "password")
    assert postgres_cluster.sql("""
        SELECT rolsuper, rolpassword IS NULL, setconfig IS NULL FROM pg_authid
        LEFT JOIN pg_db_role_setting ON setrole = pg_authid.oid
        WHERE rolname = 'postgres'""") == [(True, True, True)]


def test_create_reader_refuses_role_that_could_still_write(
        postgres: str, postgres_cluster: PostgresServer) -> None:
    """
    An existing role with a write grant of its own would not be read-only:
    it is refused and left as it was.
    """
    login = f"w_{parse_dsn(postgres)['dbname']}"
    postgres_cluster.sql(f"CREATE ROLE {login}")
    try:
        run_sql(postgres, f"GRANT INSERT ON events TO {login}")
        with pytest.raises(ReaderError, match="could still write events"):
            create_reader(postgres, login, "password")
        assert postgres_cluster.sql(
            "SELECT rolcanlogin, pg_has_role(%s, 'tickstock_reader', 'MEMBER') FROM pg_roles "
            "WHERE rolname = %s", params=(login, login)) == [(False, False)]
    finally:
        run_sql(postgres, f"REVOKE ALL ON events FROM {login}")
        postgres_cluster.sql(f"DROP ROLE {login}")


def test_migrating_without_createrole(postgres_server: PostgresServer) -> None:
    """
    A database owner without CREATEROLE migrates fine: the reader role is
    skipped with a NOTICE where it does not exist, granted to where it does,
    and update_etf_universe is owner-only either way. Applying 0004 again
    once the role exists (the recovery docs/database.md gives) grants it,
    with no NOTICE since its read-only default is set. C{tickstock-db
    migrate} prints a NOTICE on a line of its own, after what it applied.
    """
    postgres_server.sql("CREATE ROLE owner LOGIN")
    postgres_server.sql("CREATE ROLE bystander")
    postgres_server.sql("CREATE DATABASE first OWNER owner")
    notices: list[str] = []
    assert migrate(postgres_server.dsn("first", user="owner"), on_notice=notices.append) == ALL
    assert any("tickstock_reader not created" in notice for notice in notices), notices
    assert postgres_server.sql("SELECT 1 FROM pg_roles WHERE rolname = 'tickstock_reader'") == []
    assert postgres_server.sql(
        f"SELECT has_function_privilege('bystander', '{UPDATE}', 'EXECUTE')", "first") == [(False,)]

    postgres_server.sql("CREATE DATABASE second")
    assert migrate(postgres_server.dsn("second")) == ALL
    first = postgres_server.dsn("first", user="owner")
    run_sql(first, "DELETE FROM schema_migrations WHERE version = 4")
    notices.clear()
    assert migrate(first, on_notice=notices.append) == ["0004_reader_role"]
    assert notices == []
    assert postgres_server.sql(
        "SELECT has_table_privilege('tickstock_reader', 'events', 'SELECT')", "first") == [(True,)]

    postgres_server.sql("ALTER ROLE tickstock_reader RESET default_transaction_read_only")
    postgres_server.sql("CREATE DATABASE third OWNER owner")
    notices.clear()
    assert migrate(postgres_server.dsn("third", user="owner"), on_notice=notices.append) == ALL
    assert any("default_transaction_read_only not set" in notice for notice in notices), notices
    assert postgres_server.sql("""
        SELECT has_table_privilege('tickstock_reader', 'cache_entries', 'SELECT'),
               has_function_privilege('tickstock_reader', 'get_etf_universe(text)', 'EXECUTE'),
               has_function_privilege('tickstock_reader', %s, 'EXECUTE')""",
                               "third", (UPDATE,)) == [(True, True, False)]

    # The command prints the notices after its result, one line each.
    postgres_server.sql("CREATE DATABASE fourth OWNER owner")
    result = subprocess.run(
        [sys.executable, "-m", "tickstock.cli.db", "migrate", "--postgres",
         postgres_server.dsn("fourth", user="owner")],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60)
    assert result.returncode == 0, result.stdout
    assert result.stdout == "".join(f"applied {name}\n" for name in ALL) + (
        "tickstock-db: NOTICE: default_transaction_read_only not set on tickstock_reader "
        "(owner may not alter it)\n")


# ---------------------------------------------------------------- the command line


def test_cli_migrate_and_status(empty: str, capsys: pytest.CaptureFixture[str],
                                monkeypatch: pytest.MonkeyPatch) -> None:
    """migrate prints what it applied, then that it is up to date; status lists both kinds."""
    main(["status", "--postgres", empty])
    assert capsys.readouterr().out == "".join(f"pending  {name}\n" for name in ALL)
    main(["migrate", "--postgres", empty])
    assert capsys.readouterr().out == "".join(f"applied {name}\n" for name in ALL)
    monkeypatch.setenv("TICKSTOCK_POSTGRES", empty)
    main(["migrate"])
    assert capsys.readouterr().out == "up to date\n"
    main(["status"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in lines[:-1]] == [["applied", name] for name in ALL]
    assert lines[-1] == "up to date"


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """C{tickstock-db} as its own process, without TICKSTOCK_POSTGRES."""
    environ = {k: v for k, v in os.environ.items() if k != "TICKSTOCK_POSTGRES"}
    return subprocess.run([sys.executable, "-m", "tickstock.cli.db", *args], cwd=ROOT,
                          env=environ, capture_output=True, text=True, timeout=60)


def test_cli_unreachable_server() -> None:
    """
    A server nobody listens on, or a DSN that does not parse, is one line
    on stderr and exit status 2, and the password in the DSN is not shown.
    """
    for dsn in (f"host=127.0.0.1 port={free_port()} dbname=x user=x password=sekrit",
                "password=sekrit this is not a dsn"):
        result = run_cli("migrate", "--postgres", dsn)
        assert result.returncode == 2, result
        assert result.stdout == ""
        assert result.stderr.startswith("tickstock-db: cannot connect to PostgreSQL: ")
        assert result.stderr.count("\n") == 1 and "sekrit" not in result.stderr


def test_cli_needs_a_dsn() -> None:
    """Without --postgres or TICKSTOCK_POSTGRES, it says so (usage error, status 2)."""
    result = run_cli("status")
    assert result.returncode == 2
    assert "give --postgres DSN or set TICKSTOCK_POSTGRES" in result.stderr


def test_cli_create_reader_errors(postgres: str, tmp_path: Path) -> None:
    """A refused login name or a missing password file is one line and status 1."""
    secret = tmp_path / "password"
    secret.write_text("pw\n")
    result = run_cli("create-reader", "--postgres", postgres, "--login", "Bad Name",
                     "--password-file", str(secret))
    assert (result.returncode, result.stderr.count("\n")) == (1, 1), result
    assert result.stderr.startswith("tickstock-db: --login 'Bad Name'")
    result = run_cli("create-reader", "--postgres", postgres, "--login", "ok",
                     "--password-file", str(tmp_path / "missing"))
    assert result.returncode == 1 and "No such file" in result.stderr
