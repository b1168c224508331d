"""Development PKI and TLS: certificates, real gRPC handshakes, identities.

The server in these tests is a real grpc server on 127.0.0.1 (port 0)
serving the standard health service; a recording servicer stores what
`identity_from_auth_context` extracted on the server side.
"""

from __future__ import annotations

import datetime
import ipaddress
import stat
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from hypothesis import given
from hypothesis import strategies as st

from keyquorum.cli.admin import admin
from keyquorum.client import tls as client_tls
from keyquorum.hsm import tls
from keyquorum.hsm.pki import ClientIdentity, DevPki, make_dev_pki
from keyquorum.quorum.errors import (
    AccessDeniedError,
    DeserializationError,
    InvalidInputError,
    StateError,
)

NOW = datetime.datetime(2030, 1, 15, 12, 0, tzinfo=datetime.UTC)
CLIENTS = ("backend/booking", "auditor/alice")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    return make_dev_pki(
        tmp_path_factory.mktemp("pki") / "dev",
        server_names=["hsm.internal", "10.1.2.3"],
        clients=CLIENTS,
    )


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    """Another CA issuing a client with the very same identity."""
    return make_dev_pki(tmp_path_factory.mktemp("other"), clients=["backend/booking"])


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


# -- certificates --------------------------------------------------------


def test_files_and_permissions(pki: DevPki) -> None:
    assert stat.S_IMODE(pki.directory.stat().st_mode) == 0o700
    keys = [pki.ca_key, pki.server_key] + [c.key for c in pki.clients]
    certs = [pki.ca_cert, pki.server_cert] + [c.cert for c in pki.clients]
    for key in keys:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
        assert key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    for cert in certs:
        assert stat.S_IMODE(cert.stat().st_mode) == 0o644, cert
    assert sorted(p.name for p in pki.directory.iterdir()) == sorted(p.name for p in keys + certs)


