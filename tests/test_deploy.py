"""
The shipped deployment files work as shipped: the systemd unit's ExecStart
line (with its environment) starts a daemon that serves, logs JSON lines to
stdout for journald, and stops cleanly on systemd's KillSignal; the steps
docs/deploy.md gives for a new host (its PostgreSQL SQL, its C{tickstock-db}
lines, its config) bring up a daemon that is ready; and every installed
command's C{--help} is plain sentences.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import tomllib
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import orjson
import psycopg2.errors
import pytest

from tests.servers import (
    PostgresServer,
    RedisServer,
    _postgres_bin,
    free_port,
    poll,
    run_sql,
)
from tests.test_migrate import ALL, TABLES, write_errors
from tickstock.cli.db import create_reader

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
UNIT = ROOT / "conf" / "tickstock.service"


def unit_service_section(path: Path) -> list[tuple[str, str]]:
    """The [Service] section's key=value lines, in order (keys may repeat)."""
    section, entries = None, []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line
        elif section == "[Service]":
            key, _, value = line.partition("=")
            entries.append((key, value))
    return entries


@contextmanager
def unit_daemon(tmp_path: Path, config: Path,
                environment: Mapping[str, str]) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """
    The unit's ExecStart line with the unit's environment, the venv's twistd
    for its own, C{config} for the unit's config file, a spool folder and a
    port of the test's own, and C{environment} on top; yielded once
    C{/ready} answers 200, killed on the way out if it is still running.
    """
    entries = unit_service_section(UNIT)
    argv = shlex.split(dict(entries)["ExecStart"])
    assert argv[0] == "/opt/tickstock/venv/bin/twistd"
    argv[0] = str(BIN / "twistd")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TICKSTOCK_")}
    for key, value in entries:
        if key == "Environment":
            name, _, value = value.partition("=")
            env[name] = value
    assert env["TICKSTOCK_CONFIG"] == "/etc/tickstock/tickstock.toml"
    env["TICKSTOCK_CONFIG"] = str(config)
    env["TICKSTOCK_SPOOL_DIR"] = str(tmp_path / "spool")
    port = free_port()
    env["TICKSTOCK_LISTEN"] = f"tcp:{port}:interface=127.0.0.1"
    env.update(environment)

    daemon = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT)
    try:
        def ready() -> bool:
            assert daemon.poll() is None, daemon.communicate()[0].decode()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2) as r:
                    return r.status == 200
            except OSError:
                return False

        poll(ready, 30, "the daemon ready")
        yield daemon, port
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.communicate()


def test_the_systemd_units_command_runs_a_daemon_that_stops_on_its_kill_signal(
        tmp_path: Path) -> None:
    entries = dict(unit_service_section(UNIT))
    kill = getattr(signal, entries["KillSignal"])
    with unit_daemon(tmp_path, ROOT / "conf" / "tickstock.toml", {}) as (daemon, _):
        daemon.send_signal(kill)
        output, _ = daemon.communicate(timeout=float(entries["TimeoutStopSec"]))
    # twistd ends by re-raising the signal it stopped on; systemd counts
    # SIGTERM as a clean exit.
    assert daemon.returncode in (0, -kill)
    records = [orjson.loads(line) for line in output.splitlines()]
    assert records[-1]["message"] == "Server Shut Down."
    assert not (tmp_path / "twistd.pid").exists()  # --pidfile= : systemd tracks the process


# ---------------------------------------------------------------- docs/deploy.md, from nothing


def from_nothing() -> str:
    """The shell block of deploy.md's "From nothing" section: the commands a new host runs."""
    text = (ROOT / "docs" / "deploy.md").read_text(encoding="utf-8")
    section = text.split("\n## From nothing", 1)[1].split("\n## ", 1)[0]
    [block] = re.findall(r"^```sh\n(.*?)^```$", section, re.S | re.M)
    return block


def heredocs(block: str) -> dict[str, tuple[str, str]]:
    """Each here-document of the block, by its delimiter: the line that opens it, and its text."""
    return {match[2]: (match[1], match[3])
            for match in re.finditer(r"^([^\n]*<<'(\w+)')\n(.*?\n)\2$", block, re.S | re.M)}


