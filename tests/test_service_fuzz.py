"""Malformed and hostile requests to every RPC: a status each, and no request bytes in any log.

The servicers map every `KeyquorumError` to a status code; any other
exception in a handler becomes UNKNOWN and gRPC logs its traceback, and a
request gRPC cannot parse is logged by gRPC too. This checks that nothing a
client sends reaches those logs: a real daemon process (`keyquorum server
run`, its stdout and stderr captured by tests/harness.py), unsealed, with a
tenant created, granted to a backend and active, an access log and a
metrics port, gets

- raw bytes sent to every method of CustodianService, KeyService and
  AuditService through a byte-level channel (`request_serializer` the
  identity), so protobuf's own parser sees them: random bytes, length-
  delimited fields of marker bytes under any field number, bad UTF-8;
- valid but hostile messages of every request type, built by hypothesis
  from the protobuf descriptors, with the marker in every string and bytes
  field (raw, upper-case hex, base64, amid control characters, too long,
  inside JSON credentials and inside ciphertexts with a well-formed header
  naming the real tenant), at times the real tenant, edge integers.

Every call must end with a gRPC status before its deadline (never a hang;
the deadline only turns a hang into a failure). Afterwards the daemon's
output, its access log and its metrics must hold the marker in none of its
forms (`harness.encodings`: raw, hex, base64 in every alignment). The
store is not searched: free text a custodian may send (a proposal's
`proposer`) is logged there by design. Only the public gRPC API is used, so
this holds whatever a handler does inside (BatchWrap's C path included).
"""

from __future__ import annotations

import base64
import json
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keyquorum.cli import custodian_actions as actions
from keyquorum.client import tls as client_tls
from keyquorum.hsm.pki import DevPki, make_dev_pki
from keyquorum.quorum.credentials import CustodianCredential
from keyquorum.v1 import audit_pb2, key_pb2
from keyquorum.v1 import custodian_pb2 as pb
from keyquorum.v1 import custodian_pb2_grpc as pb_grpc
from tests.harness import (
    Custodian,
    DaemonProcess,
    ceremony_request,
    encodings,
    make_custodians,
    signed_proposal,
    start_daemon_process,
)

MARKER = b"KQ-MARKER-7f3a"
#: The forms sent: raw, upper-case hex and both base64 alphabets. (Upper case, so no
#: form is a valid tenant, backend or custodian name the daemon might log by design.)
MARKER_FORMS = (
    MARKER,
    MARKER.hex().upper().encode(),
    base64.b64encode(MARKER),
    base64.urlsafe_b64encode(MARKER),
)
MARKER_TEXTS = tuple(form.decode() for form in MARKER_FORMS)
TENANT = "acme-health"
BACKEND, AUDITOR = "backend/booking", "auditor/alice"
THRESHOLD = 2
#: Only a hang reaches this: every call here ends at once.
CALL_DEADLINE_S = 15.0
SERVICES = (
    pb.DESCRIPTOR.services_by_name["CustodianService"],
    key_pb2.DESCRIPTOR.services_by_name["KeyService"],
    audit_pb2.DESCRIPTOR.services_by_name["AuditService"],
)
METHODS: tuple[MethodDescriptor, ...] = tuple(m for s in SERVICES for m in s.methods)


def _identity(data: bytes) -> bytes:
    return data