def test_profiles_with_injected_time(tmp_path: Path) -> None:
    made = make_dev_pki(tmp_path, clients=["backend/booking"], now=NOW)
    ca, server, client = (_cert(made.ca_cert), _cert(made.server_cert), _cert(made.clients[0].cert))
    skew = datetime.timedelta(minutes=5)
    assert ca.not_valid_before_utc == NOW - skew
    assert ca.not_valid_after_utc == NOW + datetime.timedelta(days=365)
    assert server.not_valid_after_utc == NOW + datetime.timedelta(days=90)
    for cert in (ca, server, client):
        assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
        assert cert.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
        assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical
    assert bc.value.ca
    assert bc.value.path_length == 0
    for leaf, usage in (
        (server, ExtendedKeyUsageOID.SERVER_AUTH),
        (client, ExtendedKeyUsageOID.CLIENT_AUTH),
    ):
        assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        ku = leaf.extensions.get_extension_for_class(x509.KeyUsage)
        assert ku.critical
        assert ku.value.digital_signature
        assert not ku.value.key_cert_sign
        assert list(leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [usage]
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert sans.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    client_sans = client.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert client_sans.get_values_for_type(x509.UniformResourceIdentifier) == [
        "keyquorum://backend/booking"
    ]
    # The identity is the SAN, not the CN (which only reads nicely).
    assert client.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "backend booking"


def test_chains_verify_with_a_webpki_verifier(pki: DevPki) -> None:
    store = verification.Store([_cert(pki.ca_cert)])
    at = datetime.datetime.now(datetime.UTC)
    builder = verification.PolicyBuilder().store(store).time(at)
    for name in ("localhost", "hsm.internal"):
        builder.build_server_verifier(x509.DNSName(name)).verify(_cert(pki.server_cert), [])
    builder.build_server_verifier(x509.IPAddress(ipaddress.ip_address("10.1.2.3"))).verify(
        _cert(pki.server_cert), []
    )
    verified = builder.build_client_verifier().verify(_cert(pki.client("backend/booking").cert), [])
    assert verified.subjects == [x509.UniformResourceIdentifier("keyquorum://backend/booking")]
    with pytest.raises(verification.VerificationError):
        builder.build_server_verifier(x509.DNSName("evil.example")).verify(
            _cert(pki.server_cert), []
        )
    with pytest.raises(verification.VerificationError):  # a client cert is no server cert
        builder.build_server_verifier(x509.DNSName("localhost")).verify(
            _cert(pki.client("backend/booking").cert), []
        )


def test_no_leaf_outlives_its_ca(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("keyquorum.hsm.pki.CA_DAYS", 30)
    made = make_dev_pki(tmp_path, clients=["auditor/alice"], now=NOW)
    ca_end = _cert(made.ca_cert).not_valid_after_utc
    assert _cert(made.server_cert).not_valid_after_utc == ca_end
    assert _cert(made.clients[0].cert).not_valid_after_utc == ca_end


@pytest.mark.parametrize(
    ("clients", "server_names", "message"),
    [
        (["booking"], [], "role/name"),
        (["root/x"], [], "role must be one of backend, auditor"),
        (["backend/Booking"], [], "lowercase"),
        (["backend/"], [], "client name must match"),
        (["backend/a/b"], [], "client name must match"),
        (["backend/x", "backend/x"], [], "listed twice"),
        ([], ["bad name"], "neither a DNS name nor an IP"),
        ([], ["-x.example"], "neither a DNS name nor an IP"),
        ([], ["a..b"], "neither a DNS name nor an IP"),
    ],
    ids=[
        "no-role",
        "unknown-role",
        "uppercase",
        "empty-name",
        "slash-in-name",
        "duplicate",
        "space-in-server-name",
        "leading-hyphen",
        "empty-label",
    ],
)
def test_bad_names_write_nothing(
    tmp_path: Path, clients: list[str], server_names: list[str], message: str
) -> None:
    out = tmp_path / "pki"
    with pytest.raises(InvalidInputError, match=message):
        make_dev_pki(out, clients=clients, server_names=server_names)
    assert not out.exists()


def test_never_overwrites(tmp_path: Path) -> None:
    make_dev_pki(tmp_path, clients=["backend/a"])
    ca_before = (tmp_path / "ca.key").read_bytes()
    with pytest.raises(StateError, match="refusing to overwrite"):
        make_dev_pki(tmp_path, clients=["backend/b"])
    assert (tmp_path / "ca.key").read_bytes() == ca_before
    assert not (tmp_path / "backend-b.crt").exists()


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("keyquorum://backend/booking", ("backend", "booking")),
        ("keyquorum://auditor/alice.b-2", ("auditor", "alice.b-2")),
        ("keyquorum://backend/booking/extra", None),
        ("keyquorum://backend", None),
        ("keyquorum://Backend/booking", None),
        ("KEYQUORUM://backend/booking", None),
        ("keyquorum://backend/booking?x=1", None),
        ("https://backend/booking", None),
        ("keyquorum://custodian/bob", None),
    ],
    ids=[
        "backend",
        "auditor-dots-hyphens",
        "extra-path",
        "no-name",
        "role-case",
        "scheme-case",
        "query",
        "other-scheme",
        "unknown-role",
    ],
)
def test_identity_parsing(uri: str, expected: tuple[str, str] | None) -> None:
    if expected is None:
        with pytest.raises(InvalidInputError):
            ClientIdentity.parse(uri)
    else:
        parsed = ClientIdentity.parse(uri)
        assert (parsed.role, parsed.name) == expected
        assert parsed.uri == uri


# -- real gRPC over TLS --------------------------------------------------


class _Recorder(health.HealthServicer):
    """The health service, noting the identity the server saw on each call."""

    def __init__(self) -> None:
        super().__init__()
        self.identities: list[str | None] = []

    def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        self.identities.append(tls.identity_from_auth_context(context))
        return super().Check(request, context)


@dataclass
class Running:
    port: int
    recorder: _Recorder


def _start(creds: grpc.ServerCredentials | None, host: str = "127.0.0.1") -> Iterator[Running]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    recorder = _Recorder()
    health_pb2_grpc.add_HealthServicer_to_server(recorder, server)
    address = f"{host}:0"
    port = (
        server.add_insecure_port(address)
        if creds is None
        else server.add_secure_port(address, creds)
    )
    server.start()
    try:
        yield Running(port, recorder)
    finally:
        server.stop(None)


