"""TLS for the gRPC server and its clients, and who the peer is.

- `server_credentials`: the server's certificate and key, and optionally the
  CA that client certificates must chain to. With `require_client_auth`,
  the handshake fails for a client without a certificate from that CA, so
  an unauthenticated backend never reaches a servicer.
- `channel_credentials`: a client trusting one CA (never the system store:
  a development or private CA is the point), with an optional client
  certificate.
- `identity_from_auth_context`: the client's `keyquorum://role/name` URI
  from the certificate gRPC verified. It parses the peer's PEM certificate
  with `cryptography` instead of trusting gRPC's flattened SAN strings, so
  a URI is compared exactly as encoded.
- `check_plaintext_allowed`: plaintext only with the explicit development
  flag and only on a loopback address (DESIGN.md: TLS on by default).

Files are parsed when loaded, so a wrong path, a non-PEM file or a key that
does not belong to its certificate is reported by name at start-up rather
than as an opaque handshake failure later.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from pathlib import Path
from typing import Final, Protocol

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from keyquorum.hsm.pki import URI_SCHEME, ClientIdentity, uri_sans
from keyquorum.quorum.errors import AccessDeniedError, DeserializationError, InvalidInputError

LOOPBACK_NAMES: Final = ("localhost",)
INSECURE_FLAG: Final = "--insecure-dev-plaintext"


class HasAuthContext(Protocol):
    """What `identity_from_auth_context` needs: a `grpc.ServicerContext` fits.

    gRPC returns `{property name: [bytes, ...]}`; the stubs declare bytes
    values, hence `object` here and a runtime check.
    """

    def auth_context(self) -> Mapping[str, object]: ...


def server_credentials(
    cert_chain: Path,
    private_key: Path,
    *,
    client_ca: Path | None = None,
    require_client_auth: bool = False,
) -> grpc.ServerCredentials:
    """TLS server credentials; mTLS against `client_ca` when `require_client_auth`.

    gRPC Python has no "request but do not require" mode: without
    `require_client_auth` the server never asks for a client certificate
    (checked in tests/test_pki.py), so `client_ca` alone would authenticate
    nobody. It is accepted only together with the flag, so that a
    configuration cannot look like mTLS without being it.
    """
    if client_ca is not None and not require_client_auth:
        raise InvalidInputError(
            "a client CA without require_client_auth would not authenticate clients: "
            "gRPC then never asks for a client certificate (no optional mTLS); require "
            "client certificates, or serve mTLS clients on a port of their own"
        )
    if require_client_auth and client_ca is None:
        raise InvalidInputError("require_client_auth needs the client CA certificate")
    chain_pem, key_pem = _load_pair(cert_chain, private_key, "server")
    roots = None if client_ca is None else _load_ca(client_ca)
    return grpc.ssl_server_credentials(
        [(key_pem, chain_pem)],
        root_certificates=roots,
        require_client_auth=require_client_auth,
    )


def channel_credentials(
    ca: Path, *, client_cert: Path | None = None, client_key: Path | None = None
) -> grpc.ChannelCredentials:
    """Client credentials trusting exactly `ca`, with an optional client certificate."""
    if (client_cert is None) != (client_key is None):
        raise InvalidInputError("a client certificate and its key go together")
    roots = _load_ca(ca)
    if client_cert is None or client_key is None:
        return grpc.ssl_channel_credentials(root_certificates=roots)
    chain_pem, key_pem = _load_pair(client_cert, client_key, "client")
    return grpc.ssl_channel_credentials(
        root_certificates=roots, private_key=key_pem, certificate_chain=chain_pem
    )


def identity_from_auth_context(context: HasAuthContext) -> str | None:
    """The verified client's `keyquorum://role/name`, or None without one.

    None means: no TLS, no client certificate, or a certificate with no
    keyquorum URI (the caller answers UNAUTHENTICATED). A certificate with
    two keyquorum URIs or a malformed one is refused (`AccessDeniedError`)
    rather than guessed at. gRPC puts the peer certificate into the auth
    context only after it verified the chain against the client CA.
    """
    auth = context.auth_context()
    if _values(auth, "transport_security_type") != [b"ssl"]:
        return None
    pems = _values(auth, "x509_pem_cert")
    if not pems:
        return None
    try:
        cert = x509.load_pem_x509_certificate(pems[0])
    except ValueError as e:
        raise DeserializationError("the peer certificate is not valid PEM") from e
    ours = [uri for uri in uri_sans(cert) if uri.startswith(f"{URI_SCHEME}://")]
    if not ours:
        return None
    if len(ours) > 1:
        raise AccessDeniedError(f"client certificate names {len(ours)} keyquorum identities")
    try:
        ClientIdentity.parse(ours[0])
    except InvalidInputError as e:
        raise AccessDeniedError(f"client certificate has a malformed identity: {e}") from e
    return ours[0]


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


def _values(auth: Mapping[str, object], key: str) -> list[bytes]:
    raw = auth.get(key)
    if raw is None:
        return []
    if isinstance(raw, bytes):
        return [raw]
    if isinstance(raw, list | tuple) and all(isinstance(v, bytes) for v in raw):
        return list(raw)
    raise DeserializationError(f"unexpected auth context value for {key}")


def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError as e:
        raise InvalidInputError(f"{what} file {path} does not exist") from e
    except OSError as e:
        raise InvalidInputError(f"cannot read {what} file {path}: {e.strerror}") from e


def _load_ca(path: Path) -> bytes:
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


def _load_pair(cert_path: Path, key_path: Path, what: str) -> tuple[bytes, bytes]:
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
