"""KeyService over real mTLS gRPC, on a real daemon with quorum-approved tenants.

One daemon per module (ceremony, unseal, tenants created, granted and
activated by five custodians through the custodian API). Backends call
through `keyquorum.client` with certificates of a development CA. Every
status code of DESIGN.md is a named case; every byte of a ciphertext is
altered; batches mix good and bad items; no error message, access-log
line or metric carries a plaintext, a key or a context.

The KeyService on its listener and the tenants' set-up are tests/key_plane.py.
"""

from __future__ import annotations

import os
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from keyquorum.client import KeyClient, KeyServiceError, decrypt_record, encrypt_record, framing
from keyquorum.client import client as client_module
from keyquorum.hsm import dataplane
from keyquorum.hsm.dataplane import DataPlane, Revealed
from keyquorum.hsm.dataplane import plane as dataplane_plane
from keyquorum.hsm.dataplane.ratelimit import RateLimiter
from keyquorum.hsm.pki import make_dev_pki
from keyquorum.hsm.services import key_service
from keyquorum.hsm.services.access_log import AccessLog, load_or_create_key
from keyquorum.hsm.services.metrics import Metrics
from keyquorum.quorum import canonical
from keyquorum.quorum.errors import DecryptionError, KeyquorumError, StateError
from keyquorum.quorum.limits import Limits
from keyquorum.quorum.operations import TENANT_RE
from keyquorum.quorum.sealing import SealingPrivateKey
from keyquorum.v1 import key_pb2 as kpb
from keyquorum.v1 import key_pb2_grpc as kpb_grpc
from tests.certs import client_cert
from tests.custodian_steps import K, ceremony, propose, run, run_one, unseal
from tests.harness import (
    Custodian,
    FakeClock,
    InProcessDaemon,
    find_secrets,
    in_process_daemon,
    make_custodians,
)
from tests.key_plane import (
    AUDITOR,
    BOOKING,
    CONTEXT,
    MARKER,
    MESSAGING,
    TENANT,
    KeyPlane,
    key_plane,
    make_pki,
    ready_tenant,
)

C = grpc.StatusCode


# -- shared helpers ------------------------------------------------------------------


def code_of(fn: object) -> KeyServiceError:
    """Run a client call that must fail; its KeyServiceError."""
    with pytest.raises(KeyServiceError) as info:
        fn()  # type: ignore[operator]
    return info.value


def tenant_key_bytes(d: InProcessDaemon, tenant: str, version: int | None = None) -> bytes:
    _v, key = d.daemon.tenant_key(tenant, version)
    with key:
        return key.reveal()


# -- the module's daemon ---------------------------------------------------------------


@dataclass
class World:
    kp: KeyPlane
    custodians: list[Custodian]
    metrics: Metrics
    access_path: Path
    access: AccessLog
    errors: list[str]
    """Every error message a test saw, searched for secrets at the end."""


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    base = tmp_path_factory.mktemp("ks")
    dev_pki = make_pki(base / "pki")
    custodians = make_custodians(base / "custodians")
    metrics = Metrics()
    access_path = base / "access.jsonl"
    with in_process_daemon(base / "data", dev_pki, clock=FakeClock()) as d:
        access = AccessLog(access_path, load_or_create_key(d.data_dir))
        d.daemon.add_seal_observer(metrics.set_sealed)
        ceremony(d, custodians)
        unseal(d, custodians[:K])
        ready_tenant(d, custodians, TENANT)
        ready_tenant(d, custodians, "dormant", activate=False)
        ready_tenant(d, custodians, "messaging-only", backend="messaging")
        with key_plane(d, dev_pki, usage=(metrics, access)) as kp:
            yield World(kp, custodians, metrics, access_path, access, [])
        access.close()


@pytest.fixture(scope="module")
def booking(world: World) -> Iterator[KeyClient]:
    with world.kp.client() as c:
        yield c


def refused(world: World, fn: object, code: grpc.StatusCode, match: str) -> KeyServiceError:
    error = code_of(fn)
    world.errors.append(str(error))
    assert error.code == code, str(error)
    assert match in error.details, str(error)
    return error


# -- the happy paths -----------------------------------------------------------------------


def test_wrap_unwrap_round_trip_binds_the_context(world: World, booking: KeyClient) -> None:
    wrapped = booking.wrap(TENANT, MARKER, CONTEXT)
    assert wrapped.key_version == 1
    parsed = dataplane.parse(wrapped.ciphertext)
    assert (parsed.tenant, parsed.version) == (TENANT, 1)
    assert len(wrapped.ciphertext) == 2 + len(TENANT) + 4 + 12 + len(MARKER) + 16
    with booking.unwrap(wrapped.ciphertext, CONTEXT) as plain:
        assert plain.reveal() == MARKER
    # The context's key order does not matter (RFC 8785), its content does.
    with booking.unwrap(wrapped.ciphertext, dict(reversed(list(CONTEXT.items())))) as plain:
        assert plain.reveal() == MARKER
    # Two wraps of the same plaintext differ (fresh nonce).
    assert booking.wrap(TENANT, MARKER, CONTEXT).ciphertext != wrapped.ciphertext


