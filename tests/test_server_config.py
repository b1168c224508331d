"""`server run`'s settings: flags, the TOML file, precedence, and errors at start.

The table (cli/server_config.py) is checked in process; what an operator
sees (one line, `error: ...`, no traceback) is checked on the real command
in a child process, for a bad flag, a bad key, an unreadable file, a port
in use and a bad log level.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from keyquorum.cli import server as cli_server
from keyquorum.cli import server_config
from keyquorum.cli.server_config import SETTINGS, ServerConfig, read_file, resolve
from keyquorum.hsm.pki import DevPki, make_dev_pki
from keyquorum.quorum.errors import InvalidInputError


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    return make_dev_pki(tmp_path_factory.mktemp("pki"))


def write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def tls_lines(pki: DevPki) -> str:
    return f'tls-cert = "{pki.server_cert}"\ntls-key = "{pki.server_key}"\n'


# -- the table --------------------------------------------------------------------------


def test_every_flag_of_server_run_is_a_key_and_every_key_a_flag() -> None:
    flags = {
        opt.lstrip("-")
        for p in cli_server.run.params
        if isinstance(p, click.Option)
        for opt in p.opts
        if opt.startswith("--")
    }
    assert flags - {"help", "config"} == {s.key for s in SETTINGS}
    check_flags = {
        opt.lstrip("-") for p in cli_server.check_config.params for opt in getattr(p, "opts", [])
    }
    assert check_flags == flags


#: Two custodians' full fingerprints.
ROSTER = ("a" * 64, "b" * 64)


def test_file_values_and_defaults(tmp_path: Path, pki: DevPki) -> None:
    config = write(
        tmp_path / "server.toml",
        '# comment\ndata-dir = "data"\nlisten = "127.0.0.1:7000"\n'
        + tls_lines(pki)
        + f'rate-limit = 50\nceremony-roster = ["{ROSTER[0]}", "{ROSTER[1]}"]\n'
        'log-level = "debug"\n'
        'listen-mtls = "127.0.0.1:7001"\n'
        f'client-ca = "{pki.ca_cert}"\n',
    )
    got = resolve({}, {}, config)
    assert got.data_dir == tmp_path / "data"  # relative to the file's folder
    assert got.listen == "127.0.0.1:7000"
    assert got.rate_limit == 50.0
    assert got.ceremony_roster == ROSTER
    assert got.log_level == "DEBUG"
    assert got.log_format == "text"  # default
    assert got.store == "sqlite"  # default
    assert got.replica == socket.gethostname()
    assert got.sources["listen"] == f"{config} line 3"
    assert got.sources["rate-limit"] == f"{config} line 6"
    assert "log-format" not in got.sources
    got.check()


def test_flags_override_the_file_and_the_environment_overrides_the_file(
    tmp_path: Path, pki: DevPki, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write(
        tmp_path / "server.toml",
        f'data-dir = "{tmp_path}/from-file"\nlisten = "127.0.0.1:7000"\n'
        'log-level = "WARNING"\nstore = "postgres"\ndsn = "host=file"\n' + tls_lines(pki),
    )
    monkeypatch.setenv("KEYQUORUM_DSN", "host=env")
    seen: dict[str, ServerConfig] = {}

    @click.command()
    @server_config.options
    def probe(**_flags: object) -> None:
        seen["config"] = server_config.from_click(click.get_current_context())

    result = CliRunner().invoke(
        probe,
        ["--config", str(config), "--listen", "127.0.0.1:7999", "--log-level", "error"],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    got = seen["config"]
    assert got.listen == "127.0.0.1:7999"
    assert got.sources["listen"] == "command line"
    assert got.log_level == "ERROR"
    assert got.data_dir == tmp_path / "from-file"
    assert got.dsn == "host=env"
    assert got.sources["dsn"] == "environment KEYQUORUM_DSN"
    assert "host=env" not in repr(got)  # a DSN may hold a password


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('data-dir = "d"\nlisten_mtls = "x:1"\n', "line 2: unknown key 'listen_mtls' (did you mean listen-mtls?)"),  # noqa: E501
        ('data-dir = "d"\n\n[server]\nlisten = "x:1"\n', "line 3: unknown table 'server'"),
        ('data-dir = "d"\ncolour = "blue"\n', "line 2: unknown key 'colour'"),
        ('data-dir = "d"\nrate-limit = "fast"\n', "line 2: rate-limit: must be a number, not a string"),  # noqa: E501
        ('data-dir = "d"\nrate-limit = 0\n', "line 2: rate-limit: must be a number above 0"),
        ('data-dir = "d"\nrate-limit = true\n', "line 2: rate-limit: must be a number, not a boolean"),  # noqa: E501
        ('data-dir = "d"\nlisten = "nowhere"\n', "line 2: listen: must be HOST:PORT"),
        ('data-dir = "d"\nlisten = "h:70000"\n', "line 2: listen: must be HOST:PORT"),
        ('data-dir = "d"\ninsecure-dev-plaintext = "yes"\n', "line 2: insecure-dev-plaintext: must be true or false"),  # noqa: E501
        ('data-dir = "d"\nlog-level = "verbose"\n', "line 2: log-level: must be one of DEBUG, INFO, WARNING, ERROR"),  # noqa: E501
        ('data-dir = "d"\nstore = "mysql"\n', "line 2: store: must be one of sqlite, postgres"),
        ('data-dir = "d"\nceremony-roster = "one"\n', "line 2: ceremony-roster: must be a list of strings"),  # noqa: E501
        ('data-dir = "d"\nceremony-roster = ["ABCD-EFGH"]\n', "line 2: ceremony-roster: 'ABCD-EFGH' is not a full fingerprint"),  # noqa: E501
        (f'data-dir = "d"\nceremony-roster = ["{"c" * 64}", "{"c" * 64}"]\n', "line 2: ceremony-roster: a custodian is named twice"),  # noqa: E501
        ('data-dir = "d"\nauditor-key = ["a+1+AA"]\n', "line 2: auditor-key is gone: witnesses are no longer an operator's list"),  # noqa: E501
        ('data-dir = "d"\ntls-cert = "missing.pem"\n', "line 2: tls-cert:"),
        ('data-dir = 5\n', "line 1: data-dir: must be a string, not an integer"),
        ('data-dir = "d"\nlisten = \n', "not valid TOML"),
        ('listen = "127.0.0.1:1"\n', "--data-dir is required"),
    ],
    ids=[
        "underscore-key", "table", "unknown-key", "number-as-text", "zero-rate", "bool-rate",
        "bad-address", "bad-port", "bool-as-text", "bad-level", "bad-store", "list-as-text",
        "short-fingerprint", "fingerprint-twice", "removed-auditor-key",
        "missing-file", "wrong-type-line-1", "toml-syntax", "no-data-dir",
    ],
)  # fmt: skip
def test_file_errors_name_the_line(tmp_path: Path, text: str, message: str) -> None:
    config = write(tmp_path / "server.toml", text)
    with pytest.raises(InvalidInputError) as info:
        resolve({}, {}, config)
    assert message in str(info.value)
    if "line" in message:
        assert str(config) in str(info.value)


def test_a_toml_syntax_error_says_where(tmp_path: Path) -> None:
    config = write(tmp_path / "server.toml", 'data-dir = "d"\n\nlisten = \n')
    with pytest.raises(InvalidInputError, match=r"line 3"):
        resolve({}, {}, config)


def test_unreadable_and_missing_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match=r"cannot read the configuration file .*nope\.toml"):
        read_file(tmp_path / "nope.toml")
    with pytest.raises(InvalidInputError, match="cannot read the configuration file"):
        read_file(tmp_path)  # a directory
    big = write(tmp_path / "big.toml", "# x\n" * 20_000)
    with pytest.raises(InvalidInputError, match="larger than"):
        read_file(big)


def test_a_dsn_in_a_world_readable_file_is_refused(tmp_path: Path) -> None:
    text = 'data-dir = "d"\nstore = "postgres"\ndsn = "host=db password=hunter2"\n'
    config = write(tmp_path / "server.toml", text, mode=0o644)
    with pytest.raises(InvalidInputError) as info:
        resolve({}, {}, config)
    assert "line 3: sets dsn" in str(info.value)
    assert "hunter2" not in str(info.value)
    config.chmod(0o640)
    assert resolve({}, {}, config).dsn == "host=db password=hunter2"


def test_describe_never_shows_the_dsn(tmp_path: Path) -> None:
    config = write(
        tmp_path / "server.toml",
        'data-dir = "d"\nstore = "postgres"\ndsn = "host=db password=hunter2"\n'
        "insecure-dev-plaintext = true\n",
    )
    text = "\n".join(resolve({}, {}, config).describe())
    assert "hunter2" not in text
    assert 'dsn = "(set; not shown)"' in text
    assert "insecure-dev-plaintext = true" in text


# -- the commands, as an operator runs them ------------------------------------------------


def keyquorum(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("KEYQUORUM_")}
    return subprocess.run(
        [sys.executable, "-m", "keyquorum.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**clean, **(env or {})},
    )


def one_line_error(result: subprocess.CompletedProcess[str], code: int = 1) -> str:
    """The error line, after checking it is the one error line, last, with no traceback.

    Log records written before the failure (the data directory locked, the
    store opened) may precede it; they are the log, not the error.
    """
    assert result.returncode == code, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert errors == lines[-1:], result.stderr
    return errors[0]


def test_check_config_prints_the_settings_and_their_sources(tmp_path: Path, pki: DevPki) -> None:
    config = write(tmp_path / "server.toml", 'data-dir = "data"\n' + tls_lines(pki))
    result = keyquorum("server", "check-config", "--config", str(config), "--listen", "[::1]:0")
    assert result.returncode == 0, result.stderr
    assert f'data-dir = "{tmp_path}/data"  # {config} line 1' in result.stdout
    assert 'listen = "[::1]:0"  # command line' in result.stdout
    assert 'log-format = "text"  # default' in result.stdout
    assert result.stdout.strip().endswith("configuration OK")
    assert not (tmp_path / "data").exists()  # nothing created


def test_check_config_loads_the_tls_files(tmp_path: Path, pki: DevPki) -> None:
    other = make_dev_pki(tmp_path / "other")
    config = write(
        tmp_path / "server.toml",
        f'data-dir = "data"\ntls-cert = "{pki.server_cert}"\ntls-key = "{other.server_key}"\n',
    )
    message = one_line_error(keyquorum("server", "check-config", "--config", str(config)))
    assert "is not the key of the certificate" in message


@pytest.mark.parametrize(
    ("args", "expected", "code"),
    [
        (["--log-level", "verbose"], "--log-level: must be one of DEBUG, INFO, WARNING, ERROR, got 'verbose'", 1),  # noqa: E501
        (["--rate-limit", "fast"], "Invalid value for '--rate-limit': 'fast' is not a valid float", 2),  # noqa: E501
        (["--listen", "7443"], "--listen: must be HOST:PORT", 1),
        (["--no-such-flag"], "No such option '--no-such-flag'", 2),
        (["--store", "mysql"], "--store: must be one of sqlite, postgres", 1),
    ],
    ids=["log-level", "rate-limit", "listen", "unknown-flag", "store"],
)  # fmt: skip
def test_a_bad_flag_is_one_line(
    tmp_path: Path, pki: DevPki, args: list[str], expected: str, code: int
) -> None:
    result = keyquorum(
        "server", "run", "--data-dir", str(tmp_path / "data"),
        "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key), *args,
    )  # fmt: skip
    assert expected in one_line_error(result, code)
    assert not (tmp_path / "data").exists()


def test_an_unreadable_tls_key_is_one_line(tmp_path: Path, pki: DevPki) -> None:
    if os.geteuid() == 0:
        # root reads any file: make it a directory instead, which nobody can read as a key.
        key = tmp_path / "server.key"
        key.mkdir()
    else:
        key = write(tmp_path / "server.key", "x", mode=0)
    result = keyquorum(
        "server", "run", "--data-dir", str(tmp_path / "data"),
        "--tls-cert", str(pki.server_cert), "--tls-key", str(key),
    )  # fmt: skip
    assert f"--tls-key: {key} is not a file" in one_line_error(result)


def test_an_unknown_key_in_the_file_is_one_line_naming_it(tmp_path: Path, pki: DevPki) -> None:
    config = write(tmp_path / "s.toml", 'data-dir = "d"\n' + tls_lines(pki) + "threads = 9\n")
    message = one_line_error(keyquorum("server", "run", "--config", str(config)))
    assert message == f"error: {config} line 4: unknown key 'threads'"


def test_a_missing_config_file_is_one_line(tmp_path: Path) -> None:
    message = one_line_error(keyquorum("server", "run", "--config", str(tmp_path / "x.toml")))
    assert "cannot read the configuration file" in message
    assert "No such file or directory" in message


def test_a_port_in_use_is_one_line(tmp_path: Path, pki: DevPki) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = keyquorum(
            "server", "run", "--data-dir", str(tmp_path / "data"),
            "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
            "--listen", f"127.0.0.1:{port}",
        )  # fmt: skip
    message = one_line_error(result)
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in message


def test_a_metrics_port_in_use_is_one_line(tmp_path: Path, pki: DevPki) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = keyquorum(
            "server", "run", "--data-dir", str(tmp_path / "data"),
            "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
            "--listen", "127.0.0.1:0", "--metrics-listen", f"127.0.0.1:{port}",
        )  # fmt: skip
    message = one_line_error(result)
    assert f"cannot serve metrics on 127.0.0.1:{port}: Address already in use" in message


def test_a_data_dir_that_cannot_be_made_is_one_line(tmp_path: Path, pki: DevPki) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = keyquorum(
        "server", "run", "--data-dir", str(blocker / "data"),
        "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
        "--listen", "127.0.0.1:0",
    )  # fmt: skip
    assert "cannot create the data directory" in one_line_error(result)


def test_help_lists_config_and_the_file_keys() -> None:
    result = keyquorum("server", "run", "--help")
    assert result.returncode == 0
    assert "--config FILE" in result.stdout
    assert "--log-format" in result.stdout


# -- the server model's settings (docs/adr/0009) ------------------------------------------


def test_the_server_models_settings_make_the_limits(tmp_path: Path, pki: DevPki) -> None:
    """File keys and flags both reach `Limits`; what is not set keeps its default."""
    from keyquorum.quorum.limits import DEFAULT_LIMITS

    config = write(
        tmp_path / "server.toml",
        'data-dir = "data"\n' + tls_lines(pki) + "workers = 0\nmax-calls-per-peer = 7\n"
        "request-timeout = 2.5\nconnection-idle = 30\n",
    )
    got = resolve({"max-connections": 9}, {"max-connections": "command line"}, config)
    got.check()
    limits = got.limits()
    assert got.worker_count() == 0
    assert limits.max_calls_per_peer == 7
    assert limits.request_timeout_seconds == 2.5
    assert limits.connection_idle_seconds == 30
    assert limits.max_connections == 9
    assert limits.max_calls == DEFAULT_LIMITS.max_calls
    assert resolve({}, {}, write(tmp_path / "d.toml", 'data-dir = "d"\n')).worker_count() >= 1


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("workers = -1\n", "workers: must be 0 or more"),
        ("max-calls = 0\n", "max-calls: must be at least 1"),
        ("max-streams-per-connection = 1.5\n", "must be a whole number"),
        ('request-timeout = "soon"\n', "request-timeout: must be a number"),
        ("max-calls-per-peer = 50\nmax-calls = 10\n", "max_calls_per_peer cannot exceed max_calls"),
    ],
    ids=["negative-workers", "zero-calls", "fractional-streams", "text-timeout", "peer-over-all"],
)
def test_bad_server_model_settings_are_refused(
    tmp_path: Path, pki: DevPki, text: str, message: str
) -> None:
    config = write(tmp_path / "server.toml", 'data-dir = "d"\n' + tls_lines(pki) + text)
    with pytest.raises(InvalidInputError, match=message):
        resolve({}, {}, config).check()
