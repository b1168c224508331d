"""`keyquorum server run`'s settings: one table, read from flags and a TOML file.

Every setting is both a flag (`--data-dir PATH`) and a key of the
configuration file (`data-dir = "/var/lib/keyquorum"`), by construction:
`server run`'s options are made from `SETTINGS`. A value comes from, in
order: the command line, the environment (`KEYQUORUM_DSN` only), the file
given with `--config`, the default.

The file is TOML read with the standard library (`tomllib`), flat: one
`key = value` per setting. An unknown key, a value of the wrong type, a
file that cannot be read and a TOML syntax error are refused naming the
file and the line. Relative paths in the file are relative to the file's
own folder (a unit's working directory is `/`). A file that sets `dsn`
(which may carry a database password) must not be readable by every user.

Checks that involve several settings (TLS on by default, mTLS needs a
client CA, ...) run in `ServerConfig.check`, for flags and file alike, so
`server check-config` refuses exactly what `server run` would.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import socket
import stat
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import click

from keyquorum.quorum.errors import InvalidInputError
from keyquorum.quorum.limits import DEFAULT_LIMITS, Limits

#: A value as the file or click gives it, and the folder relative paths are under.
Convert = Callable[[object, Path | None], object]
#: Largest configuration file read (a few hundred bytes in practice).
MAX_FILE_BYTES: Final = 65_536
LOG_LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMATS: Final = ("text", "json")
STORES: Final = ("sqlite", "postgres")
#: A custodian's full fingerprint (`keyquorum custodian show`, the "full:" line).
_FINGERPRINT: Final = re.compile(r"[0-9a-f]{64}")
#: Settings that are gone, and what replaced them.
REMOVED: Final = {
    "auditor-key": "witnesses are no longer an operator's list: the quorum adds them to the "
    "log (`keyquorum proposal new add-witness`); see docs/audit.md",
}


# -- converters: each takes what the file or click gives and raises ValueError ---------


def _text(value: object, _base: Path | None) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be a string, not {_toml_type(value)}")
    if not value or value != value.strip():
        raise ValueError("must be a non-empty string without surrounding spaces")
    return value


def _path(value: object, base: Path | None) -> Path:
    path = Path(_text(value, base))
    return base / path if base is not None and not path.is_absolute() else path


def _readable_file(value: object, base: Path | None) -> Path:
    path = _path(value, base)
    if not path.is_file():
        raise ValueError(f"{path} is not a file")
    if not os.access(path, os.R_OK):
        raise ValueError(f"{path} is not readable by this user")
    return path


def _address(value: object, base: Path | None) -> str:
    text = _text(value, base)
    host, sep, port = text.rpartition(":")
    if not sep or not host.strip("[]") or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"must be HOST:PORT with a port from 0 to 65535, got {text!r}")
    return text


def split_address(text: str) -> tuple[str, int]:
    """(host, port) of a HOST:PORT that `_address` accepted; brackets of IPv6 removed."""
    host, _sep, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def _positive_number(value: object, _base: Path | None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"must be a number, not {_toml_type(value)}")
    number = float(value)
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"must be a number above 0, got {value!r}")
    return number


def _count(value: object, _base: Path | None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"must be a whole number, not {_toml_type(value)}")
    if value < 1:
        raise ValueError(f"must be at least 1, got {value!r}")
    return value


def _workers(value: object, _base: Path | None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"must be a whole number, not {_toml_type(value)}")
    if value < 0:
        raise ValueError(f"must be 0 or more, got {value!r}")
    return value


def _bool(value: object, _base: Path | None) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, not {_toml_type(value)}")
    return value


def _choice(choices: tuple[str, ...], *, upper: bool = False) -> Convert:
    def convert(value: object, base: Path | None) -> str:
        text = _text(value, base)
        canonical = text.upper() if upper else text.lower()
        if canonical not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, got {text!r}")
        return canonical

    return convert


def _text_list(value: object, base: Path | None) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, list | tuple):
        raise ValueError(f"must be a list of strings, not {_toml_type(value)}")
    return tuple(_text(item, base) for item in value)


def _fingerprint_list(value: object, base: Path | None) -> tuple[str, ...]:
    fingerprints = _text_list(value, base)
    for fingerprint in fingerprints:
        if not _FINGERPRINT.fullmatch(fingerprint):
            raise ValueError(
                f"{fingerprint!r} is not a full fingerprint (64 lower-case hex digits, "
                "as `keyquorum custodian show` prints it)"
            )
    if len(set(fingerprints)) != len(fingerprints):
        raise ValueError("a custodian is named twice")
    return fingerprints


def _toml_type(value: object) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(
        type(value), "a list" if isinstance(value, list) else "a table"
    )


# -- the table --------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One setting: its flag `--key` and its file key `key`."""

    key: str
    convert: Convert
    help: str
    default: object = None
    metavar: str | None = None
    flag: bool = False
    multiple: bool = False
    envvar: str | None = None

    @property
    def name(self) -> str:
        """The Python name (click's parameter name, `ServerConfig`'s field)."""
        return self.key.replace("-", "_")


