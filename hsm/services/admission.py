"""Admission to a gRPC listener: who the peer is, how much it may hold, for how long.

Every method of every service on a listener goes through `Admission`
(docs/adr/0009):

1. at a call's start, its peer is established (`PeerSource`): on the mTLS
   port the client certificate gRPC verified against the client CA, known
   by the SHA-256 of its DER (`CertificatePeers`; its keyquorum identity
   comes only from a URI SAN of that certificate and is cached under that
   hash, never under a name); on the custodian port the client's address
   (`AddressPeers`);
2. the request message must arrive within `request_timeout_seconds` of the
   call's headers, or the call ends with DEADLINE_EXCEEDED. Waiting for it
   holds no thread and no count: a coroutine on the serving loop
   (hsm/services/serving_loop.py), one stream of one connection, bounded
   by the listener's connection and stream caps and by this deadline;
3. once its request is in, the call counts against its peer's cap
   (`max_calls_per_peer`) and the listener's (`max_calls`) until it ends;
   over either it ends at once with RESOURCE_EXHAUSTED, saying which cap.
   Where several processes serve the port (`--workers N`), both caps count
   over all of them (hsm/services/shared_counts.py).

So header-only calls cannot take a place from anyone, even from a client
behind the same address; a flood of complete requests is capped per peer.
Reserved methods (the custodian plane's Seal and GetStatus) skip step 3
and run on lanes of their own (hsm/services/lanes.py), so no flood of
other calls can take their place.

Unary methods are registered as stream-request handlers so that step 2 is
our code (gRPC reads a unary request before any handler runs, with no time
limit). Servicers of our own (`unary`, `server_stream`) receive the parsed
request and a `Call` carrying the peer; third-party services (health,
reflection) are wrapped as they are (`GuardedRegistry`); a call that
streams its requests (reflection) counts from its start.

All of this runs on the serving loop only, so the counts need no lock.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Generic, Protocol, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message
from grpc import aio

from keyquorum.hsm import tls
from keyquorum.hsm.pki import ClientIdentity
from keyquorum.hsm.services.shared_counts import SharedCounts
from keyquorum.hsm.services.status import ERROR_METADATA, code_for, message_for
from keyquorum.quorum.errors import (
    AccessDeniedError,
    DeserializationError,
    HandingOverError,
    InvalidInputError,
    KeyquorumError,
    LimitExceededError,
    TimeLimitError,
    UnauthenticatedError,
)
from keyquorum.quorum.limits import Limits

log = logging.getLogger(__name__)

Req = TypeVar("Req")
Resp = TypeVar("Resp")

#: Told each call's method (`/package.Service/Method`), status code name and seconds.
Observer = Callable[[str, str, float], None]

#: What `context.read()` returns when the client closed without a message.
_EOF: Final[object] = aio.EOF  # type: ignore[attr-defined]

#: Distinct client certificates remembered; the cache starts over past this.
CERTIFICATE_CACHE: Final = 4096


@dataclass(frozen=True, slots=True)
class Peer:
    """Who a call comes from, as far as the transport proved it.

    `key` is what per-peer caps count by: `sha256:<hex>` of a verified
    client certificate's DER, or the client's address. `identity` is the
    keyquorum identity of that certificate (from a URI SAN only), None
    without one; `refusal` is set instead for a certificate that names two
    identities or a malformed one.
    """

    key: str
    identity: ClientIdentity | None = None
    refusal: KeyquorumError | None = None

    @property
    def uri(self) -> str | None:
        return None if self.identity is None else self.identity.uri

    def require(self, role: str) -> str:
        """The identity URI if it has `role`; else the refusal a servicer answers."""
        if self.refusal is not None:
            raise self.refusal
        if self.identity is None:
            article = "an" if role[:1] in "aeiou" else "a"
            raise UnauthenticatedError(
                f"{article} {role} client certificate (keyquorum://{role}/<name>) is required"
            )
        if self.identity.role != role:
            article = "an" if role[:1] in "aeiou" else "a"
            raise AccessDeniedError(f"{self.identity.uri} is not {article} {role} identity")
        return self.identity.uri


class PeerSource(Protocol):
    """How a listener learns who a call comes from."""

    def peer(self, context: aio.ServicerContext[Any, Any]) -> Peer: ...


class CertificatePeers:
    """mTLS: the verified client certificate, cached by the SHA-256 of its DER.

    The cache holds what a certificate's bytes decide (its identity or its
    refusal) under the hash of those bytes: a different certificate, even
    one showing the same names, is a different key and is parsed afresh.
    """

    def __init__(self, capacity: int = CERTIFICATE_CACHE) -> None:
        self._capacity = capacity
        self._known: dict[bytes, Peer] = {}

    def peer(self, context: aio.ServicerContext[Any, Any]) -> Peer:
        auth = context.auth_context()
        try:
            der = tls.peer_certificate(auth)
        except KeyquorumError as e:
            return Peer("unreadable-certificate", refusal=e)
        if der is None:
            return Peer("no-certificate")
        return self.peer_of_certificate(der)

    def peer_of_certificate(self, der: bytes) -> Peer:
        """The peer a verified DER certificate makes (cached by its SHA-256)."""
        digest = hashlib.sha256(der).digest()
        known = self._known.get(digest)
        if known is None:
            known = _resolve(der, digest)
            if len(self._known) >= self._capacity:
                self._known.clear()
            self._known[digest] = known
        return known

    def __repr__(self) -> str:
        return f"<CertificatePeers: {len(self._known)} certificates>"


def _resolve(der: bytes, digest: bytes) -> Peer:
    key = "sha256:" + digest.hex()
    try:
        uri = tls.identity_from_certificate(der)
    except KeyquorumError as e:
        return Peer(key, refusal=e)
    if uri is None:
        return Peer(key)
    return Peer(key, identity=ClientIdentity.parse(uri))


class AddressPeers:
    """TLS without client certificates (the custodian port): the client's address.

    gRPC reports `ipv4:203.0.113.7:51234` or `ipv6:[2001:db8::1]:51234`; the
    port is dropped, so one host's connections share one cap.
    """

    def peer(self, context: aio.ServicerContext[Any, Any]) -> Peer:
        return Peer(address_of(context.peer()))


def address_of(peer: str) -> str:
    """`ipv4:1.2.3.4:5` -> `ipv4:1.2.3.4`; `ipv6:[::1]:5` -> `ipv6:[::1]`; others whole."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6") and ":" in rest:
        return f"{kind}:{rest.rpartition(':')[0]}"
    return peer


