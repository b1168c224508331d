"""The one mapping from keyquorum's error tree to gRPC status codes.

Servicers never choose a code themselves: they raise, and admission
(hsm/services/admission.py) ends the call with `code_for`'s code.
Messages come from the errors, which never carry key material.
"""

from __future__ import annotations

import grpc

from keyquorum.quorum import errors as e

# Most specific classes first: the first isinstance match wins.
_CODES: tuple[tuple[type[e.KeyquorumError], grpc.StatusCode], ...] = (
    # The store cannot be used right now (I/O error, database down): retry later.
    (e.StorageError, grpc.StatusCode.UNAVAILABLE),
    (e.HandingOverError, grpc.StatusCode.UNAVAILABLE),
    (e.SealedError, grpc.StatusCode.FAILED_PRECONDITION),
    (e.TimeLimitError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (e.LimitExceededError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (e.NotFoundError, grpc.StatusCode.NOT_FOUND),
    (e.UnauthenticatedError, grpc.StatusCode.UNAUTHENTICATED),
    (e.AccessDeniedError, grpc.StatusCode.PERMISSION_DENIED),
    (e.ReplayError, grpc.StatusCode.ALREADY_EXISTS),
    (e.ExpiredError, grpc.StatusCode.FAILED_PRECONDITION),
    (e.ThresholdError, grpc.StatusCode.FAILED_PRECONDITION),
    (e.SignatureError, grpc.StatusCode.PERMISSION_DENIED),
    (e.NotOnRosterError, grpc.StatusCode.PERMISSION_DENIED),
    # The log is not the history it must be: tampered, rolled back, forked.
    (e.LogIntegrityError, grpc.StatusCode.DATA_LOSS),
    (e.RollbackError, grpc.StatusCode.DATA_LOSS),
    (e.ForkError, grpc.StatusCode.DATA_LOSS),
    (e.VerificationError, grpc.StatusCode.INVALID_ARGUMENT),
    (e.DecryptionError, grpc.StatusCode.INVALID_ARGUMENT),
    (e.DeserializationError, grpc.StatusCode.INVALID_ARGUMENT),
    (e.InvalidInputError, grpc.StatusCode.INVALID_ARGUMENT),
    (e.StateError, grpc.StatusCode.FAILED_PRECONDITION),
    # Raised by the auditor's offline verify, never by a servicer; mapped all the same.
    (e.UnverifiableError, grpc.StatusCode.FAILED_PRECONDITION),
)


def code_for(error: e.KeyquorumError) -> grpc.StatusCode:
    """The gRPC status code that says what `error` means to a caller."""
    for cls, code in _CODES:
        if isinstance(error, cls):
            return code
    return grpc.StatusCode.INTERNAL


#: Trailing metadata on every error the daemon answers with: the error's
#: class name, so a client tells "the daemon answered UNAVAILABLE (its store
#: is down)" from "the daemon could not be reached" (cli/connect.py).
#: Admission sets it (hsm/services/admission.py).
ERROR_METADATA = "keyquorum-error"


def message_for(error: e.KeyquorumError) -> str:
    """The status message: the error's, then any signed notes it carries as evidence.

    A rollback or a fork is proven by two notes the log key signed; the
    caller gets them whole, so the refusal can be shown to anyone.
    """
    evidence: tuple[str, ...] = ()
    if isinstance(error, e.RollbackError | e.ForkError):
        evidence = error.evidence
    parts = [str(error)]
    parts.extend(f"evidence {i}:\n{note}" for i, note in enumerate(evidence, start=1))
    return "\n\n".join(parts)