SETTINGS: Final[tuple[Setting, ...]] = (
    Setting(
        "data-dir",
        _path,
        "Directory for the SQLite store, the log signing key and the last checkpoint "
        "(created mode 0700; locked while the daemon runs). Required.",
        metavar="PATH",
    ),
    Setting("listen", _address, "HOST:PORT of the custodians' TLS port.", "127.0.0.1:7443"),
    Setting("tls-cert", _readable_file, "Server certificate chain (PEM).", metavar="FILE"),
    Setting("tls-key", _readable_file, "Server private key (PEM).", metavar="FILE"),
    Setting(
        "client-ca",
        _readable_file,
        "CA for backend and auditor client certificates (required with --listen-mtls).",
        metavar="FILE",
    ),
    Setting(
        "listen-mtls",
        _address,
        "HOST:PORT of a second listener that requires client certificates "
        "(backends: KeyService; auditors: AuditService).",
    ),
    Setting(
        "metrics-listen",
        _address,
        "HOST:PORT serving Prometheus metrics (/metrics) and health (/health) over plain "
        "HTTP, on a port of its own.",
    ),
    Setting(
        "access-log",
        _path,
        "Append one JSON line per KeyService item here (no context, no key material).",
        metavar="FILE",
    ),
    Setting(
        "rate-limit",
        _positive_number,
        "KeyService items per second per backend (bucket of one second); default: none.",
        metavar="N",
    ),
    Setting(
        "ceremony-roster",
        _fingerprint_list,
        "Run the ceremony only for exactly these custodians (their full fingerprints, in "
        "share order; repeatable, a list in the file) instead of printing a one-time "
        "ceremony code at start.",
        default=(),
        metavar="FINGERPRINT",
        multiple=True,
    ),
    Setting(
        "insecure-dev-plaintext",
        _bool,
        "Serve plaintext gRPC; only on a loopback address, for development.",
        default=False,
        flag=True,
    ),
    Setting("replica", _text, "Replica name (default: the host name).", metavar="NAME"),
    Setting(
        "store",
        _choice(STORES),
        "sqlite: one file in --data-dir (one replica); postgres: a database several "
        "replicas share (--dsn). See docs/replicas.md.",
        default="sqlite",
        metavar="|".join(STORES),
    ),
    Setting(
        "dsn",
        _text,
        "PostgreSQL connection string for --store postgres (libpq DSN or URI). Prefer the "
        "environment variable KEYQUORUM_DSN, so that a password is not on the command line.",
        envvar="KEYQUORUM_DSN",
    ),
    Setting(
        "ready-file",
        _path,
        "Write {port, pid, ...} as JSON here once serving (for scripts and tests).",
        metavar="FILE",
    ),
    Setting(
        "log-level",
        _choice(LOG_LEVELS, upper=True),
        "Least severe log level written.",
        default="INFO",
        metavar="|".join(LOG_LEVELS),
    ),
    Setting(
        "log-format",
        _choice(LOG_FORMATS),
        "text: one readable line per record; json: one JSON object per line.",
        default="text",
        metavar="|".join(LOG_FORMATS),
    ),
    # -- the server model (docs/adr/0009): workers, and what one client may hold -------
    Setting(
        "workers",
        _workers,
        "Processes serving KeyService on the --listen-mtls port (SO_REUSEPORT); 0: the "
        "daemon serves it itself. Default: the number of cores.",
        metavar="N",
    ),
    *(
        Setting(key, convert, text + f"  [default: {getattr(DEFAULT_LIMITS, field_)}]", metavar="N")
        for key, field_, convert, text in (
            (
                "max-connections",
                "max_connections",
                _count,
                "Connections open at once per listener.",
            ),
            (
                "max-streams-per-connection",
                "max_streams_per_connection",
                _count,
                "Calls open at once on one connection.",
            ),
            (
                "max-calls-per-peer",
                "max_calls_per_peer",
                _count,
                "Calls being served at once per client certificate (mTLS port) or address "
                "(custodian port), per listener and serving process.",
            ),
            (
                "max-calls",
                "max_calls",
                _count,
                "Calls being served at once per listener and serving process.",
            ),
            (
                "request-timeout",
                "request_timeout_seconds",
                _positive_number,
                "Seconds from a call's headers to its request message.",
            ),
            (
                "handshake-timeout",
                "handshake_timeout_seconds",
                _positive_number,
                "Seconds from accepting a connection to the end of its TLS handshake.",
            ),
            (
                "connection-idle",
                "connection_idle_seconds",
                _count,
                "Seconds a connection may stay without a call.",
            ),
            (
                "connection-age",
                "connection_age_seconds",
                _count,
                "Seconds after which a connection is closed (calls get --connection-age-grace).",
            ),
            (
                "connection-age-grace",
                "connection_age_grace_seconds",
                _count,
                "Seconds the calls of an aged connection get to finish.",
            ),
            ("max-message-bytes", "max_message_bytes", _count, "Largest request or answer."),
            ("max-metadata-bytes", "max_metadata_bytes", _count, "Largest header block of a call."),
        )
    ),
)
BY_KEY: Final = {s.key: s for s in SETTINGS}
#: The settings that are fields of `Limits`: key -> Limits field.
LIMIT_FIELDS: Final = {
    "max-connections": "max_connections",
    "max-streams-per-connection": "max_streams_per_connection",
    "max-calls-per-peer": "max_calls_per_peer",
    "max-calls": "max_calls",
    "request-timeout": "request_timeout_seconds",
    "handshake-timeout": "handshake_timeout_seconds",
    "connection-idle": "connection_idle_seconds",
    "connection-age": "connection_age_seconds",
    "connection-age-grace": "connection_age_grace_seconds",
    "max-message-bytes": "max_message_bytes",
    "max-metadata-bytes": "max_metadata_bytes",
}