class ForwardedPeers:
    """The daemon's internal audit listener: calls a worker forwards (hsm/services/worker.py).

    The worker verified the client's certificate in its TLS handshake and
    sends its DER with a secret token it got from the daemon over its
    private channel; only the daemon's workers know the token. A call
    without the right token names no one and is refused by the servicer.
    """

    #: Metadata keys (binary headers) of a forwarded call.
    TOKEN = "keyquorum-worker-token-bin"  # noqa: S105 (a header's name, not a secret)
    CERTIFICATE = "keyquorum-peer-cert-bin"

    def __init__(self, token: bytes) -> None:
        if len(token) < 32:
            raise InvalidInputError("the worker token must be at least 32 bytes")
        self._token = token
        self._certificates = CertificatePeers()

    def peer(self, context: aio.ServicerContext[Any, Any]) -> Peer:
        sent = dict(context.invocation_metadata() or ())
        token = sent.get(self.TOKEN)
        if not isinstance(token, bytes) or not hmac.compare_digest(token, self._token):
            return Peer("forged", refusal=UnauthenticatedError("not a worker of this daemon"))
        der = sent.get(self.CERTIFICATE)
        if not isinstance(der, bytes):
            return Peer("no-certificate")
        return self._certificates.peer_of_certificate(der)


@dataclass(frozen=True, slots=True)
class Call:
    """What a servicer method gets beside its request: the peer and gRPC's context."""

    peer: Peer
    context: aio.ServicerContext[Any, Any]


