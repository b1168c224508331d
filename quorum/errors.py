"""The one error tree of keyquorum.

Grouped by what went wrong, not by where. Every message is safe to show a
user and to log: no error is ever constructed with key material, a share,
a passphrase or plaintext in its arguments. The CLI catches
`KeyquorumError` once and exits with its message; the gRPC servicers map
the tree to status codes in one place (`keyquorum.hsm.services.status`).
"""

from __future__ import annotations

import copy
from typing import TypeVar


class KeyquorumError(Exception):
    """Base of every error keyquorum raises on purpose."""


class InvalidInputError(KeyquorumError, ValueError):
    """A caller passed something malformed: a bad size, range or name."""


class DeserializationError(KeyquorumError):
    """Bytes from outside could not be parsed (always raised `from` the cause)."""


class DecryptionError(KeyquorumError):
    """An AEAD or HPKE ciphertext did not authenticate under the given key."""


class WrongPassphraseError(DecryptionError):
    """A credential file did not open with the passphrase given."""


class UnsupportedVersionError(DeserializationError):
    """A versioned object carries a version this build does not know."""


class VerificationError(KeyquorumError):
    """Something that must hold cryptographically does not."""


class SignatureError(VerificationError):
    """A signature does not verify under the key it claims."""


class UnverifiedNoteError(SignatureError):
    """A signed note carries no signature from any key the caller trusts (C2SP
    signed-note): told apart from a forged signature, since a client may only
    need a newer key list."""


class ShareError(VerificationError):
    """A Shamir share is inconsistent with its split; names the share index."""

    def __init__(self, message: str, *, index: int | None = None) -> None:
        super().__init__(message)
        self.index = index


class CommitmentError(VerificationError):
    """A reconstructed secret does not match its commitment."""


class ThresholdError(VerificationError):
    """Fewer valid, distinct approvals or shares than the threshold requires."""


class ExpiredError(VerificationError):
    """A request, session or approval was used after its expiry."""


class ReplayError(VerificationError):
    """Something valid once was presented again: a signature counted twice,
    an approval for another request, a share from another session."""


class NotOnRosterError(VerificationError):
    """A signer is not a custodian on the roster in force."""


class ProofError(VerificationError):
    """A Merkle inclusion or consistency proof does not check."""


class RootMismatchError(ProofError):
    """A proof computed a root different from the expected one."""

    def __init__(self, message: str, *, expected: bytes, calculated: bytes) -> None:
        super().__init__(message)
        self.expected = expected
        self.calculated = calculated


class LogIntegrityError(VerificationError):
    """The quorum log is not a valid history; names the first bad entry.

    `refusal` is the typed error of the check that refused the entry (replay
    sets it), which a caller about to append that entry is given as is.
    """

    def __init__(
        self, message: str, *, seq: int | None = None, refusal: KeyquorumError | None = None
    ) -> None:
        super().__init__(message if seq is None else f"entry {seq}: {message}")
        self.seq = seq
        self.refusal = refusal


class ForkError(VerificationError):
    """Two checkpoints signed by the log key cannot both be true: the same tree
    size with two roots, or a later one that does not extend an earlier one.
    The log showed two histories (a split view); both notes are the evidence."""

    def __init__(self, message: str, *, size: int, evidence: tuple[str, str]) -> None:
        super().__init__(message)
        self.size = size
        self.evidence = evidence


class RollbackError(VerificationError):
    """The log does not extend a checkpoint this machine saw before: it is
    shorter, or an RFC 9162 consistency proof from that checkpoint fails. A
    store restored from an older snapshot, or a daemon showing another history.

    `evidence` holds the signed notes that cannot both be true (the one seen
    before, then the one shown now), when the refusing party has them."""

    def __init__(self, message: str, *, evidence: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.evidence = evidence


class UnverifiableError(KeyquorumError):
    """The input cannot be judged either way: no pinned key to check it against,
    nothing that vouches for it, or a file that is not what it claims to be.
    Not evidence of tampering (`audit verify` exits 3, not 1)."""


class NotFoundError(KeyquorumError):
    """The thing asked for does not exist (an unknown proposal id)."""


class StateError(KeyquorumError):
    """The operation is not valid in the current state (e.g. already initialised)."""


class SealedError(StateError):
    """The service is sealed: no master key is in memory."""


class AccessDeniedError(KeyquorumError):
    """The caller is authenticated but not allowed to do this."""


class UnauthenticatedError(KeyquorumError):
    """The caller presented no identity at all (no client certificate naming one)."""


class LimitExceededError(KeyquorumError):
    """A size or rate limit was exceeded."""


class TimeLimitError(LimitExceededError):
    """Something did not happen in the time allowed (a request message sent too slowly)."""


class AppendConflictError(StateError):
    """A log append expected another log size: someone appended first.

    The caller re-reads the log and decides again; nothing was written.
    """

    def __init__(self, message: str, *, expected_size: int, actual_size: int) -> None:
        super().__init__(message)
        self.expected_size = expected_size
        self.actual_size = actual_size


class StorageError(KeyquorumError):
    """The store cannot be used safely: I/O failure, unsafe durability
    settings or a failed commit (servicers answer UNAVAILABLE)."""


class HandingOverError(KeyquorumError):
    """This process is handing its work to its successor (an upgrade, SIGUSR2):
    the call was not served; the same call succeeds on a new connection
    (servicers answer UNAVAILABLE, which clients retry)."""


E = TypeVar("E", bound=KeyquorumError)


def with_context(error: E, context: str) -> E:
    """The same error, its class and fields kept, with `context: ` before its message.

    For a layer that knows more than the one that raised (which custodian,
    which checkpoint): it adds words, never rebuilds the error from text.
    """
    clone = copy.copy(error)
    clone.args = (f"{context}: {error}",)
    return clone