def test_generate_data_key_and_unwrap_it(booking: KeyClient) -> None:
    for size in (16, 32, 64):
        with booking.generate_data_key(TENANT, CONTEXT, size=size) as dk:
            assert len(dk.plaintext) == size
            with booking.unwrap(dk.ciphertext, CONTEXT) as again:
                assert again.equals(dk.plaintext)


def test_data_key_sealed_to_the_backend(world: World, booking: KeyClient) -> None:
    mine, theirs = SealingPrivateKey.generate(), SealingPrivateKey.generate()
    with booking.generate_data_key(TENANT, CONTEXT, seal_to=mine) as dk:
        clear = dk.plaintext.reveal()
        # The raw response carries no clear key: only the HPKE ciphertext.
        stub = kpb_grpc.KeyServiceStub(booking.channel)
        raw = stub.Unwrap(
            kpb.UnwrapRequest(
                ciphertext=dk.ciphertext,
                context=CONTEXT,
                recipient_public_key=mine.public_key().to_bytes(),
            )
        )
        assert raw.plaintext == b""
        assert find_secrets(raw.SerializeToString(), {"data key": clear}) == []
        opened = mine.open(raw.sealed_plaintext, dataplane.sealed_info(dk.ciphertext))
        assert opened.reveal() == clear
        # Another key cannot open it; nor can the sealed key be moved to another ciphertext.
        with pytest.raises(DecryptionError):
            theirs.open(raw.sealed_plaintext, dataplane.sealed_info(dk.ciphertext))
        with pytest.raises(DecryptionError):
            mine.open(raw.sealed_plaintext, dataplane.sealed_info(dk.ciphertext + b"x"))
        with booking.unwrap(dk.ciphertext, CONTEXT, seal_to=mine) as via_client:
            assert via_client.reveal() == clear


def test_rewrap_moves_to_the_newest_version_and_disable_stops_the_old(world: World) -> None:
    d, custodians = world.kp.d, world.custodians
    ready_tenant(d, custodians, "rotating")
    with world.kp.client() as c:
        old = c.wrap("rotating", MARKER, CONTEXT)
        run(d, custodians, "rotate-tenant", tenant="rotating")
        assert c.wrap("rotating", MARKER, CONTEXT).key_version == 2
        new = c.rewrap(old.ciphertext, CONTEXT)
        assert (old.key_version, new.key_version) == (1, 2)
        with c.unwrap(new.ciphertext, CONTEXT) as plain:
            assert plain.reveal() == MARKER
        refused(world, lambda: c.rewrap(old.ciphertext, {"other": "x"}), C.INVALID_ARGUMENT, "")
        # Old versions keep decrypting until disabled (one custodian).
        with c.unwrap(old.ciphertext, CONTEXT) as plain:
            assert plain.reveal() == MARKER
        p = propose(d, "disable-version", tenant="rotating", version=1)
        run_one(d, custodians, p.id)
        refused(world, lambda: c.unwrap(old.ciphertext, CONTEXT), C.FAILED_PRECONDITION, "disabled")
        refused(world, lambda: c.rewrap(old.ciphertext, CONTEXT), C.FAILED_PRECONDITION, "disabled")
        with c.unwrap(new.ciphertext, CONTEXT) as plain:
            assert plain.reveal() == MARKER


def raw_call(method: object, request: object) -> object:
    """A stub call whose failure is raised as the client's KeyServiceError."""
    try:
        return method(request)  # type: ignore[operator]
    except grpc.RpcError as e:
        raise client_module._error(e) from None


def test_envelope_helper_round_trip_and_refusals(world: World, booking: KeyClient) -> None:
    record = os.urandom(100_000)
    box = encrypt_record(booking, TENANT, record, CONTEXT)
    with decrypt_record(booking, box, CONTEXT) as plain:
        assert plain.reveal() == record
    mine = SealingPrivateKey.generate()
    sealed_box = encrypt_record(booking, TENANT, b"small", CONTEXT, seal_to=mine)
    with decrypt_record(booking, sealed_box, CONTEXT, seal_to=mine) as plain:
        assert plain.reveal() == b"small"
    refused(world, lambda: decrypt_record(booking, box, {"x": "y"}), C.INVALID_ARGUMENT, "")
    flipped = bytearray(box)
    flipped[-1] ^= 1
    with pytest.raises(DecryptionError, match="frame 2 does not authenticate"):
        decrypt_record(booking, bytes(flipped), CONTEXT)
    # A record moved under another record's header (its wrapped key and salt)
    # does not open: the frames are under another message key.
    other = encrypt_record(booking, TENANT, record, CONTEXT)
    size = framing.parse_header(box).size
    with pytest.raises(DecryptionError, match="frame 1 does not authenticate"):
        decrypt_record(booking, other[:size] + box[size:], CONTEXT)


# -- every status code ------------------------------------------------------------------------