class Admission:
    """One listener's caps: calls per peer and in all, and the request's arrival time."""

    def __init__(
        self,
        limits: Limits,
        peers: PeerSource,
        *,
        reserved: Iterable[str] = (),
        observe: Observer | None = None,
        shared: SharedCounts | None = None,
    ) -> None:
        #: Told every call's method, status code name and seconds (the RPC metrics).
        self.observe = observe
        #: The counts shared by every process serving this port (`--workers N`), so
        #: that the caps hold over all of them; None when this process serves it alone.
        self.shared = shared
        self._per_peer = limits.max_calls_per_peer
        self._total_cap = limits.max_calls
        self._timeout = limits.request_timeout_seconds
        self.peers = peers
        #: Full method names (`/package.Service/Method`) that skip the call caps.
        self.reserved = frozenset(reserved)
        self._open: dict[str, int] = {}
        self._total = 0
        self._draining = False

    @property
    def open_calls(self) -> int:
        """Calls this process counts now (all peers; reserved methods are not counted)."""
        return self._total

    def open_for(self, key: str) -> int:
        return self._open.get(key, 0)

    def drain(self) -> None:
        """Serve no new call (HandingOverError: UNAVAILABLE, which clients retry on a
        new connection); the calls open now finish (hsm/upgrade.py)."""
        self._draining = True

    def enter(self, peer: Peer) -> None:
        """Count one call of `peer`, or raise LimitExceededError naming the cap."""
        if self._draining:
            raise HandingOverError("this process is handing over to its successor; retry")
        held = self._open.get(peer.key, 0)
        if self.shared is not None:
            self.shared.enter(peer.key, self._per_peer, self._total_cap)
        elif held >= self._per_peer:
            raise LimitExceededError(
                f"this client already has {held} calls open on this listener, the most one "
                f"client may (max_calls_per_peer); retry when some have finished"
            )
        elif self._total >= self._total_cap:
            raise LimitExceededError(
                f"this listener has {self._total} calls open, its limit (max_calls); retry shortly"
            )
        self._open[peer.key] = held + 1
        self._total += 1

    def leave(self, peer: Peer) -> None:
        held = self._open[peer.key] - 1
        if held:
            self._open[peer.key] = held
        else:
            del self._open[peer.key]
        self._total -= 1
        if self.shared is not None:
            self.shared.leave(peer.key)

    async def read_request(self, context: aio.ServicerContext[Any, Any]) -> bytes:
        """The call's one request message, as bytes, within the request timeout."""
        try:
            async with asyncio.timeout(self._timeout):
                raw = await context.read()
        except TimeoutError:
            raise TimeLimitError(
                f"no request message within {self._timeout:g} s of the call's start"
            ) from None
        if raw is _EOF:
            raise DeserializationError("the call ended without a request message")
        if not isinstance(raw, bytes):  # pragma: no cover (handlers read raw bytes)
            raise DeserializationError("the request message is not bytes")
        return raw

    def __repr__(self) -> str:
        return f"<Admission: {self._total} calls open, {len(self._open)} peers>"


async def _respond(result: Any, context: aio.ServicerContext[Any, Any]) -> Any:
    """A handler's answer: an async generator's items written one by one, or its value."""
    if inspect.isasyncgen(result):
        async for answer in result:
            await context.write(answer)
        return None
    return await result


async def _abort(context: aio.ServicerContext[Any, Any], error: KeyquorumError) -> None:
    """End the call with `error`'s code and message (with any signed evidence,
    `message_for`), marked as the daemon's answer."""
    await context.abort(
        code_for(error), message_for(error), ((ERROR_METADATA, type(error).__name__),)
    )


# -- our own servicers ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Unary(Generic[Req, Resp]):
    """A unary method of ours: `behavior(request, call)` with the request parsed."""

    behavior: Callable[[Req, Call], Awaitable[Resp]]
    parse: Callable[[bytes], Req]
    serialize: Callable[[Resp], bytes]


@dataclass(frozen=True, slots=True)
class ServerStream(Generic[Req, Resp]):
    """A server-streaming method of ours: `behavior(request, call)` yields the answers."""

    behavior: Callable[[Req, Call], AsyncIterator[Resp]]
    parse: Callable[[bytes], Req]
    serialize: Callable[[Resp], bytes]