@pytest.fixture(scope="module")
def tls_server(pki: DevPki) -> Iterator[Running]:
    yield from _start(tls.server_credentials(pki.server_cert, pki.server_key))


@pytest.fixture(scope="module")
def mtls_server(pki: DevPki) -> Iterator[Running]:
    creds = tls.server_credentials(
        pki.server_cert, pki.server_key, client_ca=pki.ca_cert, require_client_auth=True
    )
    yield from _start(creds)


def _check(target: str, creds: grpc.ChannelCredentials | None) -> int:
    channel = grpc.insecure_channel(target) if creds is None else grpc.secure_channel(target, creds)
    with channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10
        )
    return int(reply.status)


def _handshake_fails(target: str, creds: grpc.ChannelCredentials) -> None:
    with pytest.raises(grpc.RpcError) as info:
        _check(target, creds)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
def test_tls_with_the_ca_works(pki: DevPki, tls_server: Running, host: str) -> None:
    creds = client_tls.channel_credentials(pki.ca_cert)
    assert _check(f"{host}:{tls_server.port}", creds) == health_pb2.HealthCheckResponse.SERVING
    assert tls_server.recorder.identities[-1] is None  # no client certificate: no identity


def test_tls_client_trusting_another_ca_refuses_the_server(
    other_pki: DevPki, tls_server: Running
) -> None:
    _handshake_fails(
        f"localhost:{tls_server.port}", client_tls.channel_credentials(other_pki.ca_cert)
    )


def test_plaintext_client_gets_nothing_from_a_tls_server(tls_server: Running) -> None:
    with pytest.raises(grpc.RpcError) as info:
        _check(f"127.0.0.1:{tls_server.port}", None)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("client", CLIENTS)
def test_mtls_client_identity_is_extracted(pki: DevPki, mtls_server: Running, client: str) -> None:
    files = pki.client(client)
    creds = client_tls.channel_credentials(
        pki.ca_cert, client_cert=files.cert, client_key=files.key
    )
    before = len(mtls_server.recorder.identities)
    assert _check(f"localhost:{mtls_server.port}", creds) == health_pb2.HealthCheckResponse.SERVING
    assert mtls_server.recorder.identities[before:] == [f"keyquorum://{client}"]


def test_mtls_without_client_certificate_fails(pki: DevPki, mtls_server: Running) -> None:
    before = len(mtls_server.recorder.identities)
    _handshake_fails(f"localhost:{mtls_server.port}", client_tls.channel_credentials(pki.ca_cert))
    assert len(mtls_server.recorder.identities) == before  # no servicer was reached


def test_mtls_client_from_another_ca_fails(
    pki: DevPki, other_pki: DevPki, mtls_server: Running
) -> None:
    impostor = other_pki.client("backend/booking")  # same URI, wrong CA
    creds = client_tls.channel_credentials(
        pki.ca_cert, client_cert=impostor.cert, client_key=impostor.key
    )
    before = len(mtls_server.recorder.identities)
    _handshake_fails(f"localhost:{mtls_server.port}", creds)
    assert len(mtls_server.recorder.identities) == before


def test_mtls_expired_client_certificate_fails(tmp_path: Path) -> None:
    old = make_dev_pki(
        tmp_path,
        clients=["backend/old"],
        now=datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=120),
    )
    fresh_server = make_dev_pki(tmp_path / "server")
    creds = tls.server_credentials(
        fresh_server.server_cert,
        fresh_server.server_key,
        client_ca=old.ca_cert,  # the old CA is still valid; its leaf is not
        require_client_auth=True,
    )
    for running in _start(creds):
        files = old.client("backend/old")
        client = client_tls.channel_credentials(
            fresh_server.ca_cert, client_cert=files.cert, client_key=files.key
        )
        _handshake_fails(f"localhost:{running.port}", client)
        assert running.recorder.identities == []