def test_unauthenticated_without_a_client_certificate(world: World, tmp_path: Path) -> None:
    """No certificate: the mTLS handshake refuses, the call never reaches the service."""
    creds = grpc.ssl_channel_credentials(root_certificates=world.kp.pki.ca_cert.read_bytes())
    with grpc.secure_channel(world.kp.target, creds) as channel:
        c = KeyClient.from_channel(channel)
        error = code_of(lambda: c.wrap(TENANT, b"x", CONTEXT))
    assert error.code == C.UNAVAILABLE  # the handshake failed: no status from the server
    # A certificate from another CA: refused the same way.
    stranger = make_dev_pki(tmp_path / "other-ca", clients=[BOOKING])
    files = stranger.client(BOOKING)
    with KeyClient(
        world.kp.target, ca=world.kp.pki.ca_cert, cert=files.cert, key=files.key, attempts=1
    ) as c:
        assert code_of(lambda: c.wrap(TENANT, b"x", CONTEXT)).code == C.UNAVAILABLE


def test_unauthenticated_certificate_without_identity(world: World, tmp_path: Path) -> None:
    """A certificate of the right CA that names no keyquorum identity: UNAUTHENTICATED."""
    cert, key = client_cert(
        world.kp.pki, tmp_path, "no identity", [x509.DNSName("booking.example")]
    )
    with KeyClient(world.kp.target, ca=world.kp.pki.ca_cert, cert=cert, key=key, attempts=1) as c:
        refused(world, lambda: c.wrap(TENANT, b"x", CONTEXT), C.UNAUTHENTICATED, "required")
        refused(world, lambda: c.batch_wrap([(TENANT, b"x", CONTEXT)]), C.UNAUTHENTICATED, "")


def test_identity_cache_never_admits_a_certificate_naming_two_identities(
    world: World, booking: KeyClient, tmp_path: Path
) -> None:
    """The identity cache is keyed on the certificate's SHA-256, so each certificate decides.

    The booking backend's own certificate is cached first; a certificate of
    the same CA naming booking and a second identity is refused on every
    call (never taken for booking), and one naming booking beside a DNS name
    works as booking.
    """
    assert not isinstance(booking.wrap(TENANT, b"x", CONTEXT), KeyServiceError)
    both = [
        x509.UniformResourceIdentifier("keyquorum://backend/booking"),
        x509.UniformResourceIdentifier("keyquorum://backend/messaging"),
    ]
    cert, key = client_cert(world.kp.pki, tmp_path / "two", "no identity", both)
    with KeyClient(world.kp.target, ca=world.kp.pki.ca_cert, cert=cert, key=key, attempts=1) as c:
        for _ in range(3):
            refused(
                world, lambda: c.wrap(TENANT, b"x", CONTEXT), C.PERMISSION_DENIED, "2 keyquorum"
            )
    plus_dns = [x509.DNSName("booking.example"), both[0]]
    cert, key = client_cert(world.kp.pki, tmp_path / "dns", "no identity", plus_dns)
    with KeyClient(world.kp.target, ca=world.kp.pki.ca_cert, cert=cert, key=key, attempts=1) as c:
        for _ in range(3):
            assert c.unwrap(c.wrap(TENANT, b"y", CONTEXT).ciphertext, CONTEXT).reveal() == b"y"


@pytest.mark.parametrize(
    ("common_name", "sans"),
    [
        ("keyquorum://backend/booking", []),
        ("forged", [x509.DNSName("keyquorum://backend/booking")]),
        ("keyquorum://backend/booking", [x509.DNSName("keyquorum://backend/booking")]),
    ],
    ids=["cn", "dns-san", "both"],
)
def test_a_forged_name_is_never_served_as_the_backend(
    world: World, tmp_path: Path, common_name: str, sans: list[x509.GeneralName]
) -> None:
    """A CA-signed certificate showing booking's identity as a CN or DNS name is nobody.

    On a fresh listener (an empty identity cache): refused before the real
    booking certificate calls, and after it has called; and on the module's
    listener, where booking has been calling all along. The metrics never
    count one of its calls as booking's.
    """
    cert, key = client_cert(world.kp.pki, tmp_path / "forged", common_name, sans)

    def forged_wrap(kp: KeyPlane) -> object:
        with KeyClient(kp.target, ca=kp.pki.ca_cert, cert=cert, key=key, attempts=1) as c:
            return code_of(lambda: c.wrap(TENANT, b"x", CONTEXT))

    def booking_ok(kp: KeyPlane) -> None:
        with kp.client() as c:
            assert c.unwrap(c.wrap(TENANT, b"ok", CONTEXT).ciphertext, CONTEXT).reveal() == b"ok"

    booked = _booking_wraps(world)
    with key_plane(world.kp.d, world.kp.pki) as fresh:
        for when in ("before", "after"):
            if when == "after":
                booking_ok(fresh)
            error = forged_wrap(fresh)
            assert isinstance(error, KeyServiceError), when
            assert error.code == C.UNAUTHENTICATED, (when, str(error))
    error = forged_wrap(world.kp)
    assert isinstance(error, KeyServiceError)
    assert error.code == C.UNAUTHENTICATED
    assert _booking_wraps(world) == booked


def _booking_wraps(world: World) -> float:
    """Wraps the module's listener counted for booking (fresh listeners have no sinks)."""
    return sum(
        s.value
        for m in world.metrics.registry.collect()
        for s in m.samples
        if s.name.endswith("_total")
        and s.labels.get("backend") == "booking"
        and s.labels.get("operation") == "wrap"
    )


