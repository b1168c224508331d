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

`ServerCertificates` is the certificate, key and client CA a listener
serves, replaceable while it serves (`server run` on SIGHUP): its
credentials are gRPC's dynamic SSL server credentials, whose fetcher gRPC
core asks at every new handshake; it answers a new configuration once per
listener after `replace`, else nothing (keep the current one). So new
connections get the new certificate and connections already open keep
theirs and are never dropped. A replacement is checked whole (PEM, the key
is the leaf's) before anything changes.
"""

from __future__ import annotations

import binascii
import hashlib
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol, cast

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

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


class ServerCertificates:
    """A listener's certificate chain, key and client CA, replaceable while serving.

    `credentials()` makes one listener's credentials (each listener its own:
    the fetcher remembers which generation it last gave that listener).
    With `require_client_auth`, a client CA is required, as for
    `server_credentials`; the requirement itself never changes on reload.
    """

    __slots__ = ("_config", "_generation", "_leaf_sha256", "_lock", "require_client_auth")

    def __init__(
        self, chain: bytes, key: bytes, client_ca: bytes | None, *, require_client_auth: bool
    ) -> None:
        if require_client_auth != (client_ca is not None):
            raise InvalidInputError("a client CA goes with require_client_auth, and only with it")
        self.require_client_auth = require_client_auth
        self._lock = threading.Lock()
        self._generation = 0
        self._config, self._leaf_sha256 = _configuration(chain, key, client_ca)

    @classmethod
    def from_files(
        cls, cert_chain: Path, private_key: Path, client_ca: Path | None = None
    ) -> ServerCertificates:
        """From PEM files, checked as `server_credentials` checks them; mTLS iff `client_ca`."""
        chain, key, ca = read_files(cert_chain, private_key, client_ca)
        return cls(chain, key, ca, require_client_auth=client_ca is not None)

    @property
    def generation(self) -> int:
        """How many times the certificates were replaced."""
        return self._generation

    @property
    def leaf_sha256(self) -> str:
        """Hex SHA-256 of the served leaf certificate's DER (what a log line names)."""
        return self._leaf_sha256

    def replace(self, chain: bytes, key: bytes, client_ca: bytes | None) -> None:
        """Serve these to new connections from now on; open connections keep theirs."""
        if self.require_client_auth != (client_ca is not None):
            raise InvalidInputError(
                "turning client certificates on or off needs a restart, not a reload"
            )
        config, leaf = _configuration(chain, key, client_ca)
        with self._lock:
            self._config, self._leaf_sha256 = config, leaf
            self._generation += 1

    def credentials(self) -> grpc.ServerCredentials:
        """Credentials for one listener, following every later `replace`."""
        with self._lock:
            initial, given = self._config, self._generation

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            # Called by gRPC core at every new handshake: cheap unless replaced.
            nonlocal given
            with self._lock:
                if self._generation == given:
                    return None
                given = self._generation
                return self._config

        # gRPC documents None as "keep the current configuration"; its stubs omit it.
        fetcher = cast("Callable[[], grpc.ServerCertificateConfiguration]", fetch)
        return grpc.dynamic_ssl_server_credentials(
            initial, fetcher, require_client_authentication=self.require_client_auth
        )

    def __repr__(self) -> str:
        return f"<ServerCertificates leaf {self._leaf_sha256[:16]}, generation {self._generation}>"


def read_files(
    cert_chain: Path, private_key: Path, client_ca: Path | None
) -> tuple[bytes, bytes, bytes | None]:
    """The PEM bytes of a certificate chain, its key (checked to match) and a client CA."""
    chain, key = load_pair(cert_chain, private_key, "server")
    return chain, key, None if client_ca is None else load_ca(client_ca)


def _configuration(
    chain: bytes, key: bytes, client_ca: bytes | None
) -> tuple[grpc.ServerCertificateConfiguration, str]:
    try:
        leaf = x509.load_pem_x509_certificates(chain)[0]
    except ValueError as e:
        raise DeserializationError("the server certificate is not PEM") from e
    der = leaf.public_bytes(serialization.Encoding.DER)
    config = grpc.ssl_server_certificate_configuration([(key, chain)], root_certificates=client_ca)
    return config, hashlib.sha256(der).hexdigest()


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