def test_grpc_has_no_optional_client_auth(pki: DevPki) -> None:
    """Why `server_credentials` refuses a client CA without the flag: gRPC
    then never requests a certificate, even one the client would send."""
    raw = grpc.ssl_server_credentials(
        [(pki.server_key.read_bytes(), pki.server_cert.read_bytes())],
        root_certificates=pki.ca_cert.read_bytes(),
        require_client_auth=False,
    )
    files = pki.client("backend/booking")
    creds = client_tls.channel_credentials(
        pki.ca_cert, client_cert=files.cert, client_key=files.key
    )
    for running in _start(raw):
        assert _check(f"localhost:{running.port}", creds) == health_pb2.HealthCheckResponse.SERVING
        assert running.recorder.identities == [None]


def test_plaintext_on_loopback_only_with_the_flag() -> None:
    with pytest.raises(InvalidInputError, match="--insecure-dev-plaintext"):
        client_tls.check_plaintext_allowed("127.0.0.1", False)
    with pytest.raises(InvalidInputError, match="only on loopback"):
        client_tls.check_plaintext_allowed("0.0.0.0", True)
    client_tls.check_plaintext_allowed("127.0.0.1", True)
    for running in _start(None, "127.0.0.1"):
        assert _check(f"127.0.0.1:{running.port}", None) == health_pb2.HealthCheckResponse.SERVING
        assert running.recorder.identities == [None]  # plaintext never yields an identity


# -- configuration errors ------------------------------------------------


PLAINTEXT_CASES = [
    ("127.0.0.1", True, True),
    ("127.4.5.6", True, True),
    ("::1", True, True),
    ("[::1]", True, True),
    ("localhost", True, True),
    ("LocalHost", True, True),
    ("127.0.0.1", False, False),
    ("localhost", False, False),
    ("::1", False, False),
    ("0.0.0.0", True, False),
    ("::", True, False),
    ("10.0.0.5", True, False),
    ("192.168.1.1", True, False),
    ("example.com", True, False),
    ("localhost.example.com", True, False),
    ("::ffff:127.0.0.1", True, False),
    ("::1%lo", True, False),
    ("", True, False),
]


@pytest.mark.parametrize(
    ("host", "flag", "allowed"),
    PLAINTEXT_CASES,
    ids=[f"{h or 'empty'}-{'flag' if f else 'no-flag'}" for h, f, _ in PLAINTEXT_CASES],
)
def test_check_plaintext_allowed(host: str, flag: bool, allowed: bool) -> None:
    if allowed:
        client_tls.check_plaintext_allowed(host, flag)
    else:
        with pytest.raises(InvalidInputError):
            client_tls.check_plaintext_allowed(host, flag)


def test_server_credential_combinations_are_checked(pki: DevPki) -> None:
    with pytest.raises(InvalidInputError, match="would not authenticate"):
        tls.server_credentials(pki.server_cert, pki.server_key, client_ca=pki.ca_cert)
    with pytest.raises(InvalidInputError, match="needs the client CA"):
        tls.server_credentials(pki.server_cert, pki.server_key, require_client_auth=True)
    with pytest.raises(InvalidInputError, match="go together"):
        client_tls.channel_credentials(pki.ca_cert, client_cert=pki.client("backend/booking").cert)


@pytest.mark.parametrize(
    ("case", "error", "message"),
    [
        ("missing-cert", InvalidInputError, "does not exist"),
        ("garbage-cert", DeserializationError, "not a PEM certificate"),
        ("garbage-key", DeserializationError, "not an unencrypted PEM private key"),
        ("key-of-another-cert", InvalidInputError, "is not the key of the certificate"),
        ("leaf-as-client-ca", InvalidInputError, "not a CA"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_bad_files_are_named(
    pki: DevPki, tmp_path: Path, case: str, error: type[Exception], message: str
) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"-----BEGIN NOTHING-----\n")
    cert, key, ca = pki.server_cert, pki.server_key, pki.ca_cert
    if case == "missing-cert":
        cert = tmp_path / "absent.crt"
    elif case == "garbage-cert":
        cert = garbage
    elif case == "garbage-key":
        key = garbage
    elif case == "key-of-another-cert":
        key = pki.client("backend/booking").key
    else:
        ca = pki.server_cert
    with pytest.raises(error, match=message):
        tls.server_credentials(cert, key, client_ca=ca, require_client_auth=True)


# -- identity_from_auth_context on crafted certificates ------------------


def _pem_with_uris(uris: list[str]) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "keyquorum://backend/from-cn")])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(NOW)
        .not_valid_after(NOW + datetime.timedelta(days=1))
    )
    if uris:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
            critical=False,
        )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