@pytest.mark.parametrize(
    ("call", "match"),
    [
        ("wrap", "not a backend identity"),
        ("unwrap", "not a backend identity"),
        ("generate", "not a backend identity"),
        ("batch", "not a backend identity"),
    ],
    ids=["wrap", "unwrap", "generate-data-key", "batch-wrap"],
)
def test_permission_denied_for_another_role(
    world: World, booking: KeyClient, call: str, match: str
) -> None:
    ciphertext = booking.wrap(TENANT, b"x", CONTEXT).ciphertext
    with world.kp.client(AUDITOR) as auditor:
        fn = {
            "wrap": lambda: auditor.wrap(TENANT, b"x", CONTEXT),
            "unwrap": lambda: auditor.unwrap(ciphertext, CONTEXT),
            "generate": lambda: auditor.generate_data_key(TENANT, CONTEXT),
            "batch": lambda: auditor.batch_wrap([(TENANT, b"x", CONTEXT)]),
        }[call]
        refused(world, fn, C.PERMISSION_DENIED, match)


def test_permission_denied_for_a_tenant_not_granted(world: World, booking: KeyClient) -> None:
    ciphertext = booking.wrap(TENANT, MARKER, CONTEXT).ciphertext
    with world.kp.client(MESSAGING) as messaging:
        for fn in (
            lambda: messaging.wrap(TENANT, MARKER, CONTEXT),
            lambda: messaging.unwrap(ciphertext, CONTEXT),
            lambda: messaging.generate_data_key(TENANT, CONTEXT),
            lambda: messaging.rewrap(ciphertext, CONTEXT),
        ):
            refused(world, fn, C.PERMISSION_DENIED, "backend messaging is not granted")
        # Its own tenant works.
        messaging.wrap("messaging-only", b"x", CONTEXT)
    # booking may not use messaging's tenant; an unknown tenant looks the same (no probing).
    refused(world, lambda: booking.wrap("messaging-only", b"x", CONTEXT), C.PERMISSION_DENIED, "")
    refused(world, lambda: booking.wrap("no-such-tenant", b"x", CONTEXT), C.PERMISSION_DENIED, "")


def test_failed_precondition_tenant_not_active(world: World, booking: KeyClient) -> None:
    refused(
        world, lambda: booking.wrap("dormant", b"x", CONTEXT), C.FAILED_PRECONDITION, "not active"
    )
    refused(
        world,
        lambda: booking.generate_data_key("dormant", CONTEXT),
        C.FAILED_PRECONDITION,
        "not active",
    )


def test_failed_precondition_deactivated_and_destroyed(world: World, booking: KeyClient) -> None:
    d, custodians = world.kp.d, world.custodians
    ready_tenant(d, custodians, "short-lived")
    ct = booking.wrap("short-lived", MARKER, CONTEXT).ciphertext
    run_one(d, custodians, propose(d, "deactivate-tenant", tenant="short-lived").id)
    refused(world, lambda: booking.unwrap(ct, CONTEXT), C.FAILED_PRECONDITION, "not active")
    run(d, custodians, "activate-tenant", tenant="short-lived", duration_seconds=3600)
    with booking.unwrap(ct, CONTEXT) as plain:
        assert plain.reveal() == MARKER
    run(d, custodians, "destroy-tenant", tenant="short-lived")
    for fn in (lambda: booking.unwrap(ct, CONTEXT), lambda: booking.wrap("short-lived", b"x")):
        refused(world, fn, C.FAILED_PRECONDITION, "short-lived")


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("empty-plaintext", "the plaintext is empty"),
        ("bad-tenant-name", "not granted"),
        ("empty-context-key", "context key is empty"),
        ("garbage-ciphertext", "unknown ciphertext format 0x67"),
        ("empty-ciphertext", "the ciphertext is empty"),
        ("short-ciphertext", "shorter than its"),
        ("data-key-too-small", "a data key is 16 to 64 bytes, got 8"),
        ("data-key-too-large", "a data key is 16 to 64 bytes, got 65"),
        ("bad-recipient-key", "sealing public key must be 1216 bytes"),
        ("wrong-context", "does not authenticate"),
        ("missing-context", "does not authenticate"),
        ("forged-version", "names key version 7"),
    ],
    ids=lambda v: v if " " not in v else "",
)
def test_invalid_argument(world: World, booking: KeyClient, case: str, match: str) -> None:
    ct = booking.wrap(TENANT, MARKER, CONTEXT).ciphertext
    forged = bytearray(ct)
    forged[2 + len(TENANT) : 6 + len(TENANT)] = (7).to_bytes(4, "big")
    stub = kpb_grpc.KeyServiceStub(booking.channel)
    calls = {
        "empty-plaintext": lambda: booking.wrap(TENANT, b"", CONTEXT),
        "bad-tenant-name": lambda: booking.wrap("Not A Tenant", b"x", CONTEXT),
        "empty-context-key": lambda: booking.wrap(TENANT, b"x", {"": "v"}),
        "garbage-ciphertext": lambda: booking.unwrap(b"garbage", CONTEXT),
        "empty-ciphertext": lambda: booking.unwrap(b"", CONTEXT),
        "short-ciphertext": lambda: booking.unwrap(ct[:30], CONTEXT),
        "data-key-too-small": lambda: booking.generate_data_key(TENANT, CONTEXT, size=8),
        "data-key-too-large": lambda: booking.generate_data_key(TENANT, CONTEXT, size=65),
        "bad-recipient-key": lambda: raw_call(
            stub.GenerateDataKey,
            kpb.GenerateDataKeyRequest(tenant=TENANT, recipient_public_key=b"\x01" * 32),
        ),
        "wrong-context": lambda: booking.unwrap(ct, {**CONTEXT, "doctor": "dr-0816"}),
        "missing-context": lambda: booking.unwrap(ct, {}),
        "forged-version": lambda: booking.unwrap(bytes(forged), CONTEXT),
    }
    code = C.PERMISSION_DENIED if case == "bad-tenant-name" else C.INVALID_ARGUMENT
    refused(world, calls[case], code, match)


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("plaintext-4097", "the plaintext is 4097 bytes; at most 4096"),
        ("context-too-many-pairs", "65 pairs; at most 64"),
        ("context-too-long", "bytes encoded; at most 4096"),
        ("batch-too-large", "a batch has at most 1000 items, got 1001"),
    ],
    ids=["plaintext-4097", "context-pairs", "context-bytes", "batch-1001"],
)
def test_resource_exhausted_size_limits(
    world: World, booking: KeyClient, case: str, match: str
) -> None:
    calls = {
        "plaintext-4097": lambda: booking.wrap(TENANT, b"p" * 4097, CONTEXT),
        "context-too-many-pairs": lambda: booking.wrap(
            TENANT, b"x", {f"k{i}": "v" for i in range(65)}
        ),
        "context-too-long": lambda: booking.wrap(TENANT, b"x", {"k": "v" * 4096}),
        "batch-too-large": lambda: booking.batch_wrap([(TENANT, b"x", CONTEXT)] * 1001),
    }
    refused(world, calls[case], C.RESOURCE_EXHAUSTED, match)
    # 4096 bytes is fine.
    booking.wrap(TENANT, b"p" * 4096, CONTEXT)


