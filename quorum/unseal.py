"""The HPKE `info` that binds an unseal submission to its session.

A custodian's share travels to the daemon encrypted with HPKE (RFC 9180,
section 5.1: `info` is bound into the key schedule) to the session's fresh
public key. Binding deployment, replica, session id, custodian and share
index into `info` means a ciphertext recorded by a proxy cannot be replayed
to another session, replica or under another custodian's name: it would
not decrypt. The signature over the unseal-share statement covers the
ciphertext's SHA-256 on top.
"""

from __future__ import annotations

from keyquorum.quorum import canonical
from keyquorum.quorum.errors import InvalidInputError

_DOMAIN = b"keyquorum/v1/unseal-share\x00"


def session_info(
    deployment: str, replica: str, session: bytes, custodian: str, index: int
) -> bytes:
    """HPKE info for one custodian's share sent to one unseal session."""
    if not 1 <= len(session) <= 64:
        raise InvalidInputError("session id must be 1 to 64 bytes")
    if not 1 <= index <= 255:
        raise InvalidInputError(f"share index must be 1..255, got {index}")
    return _DOMAIN + canonical.encode(
        {
            "custodian": custodian,
            "deployment": deployment,
            "index": index,
            "replica": replica,
            "session": session.hex(),
        }
    )
