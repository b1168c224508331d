"""TLS for clients of the daemon, and the rule for plaintext.

- `channel_credentials`: a client trusting one CA (never the system store:
  a development or private CA is the point), with an optional client
  certificate.
- `check_plaintext_allowed`: plaintext only with the explicit development
  flag and only on a loopback address (DESIGN.md: TLS on by default); the
  daemon's `server run` applies the same rule to its listeners.
- `load_ca`, `load_pair`: PEM files parsed when loaded, so a wrong path, a
  non-PEM file or a key that does not belong to its certificate is
  reported by name rather than as an opaque handshake failure later.

Only grpc and cryptography: the backend SDK installs without the daemon.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Final

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from keyquorum.quorum.errors import DeserializationError, InvalidInputError

LOOPBACK_NAMES: Final = ("localhost",)
INSECURE_FLAG: Final = "--insecure-dev-plaintext"


def channel_credentials(
    ca: Path, *, client_cert: Path | None = None, client_key: Path | None = None
) -> grpc.ChannelCredentials:
    """Client credentials trusting exactly `ca`, with an optional client certificate."""
    if (client_cert is None) != (client_key is None):
        raise InvalidInputError("a client certificate and its key go together")
    roots = load_ca(ca)
    if client_cert is None or client_key is None:
        return grpc.ssl_channel_credentials(root_certificates=roots)
    chain_pem, key_pem = load_pair(client_cert, client_key, "client")
    return grpc.ssl_channel_credentials(
        root_certificates=roots, private_key=key_pem, certificate_chain=chain_pem
    )


def check_plaintext_allowed(host: str, allow_insecure_dev: bool) -> None:
    """Permit plaintext only with the development flag AND a loopback host.

    Loopback: 127.0.0.0/8, ::1 (with or without brackets) or `localhost`.
    No name is resolved: `localhost` is taken as a name, anything else must
    be an IP literal. 0.0.0.0 and :: listen on every interface and are
    refused, as are IPv4-mapped and scoped IPv6 forms.
    """
    if not isinstance(host, str) or not host:
        raise InvalidInputError("host must be a non-empty string")
    if not _is_loopback(host):
        raise InvalidInputError(
            f"plaintext is allowed only on loopback (127.0.0.0/8, ::1, localhost), "
            f"not on {host!r}; use TLS (see `keyquorum admin dev-pki`)"
        )
    if not allow_insecure_dev:
        raise InvalidInputError(
            f"plaintext on {host!r} needs the explicit {INSECURE_FLAG} flag; "
            "TLS is the default (see `keyquorum admin dev-pki`)"
        )


def _is_loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    literal = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        address = ipaddress.ip_address(literal)
    except ValueError:
        return False
    # ip_address accepts "::1%eth0"; a scope names an interface, so refuse it.
    # IPv4-mapped addresses are refused too: Python versions disagree on
    # whether ::ffff:127.0.0.1 is loopback, and nobody needs it here.
    if isinstance(address, ipaddress.IPv6Address) and (
        address.scope_id is not None or address.ipv4_mapped is not None
    ):
        return False
    return address.is_loopback


def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError as e:
        raise InvalidInputError(f"{what} file {path} does not exist") from e
    except OSError as e:
        raise InvalidInputError(f"cannot read {what} file {path}: {e.strerror}") from e


def load_ca(path: Path) -> bytes:
    """A PEM file of CA certificates (each must be a CA), as bytes."""
    pem = _read(path, "CA certificate")
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError as e:
        raise DeserializationError(f"{path} is not a PEM certificate") from e
    for cert in certs:
        try:
            ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            ca = False
        if not ca:
            raise InvalidInputError(f"{path} holds a certificate that is not a CA")
    return pem


def load_pair(cert_path: Path, key_path: Path, what: str) -> tuple[bytes, bytes]:
    """Read a certificate chain and its key; check that the key is the leaf's."""
    chain_pem = _read(cert_path, f"{what} certificate")
    key_pem = _read(key_path, f"{what} private key")
    try:
        leaf = x509.load_pem_x509_certificates(chain_pem)[0]
    except ValueError as e:
        raise DeserializationError(f"{cert_path} is not a PEM certificate") from e
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as e:
        raise DeserializationError(f"{key_path} is not an unencrypted PEM private key") from e
    if key.public_key() != leaf.public_key():
        raise InvalidInputError(f"{key_path} is not the key of the certificate in {cert_path}")
    return chain_pem, key_pem