@dataclass
class Target:
    """The daemon process and a byte-level channel to each of its services."""

    proc: DaemonProcess
    channels: dict[str, grpc.Channel]
    access_log: Path
    metrics_port: int
    proposer: CustodianCredential
    codes: Counter[tuple[str, str]] = field(default_factory=Counter)
    _callables: dict[str, Any] = field(default_factory=dict)

    def call(self, method: MethodDescriptor, request: bytes) -> grpc.StatusCode:
        """Send `request` as the raw message of `method`; the status it ended with."""
        return self.exchange(method, request)[0]

    def exchange(
        self, method: MethodDescriptor, request: bytes
    ) -> tuple[grpc.StatusCode, list[bytes]]:
        """Send `request` as the raw message of `method`; its status and response messages."""
        path = f"/{method.containing_service.full_name}/{method.name}"
        fn = self._callables.get(path)
        if fn is None:
            channel = self.channels[method.containing_service.full_name]
            make = channel.unary_stream if method.server_streaming else channel.unary_unary
            fn = self._callables[path] = make(
                path, request_serializer=_identity, response_deserializer=_identity
            )
        responses: list[bytes] = []
        try:
            if method.server_streaming:
                responses.extend(fn(request, timeout=CALL_DEADLINE_S))
            else:
                responses.append(fn(request, timeout=CALL_DEADLINE_S))
            code = grpc.StatusCode.OK
        except grpc.RpcError as e:
            code = e.code()
        assert code is not grpc.StatusCode.DEADLINE_EXCEEDED, f"{path} did not answer"
        self.codes[(path, code.name)] += 1
        return code, responses

    def logs(self) -> dict[str, bytes]:
        """Everything the daemon wrote for people and tools to read."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=CALL_DEADLINE_S) as response:
            metrics: bytes = response.read()
        return {
            "daemon stdout/stderr": self.proc.log_path.read_bytes(),
            "access log": self.access_log.read_bytes() if self.access_log.exists() else b"",
            "metrics": metrics,
        }


def leaks(target: Target) -> list[str]:
    return [
        f"{where}: {how}"
        for where, data in target.logs().items()
        for how, needle in encodings(MARKER).items()
        if needle in data
    ]


def _quorum(
    stub: pb_grpc.CustodianServiceStub, custodians: list[Custodian], op: str, **params: str
) -> None:
    proposal = stub.Propose(signed_proposal(stub, custodians[0].credential, op, dict(params)))
    for c in custodians[:THRESHOLD]:
        response = actions.verdict(
            stub, proposal.id, c.fingerprint, lambda _t, c=c: c.credential, verdict="approve"
        )
    assert response.executed


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    base = tmp_path_factory.mktemp("fuzz")
    dev_pki: DevPki = make_dev_pki(base / "pki", clients=[BACKEND, AUDITOR])
    custodians = make_custodians(base / "custodians", names=("alice", "bob", "carol"))
    data = base / "data"
    access_log = base / "access.jsonl"
    proc = start_daemon_process(
        data, dev_pki,
        "--listen-mtls", "127.0.0.1:0", "--client-ca", str(dev_pki.ca_cert),
        "--access-log", str(access_log), "--metrics-listen", "127.0.0.1:0",
    )  # fmt: skip
    try:
        ready = json.loads((data.parent / f"{data.name}.ready").read_text())
        custodian_channel = proc.channel()
        stub = pb_grpc.CustodianServiceStub(custodian_channel)
        stub.InitCeremony(ceremony_request("fuzz", THRESHOLD, custodians, proc.ceremony_code()))
        for c in custodians[:THRESHOLD]:
            actions.submit_share(stub, c.credential)
        _quorum(stub, custodians, "create-tenant", tenant=TENANT)
        _quorum(stub, custodians, "grant", tenant=TENANT, backend="booking")
        _quorum(stub, custodians, "activate-tenant", tenant=TENANT, duration_seconds="3600")

        def mtls(who: str) -> grpc.Channel:
            files = dev_pki.client(who)
            creds = client_tls.channel_credentials(
                dev_pki.ca_cert, client_cert=files.cert, client_key=files.key
            )
            return grpc.secure_channel(f"127.0.0.1:{ready['mtls_port']}", creds)

        channels = {
            "keyquorum.v1.CustodianService": custodian_channel,
            "keyquorum.v1.KeyService": mtls(BACKEND),
            "keyquorum.v1.AuditService": mtls(AUDITOR),
        }
        target = Target(
            proc, channels, access_log, int(ready["metrics_port"]), custodians[0].credential
        )
        # The setup itself is clean, so any marker found later came from the fuzzing.
        assert leaks(target) == []
        yield target
        for channel in channels.values():
            channel.close()
    finally:
        stopped = proc.stop()
    # After the module's tests (whichever of them ran): what the daemon wrote up
    # to its exit holds no marker either, and no handler let an exception other
    # than a KeyquorumError escape (UNKNOWN, whose traceback gRPC logs).
    assert stopped == 0
    final = {"daemon stdout/stderr": proc.log_path.read_bytes(), "access log": b""}
    if access_log.exists():
        final["access log"] = access_log.read_bytes()
    found = [
        f"{where}: {how}"
        for where, data in final.items()
        for how, needle in encodings(MARKER).items()
        if needle in data
    ]
    assert found == []
    assert [key for key in target.codes if key[1] == "UNKNOWN"] == []


# -- strategies -------------------------------------------------------------------------

_marker_bytes = st.sampled_from(MARKER_FORMS)
_marker_text = st.sampled_from(MARKER_TEXTS)


def _around(core: st.SearchStrategy[Any], pad: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.tuples(pad, core, pad).map(lambda t: t[0] + t[1] + t[2])


def _ciphertext(body: bytes, tenant: bytes, version: int) -> bytes:
    """The data plane's format 0x01 header (docs/dataplane.md) in front of `body`."""
    return b"\x01" + bytes([len(tenant) % 256]) + tenant + version.to_bytes(4, "big") + body


