"""TLS for the daemon's gRPC servers, and who the peer is.

- `server_credentials`: the server's certificate and key, and optionally the
  CA that client certificates must chain to. With `require_client_auth`,
  the handshake fails for a client without a certificate from that CA, so
  an unauthenticated backend never reaches a servicer.
- `identity_from_certificate`: the client's `keyquorum://role/name` URI,
  read only from a URI subject alternative name of the DER certificate
  gRPC verified against the client CA (`peer_certificate`), parsed with
  `cryptography`: never from the subject's CN, a DNS name, or gRPC's
  flattened SAN strings (`peer_identities()`), which do not say which kind
  of name a string was. `identity_from_auth_context` is both in one call.
- Client credentials and the plaintext rule are `keyquorum.client.tls`'s.

Files are parsed when loaded, so a wrong path, a non-PEM file or a key that
does not belong to its certificate is reported by name at start-up rather
than as an opaque handshake failure later.
"""

from __future__ import annotations

import binascii
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import grpc
from cryptography import x509

from keyquorum.client.tls import load_ca, load_pair
from keyquorum.hsm.pki import URI_SCHEME, ClientIdentity, uri_sans
from keyquorum.quorum.errors import AccessDeniedError, DeserializationError, InvalidInputError


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
    chain_pem, key_pem = load_pair(cert_chain, private_key, "server")
    roots = None if client_ca is None else load_ca(client_ca)
    return grpc.ssl_server_credentials(
        [(key_pem, chain_pem)],
        root_certificates=roots,
        require_client_auth=require_client_auth,
    )


def identity_from_auth_context(context: HasAuthContext) -> str | None:
    """The verified client's `keyquorum://role/name`, or None without one.

    `identity_from_certificate` of `peer_certificate`: None also without TLS
    or without a client certificate.
    """
    der = peer_certificate(context.auth_context())
    return None if der is None else identity_from_certificate(der)


def peer_certificate(auth: Mapping[str, object]) -> bytes | None:
    """The DER of the client's leaf certificate from a call's auth context, or None.

    gRPC puts the peer certificate (`x509_pem_cert`) into the auth context
    only after the handshake verified its chain against the client CA;
    None means no TLS or no client certificate.
    """
    if _values(auth, "transport_security_type") != [b"ssl"]:
        return None
    pems = _values(auth, "x509_pem_cert")
    if not pems:
        return None
    return pem_to_der(pems[0])


def pem_to_der(pem: bytes) -> bytes:
    """The DER bytes of one PEM certificate (DeserializationError if it is not one)."""
    begin, end = b"-----BEGIN CERTIFICATE-----", b"-----END CERTIFICATE-----"
    start = pem.find(begin)
    stop = pem.find(end, start + len(begin)) if start >= 0 else -1
    if stop < 0:
        raise DeserializationError("the peer certificate is not valid PEM")
    try:
        der = binascii.a2b_base64(pem[start + len(begin) : stop], strict_mode=False)
    except binascii.Error as e:
        raise DeserializationError("the peer certificate is not valid PEM") from e
    if not der:
        raise DeserializationError("the peer certificate is not valid PEM")
    return der


def identity_from_certificate(der: bytes) -> str | None:
    """The `keyquorum://role/name` URI of a verified client certificate, or None.

    Only URI subject alternative names count: a certificate whose CN or DNS
    name reads `keyquorum://backend/x` names no identity. None means no
    keyquorum URI (the caller answers UNAUTHENTICATED). A certificate with
    two keyquorum URIs or a malformed one is refused (`AccessDeniedError`)
    rather than guessed at.
    """
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError as e:
        raise DeserializationError("the peer certificate is not valid DER") from e
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


def _values(auth: Mapping[str, object], key: str) -> list[bytes]:
    raw = auth.get(key)
    if raw is None:
        return []
    if isinstance(raw, bytes):
        return [raw]
    if isinstance(raw, list | tuple) and all(isinstance(v, bytes) for v in raw):
        return list(raw)
    raise DeserializationError(f"unexpected auth context value for {key}")