# -- the result -------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerConfig:
    """The settings `server run` starts with, each with where it came from."""

    data_dir: Path
    listen: str
    tls_cert: Path | None
    tls_key: Path | None
    client_ca: Path | None
    listen_mtls: str | None
    metrics_listen: str | None
    access_log: Path | None
    rate_limit: float | None
    ceremony_roster: tuple[str, ...]
    insecure_dev_plaintext: bool
    replica: str
    store: str
    dsn: str | None = field(repr=False)
    ready_file: Path | None
    log_level: str
    log_format: str
    workers: int | None
    max_connections: int | None
    max_streams_per_connection: int | None
    max_calls_per_peer: int | None
    max_calls: int | None
    request_timeout: float | None
    handshake_timeout: float | None
    connection_idle: int | None
    connection_age: int | None
    connection_age_grace: int | None
    max_message_bytes: int | None
    max_metadata_bytes: int | None
    #: key -> "command line", "environment", "FILE line N" or "default".
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)

    def check(self) -> None:
        """Refuse combinations `server run` cannot serve (each message names the settings)."""
        if self.insecure_dev_plaintext:
            if self.tls_cert is not None or self.tls_key is not None:
                raise InvalidInputError(
                    "--insecure-dev-plaintext serves without TLS: drop --tls-cert and "
                    "--tls-key, or drop the flag"
                )
            from keyquorum.client.tls import check_plaintext_allowed

            check_plaintext_allowed(split_address(self.listen)[0], allow_insecure_dev=True)
        elif self.tls_cert is None or self.tls_key is None:
            raise InvalidInputError(
                "TLS is on by default: give --tls-cert and --tls-key "
                "(or --insecure-dev-plaintext on loopback)"
            )
        if self.listen_mtls is not None:
            if self.tls_cert is None or self.tls_key is None or self.client_ca is None:
                raise InvalidInputError("--listen-mtls needs --tls-cert, --tls-key and --client-ca")
        elif self.client_ca is not None:
            raise InvalidInputError("--client-ca is for the --listen-mtls listener: give both")
        if self.listen_mtls is None and (
            self.access_log is not None or self.rate_limit is not None
        ):
            raise InvalidInputError(
                "--access-log and --rate-limit are for KeyService: give --listen-mtls too"
            )
        if self.store == "postgres" and not self.dsn:
            raise InvalidInputError("--store postgres needs --dsn (or the env KEYQUORUM_DSN)")
        if self.store == "sqlite" and self.dsn:
            raise InvalidInputError("--dsn is for --store postgres")
        self.limits()

    def limits(self) -> Limits:
        """`Limits` with the server-model settings given (the others at their defaults)."""
        given = {
            field_: value
            for key, field_ in LIMIT_FIELDS.items()
            if (value := getattr(self, BY_KEY[key].name)) is not None
        }
        return dataclasses.replace(DEFAULT_LIMITS, **given)

    def worker_count(self) -> int:
        """`workers`, or the number of cores this process may run on."""
        if self.workers is not None:
            return self.workers
        if hasattr(os, "sched_getaffinity"):
            return len(os.sched_getaffinity(0))
        return os.cpu_count() or 1

    def describe(self) -> list[str]:
        """One line per setting, `key = value  # source`; the DSN is never shown."""
        lines = []
        for s in SETTINGS:
            value: Any = getattr(self, s.name)
            if s.key == "dsn" and value is not None:
                shown = '"(set; not shown)"'
            elif value is None:
                continue
            elif isinstance(value, bool):
                shown = "true" if value else "false"
            elif isinstance(value, int | float):
                shown = repr(value)
            elif isinstance(value, tuple):
                shown = "[" + ", ".join(_quote(str(v)) for v in value) + "]"
            else:
                shown = _quote(str(value))
            lines.append(f"{s.key} = {shown}  # {self.sources.get(s.key, 'default')}")
        return lines


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


