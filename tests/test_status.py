"""The one mapping from the error tree to gRPC status codes, pinned per class."""

from __future__ import annotations

import inspect

import grpc
import pytest

from keyquorum.hsm.services.status import code_for, message_for
from keyquorum.quorum import errors as e

C = grpc.StatusCode

EXPECTED: dict[type[e.KeyquorumError], grpc.StatusCode] = {
    e.KeyquorumError: C.INTERNAL,
    e.InvalidInputError: C.INVALID_ARGUMENT,
    e.TimeLimitError: C.DEADLINE_EXCEEDED,
    e.DeserializationError: C.INVALID_ARGUMENT,
    e.UnsupportedVersionError: C.INVALID_ARGUMENT,
    e.DecryptionError: C.INVALID_ARGUMENT,
    e.WrongPassphraseError: C.INVALID_ARGUMENT,
    e.VerificationError: C.INVALID_ARGUMENT,
    e.ShareError: C.INVALID_ARGUMENT,
    e.CommitmentError: C.INVALID_ARGUMENT,
    e.ProofError: C.INVALID_ARGUMENT,
    e.RootMismatchError: C.INVALID_ARGUMENT,
    e.SignatureError: C.PERMISSION_DENIED,
    e.NotOnRosterError: C.PERMISSION_DENIED,
    e.AccessDeniedError: C.PERMISSION_DENIED,
    e.UnauthenticatedError: C.UNAUTHENTICATED,
    e.ReplayError: C.ALREADY_EXISTS,
    e.ExpiredError: C.FAILED_PRECONDITION,
    e.ThresholdError: C.FAILED_PRECONDITION,
    e.StateError: C.FAILED_PRECONDITION,
    e.SealedError: C.FAILED_PRECONDITION,
    e.LimitExceededError: C.RESOURCE_EXHAUSTED,
    e.LogIntegrityError: C.DATA_LOSS,
    e.RollbackError: C.DATA_LOSS,
    e.ForkError: C.DATA_LOSS,
    e.StorageError: C.UNAVAILABLE,
    e.HandingOverError: C.UNAVAILABLE,
    e.NotFoundError: C.NOT_FOUND,
    e.UnverifiableError: C.FAILED_PRECONDITION,
}


def _all_error_classes() -> list[type[e.KeyquorumError]]:
    return [
        cls
        for _, cls in inspect.getmembers(e, inspect.isclass)
        if issubclass(cls, e.KeyquorumError)
    ]


def _instance(cls: type[e.KeyquorumError]) -> e.KeyquorumError:
    """An instance, whatever keyword arguments the class's constructor wants."""
    obj = cls.__new__(cls)
    Exception.__init__(obj, "message")
    return obj


@pytest.mark.parametrize("cls", _all_error_classes(), ids=lambda c: c.__name__)
def test_every_error_class_has_a_pinned_code(cls: type[e.KeyquorumError]) -> None:
    # Classes not listed (e.g. AppendConflictError) take their nearest listed parent's code.
    if cls not in EXPECTED:
        parents = [p for p in cls.__mro__[1:] if p in EXPECTED]
        assert parents, f"{cls.__name__} has no expected status code"
        expected = EXPECTED[parents[0]]
    else:
        expected = EXPECTED[cls]
    assert code_for(_instance(cls)) == expected


def test_rollback_and_fork_refusals_carry_their_evidence() -> None:
    """Both notes that cannot both be true reach the caller whole, after the message."""
    seen, shown = "keyquorum/x\n5\nAAAA\n\n— sig one\n", "keyquorum/x\n3\nBBBB\n\n— sig two\n"
    rollback = e.RollbackError("the log was rolled back", evidence=(seen, shown))
    fork = e.ForkError("fork at size 5", size=5, evidence=(seen, shown))
    for error in (rollback, fork):
        assert code_for(error) == C.DATA_LOSS
        text = message_for(error)
        assert text.startswith(str(error))
        assert f"evidence 1:\n{seen}" in text
        assert f"evidence 2:\n{shown}" in text
    assert message_for(e.RollbackError("no evidence kept")) == "no evidence kept"
