"""Connecting the CLI to a daemon: one set of options, one channel builder.

TLS is the default; `--ca` names the CA that signed the daemon's
certificate. Plaintext needs `--insecure-dev-plaintext` and a loopback
address, the same rule the server applies. `--server` must name a port:
nothing is guessed (gRPC alone would try 443).

A call that fails because the daemon cannot be reached is explained by
`diagnose` (the certificate's names, the CA expected, another service on
the port); a call the daemon answers with an error keeps the daemon's own
message. The daemon marks its answers with the `keyquorum-error` trailing
metadata (hsm/services/status.py), so "the daemon answered: its database is
down" is never mistaken for "the daemon cannot be reached".
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import click
import grpc

from keyquorum.quorum.errors import InvalidInputError, KeyquorumError

if TYPE_CHECKING:
    from keyquorum.cli.diagnose import Target

F = TypeVar("F", bound=Callable[..., Any])

#: Trailing metadata key the daemon puts on every error it answers with.
ERROR_METADATA = "keyquorum-error"
_TARGET = re.compile(r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[^\s:\[\]/]+)):(?P<port>[0-9]{1,5})")


@dataclass(frozen=True)
class Endpoint:
    """Where the daemon is and how to reach it."""

    target: str
    ca: Path | None
    cert: Path | None = None
    key: Path | None = None
    insecure_dev_plaintext: bool = False

    def host(self) -> str:
        return parse_target(self.target)[0]

    def port(self) -> int:
        return parse_target(self.target)[1]

    def diagnosis_target(self) -> Target:
        from keyquorum.cli.diagnose import Target

        host, port = parse_target(self.target)
        return Target(host, port, self.ca, self.cert, self.key, self.insecure_dev_plaintext)


def parse_target(server: str) -> tuple[str, int]:
    """HOST:PORT (or [IPv6]:PORT) into its parts; a missing or bad port is an error."""
    match = _TARGET.fullmatch(server.strip())
    if match is None:
        if ":" not in server or (server.startswith("[") and server.endswith("]")):
            raise InvalidInputError(
                f"--server {server!r} has no port: give HOST:PORT, e.g. {server}:7443 "
                "(keyquorum does not guess a port; gRPC alone would try 443)"
            )
        raise InvalidInputError(
            f"--server {server!r} is not HOST:PORT (an IPv6 address goes in brackets: [::1]:7443)"
        )
    port = int(match["port"])
    if not 1 <= port <= 65535:
        raise InvalidInputError(f"--server {server!r}: port {port} is not in 1..65535")
    return match["v6"] or match["host"], port


def endpoint_options(f: F) -> F:
    """The options every command that talks to a daemon takes."""
    return _with_endpoint(
        click.option(
            "--server",
            "server",
            envvar="KEYQUORUM_SERVER",
            default="127.0.0.1:7443",
            show_default=True,
            help="Daemon address HOST:PORT (env KEYQUORUM_SERVER).",
        ),
        "CA certificate that signed the daemon's certificate (env KEYQUORUM_CA).",
    )(f)


def replica_endpoint_options(what: str) -> Callable[[F], F]:
    """`endpoint_options` for a command that talks to several replicas (`servers`, a
    tuple): `what` says what repeating --server does."""
    return _with_endpoint(
        click.option(
            "--server",
            "servers",
            multiple=True,
            envvar="KEYQUORUM_SERVER",
            default=("127.0.0.1:7443",),
            show_default=True,
            help=f"Daemon address HOST:PORT; repeat it {what} (env KEYQUORUM_SERVER, "
            "space-separated).",
        ),
        "CA certificate that signed the daemons' certificates (env KEYQUORUM_CA).",
    )


def _with_endpoint(server: Callable[[Any], Any], ca_help: str) -> Callable[[F], F]:
    options: list[Callable[[Any], Any]] = [
        server,
        click.option(
            "--ca",
            type=click.Path(exists=True, dir_okay=False, path_type=Path),
            envvar="KEYQUORUM_CA",
            help=ca_help,
        ),
        click.option(
            "--insecure-dev-plaintext",
            is_flag=True,
            help="Plaintext gRPC, for development on loopback only.",
        ),
    ]

    def decorate(f: F) -> F:
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


def make_endpoint(
    server: str,
    ca: Path | None,
    insecure_dev_plaintext: bool,
    *,
    cert: Path | None = None,
    key: Path | None = None,
) -> Endpoint:
    endpoint = Endpoint(server, ca, cert, key, insecure_dev_plaintext)
    host = endpoint.host()
    if insecure_dev_plaintext:
        # Imported here: keyquorum.client.tls loads cryptography's X.509, which
        # a TLS status call does not need (cli/main.py, start-up time).
        from keyquorum.client.tls import check_plaintext_allowed

        check_plaintext_allowed(host, allow_insecure_dev=True)
    elif ca is None:
        raise InvalidInputError(
            "--ca is required for TLS (or --insecure-dev-plaintext on loopback)"
        )
    return endpoint


@contextmanager
def open_channel(endpoint: Endpoint) -> Iterator[grpc.Channel]:
    """A channel with TLS (server verified against --ca) unless plaintext was allowed.

    A call inside that cannot reach the daemon raises `UnreachableError`
    saying why (`diagnose`); other failures pass unchanged.
    """
    if endpoint.insecure_dev_plaintext:
        channel = grpc.insecure_channel(endpoint.target)
    else:
        assert endpoint.ca is not None
        if endpoint.cert is None and endpoint.key is None:
            creds = grpc.ssl_channel_credentials(root_certificates=endpoint.ca.read_bytes())
        else:
            # A client certificate: checked against its key when loaded, so a
            # mismatch is named (cryptography, imported only for this case).
            from keyquorum.client.tls import channel_credentials

            creds = channel_credentials(
                endpoint.ca, client_cert=endpoint.cert, client_key=endpoint.key
            )
        channel = grpc.secure_channel(endpoint.target, creds)
    try:
        with channel:
            yield channel
    except RemoteError as e:
        if not e.unreachable:
            raise
        from keyquorum.cli.diagnose import diagnose

        found = diagnose(endpoint.diagnosis_target())
        if found is None:
            raise UnreachableError(
                f"cannot reach the daemon at {endpoint.target}: {e.details}"
            ) from None
        raise UnreachableError(f"cannot reach the daemon at {endpoint.target}: {found}") from None


@contextmanager
def rpc_errors() -> Iterator[None]:
    """Turn a failed call into the daemon's message as a KeyquorumError."""
    try:
        yield
    except grpc.RpcError as e:
        raise from_rpc_error(e) from None