class _Context:
    def __init__(self, auth: dict[str, list[bytes]]) -> None:
        self._auth = auth

    def auth_context(self) -> dict[str, list[bytes]]:
        return self._auth


def _ssl(pem: bytes) -> _Context:
    return _Context({"transport_security_type": [b"ssl"], "x509_pem_cert": [pem]})


@pytest.mark.parametrize(
    ("uris", "expected"),
    [
        (["keyquorum://backend/booking"], "keyquorum://backend/booking"),
        (["spiffe://example.org/x", "keyquorum://auditor/alice"], "keyquorum://auditor/alice"),
        ([], None),  # the CN says keyquorum://backend/from-cn: it must not count
        (["spiffe://example.org/x"], None),
    ],
    ids=["one-uri", "other-uris-ignored", "cn-is-not-identity", "foreign-uri-only"],
)
def test_identity_from_crafted_certificates(uris: list[str], expected: str | None) -> None:
    assert tls.identity_from_auth_context(_ssl(_pem_with_uris(uris))) == expected


@pytest.mark.parametrize(
    ("uris", "message"),
    [
        (["keyquorum://backend/a", "keyquorum://backend/b"], "names 2 keyquorum identities"),
        (["keyquorum://root/admin"], "malformed identity"),
        (["keyquorum://backend/A"], "malformed identity"),
    ],
    ids=["two-identities", "unknown-role", "bad-name"],
)
def test_ambiguous_or_malformed_identity_is_refused(uris: list[str], message: str) -> None:
    with pytest.raises(AccessDeniedError, match=message):
        tls.identity_from_auth_context(_ssl(_pem_with_uris(uris)))


def test_no_identity_without_tls() -> None:
    pem = _pem_with_uris(["keyquorum://backend/booking"])
    assert tls.identity_from_auth_context(_Context({})) is None
    insecure = {"transport_security_type": [b"insecure"], "x509_pem_cert": [pem]}
    assert tls.identity_from_auth_context(_Context(insecure)) is None
    assert tls.identity_from_auth_context(_Context({"transport_security_type": [b"ssl"]})) is None
    with pytest.raises(DeserializationError, match="not valid PEM"):
        tls.identity_from_auth_context(_ssl(b"-----BEGIN CERTIFICATE-----\nAAAA\n"))


# -- CLI -------------------------------------------------------------------


def test_cli_dev_pki(tmp_path: Path) -> None:
    runner = CliRunner()
    help_text = runner.invoke(admin, ["dev-pki", "--help"]).output
    assert "Examples:" in help_text
    assert "--client backend/booking" in help_text
    out = tmp_path / "pki"
    args = ["dev-pki", "--out", str(out), "--server-name", "hsm.internal"]
    result = runner.invoke(admin, [*args, "--client", "backend/booking"])
    assert result.exit_code == 0, result.output
    assert "keyquorum://backend/booking" in result.output
    assert str(out / "backend-booking.key") in result.output
    assert "hsm.internal" in result.output
    server_sans = _cert(out / "server.crt").extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert "hsm.internal" in server_sans.value.get_values_for_type(x509.DNSName)
    again = runner.invoke(admin, args)
    assert isinstance(again.exception, StateError)  # main turns it into "error: ..." and exit 1
    bad = runner.invoke(admin, ["dev-pki", "--out", str(tmp_path / "b"), "--client", "booking"])
    assert isinstance(bad.exception, InvalidInputError)


@given(st.from_regex(r"[a-z0-9._-]{1,70}", fullmatch=True))
def test_every_client_name_the_pki_accepts_can_be_granted(name: str) -> None:
    from keyquorum.quorum.operations import BACKEND_RE

    try:
        ClientIdentity("backend", name)
    except InvalidInputError:
        return
    assert BACKEND_RE.fullmatch(name), name


@pytest.mark.parametrize("name", ["under_score", "trailing-", "trailing.", "-leading"])
def test_names_the_log_could_never_grant_are_refused(name: str) -> None:
    with pytest.raises(InvalidInputError, match="client name must match"):
        ClientIdentity("backend", name)
