"""Every size, time and rate limit in one frozen place.

Documented in README.md ("Limits"); the daemon takes a `Limits` at start so
tests can lower a value without monkeypatching.
"""

from __future__ import annotations

from dataclasses import dataclass


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

    def __post_init__(self) -> None:
        if not 7 * 86400 <= self.destroy_wait_seconds <= 30 * 86400:
            # Imported here to keep the dataclass importable without the error tree.
            from keyquorum.quorum.errors import InvalidInputError

            raise InvalidInputError("destroy_wait_seconds must be between 7 and 30 days")


DEFAULT_LIMITS = Limits()