class RemoteError(KeyquorumError):
    """A call to the daemon failed; carries the gRPC code and the daemon's message.

    `unreachable` is true when the call never got an answer from a daemon
    (UNAVAILABLE without the daemon's error mark): `open_channel` then
    explains why.
    """

    def __init__(self, code: grpc.StatusCode, message: str, *, unreachable: bool = False) -> None:
        super().__init__(f"{message} ({code.name})")
        self.code = code
        self.details = message
        self.unreachable = unreachable


class UnreachableError(KeyquorumError):
    """The daemon could not be reached; the message says what to fix."""


def _error_class(call: grpc.Call) -> str | None:
    try:
        metadata = call.trailing_metadata() or ()
    except Exception:  # noqa: BLE001 - a failed call may have no metadata to give
        return None
    for key, value in metadata:
        if key == ERROR_METADATA:
            return str(value)
    return None


def from_rpc_error(error: grpc.RpcError) -> RemoteError:
    """Turn a failed call into a RemoteError with the daemon's own message."""
    # Failed calls are both RpcError and Call at run time; the stubs cannot say so.
    call = cast(grpc.Call, error)
    code = call.code() if hasattr(call, "code") else grpc.StatusCode.UNKNOWN
    details = call.details() if hasattr(call, "details") else str(error)
    answered = _error_class(call) if hasattr(call, "trailing_metadata") else None
    if code == grpc.StatusCode.UNAVAILABLE and answered == "StorageError":
        details = (
            f"the daemon answered, but cannot use its store: {details}; nothing was "
            "changed. Its operator should check the database (the daemon's log says more)"
        )
        return RemoteError(code, details)
    if code == grpc.StatusCode.UNAVAILABLE and answered is None:
        return RemoteError(code, details or code.name, unreachable=True)
    return RemoteError(code, details or code.name)
