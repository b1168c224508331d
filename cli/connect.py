"""Connecting the CLI to a daemon: one set of options, one channel builder.

TLS is the default; `--ca` names the CA that signed the daemon's
certificate. Plaintext needs `--insecure-dev-plaintext` and a loopback
address, the same rule the server applies.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import click
import grpc

from keyquorum.quorum.errors import InvalidInputError, KeyquorumError

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Endpoint:
    """Where the daemon is and how to reach it."""

    target: str
    ca: Path | None
    cert: Path | None = None
    key: Path | None = None
    insecure_dev_plaintext: bool = False

    def host(self) -> str:
        host, sep, _port = self.target.rpartition(":")
        if not sep or not host:
            raise InvalidInputError(f"--server must be HOST:PORT, got {self.target!r}")
        return host.strip("[]")


def endpoint_options(f: F) -> F:
    """The options every command that talks to a daemon takes."""
    options = [
        click.option(
            "--server",
            "server",
            envvar="KEYQUORUM_SERVER",
            default="127.0.0.1:7443",
            show_default=True,
            help="Daemon address HOST:PORT (env KEYQUORUM_SERVER).",
        ),
        click.option(
            "--ca",
            type=click.Path(exists=True, dir_okay=False, path_type=Path),
            envvar="KEYQUORUM_CA",
            help="CA certificate that signed the daemon's certificate (env KEYQUORUM_CA).",
        ),
        click.option(
            "--insecure-dev-plaintext",
            is_flag=True,
            help="Plaintext gRPC, for development on loopback only.",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def make_endpoint(server: str, ca: Path | None, insecure_dev_plaintext: bool) -> Endpoint:
    endpoint = Endpoint(target=server, ca=ca, insecure_dev_plaintext=insecure_dev_plaintext)
    if insecure_dev_plaintext:
        # Imported here: keyquorum.client.tls loads cryptography's X.509, which
        # a TLS status call does not need (cli/main.py, start-up time).
        from keyquorum.client.tls import check_plaintext_allowed

        check_plaintext_allowed(endpoint.host(), allow_insecure_dev=True)
    elif ca is None:
        raise InvalidInputError(
            "--ca is required for TLS (or --insecure-dev-plaintext on loopback)"
        )
    return endpoint


def open_channel(endpoint: Endpoint) -> grpc.Channel:
    """A channel with TLS (server verified against --ca) unless plaintext was allowed."""
    if endpoint.insecure_dev_plaintext:
        return grpc.insecure_channel(endpoint.target)
    assert endpoint.ca is not None
    creds = grpc.ssl_channel_credentials(
        root_certificates=endpoint.ca.read_bytes(),
        private_key=endpoint.key.read_bytes() if endpoint.key else None,
        certificate_chain=endpoint.cert.read_bytes() if endpoint.cert else None,
    )
    return grpc.secure_channel(endpoint.target, creds)


@contextmanager
def rpc_errors() -> Iterator[None]:
    """Turn a failed call into the daemon's message as a KeyquorumError."""
    try:
        yield
    except grpc.RpcError as e:
        raise from_rpc_error(e) from None


class RemoteError(KeyquorumError):
    """A call to the daemon failed; carries the gRPC code and the daemon's message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{message} ({code.name})")
        self.code = code


def from_rpc_error(error: grpc.RpcError) -> RemoteError:
    """Turn a failed call into a RemoteError with the daemon's own message."""
    # Failed calls are both RpcError and Call at run time; the stubs cannot say so.
    call = cast(grpc.Call, error)
    code = call.code() if hasattr(call, "code") else grpc.StatusCode.UNKNOWN
    details = call.details() if hasattr(call, "details") else str(error)
    if code == grpc.StatusCode.UNAVAILABLE:
        details = f"cannot reach the daemon: {details}"
    return RemoteError(code, details or code.name)
