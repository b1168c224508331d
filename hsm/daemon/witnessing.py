"""Which stored checkpoint enough witnesses cosigned: what custodians sign over.

Witnesses are the C2SP cosignature keys the quorum put in the log
(`add-witness` / `remove-witness`, with the threshold m); a witness
(`keyquorum audit witness`, cli/witness.py) cosigns a checkpoint only if it
extends the last one it cosigned, and sends the cosignature to the audit
service, which merges it into the stored note (hsm/services/audit_service.py).

The latest checkpoint that m witnesses of the policy in force cosigned is
the "witnessed" one; custodians' CLIs refuse to sign over a log no
witnessed checkpoint covers (cli/seen_checkpoints.py). With no witness (m
= 0) every checkpoint is witnessed. Finding it must not read every stored
note, so the audit service records its size in the store's meta table
(`WITNESSED_KEY`) whenever a merge reaches m; that record is a hint, never
trusted: the note it names is checked here against the policy every time.
"""

from __future__ import annotations

import logging
from typing import Final

from keyquorum.hsm.stores.base import Store
from keyquorum.quorum.checkpoint import parse_verifier_key, unverified_size, verify_checkpoint
from keyquorum.quorum.errors import KeyquorumError
from keyquorum.quorum.replay import LogState, WitnessPolicy

log = logging.getLogger(__name__)

#: The `meta` key holding the size of the latest checkpoint m witnesses cosigned.
WITNESSED_KEY: Final = "witnessed_size"


def count_cosigners(note: str, state: LogState, policy: WitnessPolicy) -> int:
    """How many witnesses of `policy` validly cosigned `note` (0 if it does not check).

    The note must be signed by the log key in force at its size.
    """
    if not policy.witnesses:
        return 0
    try:
        log_key = parse_verifier_key(state.key_at(unverified_size(note)))
        verified = verify_checkpoint(note, log_key, policy.verifiers())
    except KeyquorumError:
        return 0
    return len(verified.cosigned_by)


def witnessed_checkpoint(store: Store, state: LogState) -> str:
    """The latest stored checkpoint of this log that m witnesses in force cosigned, or "".

    m = 0 (no witness): the latest checkpoint itself.
    """
    if state.size == 0:
        return ""
    policy = state.witness_policy
    if policy.threshold == 0:
        return store.checkpoint_at(state.size) or ""
    hint = store.get_meta(WITNESSED_KEY)
    if hint is None or not hint.isdigit():
        return ""
    size = int(hint)
    if not 0 < size <= state.size:
        return ""
    note = store.checkpoint_at(size)
    if note is None or count_cosigners(note, state, policy) < policy.threshold:
        return ""
    return note


def record_cosigned(store: Store, state: LogState, size: int, note: str) -> None:
    """After a cosignature merge: remember `size` if m witnesses in force now cosigned it."""
    policy = state.witness_policy
    if policy.threshold == 0 or count_cosigners(note, state, policy) < policy.threshold:
        return
    hint = store.get_meta(WITNESSED_KEY)
    if hint is not None and hint.isdigit() and int(hint) >= size:
        return
    store.set_meta(WITNESSED_KEY, str(size))
    log.info("checkpoint %d is witnessed (%d of its witnesses cosigned)", size, policy.threshold)