def runuser_lines(block: str, program: str) -> list[tuple[str, list[str]]]:
    """
    The block's C{runuser -u USER -- PROGRAM ...} lines for this program:
    the user, and the arguments after the program (a here-document's
    C{<<'X'} left out).
    """
    found = []
    for line in block.splitlines():
        match = re.fullmatch(r"runuser -u (\w+) -- (\S+)(.*?)(?: <<'\w+')?", line)
        if match and os.path.basename(match[2]) == program:
            found.append((match[1], shlex.split(match[3])))
    return found


def as_user(postgres: PostgresServer, user: str) -> dict[str, str]:
    """
    The environment in which libpq connects to the test cluster as C{user},
    as C{runuser -u USER} connects to the local server (peer authentication)
    on the host.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "TICKSTOCK_"))}
    return {**env, "PGHOST": "127.0.0.1", "PGPORT": str(postgres.port), "PGUSER": user}


def test_the_documented_postgres_setup_migrates_as_the_owner_and_serves(
        postgres_server: PostgresServer, redis_server: RedisServer, secret_file: str,
        tmp_path: Path) -> None:
    """
    deploy.md's SQL block, run by psql as the superuser, then its
    C{tickstock-db} lines run as the owner, as the page has them: migrate
    prints one line per migration and no NOTICE (the owner lacks CREATEROLE,
    and needs it for nothing), and status prints clean lines. The reader
    role reads every table and can write none. The unit's ExecStart with
    the page's config, its Redis and JWT secret pointed at the test's own,
    is ready. A cluster of the test's own: the SQL creates cluster-wide
    roles, as on a new host.
    """
    block = from_nothing()
    [(superuser, psql_args)] = runuser_lines(block, "psql")
    assert superuser == "postgres"
    opener, sql = heredocs(block)["SQL"]
    assert opener.startswith("runuser -u postgres -- psql ")
    result = subprocess.run([_postgres_bin("psql"), *psql_args], input=sql, text=True,
                            env=as_user(postgres_server, superuser), capture_output=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr

    outputs = []
    commands = runuser_lines(block, "tickstock-db")
    assert [(user, args[0]) for user, args in commands] == [("tickstock", "migrate"),
                                                            ("tickstock", "status")]
    for user, args in commands:
        result = subprocess.run([str(BIN / "tickstock-db"), *args], text=True, timeout=120,
                                env=as_user(postgres_server, user),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert result.returncode == 0, result.stdout
        outputs.append(result.stdout)
    assert outputs[0] == "".join(f"applied {name}\n" for name in ALL)
    *applied, last = outputs[1].split("\n")[:-1]
    assert last == "up to date" and outputs[1].endswith("\n")
    assert [re.fullmatch(r"applied  (\w+)  \S+", line)[1] for line in applied] == ALL

    dsn = postgres_server.dsn("tickstock")
    assert run_sql(dsn, """
        SELECT rolcanlogin, setconfig FROM pg_roles
        LEFT JOIN pg_db_role_setting ON setrole = pg_roles.oid
        WHERE rolname = 'tickstock_reader'""") == [(False, ["default_transaction_read_only=on"])]
    assert run_sql(dsn, "SELECT DISTINCT tableowner FROM pg_tables WHERE schemaname = 'public'"
                   ) == [("tickstock",)]
    assert create_reader(dsn, "tickstock_ui", "ui password") is True
    reader = postgres_server.dsn("tickstock", user="tickstock_ui")
    for table in TABLES:
        run_sql(reader, f"SELECT * FROM {table} LIMIT 1")
    outcome = write_errors(reader, read_write=True)
    assert set(outcome.values()) == {psycopg2.errors.InsufficientPrivilege}, outcome

    _, config_text = heredocs(block)["TOML"]
    config = tmp_path / "tickstock.toml"
    config.write_text(config_text)
    settings = tomllib.loads(config_text)["tickstock"]
    environment = {
        # What differs from the host's: the test's Redis, secret and cluster.
        "TICKSTOCK_REDIS": redis_server.url, "TICKSTOCK_JWT_SECRET_FILE": secret_file,
        "PGHOST": "127.0.0.1", "PGPORT": str(postgres_server.port),
    }
    assert {"redis", "jwt_secret_file", "postgres"} <= set(settings)
    assert "host" not in settings["postgres"]  # the local socket: PGHOST may stand in for it
    with unit_daemon(tmp_path, config, environment) as (_, port):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=5) as answer:
            store = orjson.loads(answer.read())["components"]["store"]
    assert store["writer"]["state"] == "connected"  # PostgreSQL, not the embedded store


def test_the_documented_host_has_the_units_paths_and_user() -> None:
    """
    deploy.md's commands create what conf/tickstock.service names: its user
    and group, the virtualenv its ExecStart runs from, its config file; the
    secret and the config are made root's and the group's before they are
    written; the unit is installed and enabled, and the readiness check asks
    the port the config listens on.
    """
    block = from_nothing()
    lines = block.splitlines()
    unit = dict(unit_service_section(UNIT))
    user = unit["User"]
    assert unit["Group"] == user
    useradd = next(line for line in lines if line.startswith("useradd "))
    assert "--user-group" in useradd.split() and useradd.split()[-1] == user
    assert f"--home-dir {unit['WorkingDirectory']}" in useradd
    assert unit["WorkingDirectory"] == f"/var/lib/{unit['StateDirectory']}"

    bin_dir = os.path.dirname(shlex.split(unit["ExecStart"])[0])
    assert f"python3 -m venv {os.path.dirname(bin_dir)}" in lines
    programs = re.findall(r"/opt/\S+/bin/\S+", block)
    assert programs and all(os.path.dirname(path) == bin_dir for path in programs), programs

    environment = dict(value.split("=", 1) for key, value in unit_service_section(UNIT)
                       if key == "Environment")
    config_path = environment["TICKSTOCK_CONFIG"]
    opener, config_text = heredocs(block)["TOML"]
    assert opener == f"cat > {config_path} <<'TOML'"
    settings = tomllib.loads(config_text)["tickstock"]
    secret_path = settings["jwt_secret_file"]
    for path in (secret_path, config_path):
        created = lines.index(f"install -m 0640 -o root -g {user} /dev/null {path}")
        written = next(i for i, line in enumerate(lines) if f"> {path}" in line)
        assert lines.index(f"install -d -m 0750 -o root -g {user} {os.path.dirname(path)}") \
            < created < written
    assert f"install -m 0644 conf/tickstock.service /etc/systemd/system/{UNIT.name}" in lines
    assert f"systemctl enable --now {UNIT.stem}" in lines

    port = re.fullmatch(r"tcp:(\d+):interface=127\.0\.0\.1", settings["listen"])[1]
    assert re.search(rf"^curl .* http://127\.0\.0\.1:{port}/ready$", block, re.M)


def test_the_daemon_process_runs_with_its_own_garbage_collector_thresholds() -> None:
    """makeService (twistd's entry point) sets the process's GC thresholds."""
    import gc

    from tickstock.tap import GC_THRESHOLDS, Options, makeService

    before = gc.get_threshold()
    options = Options()
    options.parseOptions(["--listen", "tcp:0:interface=127.0.0.1"])
    try:
        makeService(options)
        assert gc.get_threshold() == GC_THRESHOLDS != before
    finally:
        gc.set_threshold(*before)


# ---------------------------------------------------------------- the installed commands

EPYTEXT = re.compile(r"\b[BCILMU]\{|@(param|return|raise|ivar|type|rtype)\b")
SCRIPTS = sorted(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"])
DB_COMMANDS = ("migrate", "status", "create-reader")


@pytest.mark.parametrize("argv", [[script] for script in SCRIPTS]
                         + [["tickstock-db", command] for command in DB_COMMANDS])
def test_installed_command_help_is_plain_sentences(argv: list[str]) -> None:
    """
    Each console script the package installs (and each tickstock-db
    command) describes itself in plain sentences: no epytext markup, and a
    description that is whole sentences, not a docstring's first line.
    """
    result = subprocess.run([str(BIN / argv[0]), *argv[1:], "--help"], capture_output=True,
                            text=True, timeout=60)
    assert (result.returncode, result.stderr) == (0, ""), result
    assert not EPYTEXT.search(result.stdout), result.stdout
    usage, description, *_ = result.stdout.split("\n\n")
    assert usage.startswith(f"usage: {' '.join(argv)} ")
    description = " ".join(description.split())
    assert re.fullmatch(r"[A-Z].*[.!?]", description), description