Method = Unary[Any, Any] | ServerStream[Any, Any]

M = TypeVar("M", bound=Message)


def parser(message: type[M]) -> Callable[[bytes], M]:
    """A request parser: protobuf's, a malformed message a DeserializationError."""
    name = message.DESCRIPTOR.name

    def parse(raw: bytes) -> M:
        try:
            return message.FromString(raw)
        except DecodeError:
            raise DeserializationError(f"the request is not a valid {name}") from None

    return parse


def serialize(message: Message) -> bytes:
    """A response serialiser: protobuf's."""
    return message.SerializeToString()


def service(
    admission: Admission, name: str, methods: Mapping[str, Method]
) -> grpc.GenericRpcHandler[Any, Any]:
    """One service of ours, every method admitted (see the module docstring)."""
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method, spec in methods.items():
        path = f"/{name}/{method}"
        counted = path not in admission.reserved
        if isinstance(spec, Unary):
            handlers[method] = grpc.stream_unary_rpc_method_handler(
                _observed(admission.observe, path, _unary(admission, spec, counted)),
                response_serializer=spec.serialize,
            )
        else:
            handlers[method] = grpc.stream_stream_rpc_method_handler(
                _observed_stream(admission.observe, path, _server_stream(admission, spec, counted)),
                response_serializer=spec.serialize,
            )
    return grpc.method_handlers_generic_handler(name, handlers)


def _unary(
    admission: Admission, spec: Unary[Any, Any], counted: bool
) -> Callable[[object, aio.ServicerContext[Any, Any]], Awaitable[Any]]:
    behavior, parse, peers = spec.behavior, spec.parse, admission.peers

    async def handle(_requests: object, context: aio.ServicerContext[Any, Any]) -> Any:
        peer = peers.peer(context)
        try:
            raw = await admission.read_request(context)
            if counted:
                admission.enter(peer)
        except KeyquorumError as e:
            await _abort(context, e)
        try:
            return await behavior(parse(raw), Call(peer, context))
        except KeyquorumError as e:
            await _abort(context, e)
        finally:
            if counted:
                admission.leave(peer)

    return handle


