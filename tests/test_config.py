"""Settings from defaults, a TOML file, TICKSTOCK_* variables and flags."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tickstock.config import (
    OPTIONS,
    ConfigError,
    check_settings,
    describe,
    load_settings,
    parse_redis_url,
)
from tickstock.web.origins import normalize_origin


def test_defaults_are_the_embedded_demo():
    """With nothing set, the daemon is the embedded demo on loopback port 8080."""
    settings = load_settings({}, {})
    assert settings.listen == "tcp:8080:interface=127.0.0.1"
    assert settings.redis is None and settings.embedded
    assert settings.mode == "pubsub" and not settings.demo


def test_precedence_flags_over_env_over_toml(tmp_path):
    """A flag beats TICKSTOCK_* which beats the TOML file which beats the default."""
    config = tmp_path / "t.toml"
    config.write_text('[tickstock]\nsim_rate = 5\nsim_symbols = 7\nmax-subscriptions = 9\n')
    env = {"TICKSTOCK_SIM_RATE": "6", "TICKSTOCK_SIM_SYMBOLS": "8"}
    settings = load_settings({"sim_rate": "7"}, env, str(config))
    assert settings.sim_rate == 7.0
    assert settings.sim_symbols == 8
    assert settings.max_subscriptions == 9
    assert settings.client_queue_limit == 1000


def test_config_file_from_environment(tmp_path):
    """TICKSTOCK_CONFIG names the TOML file when --config is not given."""
    config = tmp_path / "t.toml"
    config.write_text('redis = "redis://example.test:6380/2"\ndemo = true\n')
    settings = load_settings({}, {"TICKSTOCK_CONFIG": str(config)})
    redis = settings.redis
    assert (redis.host, redis.port, redis.db) == ("example.test", 6380, 2)


@pytest.mark.parametrize("flags, env, message", [
    ({"redis": "http://x"}, {}, "--redis: expected redis://"),
    ({"redis": "redis://h:99999/0"}, {}, "--redis: bad port"),
    ({"redis": "redis://h/x"}, {}, "--redis: database must be a number"),
    ({}, {"TICKSTOCK_SIM_RATE": "fast"}, "TICKSTOCK_SIM_RATE: expected a number"),
    ({"max_message_size": "10"}, {}, "--max-message-size: must be between"),
    ({"mode": "kafka"}, {}, "--mode: expected one of pubsub, streams"),
    ({"allowed_origins": "ftp://x"}, {}, "--allowed-origins: not an http(s) origin"),
    ({"jwt_secret_file": "/nonexistent"}, {}, "--jwt-secret-file: no such file"),
    ({}, {"TICKSTOCK_DEMO": "maybe"}, "TICKSTOCK_DEMO: expected true or false"),
    ({"postgres_readonly": "dbname=x"}, {}, "--postgres-readonly: give --postgres too"),
    ({"redis": "redis://h"}, {}, "--jwt-secret-file: clients must authenticate"),
    ({}, {"TICKSTOCK_JWT_SECRET": "short"}, "TICKSTOCK_JWT_SECRET: the secret must be at least 32"),
    ({"mode": "streams"}, {}, "--mode: streams mode reads Redis streams; give --redis"),
    ({"workers": "2"}, {}, "--workers: worker processes share events through Redis"),
    ({"workers": "0"}, {}, "--workers: must be between"),
    ({"workers": "2", "redis": "redis://h", "listen": "unix:/tmp/s", "demo": True}, {},
     "--workers: needs a tcp: --listen endpoint"),
])
def test_wrong_values_name_the_option(flags, env, message):
    """Each wrong value raises one line that names the option and the problem."""
    with pytest.raises(ConfigError) as raised:
        load_settings(flags, env)
    assert str(raised.value).startswith(message)
    assert "\n" not in str(raised.value)


def test_secret_from_file_stripped_or_environment(tmp_path):
    """
    The secret comes from the file (whitespace stripped) before the
    environment; a short one is refused; it never shows in repr(settings).
    """
    path = tmp_path / "jwt"
    path.write_bytes(b"\n  " + b"f" * 32 + b"  \n")
    env = {"TICKSTOCK_JWT_SECRET": "e" * 40}
    settings = load_settings({"redis": "redis://h", "jwt_secret_file": str(path)}, env)
    assert settings.jwt_secret == b"f" * 32
    assert b"f" * 32 not in repr(settings).encode()
    assert load_settings({"redis": "redis://h"}, env).jwt_secret == b"e" * 40
    path.write_bytes(b"short\n")
    with pytest.raises(ConfigError,
                       match="--jwt-secret-file: the secret must be at least 32 bytes, got 5"):
        load_settings({"jwt_secret_file": str(path)}, {})


def test_toml_errors(tmp_path):
    """A missing file, bad TOML, or an unknown key is a one-line error."""
    with pytest.raises(ConfigError, match="--config: cannot read"):
        load_settings({}, {}, str(tmp_path / "missing.toml"))
    bad = tmp_path / "bad.toml"
    bad.write_text("listen = \n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_settings({}, {}, str(bad))
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("colour = 'blue'\n")
    with pytest.raises(ConfigError, match="unknown option 'colour'"):
        load_settings({}, {}, str(unknown))


def test_redis_url_password_is_not_printed():
    """The parsed address keeps the password but never shows it."""
    address = parse_redis_url("redis://:hunter2@10.0.0.5:6390/3")
    assert address.password == "hunter2"
    assert "hunter2" not in str(address) and "hunter2" not in address.endpoint()


def test_origins_are_normalized_with_ports():
    """Default ports are made explicit so both spellings of an origin match."""
    assert normalize_origin("https://App.Example.com") == "https://app.example.com:443"
    assert normalize_origin("http://localhost:8080") == "http://localhost:8080"
    with pytest.raises(ValueError):
        normalize_origin("null")


def test_shipped_example_config_documents_every_option_with_its_default():
    """
    conf/tickstock.toml loads, names every option (set, or commented out
    when it has no plain default), and every value it sets is the default.
    """
    path = Path(__file__).resolve().parent.parent / "conf" / "tickstock.toml"
    assert load_settings({}, {}, str(path)) == load_settings({}, {})
    named = set(re.findall(r"^#? ?([a-z_]+) = ", path.read_text(), re.MULTILINE))
    assert named >= {option.name for option in OPTIONS}, {o.name for o in OPTIONS} - named


def _twistd(*args: str) -> subprocess.CompletedProcess[str]:
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    return subprocess.run([twistd, *args], capture_output=True, text=True, timeout=60)


def test_twistd_lists_the_plugin():
    """`twistd --help` lists tickstock, so the plugin is installed and importable."""
    result = _twistd("--help")
    assert result.returncode == 0
    assert "tickstock" in result.stdout


def test_twistd_refuses_a_wrong_option_in_one_line():
    """A wrong value stops start-up with one line on stderr and no traceback."""
    result = _twistd("-n", "--pidfile=", "tickstock", "--redis", "mysql://db")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert lines == ["tickstock: --redis: expected redis://[:password@]host[:port][/db], got 'mysql://db'"]
    assert "Traceback" not in result.stdout + result.stderr


def test_twistd_refuses_a_bad_endpoint():
    """A --listen that is not an endpoint string is a one-line error too."""
    result = _twistd("-n", "--pidfile=", "tickstock", "--listen", "carrier-pigeon:8080")
    assert result.returncode != 0
    assert result.stderr.strip().startswith("tickstock: --listen: not a Twisted endpoint string")
    assert "Traceback" not in result.stderr


def test_readme_lists_every_option():
    """The README's options table names every option with its env variable."""
    readme = Path(__file__).resolve().parent.parent.joinpath("README.md").read_text()
    for option in OPTIONS:
        assert f"| `{option.cli}` | `{option.env}` |" in readme, option.name