def test_resource_exhausted_rate_limit(world: World) -> None:
    clock = FakeClock(0)
    limiter = RateLimiter(5, clock=lambda: float(clock.now))
    with (
        key_plane(world.kp.d, world.kp.pki, rate_limit=limiter) as kp,
        kp.client() as c,
        kp.client(MESSAGING) as m,
    ):
        for _ in range(5):
            c.wrap(TENANT, b"x", CONTEXT)
        refused(world, lambda: c.wrap(TENANT, b"x", CONTEXT), C.RESOURCE_EXHAUSTED, "rate")
        # Per backend: messaging has its own bucket.
        m.wrap("messaging-only", b"x", CONTEXT)
        clock.advance(1)
        results = c.batch_wrap([(TENANT, b"x", CONTEXT)] * 5)
        assert all(not isinstance(r, KeyServiceError) for r in results)
        clock.advance(1)
        refused(
            world,
            lambda: c.batch_wrap([(TENANT, b"x", CONTEXT)] * 6),
            C.RESOURCE_EXHAUSTED,
            "exceed the per-backend burst of 5",
        )


def test_encryption_bound_refuses_and_says_rotate(world: World) -> None:
    """SP 800-38D 8.3 bound (lowered to 5 here), counted in the store across planes."""
    d, custodians = world.kp.d, world.custodians
    ready_tenant(d, custodians, "bounded")
    limits = Limits(encryption_limit=5, counter_block=2)
    with key_plane(d, world.kp.pki, limits=limits) as kp, kp.client() as c:
        c.wrap("bounded", b"x", CONTEXT)
        c.generate_data_key("bounded", CONTEXT)
        ct = c.wrap("bounded", MARKER, CONTEXT).ciphertext
    # A second plane (a restart) continues the count: blocks of the first are not reused.
    with key_plane(d, world.kp.pki, limits=limits) as kp, kp.client() as c:
        c.wrap("bounded", b"x", CONTEXT)
        error = refused(
            world, lambda: c.wrap("bounded", b"x", CONTEXT), C.RESOURCE_EXHAUSTED, "rotate"
        )
        assert "SP 800-38D" in error.details
        refused(world, lambda: c.rewrap(ct, CONTEXT), C.RESOURCE_EXHAUSTED, "rotate-tenant")
        # Unwrapping still works; a new version has a count of its own.
        with c.unwrap(ct, CONTEXT) as plain:
            assert plain.reveal() == MARKER
        run(d, custodians, "rotate-tenant", tenant="bounded")
        assert c.rewrap(ct, CONTEXT).key_version == 2


# -- ciphertext tampering ---------------------------------------------------------------------


def _expected_code(tampered: bytes) -> grpc.StatusCode:
    """What an altered ciphertext must give: malformed or unauthentic is INVALID_ARGUMENT,
    unless the alteration names a (valid) tenant the backend is not granted."""
    try:
        parsed = dataplane.parse(tampered)
    except Exception:
        return C.INVALID_ARGUMENT
    if parsed.tenant != TENANT and TENANT_RE.fullmatch(parsed.tenant):
        return C.PERMISSION_DENIED
    return C.INVALID_ARGUMENT


