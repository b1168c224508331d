"""A development PKI: one CA, a server certificate, client certificates.

For development, tests and the demo only; production deployments bring
certificates from their own CA. Everything is ECDSA P-256 with SHA-256,
the curve every TLS stack (gRPC's BoringSSL included) accepts for both
server and client authentication.

Client identity is a URI in the subject alternative name (RFC 5280
section 4.2.1.6), never the common name:

    keyquorum://<role>/<name>     role in {backend, auditor}
                                  name: [a-z0-9][a-z0-9._-]{0,62}

e.g. `keyquorum://backend/booking`, `keyquorum://auditor/alice`. The daemon
reads it from the verified peer certificate (`keyquorum.hsm.tls`) and
grants tenants to that exact string. Custodians need no certificate: they
authenticate every action by their hybrid signatures.

Profiles (RFC 5280 section 4.2.1):
- CA: basicConstraints CA:TRUE pathlen:0 (critical), keyUsage
  keyCertSign + cRLSign (critical), 365 days.
- Server: CA:FALSE, keyUsage digitalSignature (critical), extendedKeyUsage
  serverAuth, SAN DNS:localhost, IP:127.0.0.1, IP:::1 and the names given
  (an IP literal becomes an IP SAN), 90 days.
- Client: CA:FALSE, keyUsage digitalSignature (critical), extendedKeyUsage
  clientAuth, SAN URI:keyquorum://role/name, 90 days.
Validity starts five minutes before `now` to absorb clock skew, and no
certificate outlives its CA.

Private keys are written unencrypted (PKCS#8 PEM) with mode 0600, the
directory with 0700; existing files are never overwritten.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from keyquorum.quorum.errors import InvalidInputError, StateError

URI_SCHEME: Final = "keyquorum"
ROLES: Final = ("backend", "auditor")
CA_DAYS: Final = 365
LEAF_DAYS: Final = 90
CLOCK_SKEW: Final = datetime.timedelta(minutes=5)
DEFAULT_SERVER_NAMES: Final = ("localhost", "127.0.0.1", "::1")

# A subset of the log's backend-name rule (quorum.operations.BACKEND_RE), so
# that every client certificate this module makes can be granted a tenant.
_NAME = re.compile(r"[a-z0-9](?:[a-z0-9.-]{0,61}[a-z0-9])?")
_DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


@dataclass(frozen=True)
class ClientIdentity:
    """A client's identity: its role and name, written as a URI SAN."""

    role: str
    name: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise InvalidInputError(
                f"client role must be one of {', '.join(ROLES)}, got {self.role!r}"
            )
        if not _NAME.fullmatch(self.name):
            raise InvalidInputError(
                f"client name must match {_NAME.pattern} (lowercase), got {self.name!r}"
            )

    @property
    def uri(self) -> str:
        return f"{URI_SCHEME}://{self.role}/{self.name}"

    @classmethod
    def parse(cls, uri: str) -> ClientIdentity:
        """Parse `keyquorum://role/name` exactly (no port, query, fragment or case folding)."""
        prefix = f"{URI_SCHEME}://"
        if not uri.startswith(prefix):
            raise InvalidInputError(f"not a {URI_SCHEME}:// identity: {uri!r}")
        role, sep, name = uri[len(prefix) :].partition("/")
        if not sep:
            raise InvalidInputError(f"identity must be {prefix}<role>/<name>, got {uri!r}")
        return cls(role, name)

    @classmethod
    def from_spec(cls, spec: str) -> ClientIdentity:
        """Parse the CLI form `role/name` (e.g. `backend/booking`)."""
        role, sep, name = spec.partition("/")
        if not sep:
            raise InvalidInputError(
                f"client must be given as role/name (roles: {', '.join(ROLES)}), got {spec!r}"
            )
        return cls(role, name)


@dataclass(frozen=True)
class ClientFiles:
    identity: ClientIdentity
    cert: Path
    key: Path


@dataclass(frozen=True)
class DevPki:
    """Paths of everything `make_dev_pki` wrote."""

    directory: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    server_names: tuple[str, ...]
    clients: tuple[ClientFiles, ...]

    def client(self, spec: str) -> ClientFiles:
        """The files of the client given as `role/name`."""
        wanted = ClientIdentity.from_spec(spec)
        for c in self.clients:
            if c.identity == wanted:
                return c
        raise InvalidInputError(f"no client {spec!r} in this PKI")


