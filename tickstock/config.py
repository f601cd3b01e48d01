"""
The daemon's settings: one frozen value built from defaults, a TOML file,
C{TICKSTOCK_*} environment variables and command-line flags.

Precedence, lowest to highest: defaults < TOML file < environment < flags,
so a deployment can ship one config file and still override a value per
host or per container without editing it.

Every value is parsed and checked here, before any service starts, so a
wrong value stops start-up with one line naming the option and the problem.
No Twisted in this module: it is plain data and parsing.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from tickstock.connections.address import RedisAddress
from tickstock.connections.jwks import check_source
from tickstock.deliver.auth import MIN_SECRET_BYTES
from tickstock.domain.jobs import JOB_PATTERNS
from tickstock.domain.topics import DEFAULT_REGISTRY, Registry, configure
from tickstock.history import DEDUPE_MAX, DEDUPE_WINDOW
from tickstock.web.origins import normalize_origin

ENV_PREFIX = "TICKSTOCK_"
SECRET_ENV = ENV_PREFIX + "JWT_SECRET"


class ConfigError(ValueError):
    """
    A setting is wrong. The message is one line that names the option
    (as its command-line flag) and says what was wrong with the value;
    C{problems} holds that line and any others found with it, so that a
    user fixes them all in one go.
    """

    def __init__(self, *problems: str) -> None:
        super().__init__(problems[0])
        self.problems: tuple[str, ...] = problems


def parse_redis_url(value: str) -> RedisAddress:
    """
    Parse C{redis://[[user]:password@]host[:port][/db]}.

    @raise ValueError: with a message saying what is wrong.
    """
    parts = urlsplit(value)
    if parts.scheme != "redis":
        raise ValueError(
            f"expected redis://[:password@]host[:port][/db], got {value!r}"
        )
    if not parts.hostname:
        raise ValueError(f"no host in {value!r}")
    try:
        port = parts.port or 6379
    except ValueError:
        raise ValueError(f"bad port in {value!r}") from None
    path = parts.path.strip("/") or "0"
    if not (path.isascii() and path.isdigit()):
        raise ValueError(f"database must be a number, got {path!r}")
    return RedisAddress(
        host=parts.hostname,
        port=port,
        db=int(path),
        password=unquote(parts.password) if parts.password else None,
        username=unquote(parts.username) if parts.username else None,
    )


def _str(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("expected a non-empty string")
    return value.strip()


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off", ""):
            return False
    raise ValueError(f"expected true or false, got {value!r}")


def _number(low: float, high: float, kind: type = float) -> Callable[[Any], Any]:
    def parse(value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError(f"expected a number, got {value!r}")
        try:
            number = kind(value)
        except (TypeError, ValueError):
            raise ValueError(f"expected a number, got {value!r}") from None
        if not low <= number <= high:
            raise ValueError(f"must be between {low:g} and {high:g}, got {number:g}")
        return number

    return parse


def _choice(*choices: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}; got {value!r}")
        return str(value)

    return parse


def _origins(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        items = [item for item in value.split(",") if item.strip()]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise ValueError("expected a comma-separated list of origins")
    result = []
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"expected origins as strings, got {item!r}")
        result.append("*" if item.strip() == "*" else normalize_origin(item))
    return tuple(result)


def _names(value: Any) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise ValueError("expected a comma-separated list of names")
    names = tuple(dict.fromkeys(
        item.strip() for item in items if isinstance(item, str) and item.strip()))
    if len(names) != len([i for i in items if not isinstance(i, str) or i.strip()]):
        raise ValueError("expected names as non-empty strings")
    if not names or any(len(n) > 64 or not n.isprintable() for n in names):
        raise ValueError("expected 1 or more names of 1-64 printable characters")
    return names


def _redis(value: Any) -> RedisAddress:
    return parse_redis_url(_str(value))


SENTINEL_PORT = 26379


def _sentinels(value: Any) -> tuple[tuple[str, int], ...]:
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items:
        raise ValueError("expected a comma-separated list of host:port")
    result = []
    for item in items:
        if not isinstance(item, str) or not item.strip():
            raise ValueError(f"expected host:port, got {item!r}")
        parts = urlsplit("//" + item.strip())
        try:
            port = SENTINEL_PORT if parts.port is None else parts.port
        except ValueError:
            port = 0
        if not port:
            raise ValueError(f"bad port in {item.strip()!r}")
        if not parts.hostname or parts.path or parts.query or parts.username:
            raise ValueError(f"expected host:port, got {item.strip()!r}")
        result.append((parts.hostname, port))
    return tuple(dict.fromkeys(result))


def _dsn(value: Any) -> str:
    import psycopg2.extensions

    dsn = _str(value)
    try:
        psycopg2.extensions.parse_dsn(dsn)
    except psycopg2.ProgrammingError:
        # psycopg2's message quotes the DSN, which may hold a password.
        raise ValueError("not a PostgreSQL DSN (key=value pairs or a postgresql:// URL)") from None
    return dsn


def _jwks(value: Any) -> str:
    source = _str(value)
    problem = check_source(source)
    if problem is not None:
        raise ValueError(problem)
    if "://" not in source:
        return _readable_file(source)
    return source


def _readable_file(value: Any) -> str:
    path = _str(value)
    if not os.path.isfile(path):
        raise ValueError(f"no such file: {path}")
    if not os.access(path, os.R_OK):
        raise ValueError(f"cannot read {path}")
    return path


@dataclass(frozen=True)
class Option:
    """One setting: its parser, default and help text, shared by every source."""

    name: str
    parse: Callable[[Any], Any]
    default: Any
    help: str
    flag: bool = False

    @property
    def cli(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


OPTIONS: tuple[Option, ...] = (
    Option("listen", _str, "tcp:8080:interface=127.0.0.1",
           "Twisted endpoint string for the web server (HTTP, /ws, API)."),
    Option("redis", _redis, None,
           "redis://[:password@]host[:port][/db]; none: the embedded in-process bus."),
    Option("redis_sentinel", _sentinels, None,
           "Comma-separated Sentinel host:port list (port default 26379): find the Redis "
           "master through them and follow failovers; needs --redis-master. --redis then "
           "gives only the password, user and db (its host and port are not used)."),
    Option("redis_master", _str, None,
           "Name of the master the --redis-sentinel sentinels monitor."),
    Option("postgres", _dsn, None,
           "PostgreSQL DSN; none: the embedded in-memory store."),
    Option("postgres_readonly", _dsn, None,
           "PostgreSQL DSN for UI reads (default: the --postgres DSN, read-only)."),
    Option("mode", _choice("pubsub", "streams"), "pubsub",
           "How to read the producer: pubsub or streams."),
    Option("jwt_secret_file", _readable_file, None,
           "File holding the HS256 secret for client tokens (or set TICKSTOCK_JWT_SECRET)."),
    Option("jwt_audience", _str, None, "Required 'aud' claim of client tokens."),
    Option("jwt_issuer", _str, None, "Required 'iss' claim of client tokens."),
    Option("jwt_jwks_url", _jwks, None,
           "Identity provider's JWKS (https:// URL, or a file path): RS256/ES256/EdDSA client "
           "tokens signed by its keys are accepted, besides HS256 ones if a secret is given."),
    Option("jwt_jwks_refresh", _number(10, 86_400), 300.0,
           "Seconds between two fetches of the JWKS (a token naming an unknown key fetches it "
           "sooner, at most every 10 s)."),
    Option("jwt_leeway", _number(0, 300), 10.0,
           "Seconds of clock skew allowed when checking a token's exp and nbf."),
    Option("jwt_permissions_claim", _str, "tickstock",
           "Claim that narrows what a token's user may do (topics, universes, backtests); "
           "a token without it may do everything."),
    Option("demo", _bool, False,
           "Feed live data from the built-in producer simulator.", flag=True),
    Option("allowed_origins", _origins, (),
           "Comma-separated WebSocket origins (scheme://host:port); default same-origin."),
    Option("sim_rate", _number(0, 100_000), 20.0,
           "Events per second the built-in simulator publishes (demo)."),
    Option("sim_symbols", _number(1, 10_000, int), 20,
           "How many symbols the built-in simulator trades (demo)."),
    Option("sim_dialect", _choice("tickstock", "upstream"), "tickstock",
           "The shapes the built-in simulator publishes (demo): tickstock, or upstream "
           "(every shape the real producer sends, mixed)."),
    Option("max_message_size", _number(256, 16 * 1024 * 1024, int), 64 * 1024,
           "Largest client WebSocket message or frame, in bytes (close 1009 past it)."),
    Option("max_subscriptions", _number(1, 10_000, int), 100,
           "Subscriptions one connection may hold."),
    Option("client_queue_limit", _number(1, 1_000_000, int), 1000,
           "Messages queued for a client that stopped reading before it is closed."),
    Option("ws_ping_interval", _number(0, 3600), 20.0,
           "Seconds between WebSocket pings to each client (0: off)."),
    # Autobahn's timers fire in 200 ms buckets: a shorter timeout can expire
    # before any pong could arrive.
    Option("ws_ping_timeout", _number(1, 3600), 10.0,
           "Seconds to wait for a pong before closing the client."),
    Option("handshake_timeout", _number(0.1, 600), 10.0,
           "Seconds a new connection has to finish the HTTP and WebSocket handshake."),
    Option("hello_timeout", _number(0.1, 600), 10.0,
           "Seconds a new WebSocket has to send its hello."),
    Option("redis_ping_interval", _number(0.05, 600), 1.0,
           "Seconds between PINGs on the Redis subscriber connection."),
    Option("redis_ping_timeout", _number(0.05, 600), 3.0,
           "Seconds without a PONG before the Redis connection is dropped and remade."),
    Option("deadletter_max", _number(0, 1_000_000, int), 1000,
           "Malformed producer messages kept in tickstock:deadletter."),
    Option("history_max", _number(1, 10_000_000, int), 10_000,
           "Events kept per topic for resume and REST history."),
    Option("history_max_age", _number(1, 30 * 86400), 86400.0,
           "Seconds an event is kept for resume."),
    Option("dedupe_window", _number(1, 86400), DEDUPE_WINDOW,
           "Seconds a producer event_id is remembered on its channel: a message that repeats "
           f"one within it (and within the channel's last {DEDUPE_MAX:,}) is delivered once."),
    Option("history_user_max", _number(1, 1_000_000, int), 1000,
           "Targeted events (own backtests) kept per user until delivered or expired."),
    Option("store_window", _number(0, 1), 0.002,
           "Seconds an event may wait to be stored in Redis with the ones after it: under load, "
           "one script call per window (0: one per reactor turn)."),
    Option("workers", _number(1, 256, int), 1,
           "Processes serving the one port (needs --redis and a tcp: --listen)."),
    Option("node_id", _str, None,
           "This daemon's name as a stream consumer (default: host name and listen port)."),
    Option("postgres_timeout", _number(0.1, 600), 5.0,
           "Seconds a PostgreSQL statement may run before it is cancelled (and the API says 503)."),
    Option("flush_interval", _number(0.01, 60), 1.0,
           "Seconds between writes of tick bars and events to the store."),
    Option("pending_max", _number(100, 100_000_000, int), 200_000,
           "Unwritten bars and events kept in memory while the store is down; past it the "
           "oldest are spilled to --spool-dir."),
    Option("spool_dir", _str, None,
           "Folder for bars and events spilled while PostgreSQL is down (default: a "
           "tickstock-spool folder in the system temp folder)."),
    Option("tick_rate", _number(0.1, 1000), 10.0,
           "Most tick updates per second one client gets per symbol (newer ones replace older)."),
    Option("catchup_max", _number(0, 1_000_000, int), 10_000,
           "Events one resuming subscription may get from PostgreSQL when its gap is older "
           "than the Redis history."),
    Option("api_cache_ttl", _number(0, 3600), 5.0,
           "Seconds a cached /api/patterns answer is served (universe answers: until the "
           "producer says they changed); 0: no cache."),
    Option("jobs_per_user", _number(1, 10_000, int), 3,
           "Backtest jobs one user may have queued or running at once; more are refused."),
    Option("job_timeout", _number(1, 7 * 86400), 300.0,
           "Seconds a job may go without progress from the producer before it is failed."),
    Option("job_patterns", _names, JOB_PATTERNS,
           "Pattern names a backtest may ask for (comma-separated)."),
    Option("canary_interval", _number(0, 3600), 5.0,
           "Seconds between freshness canaries sent through Redis to this daemon's own "
           "source; /ready fails when none came back for three intervals (0: off)."),
    Option("log_format", _choice("json", "text"), None,
           "Log lines as json (one object per line) or text (default: json when twistd "
           "runs as a daemon, text with -n)."),
    Option("client_rate", _number(0.1, 1_000_000), 20.0,
           "Messages per second one WebSocket client may send on average (close 1008 past "
           "--client-burst)."),
    Option("client_burst", _number(1, 1_000_000, int), 200,
           "Messages one WebSocket client may send at once (a reconnect re-sends every "
           "subscription)."),
    Option("max_connections_per_user", _number(0, 1_000_000, int), 20,
           "WebSocket connections one user may hold on this process (0: no limit)."),
    Option("max_connections_per_ip", _number(0, 1_000_000, int), 100,
           "WebSocket connections from one IP address on this process (0: no limit; "
           "set 0 behind a proxy or load balancer)."),
    Option("api_rate", _number(0.1, 1_000_000), 20.0,
           "REST requests per second one user may make on average (429 past --api-burst)."),
    Option("api_burst", _number(1, 1_000_000, int), 100,
           "REST requests one user may make at once."),
    Option("cors_origins", _origins, (),
           "Comma-separated origins allowed to call /api from another site (CORS); "
           "default none: CORS off."),
)

_BY_NAME = {option.name: option for option in OPTIONS}


@dataclass(frozen=True)
class Settings:
    """The daemon's settings after every source has been applied."""

    listen: str
    redis: RedisAddress | None
    redis_sentinel: tuple[tuple[str, int], ...] | None
    redis_master: str | None
    postgres: str | None = dataclasses.field(repr=False)  # a DSN may hold a password
    postgres_readonly: str | None = dataclasses.field(repr=False)
    mode: str
    jwt_secret_file: str | None
    jwt_audience: str | None
    jwt_issuer: str | None
    jwt_jwks_url: str | None
    jwt_jwks_refresh: float
    jwt_leeway: float
    jwt_permissions_claim: str
    demo: bool
    allowed_origins: tuple[str, ...]
    sim_rate: float
    sim_symbols: int
    sim_dialect: str
    max_message_size: int
    max_subscriptions: int
    client_queue_limit: int
    ws_ping_interval: float
    ws_ping_timeout: float
    handshake_timeout: float
    hello_timeout: float
    redis_ping_interval: float
    redis_ping_timeout: float
    deadletter_max: int
    history_max: int
    history_max_age: float
    dedupe_window: float
    history_user_max: int
    store_window: float
    workers: int
    node_id: str | None
    postgres_timeout: float
    flush_interval: float
    pending_max: int
    spool_dir: str | None
    tick_rate: float
    catchup_max: int
    api_cache_ttl: float
    jobs_per_user: int
    job_timeout: float
    job_patterns: tuple[str, ...]
    canary_interval: float
    log_format: str | None
    client_rate: float
    client_burst: int
    max_connections_per_user: int
    max_connections_per_ip: int
    api_rate: float
    api_burst: int
    cors_origins: tuple[str, ...]
    jwt_secret: bytes | None = dataclasses.field(default=None, repr=False)
    channels: Registry = dataclasses.field(default=DEFAULT_REGISTRY, repr=False)
    """The producer channels: the defaults with the TOML file's C{[channels.*]} applied."""

    @property
    def embedded(self) -> bool:
        """No outside service: the in-process bus feeds the daemon."""
        return self.redis is None


assert {f.name for f in dataclasses.fields(Settings)} == set(_BY_NAME) | {"jwt_secret", "channels"}


def read_secret(path: str | None, environ: Mapping[str, str]) -> bytes | None:
    """
    The token secret: the file's content with surrounding whitespace
    stripped, else C{TICKSTOCK_JWT_SECRET}. Never a flag, so it stays out of
    C{ps} and shell history; never in C{repr(Settings)}, so out of logs.

    @raise ConfigError: if it is shorter than L{MIN_SECRET_BYTES}.
    """
    if path:
        with open(path, "rb") as handle:
            secret, where = handle.read().strip(), "--jwt-secret-file"
    elif environ.get(SECRET_ENV):
        secret, where = environ[SECRET_ENV].strip().encode(), SECRET_ENV
    else:
        return None
    if len(secret) < MIN_SECRET_BYTES:
        raise ConfigError(
            f"{where}: the secret must be at least {MIN_SECRET_BYTES} bytes, got {len(secret)}"
        )
    return secret


def read_toml(path: str) -> dict[str, Any]:
    """
    Read a TOML config file. Keys are option names with C{_} or C{-};
    an optional C{[tickstock]} table is accepted as well as top-level keys.

    @raise ConfigError: when the file is missing, unreadable or not TOML.
    """
    try:
        with open(path, "rb") as handle:
            document = tomllib.load(handle)
    except OSError as error:
        raise ConfigError(f"--config: cannot read {path}: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"--config: {path} is not valid TOML: {error}") from None
    table = document.get("tickstock", document)
    if not isinstance(table, dict):
        raise ConfigError(f"--config: [tickstock] in {path} must be a table")
    options = {key.replace("-", "_"): value for key, value in table.items()}
    if table is not document and "channels" in document:
        options["channels"] = document["channels"]
    return options


def load_settings(
    flags: Mapping[str, Any],
    environ: Mapping[str, str],
    config_file: str | None = None,
) -> Settings:
    """
    Build L{Settings} from every source.

    @param flags: option name to value, only for the flags actually given.
    @param environ: the process environment (C{TICKSTOCK_*} are read).
    @param config_file: a TOML file, or L{None}; C{TICKSTOCK_CONFIG} names
        one when this is L{None}.
    @raise ConfigError: naming every wrong option, the first in its message.
    """
    checked = check_settings(flags, environ, config_file)
    if checked.problems:
        raise ConfigError(*checked.problems)
    return checked.settings


@dataclass(frozen=True)
class Checked:
    """
    What L{check_settings} found. C{settings} holds the default in place of
    each value that was wrong, so it is only for use when C{problems} is
    empty (or to look at options not in C{wrong}).
    """

    settings: Settings
    problems: tuple[str, ...]
    wrong: frozenset[str]
    """Options whose own value was wrong (a check between options does not count)."""
    sources: Mapping[str, str]
    """Where each option's value came from: C{default}, the TOML file, a variable or a flag."""


def check_settings(
    flags: Mapping[str, Any],
    environ: Mapping[str, str],
    config_file: str | None = None,
) -> Checked:
    """
    Check every source at once (the parameters are those of L{load_settings})
    and report every problem, one line each, so a first run is fixed in one
    edit rather than one per start. A wrong value is not also reported by
    the checks between options that read it: each problem is said once, at
    its cause.
    """
    config_file = config_file or environ.get(ENV_PREFIX + "CONFIG")
    problems: list[str] = []
    registry = DEFAULT_REGISTRY
    layers: list[tuple[str, Mapping[str, Any]]] = []
    if config_file:
        try:
            document = read_toml(config_file)
        except ConfigError as error:
            problems.append(str(error))
        else:
            tables = document.pop("channels", {})
            try:
                if not isinstance(tables, dict):
                    raise ValueError("[channels] must be a table of channel tables")
                registry = configure(tables)
            except ValueError as error:
                problems.extend(f"--config: {line}" for line in str(error).splitlines())
            problems.extend(f"--config: unknown option {key!r} in {config_file}"
                            for key in sorted(set(document) - set(_BY_NAME)))
            layers.append(("toml", document))
    layers.append(("env", {
        option.name: environ[option.env] for option in OPTIONS if option.env in environ
    }))
    layers.append(("flag", flags))

    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    wrong: set[str] = set()
    for option in OPTIONS:
        value, source = option.default, "default"
        for name, layer in layers:
            if layer.get(option.name) is not None:
                value, source = layer[option.name], name
        sources[option.name] = {"default": "default", "toml": str(config_file),
                                "env": option.env, "flag": option.cli}[source]
        if source != "default":
            try:
                value = option.parse(value)
            except ValueError as error:
                problems.append(f"{option.env if source == 'env' else option.cli}: {error}")
                wrong.add(option.name)
                value = option.default
        values[option.name] = value

    secret = None
    if "jwt_secret_file" in wrong:
        wrong.add("jwt_secret")  # not the variable's instead: that would hide the mistake
    else:
        try:
            secret = read_secret(values["jwt_secret_file"], environ)
        except ConfigError as error:
            problems.append(str(error))
            wrong.add("jwt_secret")
        except OSError as error:
            problems.append(f"--jwt-secret-file: cannot read {error.filename}: {error.strerror}")
            wrong.add("jwt_secret")
    if not wrong & {"redis", "redis_sentinel", "redis_master"}:
        try:
            values["redis"] = _sentinel_address(
                values["redis"], values["redis_sentinel"], values["redis_master"])
        except ConfigError as error:
            problems.append(str(error))
            wrong.add("redis_sentinel")
    settings = Settings(**values, jwt_secret=secret, channels=registry)
    problems.extend(_combination_problems(settings, wrong))
    return Checked(settings, tuple(problems), frozenset(wrong), sources)


def _sentinel_address(
    redis: RedisAddress | None, sentinels: tuple[tuple[str, int], ...] | None,
    master: str | None,
) -> RedisAddress | None:
    """
    The Redis address with Sentinel applied: sentinel mode is Redis mode for
    the rest of the daemon; a --redis URL still gives the credentials and db.
    """
    if sentinels and not master:
        raise ConfigError("--redis-sentinel: give --redis-master too (the monitored master's name)")
    if master and not sentinels:
        raise ConfigError("--redis-master: give --redis-sentinel too (where the sentinels are)")
    if not sentinels:
        return redis
    base = redis or RedisAddress(host="", port=0, db=0, password=None, username=None)
    return dataclasses.replace(base, sentinels=sentinels, master=master)


def _combination_problems(settings: Settings, wrong: set[str]) -> Iterator[str]:
    """The rules between options; each is skipped when an option it reads was wrong."""

    def given(*names: str) -> bool:
        return not wrong.intersection(names)

    if given("ws_ping_interval", "ws_ping_timeout") and settings.ws_ping_interval \
            and settings.ws_ping_timeout >= settings.ws_ping_interval * 10:
        yield "--ws-ping-timeout: must be shorter than ten ping intervals"
    if given("redis_ping_interval", "redis_ping_timeout") \
            and settings.redis_ping_timeout <= settings.redis_ping_interval:
        yield "--redis-ping-timeout: must be longer than --redis-ping-interval"
    if given("postgres", "postgres_readonly") and settings.postgres_readonly \
            and not settings.postgres:
        yield "--postgres-readonly: give --postgres too (the writer)"
    if given("redis", "redis_sentinel", "redis_master", "demo", "jwt_secret", "jwt_jwks_url") \
            and settings.redis is not None and not settings.demo \
            and settings.jwt_secret is None and settings.jwt_jwks_url is None:
        yield (f"--jwt-secret-file: clients must authenticate when not --demo; "
               f"give a secret file (or {SECRET_ENV}), or --jwt-jwks-url")
    if given("workers", "redis", "redis_sentinel") and settings.workers > 1 \
            and settings.redis is None:
        yield "--workers: worker processes share events through Redis; give --redis"
    if given("workers", "listen") and settings.workers > 1 \
            and settings.listen.split(":", 1)[0] not in ("tcp", "tcp6"):
        yield "--workers: needs a tcp: --listen endpoint"
    if given("mode", "redis", "redis_sentinel") and settings.mode == "streams" \
            and settings.redis is None:
        yield "--mode: streams mode reads Redis streams; give --redis"


MASK = "***"


def describe(checked: Checked) -> list[str]:
    """
    The effective settings, one line each with where the value came from:
    what C{--check-config} prints. The JWT secret and the passwords in the
    Redis URL and PostgreSQL DSNs are masked.
    """
    settings = checked.settings
    width = max(len(option.cli) for option in OPTIONS)
    lines = [f"{option.cli:<{width}}  {_shown(option.name, getattr(settings, option.name))}"
             f"  ({checked.sources[option.name]})" for option in OPTIONS]
    if settings.jwt_secret is None:
        secret, source = "none: auth off", "default"
    else:
        secret = f"{MASK} ({len(settings.jwt_secret)} bytes)"
        source = "--jwt-secret-file" if settings.jwt_secret_file else SECRET_ENV
    lines.append(f"{'JWT secret':<{width}}  {secret}  ({source})")
    return lines


def _shown(name: str, value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, RedisAddress):
        return masked_redis(value)
    if name in ("postgres", "postgres_readonly"):
        return masked_dsn(value)
    if name == "redis_sentinel":
        return ",".join(f"{host}:{port}" for host, port in value)
    if isinstance(value, tuple):
        return ",".join(value) if value else "none"
    return str(value)


def masked_redis(address: RedisAddress) -> str:
    """The address as a URL that shows whether it has a user and password, not what they are."""
    text = str(address)
    if address.password is None and address.username is None:
        return text
    scheme, rest = text.split("://", 1)
    password = f":{MASK}" if address.password is not None else ""
    return f"{scheme}://{address.username or ''}{password}@{rest}"


def masked_dsn(dsn: str) -> str:
    """A PostgreSQL DSN (C{key=value} or URL) as C{key=value}, every password masked."""
    import psycopg2.extensions

    params = psycopg2.extensions.parse_dsn(dsn)
    masked: str = psycopg2.extensions.make_dsn(**{
        key: MASK if "password" in key else value for key, value in params.items()})
    return masked