def test_every_byte_and_bit_of_a_ciphertext_is_checked(world: World, booking: KeyClient) -> None:
    ct = booking.wrap(TENANT, MARKER, CONTEXT).ciphertext
    tampered: list[bytes] = []
    for i in range(len(ct)):
        for bit in (0x01, 0x80):
            flipped = bytearray(ct)
            flipped[i] ^= bit
            tampered.append(bytes(flipped))
    tampered += [ct[:n] for n in range(len(ct))]  # every truncation
    tampered += [ct + b"\x00", b"\x02" + ct[1:]]  # an extra byte, a future format
    items = [(t, CONTEXT) for t in tampered]
    results = booking.batch_unwrap(items)
    assert len(results) == len(tampered)
    for t, r in zip(tampered, results, strict=True):
        assert isinstance(r, KeyServiceError), f"altered ciphertext opened: {t.hex()}"
        assert r.code == _expected_code(t), (t.hex(), str(r))
        world.errors.append(str(r))
    # The same through single calls, for a sample: same codes as in the batch.
    for t in tampered[:: len(tampered) // 12]:
        assert code_of(lambda t=t: booking.unwrap(t, CONTEXT)).code == _expected_code(t)
    # Moved to another tenant the backend may use: the header is authenticated.
    ready = bytearray(booking.wrap(TENANT, MARKER, CONTEXT).ciphertext)
    other = dataplane.header("rotating", 2) + bytes(ready[2 + len(TENANT) + 4 :])
    refused(world, lambda: booking.unwrap(other, CONTEXT), C.INVALID_ARGUMENT, "authenticate")


# -- batches ---------------------------------------------------------------------------------


def test_batch_wrap_mixes_good_and_bad_items(world: World, booking: KeyClient) -> None:
    results = booking.batch_wrap(
        [
            (TENANT, b"one", CONTEXT),
            (TENANT, b"p" * 5000, CONTEXT),
            ("messaging-only", b"x", CONTEXT),
            ("dormant", b"x", CONTEXT),
            (TENANT, b"", CONTEXT),
            (TENANT, b"two", {"other": "context"}),
        ]
    )
    codes = [r.code if isinstance(r, KeyServiceError) else "ok" for r in results]
    assert codes == [
        "ok",
        C.RESOURCE_EXHAUSTED,
        C.PERMISSION_DENIED,
        C.FAILED_PRECONDITION,
        C.INVALID_ARGUMENT,
        "ok",
    ]
    world.errors += [str(r) for r in results if isinstance(r, KeyServiceError)]
    first, last = results[0], results[5]
    assert not isinstance(first, KeyServiceError)
    assert not isinstance(last, KeyServiceError)
    unwrapped = booking.batch_unwrap(
        [
            (first.ciphertext, CONTEXT),
            (last.ciphertext, CONTEXT),  # wrong context for this one
            (last.ciphertext, {"other": "context"}),
            (b"\x01\x00", CONTEXT),
        ]
    )
    outcomes = [u.code if isinstance(u, KeyServiceError) else u.reveal() for u in unwrapped]
    assert outcomes == [b"one", C.INVALID_ARGUMENT, b"two", C.INVALID_ARGUMENT]


def test_batch_generate_and_rewrap(world: World, booking: KeyClient) -> None:
    keys = booking.batch_generate_data_key([(TENANT, CONTEXT), ("dormant", CONTEXT)] * 3)
    assert [isinstance(k, KeyServiceError) for k in keys] == [False, True] * 3
    good = [k for k in keys if not isinstance(k, KeyServiceError)]
    assert len({k.plaintext.reveal() for k in good}) == 3
    rewrapped = booking.batch_rewrap(
        [(k.ciphertext, CONTEXT) for k in good] + [(good[0].ciphertext, {})]
    )
    assert [isinstance(r, KeyServiceError) for r in rewrapped] == [False, False, False, True]
    for k, r in zip(good, rewrapped, strict=False):
        assert not isinstance(r, KeyServiceError)
        with booking.unwrap(r.ciphertext, CONTEXT) as plain:
            assert plain.equals(k.plaintext)


def test_batch_contexts_encoded_once_still_bind_each_item(booking: KeyClient) -> None:
    """A batch encodes each distinct context once; every item stays bound to its own."""
    a, b, a_reordered = {"p": "1", "q": "2"}, {"p": "1", "q": "3"}, {"q": "2", "p": "1"}
    contexts = [a, b, a_reordered, a, b]
    results = booking.batch_wrap([(TENANT, bytes([i]) * 8, c) for i, c in enumerate(contexts)])
    for i, (result, own) in enumerate(zip(results, contexts, strict=True)):
        assert not isinstance(result, KeyServiceError)
        other = b if own is not b else a
        opened = booking.batch_unwrap([(result.ciphertext, own), (result.ciphertext, other)])
        assert not isinstance(opened[0], KeyServiceError)
        assert opened[0].reveal() == bytes([i]) * 8
        assert isinstance(opened[1], KeyServiceError)
        assert opened[1].code == C.INVALID_ARGUMENT
    assert len({r.ciphertext[-28:-16] for r in results if not isinstance(r, KeyServiceError)}) == 5


def test_batch_call_level_refusals(world: World, booking: KeyClient) -> None:
    refused(world, lambda: booking.batch_wrap([]), C.INVALID_ARGUMENT, "at least one item")
    refused(world, lambda: booking.batch_unwrap([]), C.INVALID_ARGUMENT, "at least one item")


# -- usage records ---------------------------------------------------------------------------


def test_metrics_count_per_backend_tenant_operation_outcome(world: World) -> None:
    metrics = world.metrics
    server = metrics.serve("127.0.0.1", 0)
    try:
        with world.kp.client() as c:
            before = _sample(server.port, "booking", TENANT, "wrap", "OK")
            for _ in range(3):
                c.wrap(TENANT, b"x", CONTEXT)
            code_of(lambda: c.wrap("dormant", b"x", CONTEXT))
            code_of(lambda: c.wrap("never-granted", b"x", CONTEXT))
        assert _sample(server.port, "booking", TENANT, "wrap", "OK") == before + 3
        assert _sample(server.port, "booking", "dormant", "wrap", "FAILED_PRECONDITION") >= 1
        # A tenant the backend is not granted is never a label.
        text = _scrape(server.port)
        assert "never-granted" not in text
        assert _sample(server.port, "booking", "-", "wrap", "PERMISSION_DENIED") >= 1
        assert "keyquorum_sealed 0.0" in text
    finally:
        server.close()


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return str(r.read().decode())


def _sample(port: int, backend: str, tenant: str, operation: str, outcome: str) -> float:
    labels = f'backend="{backend}",operation="{operation}",outcome="{outcome}",tenant="{tenant}"'
    for line in _scrape(port).splitlines():
        if line.startswith(f"keyquorum_keyservice_requests_total{{{labels}}}"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_access_log_lines_carry_a_keyed_hash_not_the_context(world: World) -> None:
    with world.kp.client() as c:
        c.wrap(TENANT, MARKER, CONTEXT)
        code_of(lambda: c.unwrap(b"\x01", CONTEXT))
    lines = world.access_path.read_text().splitlines()
    records = [canonical_json(line) for line in lines]
    assert set(records[-1]) == {"time", "backend", "tenant", "operation", "outcome", "context_hmac"}
    wrap = records[-2]
    assert (wrap["backend"], wrap["tenant"], wrap["operation"], wrap["outcome"]) == (
        "booking",
        TENANT,
        "wrap",
        "OK",
    )
    assert wrap["context_hmac"] == world.access.context_hmac(canonical.encode(CONTEXT))
    assert records[-1]["outcome"] == "INVALID_ARGUMENT"
    assert records[-1]["tenant"] == "-"


def canonical_json(line: str) -> dict[str, object]:
    import json

    value = json.loads(line)
    assert isinstance(value, dict)
    return value


def test_zz_no_secret_in_messages_logs_or_metrics(world: World) -> None:
    """Runs last in the module: every message seen, the access log, the metrics."""
    d = world.kp.d
    secrets = {
        "plaintext marker": MARKER,
        "tenant key": tenant_key_bytes(d, TENANT),
        "rotating v2": tenant_key_bytes(d, "rotating", 2),
    }
    with world.kp.client() as c, c.generate_data_key(TENANT, CONTEXT) as dk:
        secrets["data key"] = dk.plaintext.reveal()
        for fn in (
            lambda: c.unwrap(dk.ciphertext, {}),
            lambda: c.wrap(TENANT, MARKER * 200, CONTEXT),
        ):
            world.errors.append(str(code_of(fn)))
    assert len(world.errors) > 60
    haystack = "\n".join(world.errors).encode()
    assert find_secrets(haystack, secrets) == []
    log_bytes = world.access_path.read_bytes()
    metrics_text = _metrics_text(world.metrics).encode()
    for blob in (haystack, log_bytes, metrics_text):
        assert find_secrets(blob, secrets) == []
        for value in CONTEXT.values():
            assert value.encode() not in blob


def _metrics_text(metrics: Metrics) -> str:
    from prometheus_client import generate_latest

    return generate_latest(metrics.registry).decode()


def test_health_serving_while_unsealed(world: World) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with world.kp.client() as c:
        stub = health_pb2_grpc.HealthStub(c.channel)
        r = stub.Check(health_pb2.HealthCheckRequest(service=key_service.SERVICE_NAME))
    assert r.status == health_pb2.HealthCheckResponse.SERVING


def test_without_the_c_extension_every_call_takes_the_python_path(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where `_wire` is not built, Wrap, Unwrap and BatchWrap parse with protobuf."""
    monkeypatch.setattr(dataplane_plane, "WIRE_CODEC_BUILT", False)
    monkeypatch.setenv("KEYQUORUM_WITHOUT_NATIVE", "1")
    monkeypatch.setattr(dataplane_plane, "_wire", None, raising=False)  # any use would fail
    with world.kp.client() as c:
        wrapped = c.wrap(TENANT, MARKER, CONTEXT)
        assert c.unwrap(wrapped.ciphertext, CONTEXT).reveal() == MARKER
        results = c.batch_wrap([(TENANT, b"one", CONTEXT), (TENANT, b"", CONTEXT)])
        first, second = results
        assert not isinstance(first, KeyServiceError)
        assert c.unwrap(first.ciphertext, CONTEXT).reveal() == b"one"
        assert isinstance(second, KeyServiceError)
        assert second.code == C.INVALID_ARGUMENT
        call = c.channel.unary_unary("/keyquorum.v1.KeyService/Wrap")
        with pytest.raises(grpc.RpcError) as info:
            call(b"\xff\xff", timeout=10)
        assert info.value.code() == C.INVALID_ARGUMENT


class _Records:
    """A usage sink that keeps every record."""

    def __init__(self) -> None:
        self.records: list[tuple[str, str, str, str, bytes | None]] = []

    def record(
        self,
        backend: str,
        tenant: str,
        operation: str,
        error: KeyquorumError | None,
        context: bytes | None,
    ) -> None:
        outcome = "OK" if error is None else f"{type(error).__name__}: {error}"
        self.records.append((backend, tenant, operation, outcome, context))


def test_batch_unwrap_short_way_is_the_reference(world: World, booking: KeyClient) -> None:
    """`batch_unwrap_requests` gives `batch_unwrap`'s results, errors and records, item by item.

    Ordinary items (the short way, with its header cache cold and then warm)
    beside every kind of item it hands to the reference: another context,
    an altered tag, a short ciphertext, an unknown format, a tenant not
    granted, a version the tenant never had, a recipient key.
    """
    good = [
        (booking.wrap(TENANT, f"secret {i}".encode(), CONTEXT | {"n": str(i)}).ciphertext, i)
        for i in range(3)
    ]
    with world.kp.client(MESSAGING) as messaging:
        foreign = messaging.wrap("messaging-only", b"x", CONTEXT).ciphertext
    ct0 = good[0][0]
    head = 2 + ct0[1] + 4
    altered = ct0[:-1] + bytes([ct0[-1] ^ 1])
    forged_version = ct0[: head - 4] + (9).to_bytes(4, "big") + ct0[head:]
    recipient = SealingPrivateKey.generate()
    items = [
        *[kpb.UnwrapRequest(ciphertext=ct, context=CONTEXT | {"n": str(i)}) for ct, i in good],
        kpb.UnwrapRequest(ciphertext=ct0, context={"n": "other"}),
        kpb.UnwrapRequest(ciphertext=altered, context=CONTEXT | {"n": "0"}),
        kpb.UnwrapRequest(ciphertext=ct0[: head + 10], context=CONTEXT),
        kpb.UnwrapRequest(ciphertext=b"\x07" + ct0[1:], context=CONTEXT),
        kpb.UnwrapRequest(ciphertext=b"", context=CONTEXT),
        kpb.UnwrapRequest(ciphertext=foreign, context=CONTEXT),
        kpb.UnwrapRequest(ciphertext=forged_version, context=CONTEXT | {"n": "0"}),
        kpb.UnwrapRequest(
            ciphertext=good[1][0],
            context=CONTEXT | {"n": "1"},
            recipient_public_key=recipient.public_key().to_bytes(),
        ),
        *[kpb.UnwrapRequest(ciphertext=ct, context=CONTEXT | {"n": str(i)}) for ct, i in good],
    ]

    def outcomes(
        results: list[Revealed | KeyquorumError],
    ) -> list[tuple[str, object, object, object]]:
        out: list[tuple[str, object, object, object]] = []
        for r in results:
            if isinstance(r, KeyquorumError):
                out.append((type(r).__name__, str(r), None, None))
            else:
                plain = None if r.plaintext is None else r.plaintext.reveal()
                out.append(("ok", r.tenant, r.version, plain if r.sealed is None else "sealed"))
                r.wipe()
        return out

    who = "keyquorum://backend/booking"
    reference_sink, short_sink = _Records(), _Records()
    reference = DataPlane(world.kp.d.daemon, world.kp.d.store, usage=(reference_sink,))
    short = DataPlane(world.kp.d.daemon, world.kp.d.store, usage=(short_sink,))
    expected = outcomes(reference.batch_unwrap(who, [key_service._unwrap_item(i) for i in items]))
    for _ in range(2):  # the header cache cold, then warm
        short_sink.records.clear()
        assert outcomes(short.batch_unwrap_requests(who, items)) == expected
        assert short_sink.records == reference_sink.records
    assert [e[0] for e in expected[:3]] == ["ok"] * 3
    assert {e[0] for e in expected[3:-3]} > {"ok"}


def test_serving_without_the_c_extension_is_a_choice(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A missing wire codec refuses to start a data plane, unless KEYQUORUM_WITHOUT_NATIVE=1."""
    monkeypatch.setattr(dataplane_plane, "WIRE_CODEC_BUILT", False)
    monkeypatch.delenv("KEYQUORUM_WITHOUT_NATIVE", raising=False)
    with pytest.raises(StateError, match="KEYQUORUM_WITHOUT_NATIVE=1"):
        DataPlane(world.kp.d.daemon, world.kp.d.store)
    monkeypatch.setenv("KEYQUORUM_WITHOUT_NATIVE", "1")
    DataPlane(world.kp.d.daemon, world.kp.d.store)