_hostile_text: st.SearchStrategy[str] = st.one_of(
    st.just(TENANT),
    _marker_text,
    _around(_marker_text, st.text(max_size=6)),
    _around(_marker_text, st.sampled_from(["\n", "\r\n", "\x00", "\x1b[31m", "%s%n", "{}", "'\""])),
    _marker_text.map(lambda m: m * 40),  # past every free-text limit
    st.sampled_from([TENANT, "booking", "", "create-tenant", "grant", "tenant"]),
    _around(_marker_text, st.just(TENANT + "-")),
)

_hostile_bytes: st.SearchStrategy[bytes] = st.one_of(
    _marker_bytes,
    _around(_marker_bytes, st.binary(max_size=12)),
    _marker_bytes.map(lambda m: m * 200),
    # A well-formed ciphertext header naming the real tenant (or the marker), then marker bytes.
    st.builds(
        _ciphertext,
        _around(_marker_bytes, st.binary(max_size=28)),
        st.sampled_from([TENANT.encode(), MARKER, MARKER.hex().upper().encode()]),
        st.sampled_from([0, 1, 2, 2**32 - 1]),
    ),
    # A public credential file's shape with the marker as its content.
    _marker_text.map(lambda m: json.dumps({"name": m, "verify_key": m, "sealing_key": m}).encode()),
    # A hybrid signature's rough size, full of marker bytes.
    _marker_bytes.map(lambda m: (m * 300)[:3373]),
)

_EDGE_INTS = (0, 1, 2, 255, 256, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**64 - 1)
_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}


def _integers(kind: int) -> st.SearchStrategy[int]:
    lo, hi = _RANGES[kind]
    edges = [v for n in _EDGE_INTS for v in (n, -n) if lo <= v <= hi]
    return st.one_of(st.sampled_from(edges), st.integers(lo, hi))


def _scalar(f: FieldDescriptor) -> st.SearchStrategy[Any]:
    if f.type == FieldDescriptor.TYPE_STRING:
        return _hostile_text
    if f.type == FieldDescriptor.TYPE_BYTES:
        return _hostile_bytes
    if f.type == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if f.type == FieldDescriptor.TYPE_ENUM:
        return st.sampled_from([v.number for v in f.enum_type.values])
    return _integers(f.type)