def test_the_repr_of_settings_holds_no_password():
    """A settings object that ends up in a log line or traceback shows no secret."""
    settings = load_settings({"redis": "redis://:redis-pw-1@h:1/0", "demo": True,
                              "postgres": "host=db password=pg-pw-2",
                              "postgres_readonly": "host=replica password=pg-pw-3"}, {})
    shown = repr(settings) + str(settings.redis)
    assert not any(secret in shown for secret in ("redis-pw-1", "pg-pw-2", "pg-pw-3"))


def test_every_problem_is_reported_once_at_its_cause(tmp_path):
    """
    Every wrong value is reported, in one go; a rule between options is not
    also reported when an option it reads was wrong (that is the cause).
    """
    config = tmp_path / "t.toml"
    config.write_text('colour = "blue"\nshape = 1\nsim_symbols = "many"\n')
    with pytest.raises(ConfigError) as raised:
        load_settings({"redis": "mysql://db", "mode": "streams", "workers": "2",
                       "jwt_secret_file": str(tmp_path / "missing")},
                      {"TICKSTOCK_SIM_RATE": "fast"}, str(config))
    assert raised.value.problems == (
        f"--config: unknown option 'colour' in {config}",
        f"--config: unknown option 'shape' in {config}",
        "--redis: expected redis://[:password@]host[:port][/db], got 'mysql://db'",
        f"--jwt-secret-file: no such file: {tmp_path / 'missing'}",
        "TICKSTOCK_SIM_RATE: expected a number, got 'fast'",
        "--sim-symbols: expected a number, got 'many'",
    )
    assert str(raised.value) == raised.value.problems[0]