def _server_stream(
    admission: Admission, spec: ServerStream[Any, Any], counted: bool
) -> Callable[[object, aio.ServicerContext[Any, Any]], AsyncIterator[Any]]:
    behavior, parse, peers = spec.behavior, spec.parse, admission.peers

    async def handle(
        _requests: object, context: aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        peer = peers.peer(context)
        try:
            raw = await admission.read_request(context)
            if counted:
                admission.enter(peer)
        except KeyquorumError as e:
            await _abort(context, e)
        try:
            async for answer in behavior(parse(raw), Call(peer, context)):
                yield answer
        except KeyquorumError as e:
            await _abort(context, e)
        finally:
            if counted:
                admission.leave(peer)

    return handle


def _code_name(context: aio.ServicerContext[Any, Any]) -> str:
    """The status a call ended with when its handler raised (an abort sets it)."""
    code = context.code()
    return code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"


def _observed(
    observe: Observer | None,
    method: str,
    handler: Callable[[object, aio.ServicerContext[Any, Any]], Awaitable[Any]],
) -> Callable[[object, aio.ServicerContext[Any, Any]], Awaitable[Any]]:
    """`handler`, its outcome and time told to `observe` (the RPC metrics), if given."""
    if observe is None:
        return handler

    async def timed(requests: object, context: aio.ServicerContext[Any, Any]) -> Any:
        start = time.perf_counter()
        code = "UNKNOWN"
        try:
            result = await handler(requests, context)
            code = "OK"
            return result
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except BaseException:
            code = _code_name(context)
            raise
        finally:
            observe(method, code, time.perf_counter() - start)

    return timed


def _observed_stream(
    observe: Observer | None,
    method: str,
    handler: Callable[[object, aio.ServicerContext[Any, Any]], AsyncIterator[Any]],
) -> Callable[[object, aio.ServicerContext[Any, Any]], AsyncIterator[Any]]:
    """`_observed` for a handler that yields its answers: timed until the last one."""
    if observe is None:
        return handler

    async def timed(requests: object, context: aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        start = time.perf_counter()
        code = "UNKNOWN"
        try:
            async for answer in handler(requests, context):
                yield answer
            code = "OK"
        except (asyncio.CancelledError, GeneratorExit):
            code = "CANCELLED"
            raise
        except BaseException:
            code = _code_name(context)
            raise
        finally:
            observe(method, code, time.perf_counter() - start)

    return timed


# -- third-party services (health, reflection) ------------------------------------


class GuardedRegistry:
    """What generated `add_*_to_server` functions call, wrapping every method.

    Unary-request methods become stream-request handlers that read their
    request within the timeout, then count per peer while they run;
    stream-request methods count from their start. The wrapped handlers go
    to `server`.
    """

    def __init__(self, server: aio.Server, admission: Admission) -> None:
        self._server = server
        self._admission = admission

    def add_generic_rpc_handlers(
        self, handlers: Iterable[grpc.GenericRpcHandler[Any, Any]]
    ) -> None:
        for handler in handlers:
            self._server.add_generic_rpc_handlers((_GuardedHandler(handler, self._admission),))

    def add_registered_method_handlers(
        self, service_name: str, handlers: Mapping[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        """Ignored: the same handlers arrive through `add_generic_rpc_handlers`.

        gRPC resolves registered handlers before generic ones; registering
        these unwrapped would bypass admission.
        """


class _GuardedHandler(grpc.GenericRpcHandler):  # type: ignore[type-arg]
    def __init__(self, inner: grpc.GenericRpcHandler[Any, Any], admission: Admission) -> None:
        self._inner = inner
        self._admission = admission
        self._cache: dict[str, grpc.RpcMethodHandler[Any, Any] | None] = {}

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method = handler_call_details.method
        if method in self._cache:
            return self._cache[method]
        inner = self._inner.service(handler_call_details)
        wrapped = None if inner is None else _guard(inner, self._admission, method)
        if len(self._cache) < 256:
            self._cache[method] = wrapped
        return wrapped


def _guard(
    inner: grpc.RpcMethodHandler[Any, Any], admission: Admission, method: str
) -> grpc.RpcMethodHandler[Any, Any]:
    peers = admission.peers
    serialize = inner.response_serializer
    # The stubs type handlers as the sync API's; on an aio server they are coroutines.
    behavior: Any = inner.stream_stream if inner.response_streaming else inner.stream_unary
    if inner.request_streaming:

        async def streamed(requests: object, context: aio.ServicerContext[Any, Any]) -> Any:
            peer = peers.peer(context)
            try:
                admission.enter(peer)
            except KeyquorumError as e:
                await _abort(context, e)
            try:
                return await _respond(behavior(requests, context), context)
            finally:
                admission.leave(peer)

        timed = _observed(admission.observe, method, streamed)
        if inner.response_streaming:
            return grpc.stream_stream_rpc_method_handler(
                timed,
                request_deserializer=inner.request_deserializer,
                response_serializer=serialize,
            )
        return grpc.stream_unary_rpc_method_handler(
            timed,
            request_deserializer=inner.request_deserializer,
            response_serializer=serialize,
        )
    deserialize = inner.request_deserializer or (lambda raw: raw)
    unary: Any = inner.unary_stream if inner.response_streaming else inner.unary_unary

    async def called(_requests: object, context: aio.ServicerContext[Any, Any]) -> Any:
        peer = peers.peer(context)
        try:
            request = deserialize(await admission.read_request(context))
            admission.enter(peer)
        except KeyquorumError as e:
            await _abort(context, e)
        except DecodeError:  # a library service's protobuf request
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "malformed request")
        try:
            return await _respond(unary(request, context), context)
        finally:
            admission.leave(peer)

    timed_call = _observed(admission.observe, method, called)
    if inner.response_streaming:
        return grpc.stream_stream_rpc_method_handler(timed_call, response_serializer=serialize)
    return grpc.stream_unary_rpc_method_handler(timed_call, response_serializer=serialize)