def messages(descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy[Any]:
    """Messages of `descriptor` with hostile values in any subset of their fields."""
    cls = message_factory.GetMessageClass(descriptor)
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for f in descriptor.fields:
        entry = f.message_type
        if entry is not None and entry.GetOptions().map_entry:
            key, value = entry.fields_by_name["key"], entry.fields_by_name["value"]
            fields[f.name] = st.dictionaries(_scalar(key), _scalar(value), max_size=3)
        elif entry is not None:
            if depth >= 2:
                continue
            one = messages(entry, depth + 1)
            fields[f.name] = st.lists(one, max_size=3) if f.is_repeated else one
        else:
            fields[f.name] = st.lists(_scalar(f), max_size=3) if f.is_repeated else _scalar(f)

    def build(values: dict[str, Any]) -> Any:
        message = cls()
        for name, value in values.items():
            target = getattr(message, name)
            if isinstance(value, dict):
                target.update(value)
            elif isinstance(value, list):
                target.extend(value)
            elif hasattr(value, "SerializeToString"):
                target.CopyFrom(value)
            else:
                setattr(message, name, value)
        return message

    return st.fixed_dictionaries({}, optional=fields).map(build)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


_raw_requests: st.SearchStrategy[bytes] = st.one_of(
    _around(_marker_bytes, st.binary(max_size=24)),
    st.lists(
        st.tuples(st.integers(1, 8), _around(_marker_bytes, st.binary(max_size=6))),
        min_size=1,
        max_size=4,
    ).map(lambda fs: b"".join(_field(n, p) for n, p in fs)),
    # Bad UTF-8 in what most messages parse as a string field.
    _marker_bytes.map(lambda m: _field(1, b"\xff\xfe" + m)),
    # A field's length running past the end of the message.
    _marker_bytes.map(lambda m: _varint(1 << 3 | 2) + _varint(10_000) + m),
)

FUZZ = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# -- the tests ---------------------------------------------------------------------------


def _run(target: Target, test: Callable[[], None]) -> None:
    test()
    assert leaks(target) == [], target.codes


def test_the_search_sees_what_the_daemon_logs(target: Target) -> None:
    """A positive control with another marker: the daemon logs a proposal's parameters
    (checked names, by design), so a tenant name spelled as that marker's hex must be
    found in the captured output, or the searches here would pass for nothing."""
    control = b"KQ-CONTROL-51c9"
    stub = pb_grpc.CustodianServiceStub(target.channels["keyquorum.v1.CustodianService"])
    proposal = signed_proposal(stub, target.proposer, "create-tenant", {"tenant": control.hex()})
    method = pb.DESCRIPTOR.services_by_name["CustodianService"].methods_by_name["Propose"]
    assert target.call(method, proposal.SerializeToString()) is grpc.StatusCode.OK
    output = target.logs()["daemon stdout/stderr"]
    assert encodings(control)["hex"] in output


def test_raw_request_bytes_get_a_status_and_leave_no_trace(target: Target) -> None:
    @FUZZ
    @given(method=st.sampled_from(METHODS), request=_raw_requests)
    def one(method: MethodDescriptor, request: bytes) -> None:
        target.call(method, request)

    _run(target, one)


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.name)
def test_each_method_answers_garbage_with_a_status(
    target: Target, method: MethodDescriptor
) -> None:
    for request in (b"", MARKER, _field(1, b"\xff" + MARKER), b"\xff" * 8 + MARKER):
        target.call(method, request)
    assert leaks(target) == []


def test_hostile_messages_get_a_status_and_leave_no_trace(target: Target) -> None:
    @FUZZ
    @given(data=st.data())
    def one(data: st.DataObject) -> None:
        method = data.draw(st.sampled_from(METHODS), label="method")
        message = data.draw(messages(method.input_type), label="request")
        target.call(method, message.SerializeToString())

    _run(target, one)


KEY_METHODS = {m.name: m for m in SERVICES[1].methods}
_contexts = st.dictionaries(
    st.one_of(_marker_text, _around(_marker_text, st.text(min_size=1, max_size=4))),
    st.one_of(_hostile_text, _marker_text.map(lambda m: m * 40)),
    min_size=1,
    max_size=4,
)


def test_keyservice_round_trips_with_marker_plaintexts_and_contexts(target: Target) -> None:
    """The paths that succeed: the access log records each item, never its context."""

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        plaintext=_around(_marker_bytes, st.binary(max_size=16)),
        context=_contexts,
        other=_contexts,
    )
    def one(plaintext: bytes, context: dict[str, str], other: dict[str, str]) -> None:
        wrap = key_pb2.WrapRequest(tenant=TENANT, plaintext=plaintext, context=context)
        code, (raw,) = target.exchange(KEY_METHODS["Wrap"], wrap.SerializeToString())
        assert code is grpc.StatusCode.OK
        ciphertext = key_pb2.WrapResponse.FromString(raw).ciphertext
        for ctx in (context, other):
            # Another context does not authenticate (INVALID_ARGUMENT).
            ok = ctx == context
            unwrap = key_pb2.UnwrapRequest(ciphertext=ciphertext, context=ctx)
            code = target.call(KEY_METHODS["Unwrap"], unwrap.SerializeToString())
            assert (code is grpc.StatusCode.OK) is ok
            rewrap = key_pb2.RewrapRequest(ciphertext=ciphertext, context=ctx)
            code = target.call(KEY_METHODS["Rewrap"], rewrap.SerializeToString())
            assert (code is grpc.StatusCode.OK) is ok
        batch = key_pb2.BatchUnwrapRequest(
            items=[
                key_pb2.UnwrapRequest(ciphertext=ciphertext, context=c) for c in (context, other)
            ]
        )
        assert target.call(KEY_METHODS["BatchUnwrap"], batch.SerializeToString()).name == "OK"
        generate = key_pb2.GenerateDataKeyRequest(
            tenant=TENANT, context=context, recipient_public_key=plaintext
        )
        target.call(KEY_METHODS["GenerateDataKey"], generate.SerializeToString())

    _run(target, one)
    assert target.access_log.read_bytes().count(b'"outcome":"OK"') >= 40
