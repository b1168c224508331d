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

    def __post_init__(self) -> None:
        # Imported here to keep the dataclass importable without the error tree.
        from keyquorum.quorum.errors import InvalidInputError

        if not 7 * 86400 <= self.destroy_wait_seconds <= 30 * 86400:
            raise InvalidInputError("destroy_wait_seconds must be between 7 and 30 days")
        if not 1 <= self.encryption_limit <= NONCE_BOUND:
            raise InvalidInputError("encryption_limit must be in [1, 2**32] (SP 800-38D 8.3)")
        if self.counter_block < 1:
            raise InvalidInputError("counter_block must be at least 1")


DEFAULT_LIMITS = Limits()