def make_dev_pki(
    directory: Path,
    *,
    server_names: Sequence[str] = (),
    clients: Sequence[str] = (),
    now: datetime.datetime | None = None,
) -> DevPki:
    """Create a CA, a server certificate and client certificates in `directory`.

    `server_names` are extra DNS names or IP literals for the server (the
    loopback names are always included); `clients` are `role/name` specs.
    Every name is checked and every target path is free before the first
    key is generated, so a refused call writes nothing.
    """
    names = _server_names(server_names)
    identities = [ClientIdentity.from_spec(spec) for spec in clients]
    if len(set(identities)) != len(identities):
        raise InvalidInputError("a client is listed twice")
    if now is None:
        now = datetime.datetime.now(datetime.UTC)
    if now.tzinfo is None:
        raise InvalidInputError("now must be timezone-aware")

    directory = Path(directory)
    pki = DevPki(
        directory=directory,
        ca_cert=directory / "ca.crt",
        ca_key=directory / "ca.key",
        server_cert=directory / "server.crt",
        server_key=directory / "server.key",
        server_names=names,
        clients=tuple(
            ClientFiles(
                identity=i,
                cert=directory / f"{i.role}-{i.name}.crt",
                key=directory / f"{i.role}-{i.name}.key",
            )
            for i in identities
        ),
    )
    targets = [pki.ca_cert, pki.ca_key, pki.server_cert, pki.server_key]
    targets += [p for c in pki.clients for p in (c.cert, c.key)]
    existing = [str(p) for p in targets if p.exists()]
    if existing:
        raise StateError(f"refusing to overwrite existing files: {', '.join(existing)}")

    ca_key, ca_cert = _make_ca(now)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = _issue(
        ca_key,
        ca_cert,
        server_key.public_key(),
        common_name=names[0],
        sans=[_san(n) for n in names],
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
        now=now,
    )
    issued: list[tuple[ClientFiles, ec.EllipticCurvePrivateKey, x509.Certificate]] = []
    for files in pki.clients:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _issue(
            ca_key,
            ca_cert,
            key.public_key(),
            common_name=f"{files.identity.role} {files.identity.name}",
            sans=[x509.UniformResourceIdentifier(files.identity.uri)],
            usage=ExtendedKeyUsageOID.CLIENT_AUTH,
            now=now,
        )
        issued.append((files, key, cert))

    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    _write_key(pki.ca_key, ca_key)
    _write_cert(pki.ca_cert, ca_cert)
    _write_key(pki.server_key, server_key)
    _write_cert(pki.server_cert, server_cert)
    for files, key, cert in issued:
        _write_key(files.key, key)
        _write_cert(files.cert, cert)
    return pki


def uri_sans(cert: x509.Certificate) -> list[str]:
    """Every URI subject alternative name of `cert`, exactly as encoded."""
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return list(ext.value.get_values_for_type(x509.UniformResourceIdentifier))


def _server_names(extra: Sequence[str]) -> tuple[str, ...]:
    names: list[str] = []
    for name in (*DEFAULT_SERVER_NAMES, *extra):
        canonical = _check_server_name(name)
        if canonical not in names:
            names.append(canonical)
    return tuple(names)


def _check_server_name(name: str) -> str:
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        pass
    labels = name.rstrip(".").split(".")
    if len(name) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in labels):
        raise InvalidInputError(f"server name is neither a DNS name nor an IP address: {name!r}")
    return name.rstrip(".").lower()


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _make_ca(now: datetime.datetime) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "keyquorum development"),
            x509.NameAttribute(NameOID.COMMON_NAME, "keyquorum dev CA (not for production)"),
        ]
    )
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _issue(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    public: ec.EllipticCurvePublicKey,
    *,
    common_name: str,
    sans: list[x509.GeneralName],
    usage: x509.ObjectIdentifier,
    now: datetime.datetime,
) -> x509.Certificate:
    not_after = min(now + datetime.timedelta(days=LEAF_DAYS), ca_cert.not_valid_after_utc)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create `path` with `mode` from the start (no window with wider permissions)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError as e:
        raise StateError(f"refusing to overwrite {path}") from e
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), mode)  # the umask may have narrowed it; make it exact
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_new(path, pem, 0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    _write_new(path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