# -- reading ----------------------------------------------------------------------------


def read_file(path: Path) -> tuple[dict[str, object], dict[str, int]]:
    """The file's settings and the line each key is on; refuses anything not a setting."""
    where = str(path)
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
            mode = os.fstat(f.fileno()).st_mode
    except OSError as e:
        raise InvalidInputError(f"cannot read the configuration file {where}: {e.strerror}") from e
    if len(raw) > MAX_FILE_BYTES:
        raise InvalidInputError(f"{where}: larger than {MAX_FILE_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
        data = tomllib.loads(text)
    except UnicodeDecodeError as e:
        raise InvalidInputError(f"{where}: not UTF-8 text (byte {e.start})") from None
    except tomllib.TOMLDecodeError as e:
        raise InvalidInputError(f"{where}: not valid TOML: {e}") from None
    lines = {key: _line_of(text, key) for key in data}
    for key, value in data.items():
        line = lines[key]
        if key in REMOVED:
            raise InvalidInputError(f"{where} line {line}: {key} is gone: {REMOVED[key]}")
        if key not in BY_KEY:
            hint = f" (did you mean {close}?)" if (close := _closest(key)) else ""
            kind = "table" if isinstance(value, dict) else "key"
            raise InvalidInputError(f"{where} line {line}: unknown {kind} {key!r}{hint}")
    if "dsn" in data and mode & stat.S_IROTH:
        raise InvalidInputError(
            f"{where} line {lines['dsn']}: sets dsn (which may hold a password) but every user "
            f"can read the file (mode {stat.S_IMODE(mode):04o}): chmod o-r it, or use the "
            "environment variable KEYQUORUM_DSN"
        )
    return data, lines


def _line_of(text: str, key: str) -> int:
    """The line on which `key` is set (or opens a table); 1 if it cannot be told."""
    name = re.escape(key)
    pattern = re.compile(rf"""^\s*(?:\[+\s*)?(?:{name}|"{name}"|'{name}')\s*[=.\]]""")
    for number, line in enumerate(text.splitlines(), 1):
        if pattern.match(line):
            return number
    return 1


def _closest(key: str) -> str | None:
    normalised = key.replace("_", "-").lower()
    if normalised in BY_KEY:
        return normalised
    import difflib

    matches = difflib.get_close_matches(normalised, BY_KEY, n=1)
    return matches[0] if matches else None


def resolve(
    given: Mapping[str, object],
    sources: Mapping[str, str],
    config_file: Path | None,
) -> ServerConfig:
    """The settings from command-line/environment values, the file, and the defaults.

    `given` maps a setting's key to the value click parsed, only for keys
    whose `sources` entry is "command line" or "environment".
    """
    file_values: dict[str, object] = {}
    file_lines: dict[str, int] = {}
    base: Path | None = None
    if config_file is not None:
        file_values, file_lines = read_file(config_file)
        base = config_file.resolve().parent
    values: dict[str, object] = {}
    where: dict[str, str] = {}
    for s in SETTINGS:
        if s.key in given:
            label, raw, folder = f"--{s.key}", given[s.key], None
            where[s.key] = sources[s.key]
        elif s.key in file_values:
            line = file_lines[s.key]
            label, raw, folder = f"{config_file} line {line}: {s.key}", file_values[s.key], base
            where[s.key] = f"{config_file} line {line}"
        else:
            values[s.name] = s.default
            continue
        try:
            values[s.name] = s.convert(raw, folder)
        except ValueError as e:
            raise InvalidInputError(f"{label}: {e}") from None
    if values["data_dir"] is None:
        raise InvalidInputError("--data-dir is required (a flag or data-dir in the --config file)")
    if values["replica"] is None:
        values["replica"] = socket.gethostname()
    fields: dict[str, Any] = values
    return ServerConfig(**fields, sources=where)


def from_click(ctx: click.Context) -> ServerConfig:
    """`resolve` over the parameters of a click command made with `options`."""
    return rereader(ctx)()


def rereader(ctx: click.Context) -> Callable[[], ServerConfig]:
    """`resolve` again, each call: the same flags, the `--config` file read anew (SIGHUP)."""
    given: dict[str, object] = {}
    sources: dict[str, str] = {}
    for s in SETTINGS:
        source = ctx.get_parameter_source(s.name)
        if source is click.core.ParameterSource.COMMANDLINE:
            given[s.key], sources[s.key] = ctx.params[s.name], "command line"
        elif source is click.core.ParameterSource.ENVIRONMENT:
            given[s.key], sources[s.key] = ctx.params[s.name], f"environment {s.envvar}"
    config_file = ctx.params.get("config")
    assert config_file is None or isinstance(config_file, Path)
    return lambda: resolve(given, sources, config_file)


def options(f: Callable[..., Any]) -> Callable[..., Any]:
    """The click options of every setting, and `--config FILE`."""
    for s in reversed(SETTINGS):
        shown = s.default if s.default not in (None, (), False) else None
        help_text = s.help + (f"  [default: {shown}]" if shown is not None else "")
        if s.flag:
            option = click.option(f"--{s.key}", s.name, is_flag=True, default=None, help=help_text)
        else:
            option = click.option(
                f"--{s.key}",
                s.name,
                type=float
                if s.convert is _positive_number
                else int
                if s.convert in (_count, _workers)
                else str,
                multiple=s.multiple,
                envvar=s.envvar,
                show_envvar=s.envvar is not None,
                metavar=s.metavar or ("HOST:PORT" if s.convert is _address else "TEXT"),
                help=help_text,
            )
        f = option(f)
    return click.option(
        "--config",
        type=click.Path(dir_okay=False, path_type=Path),
        help="A TOML file of these settings (keys are the flags' names without --); "
        "flags override it.",
    )(f)


class OneLineUsageError(click.ClickException):
    """A bad flag as one line (`error: ...`, exit 2), like every other start-up error."""

    exit_code = 2

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True, file=file)


class OneLineCommand(click.Command):
    """A command whose usage errors are one line rather than usage text and a hint."""

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as e:
            raise OneLineUsageError(e.format_message()) from None