def test_rules_between_right_values_are_all_reported():
    """With every value right on its own, each broken rule between them is one line."""
    problems = check_settings({"redis_sentinel": "h:1", "mode": "streams", "workers": "2",
                               "postgres_readonly": "dbname=x"}, {}).problems
    assert problems == (
        "--redis-sentinel: give --redis-master too (the monitored master's name)",
        "--postgres-readonly: give --postgres too (the writer)",
    )
    assert check_settings({"redis": "redis://h", "workers": "2", "listen": "unix:/s"}, {}
                          ).problems == (
        "--jwt-secret-file: clients must authenticate when not --demo; give a secret file "
        "(or TICKSTOCK_JWT_SECRET), or --jwt-jwks-url",
        "--workers: needs a tcp: --listen endpoint",
    )


def test_a_dsn_that_does_not_parse_is_refused_without_showing_it():
    """A PostgreSQL DSN is checked at start-up; the message does not echo it (a password)."""
    with pytest.raises(ConfigError) as raised:
        load_settings({"postgres": "host=db password=pg pw-9"}, {})
    assert str(raised.value) == (
        "--postgres: not a PostgreSQL DSN (key=value pairs or a postgresql:// URL)")
    assert "pw-9" not in str(raised.value)


def test_described_settings_mask_every_secret_and_say_where_values_came_from(tmp_path):
    """
    What --check-config prints: each option, its value and its source; the
    JWT secret and the passwords in the Redis URL and both DSNs masked.
    """
    config = tmp_path / "t.toml"
    config.write_text('sim_rate = 5\npostgres = "postgresql://writer:pg-pw-2@db/ts"\n')
    secret = tmp_path / "jwt"
    secret.write_bytes(b"s" * 40 + b"\n")
    checked = check_settings(
        {"redis": "redis://alice:redis-pw-1@h:6380/2", "jwt_secret_file": str(secret),
         "postgres_readonly": "host=replica user=ui password=pg-pw-3"},
        {"TICKSTOCK_TICK_RATE": "4"}, str(config))
    assert checked.problems == ()
    lines = describe(checked)
    text = "\n".join(lines)
    for hidden in ("redis-pw-1", "pg-pw-2", "pg-pw-3", "s" * 32):
        assert hidden not in text
    shown = {line.split()[0]: line.split(None, 1)[1] for line in lines}
    assert shown["--redis"] == "redis://alice:***@h:6380/2  (--redis)"
    assert shown["--postgres"].endswith(f"  ({config})")
    assert "password=***" in shown["--postgres"] and "user=writer" in shown["--postgres"]
    assert "password=***" in shown["--postgres-readonly"]
    assert shown["--sim-rate"] == f"5.0  ({config})"
    assert shown["--tick-rate"] == "4.0  (TICKSTOCK_TICK_RATE)"
    assert shown["--listen"] == "tcp:8080:interface=127.0.0.1  (default)"
    assert lines[-1].split(None, 2)[2] == "*** (40 bytes)  (--jwt-secret-file)"
    assert len(lines) == len(OPTIONS) + 1


def test_options_take_a_flag_as_twistd_gives_it():
    """twistd hands a flag over as the integer 1: --demo must mean demo (not an error)."""
    from tickstock.tap import Options

    options = Options()
    options.parseOptions(["--demo", "--redis", "redis://h", "--listen", "tcp:0"])
    assert options.settings.demo is True and options.settings.jwt_secret is None


def test_check_config_prints_the_settings_or_every_problem(capsys, tmp_path):
    """--check-config: the masked settings and exit 0; or every problem and exit 2."""
    from tickstock.tap import Options

    with pytest.raises(SystemExit) as exited:
        Options().parseOptions(["--check-config", "--demo", "--redis", "redis://:pw-1@h/0"])
    assert exited.value.code == 0
    out, err = capsys.readouterr()
    assert err == "" and "pw-1" not in out
    assert out.splitlines()[0] == "tickstock: the configuration is valid; the effective settings:"
    assert "  --redis                     redis://:***@h:6379/0  (--redis)" in out.splitlines()
    with pytest.raises(SystemExit) as exited:
        Options().parseOptions(["--check-config", "--mode", "kafka", "--listen",
                                f"ssl:0:privateKey={tmp_path / 'key.pem'}"])
    assert exited.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        "tickstock: --mode: expected one of pubsub, streams; got 'kafka'",
        f"tickstock: --listen: cannot read {tmp_path / 'key.pem'}: No such file or directory",
    ]
