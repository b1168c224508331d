"""Every size, time and rate limit in one frozen place.

Documented in README.md ("Limits"); the daemon takes a `Limits` at start so
tests can lower a value without monkeypatching.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

#: NIST SP 800-38D, section 8.3: at most 2^32 invocations with random IVs per key.
NONCE_BOUND: Final = 2**32


@dataclass(frozen=True)
class Limits:
    """Limits enforced by the daemon and the verifier (as tuf's UpdaterConfig)."""

    #: Largest gRPC message the server accepts or sends.
    max_message_bytes: int = 4 * 1024 * 1024
    #: Largest public credential file accepted at the ceremony.
    max_credential_bytes: int = 16 * 1024
    #: Custodians on one roster (Shamir over GF(2^8) allows at most 255).
    max_custodians: int = 255
    #: How long an unseal session accepts shares.
    unseal_session_seconds: int = 15 * 60
    #: How far a seal request's time may be from the daemon's clock.
    seal_request_skew_seconds: int = 5 * 60
    #: Default lifetime of a proposal before it expires unapproved.
    proposal_ttl_seconds: int = 24 * 3600
    #: Longest activation of a tenant key one approval may grant.
    activation_max_seconds: int = 7 * 24 * 3600
    #: Waiting period before a destroyed tenant key is shredded (7 to 30 days).
    destroy_wait_seconds: int = 7 * 24 * 3600
    #: Longest free-text field (deployment name, reason) in a request.
    max_text_field: int = 200
    #: Proposals open for verdicts at once, over every proposer: a flood's bound.
    max_open_proposals: int = 256
    #: Proposals one proposer (custodian or registered proposer) may have open at once.
    max_open_proposals_per_proposer: int = 32
    #: Proposals one proposer may make per minute (a token bucket, refilled evenly).
    proposals_per_minute: int = 60
    #: Proposals one proposer may make at once, before the rate applies.
    proposal_burst: int = 30

    # The data plane's (docs/dataplane.md).
    #: Largest plaintext Wrap accepts (data keys and small secrets).
    max_plaintext: int = 4096
    #: Pairs in one encryption context.
    max_context_pairs: int = 64
    #: Bytes of one context's canonical encoding.
    max_context_bytes: int = 4096
    #: Items in one batch call.
    max_batch_items: int = 1000
    #: Encryptions per tenant key version (SP 800-38D, section 8.3).
    encryption_limit: int = NONCE_BOUND
    #: Encryption counter values reserved per store write.
    counter_block: int = 65536

    # What one peer can hold of a gRPC listener (docs/adr/0009; README "Limits").
    # Each listener (the custodian port, the mTLS port) and each serving process
    # applies them on its own.
    #: Connections open at once on one listener; more are closed at accept.
    max_connections: int = 256
    #: Calls open at once on one connection (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS).
    max_streams_per_connection: int = 64
    #: Calls being served at once (their request in) from one peer: one client
    #: certificate (its SHA-256) on the mTLS port, one address on the custodian port.
    max_calls_per_peer: int = 128
    #: Calls being served at once on one listener, all peers together.
    max_calls: int = 2048
    #: Time from a call's headers to its request message; then the call is ended.
    #: Until then a call holds one stream and about 7 KiB, nothing else.
    request_timeout_seconds: float = 10.0
    #: Time from accepting a connection to the end of its TLS handshake.
    handshake_timeout_seconds: float = 10.0
    #: A connection without a call for this long is closed.
    connection_idle_seconds: int = 300
    #: A connection is closed (GOAWAY) after this long, whatever it does ...
    connection_age_seconds: int = 3600
    #: ... once the calls it still runs have had this long to finish.
    connection_age_grace_seconds: int = 60
    #: The server pings a quiet connection this often and closes it if the
    #: answer takes longer than `keepalive_timeout_seconds`.
    keepalive_seconds: int = 60
    keepalive_timeout_seconds: int = 20
    #: Client pings closer together than this count as abuse; two such and the
    #: connection is closed (gRPC's keepalive enforcement).
    min_client_ping_seconds: int = 30
    #: Largest header block (metadata) of one call.
    max_metadata_bytes: int = 16 * 1024

    # The custodian plane's lanes: threads and waiting room of each; a call
    # that finds the waiting room full is refused (RESOURCE_EXHAUSTED).
    #: Seal: its own threads, which no other call can take.
    seal_threads: int = 2
    seal_waiting: int = 32
    #: GetStatus: its own threads, too.
    status_threads: int = 2
    status_waiting: int = 64
    #: Every other custodian call (unseal, proposals, verdicts, ...).
    governance_threads: int = 4
    governance_waiting: int = 64

    #: A change of the keys or grants reaches every worker process within this
    #: (`server run --workers`); a worker that has not confirmed it by then is
    #: killed and replaced.
    worker_sync_seconds: float = 0.1

    def __post_init__(self) -> None:
        # Imported here to keep the dataclass importable without the error tree.
        from keyquorum.quorum.errors import InvalidInputError

        if not 7 * 86400 <= self.destroy_wait_seconds <= 30 * 86400:
            raise InvalidInputError("destroy_wait_seconds must be between 7 and 30 days")
        if not 1 <= self.encryption_limit <= NONCE_BOUND:
            raise InvalidInputError("encryption_limit must be in [1, 2**32] (SP 800-38D 8.3)")
        if self.counter_block < 1:
            raise InvalidInputError("counter_block must be at least 1")
        for name in _AT_LEAST_ONE:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 1:
                raise InvalidInputError(f"{name} must be at least 1, got {value!r}")
        if not 0 < self.request_timeout_seconds <= 3600:
            raise InvalidInputError("request_timeout_seconds must be in (0, 3600]")
        if not 0 < self.handshake_timeout_seconds <= 3600:
            raise InvalidInputError("handshake_timeout_seconds must be in (0, 3600]")
        if not 0 < self.worker_sync_seconds <= 10:
            raise InvalidInputError("worker_sync_seconds must be in (0, 10]")
        if self.max_calls_per_peer > self.max_calls:
            raise InvalidInputError("max_calls_per_peer cannot exceed max_calls")


#: Fields that are counts or whole seconds of at least one.
_AT_LEAST_ONE: Final = (
    "max_connections",
    "max_streams_per_connection",
    "max_calls_per_peer",
    "max_calls",
    "connection_idle_seconds",
    "connection_age_seconds",
    "connection_age_grace_seconds",
    "keepalive_seconds",
    "keepalive_timeout_seconds",
    "min_client_ping_seconds",
    "max_metadata_bytes",
    "seal_threads",
    "seal_waiting",
    "status_threads",
    "status_waiting",
    "governance_threads",
    "governance_waiting",
    "max_open_proposals",
    "max_open_proposals_per_proposer",
    "proposals_per_minute",
    "proposal_burst",
)


DEFAULT_LIMITS = Limits()
