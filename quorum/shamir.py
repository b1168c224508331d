"""Shamir secret sharing of the master key, with commitments that name a bad share.

Contract (docs/shamir.md; why this field: docs/adr/0003):

- `split(secret, threshold, count)` shares `salt(32) || secret` over
  GF(2^8) (`keyquorum.quorum.gf256`, the AES field SLIP-0039 uses): one
  random polynomial of degree < threshold per byte position, the shared
  value at x = 0, share i at x = i for i = 1..count. The salt makes every
  commitment hiding even for a one-byte secret: without it a share of a
  short secret could be found by trying every value against its public
  hash.
- It returns the shares and public `SplitCommitments`:
    share commitment i  = SHA-256("keyquorum/v1/shamir/share\\0" || split_id
                          || threshold || count || i || share value i)
    secret commitment   = SHA-256("keyquorum/v1/shamir/secret\\0" || split_id
                          || salt || secret)
  (threshold, count and i one byte each; every field has a fixed length
  except the last, so the hash inputs are unambiguous). The genesis entry
  of the quorum log keeps them; the secret commitment is the master-key
  commitment.
- `verify_share` checks one share on its own, so a wrong or corrupted
  share is refused when it arrives and its index is named.
- `combine` checks every precondition and every share before it
  interpolates, then checks the result against the secret commitment.

Any threshold - 1 shares are independent of the secret (each byte position
is a textbook Shamir sharing). The commitments are public and reveal
nothing more as long as SHA-256 hides a 32-byte uniformly random salt
share. Side channels: see `keyquorum.quorum.gf256`; Python cannot promise
constant time, so the arithmetic avoids secret-indexed tables and
secret-dependent branches, and no more than that is claimed.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from keyquorum.quorum import gf256
from keyquorum.quorum.canonical import hex_bytes
from keyquorum.quorum.errors import (
    CommitmentError,
    DeserializationError,
    InvalidInputError,
    ShareError,
    ThresholdError,
    UnsupportedVersionError,
)
from keyquorum.quorum.secret import SecretBytes

SPLIT_ID_SIZE = 16
SALT_SIZE = 32
COMMITMENT_SIZE = 32
MAX_SHARES = 255
"""x = 1..255: every non-zero element of GF(2^8); x = 0 holds the secret."""
MAX_VALUE_SIZE = 0xFFFF
"""The binary share form has a two-byte value length."""
MAX_SECRET_LENGTH = MAX_VALUE_SIZE - SALT_SIZE

SHARE_FORMAT_VERSION = 1
COMMITMENTS_FORMAT_VERSION = 1
# version(1) split_id(16) threshold(1) index(1) value_length(2, big-endian)
_SHARE_HEADER_SIZE = 1 + SPLIT_ID_SIZE + 1 + 1 + 2

_SHARE_DOMAIN = b"keyquorum/v1/shamir/share\x00"
_SECRET_DOMAIN = b"keyquorum/v1/shamir/secret\x00"

RandomBytes = Callable[[int], bytes]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_parameters(threshold: object, count: object) -> None:
    if not (_is_int(threshold) and _is_int(count)):
        raise InvalidInputError("threshold and count must be integers")
    if (
        not (isinstance(threshold, int) and isinstance(count, int))
        or not 2 <= threshold <= count <= MAX_SHARES
    ):
        raise InvalidInputError(
            f"need 2 <= threshold <= count <= {MAX_SHARES}, got threshold {threshold}, "
            f"count {count}"
        )


def _check_split_id(split_id: object) -> bytes:
    if not isinstance(split_id, bytes) or len(split_id) != SPLIT_ID_SIZE:
        raise InvalidInputError(f"split id must be {SPLIT_ID_SIZE} bytes")
    return split_id


def _share_commitment(
    split_id: bytes, threshold: int, count: int, index: int, value: gf256.ByteString
) -> bytes:
    h = hashlib.sha256(_SHARE_DOMAIN)
    h.update(split_id)
    h.update(bytes((threshold, count, index)))
    h.update(value)
    return h.digest()


def _secret_commitment(split_id: bytes, salted_secret: gf256.ByteString) -> bytes:
    # salted_secret is salt || secret, exactly the hash input's tail.
    h = hashlib.sha256(_SECRET_DOMAIN)
    h.update(split_id)
    h.update(salted_secret)
    return h.digest()


class Share:
    """One custodian's share: opaque, never printed, pickled or copied.

    `index` is the x-coordinate (1..255), `value` the share of
    `salt || secret` (secret length + 32 bytes). Construction checks every
    field, so a Share with index 0 or a short value cannot exist.
    """

    __slots__ = ("_index", "_split_id", "_threshold", "_value")

    def __init__(self, *, split_id: bytes, index: int, threshold: int, value: SecretBytes) -> None:
        _check_split_id(split_id)
        if not _is_int(index) or not 1 <= index <= MAX_SHARES:
            raise InvalidInputError(
                f"share index must be 1..{MAX_SHARES} (0 is where the secret sits), got {index!r}"
            )
        if not _is_int(threshold) or not 2 <= threshold <= MAX_SHARES:
            raise InvalidInputError(f"share {index}: threshold must be 2..{MAX_SHARES}")
        if not isinstance(value, SecretBytes):
            raise InvalidInputError(f"share {index}: value must be SecretBytes")
        if not SALT_SIZE < len(value) <= MAX_VALUE_SIZE:
            raise InvalidInputError(
                f"share {index}: value must be {SALT_SIZE + 1}..{MAX_VALUE_SIZE} bytes "
                f"(32-byte salt share + secret share), got {len(value)}"
            )
        self._split_id = split_id
        self._index = index
        self._threshold = threshold
        self._value = value

    @property
    def split_id(self) -> bytes:
        return self._split_id

    @property
    def index(self) -> int:
        return self._index

    @property
    def threshold(self) -> int:
        return self._threshold

    @property
    def value(self) -> SecretBytes:
        return self._value

    def to_bytes(self) -> SecretBytes:
        """Version 1 binary form, the plaintext that is HPKE-sealed to a custodian.

        version(1) = 0x01 || split_id(16) || threshold(1) || index(1) ||
        value length(2, big-endian) || value.
        """
        out = bytearray()
        out.append(SHARE_FORMAT_VERSION)
        out += self._split_id
        out.append(self._threshold)
        out.append(self._index)
        out += len(self._value).to_bytes(2, "big")
        out += self._value.view()
        return SecretBytes.adopt(out, label=f"share {self._index}")

    @classmethod
    def from_bytes(cls, data: SecretBytes | bytes | bytearray | memoryview) -> Share:
        """Parse `to_bytes()` output; every field is checked before use.

        Raises UnsupportedVersionError for an unknown version byte and
        DeserializationError for anything else malformed.
        """
        if isinstance(data, SecretBytes):
            raw = data.view()
        elif isinstance(data, bytes | bytearray | memoryview):
            raw = memoryview(data).cast("B")
        else:
            raise DeserializationError("share: expected bytes")
        if len(raw) == 0:
            raise DeserializationError("share: empty input")
        version = raw[0]
        if version == SHARE_FORMAT_VERSION:
            return cls._from_bytes_v1(raw)
        raise UnsupportedVersionError(
            f"share: format version {version} is not supported (this build reads "
            f"version {SHARE_FORMAT_VERSION})"
        )

    @classmethod
    def _from_bytes_v1(cls, raw: memoryview) -> Share:
        if len(raw) < _SHARE_HEADER_SIZE:
            raise DeserializationError(
                f"share: {len(raw)} bytes is shorter than the {_SHARE_HEADER_SIZE}-byte header"
            )
        split_id = bytes(raw[1 : 1 + SPLIT_ID_SIZE])
        threshold = raw[1 + SPLIT_ID_SIZE]
        index = raw[2 + SPLIT_ID_SIZE]
        declared = int.from_bytes(raw[3 + SPLIT_ID_SIZE : _SHARE_HEADER_SIZE], "big")
        actual = len(raw) - _SHARE_HEADER_SIZE
        if threshold < 2:
            raise DeserializationError(f"share: threshold {threshold} is below 2")
        if index == 0:
            raise DeserializationError("share: index 0 is where the secret sits, not a share")
        if declared != actual:
            raise DeserializationError(
                f"share {index}: header says {declared} value bytes, {actual} follow"
            )
        if declared <= SALT_SIZE:
            raise DeserializationError(
                f"share {index}: value of {declared} bytes is too short "
                f"(32-byte salt share + at least 1 secret byte)"
            )
        value = SecretBytes(raw[_SHARE_HEADER_SIZE:], label=f"share {index} value")
        return cls(split_id=split_id, index=index, threshold=threshold, value=value)

    def wipe(self) -> None:
        """Overwrite the share value; the share is unusable afterwards."""
        self._value.wipe()

    def __repr__(self) -> str:
        state = "wiped" if self._value.wiped else f"{len(self._value)} bytes"
        return (
            f"<Share split={self._split_id.hex()} index={self._index} "
            f"threshold={self._threshold}: {state}>"
        )

    __str__ = __repr__

    def __reduce__(self) -> NoReturn:
        raise TypeError("Share cannot be pickled")

    def __copy__(self) -> NoReturn:
        raise TypeError("Share cannot be copied")

    def __deepcopy__(self, memo: object) -> NoReturn:
        raise TypeError("Share cannot be copied")


_JSON_FIELDS = frozenset(
    {
        "version",
        "split_id",
        "threshold",
        "count",
        "secret_length",
        "share_commitments",
        "secret_commitment",
    }
)


@dataclass(frozen=True)
class SplitCommitments:
    """The public record of one split: parameters and SHA-256 commitments.

    `share_commitments[i - 1]` commits to share i. Construction checks every
    field (InvalidInputError); `from_json` checks every field of outside data
    (DeserializationError).
    """

    split_id: bytes
    threshold: int
    count: int
    secret_length: int
    share_commitments: tuple[bytes, ...]
    secret_commitment: bytes

    def __post_init__(self) -> None:
        _check_split_id(self.split_id)
        _check_parameters(self.threshold, self.count)
        if not _is_int(self.secret_length) or not 1 <= self.secret_length <= MAX_SECRET_LENGTH:
            raise InvalidInputError(f"secret length must be 1..{MAX_SECRET_LENGTH}")
        if not isinstance(self.share_commitments, tuple):
            raise InvalidInputError("share commitments must be a tuple")
        if len(self.share_commitments) != self.count:
            raise InvalidInputError(
                f"{len(self.share_commitments)} share commitments for {self.count} shares"
            )
        for i, c in enumerate(self.share_commitments, start=1):
            if not isinstance(c, bytes) or len(c) != COMMITMENT_SIZE:
                raise InvalidInputError(f"share commitment {i} must be {COMMITMENT_SIZE} bytes")
        if (
            not isinstance(self.secret_commitment, bytes)
            or len(self.secret_commitment) != COMMITMENT_SIZE
        ):
            raise InvalidInputError(f"secret commitment must be {COMMITMENT_SIZE} bytes")

    @property
    def value_length(self) -> int:
        """Bytes in each share value: the 32-byte salt share plus the secret share."""
        return SALT_SIZE + self.secret_length

    def to_json(self) -> dict[str, Any]:
        """A dict for RFC 8785 encoding (`keyquorum.quorum.canonical`), bytes as hex."""
        return {
            "version": COMMITMENTS_FORMAT_VERSION,
            "split_id": self.split_id.hex(),
            "threshold": self.threshold,
            "count": self.count,
            "secret_length": self.secret_length,
            "share_commitments": [c.hex() for c in self.share_commitments],
            "secret_commitment": self.secret_commitment.hex(),
        }

    @classmethod
    def from_json(cls, value: object) -> SplitCommitments:
        """Inverse of `to_json`; refuses missing, extra or malformed fields."""
        if not isinstance(value, Mapping):
            raise DeserializationError("split commitments: expected a JSON object")
        keys = set(value)
        if keys != _JSON_FIELDS:
            missing = sorted(str(k) for k in _JSON_FIELDS - keys)
            extra = sorted(str(k) for k in keys - _JSON_FIELDS)
            raise DeserializationError(
                f"split commitments: missing fields {missing}, unknown fields {extra}"
            )
        version = value["version"]
        if not _is_int(version):
            raise DeserializationError("split commitments: version must be an integer")
        if version != COMMITMENTS_FORMAT_VERSION:
            raise UnsupportedVersionError(f"split commitments: version {version} is not supported")
        for name in ("threshold", "count", "secret_length"):
            if not _is_int(value[name]):
                raise DeserializationError(f"split commitments: {name} must be an integer")
        listed = value["share_commitments"]
        if not isinstance(listed, list):
            raise DeserializationError("split commitments: share_commitments must be a list")
        if len(listed) > MAX_SHARES:
            raise DeserializationError(
                f"split commitments: {len(listed)} share commitments, at most {MAX_SHARES}"
            )
        share_commitments = tuple(
            hex_bytes(c, field=f"share_commitments[{i}]", size=COMMITMENT_SIZE)
            for i, c in enumerate(listed)
        )
        try:
            return cls(
                split_id=hex_bytes(value["split_id"], field="split_id", size=SPLIT_ID_SIZE),
                threshold=value["threshold"],
                count=value["count"],
                secret_length=value["secret_length"],
                share_commitments=share_commitments,
                secret_commitment=hex_bytes(
                    value["secret_commitment"], field="secret_commitment", size=COMMITMENT_SIZE
                ),
            )
        except InvalidInputError as e:
            raise DeserializationError(f"split commitments: {e}") from e


def _draw(random_bytes: RandomBytes, size: int) -> bytes | bytearray:
    data = random_bytes(size)
    if not isinstance(data, bytes | bytearray) or len(data) != size:
        raise InvalidInputError(f"random_bytes({size}) did not return {size} bytes")
    return data


def split(
    secret: SecretBytes | bytes | bytearray,
    threshold: int,
    count: int,
    *,
    random_bytes: RandomBytes = secrets.token_bytes,
) -> tuple[list[Share], SplitCommitments]:
    """Split `secret` into `count` shares, any `threshold` of which rebuild it.

    Randomness is drawn in a fixed order (split id, salt, then the
    coefficients of x^1 .. x^(threshold-1), each secret length + 32 bytes)
    so that a deterministic `random_bytes` gives byte-exact results.
    """
    if isinstance(secret, SecretBytes):
        raw = secret.view()
    elif isinstance(secret, bytes | bytearray):
        raw = memoryview(secret)
    else:
        raise InvalidInputError("secret must be SecretBytes, bytes or bytearray")
    if not 1 <= len(raw) <= MAX_SECRET_LENGTH:
        raise InvalidInputError(f"secret must be 1..{MAX_SECRET_LENGTH} bytes, got {len(raw)}")
    _check_parameters(threshold, count)

    split_id = bytes(_draw(random_bytes, SPLIT_ID_SIZE))
    salted = bytearray(_draw(random_bytes, SALT_SIZE))
    salted += raw
    coefficients = [salted]
    try:
        for _ in range(threshold - 1):
            coefficients.append(bytearray(_draw(random_bytes, len(salted))))
        shares = []
        share_commitments = []
        for index in range(1, count + 1):
            value = gf256.evaluate(coefficients, index)
            share_commitments.append(_share_commitment(split_id, threshold, count, index, value))
            shares.append(
                Share(
                    split_id=split_id,
                    index=index,
                    threshold=threshold,
                    value=SecretBytes.adopt(value, label=f"share {index} value"),
                )
            )
        commitments = SplitCommitments(
            split_id=split_id,
            threshold=threshold,
            count=count,
            secret_length=len(raw),
            share_commitments=tuple(share_commitments),
            secret_commitment=_secret_commitment(split_id, salted),
        )
    finally:
        for coefficient in coefficients:
            coefficient[:] = bytes(len(coefficient))
    return shares, commitments


def _check_membership(share: Share, commitments: SplitCommitments) -> None:
    """Step 1 of combine for one share: it claims to belong to this split."""
    index = share.index
    if share.split_id != commitments.split_id:
        raise ShareError(
            f"share {index} belongs to split {share.split_id.hex()}, "
            f"not {commitments.split_id.hex()}",
            index=index,
        )
    if share.threshold != commitments.threshold:
        raise ShareError(
            f"share {index} says threshold {share.threshold}, "
            f"the split's threshold is {commitments.threshold}",
            index=index,
        )
    if index > commitments.count:
        raise ShareError(
            f"share index {index} is beyond the split's {commitments.count} shares",
            index=index,
        )
    if share.value.wiped:
        raise ShareError(f"share {index} was wiped", index=index)
    if len(share.value) != commitments.value_length:
        raise ShareError(
            f"share {index} holds {len(share.value)} bytes, this split's shares hold "
            f"{commitments.value_length} (32-byte salt + {commitments.secret_length}-byte secret)",
            index=index,
        )


def _check_commitment(share: Share, commitments: SplitCommitments) -> None:
    """Step 4 of combine for one share: its value is the one committed at split time."""
    index = share.index
    expected = commitments.share_commitments[index - 1]
    actual = _share_commitment(
        commitments.split_id, commitments.threshold, commitments.count, index, share.value.view()
    )
    if not hmac.compare_digest(expected, actual):
        raise ShareError(
            f"share {index} does not match its commitment: altered, corrupted or forged",
            index=index,
        )


def verify_share(share: Share, commitments: SplitCommitments) -> None:
    """Check one share against its split on its own; raise ShareError naming its index."""
    if not isinstance(share, Share):
        raise InvalidInputError("expected a Share")
    if not isinstance(commitments, SplitCommitments):
        raise InvalidInputError("expected SplitCommitments")
    _check_membership(share, commitments)
    _check_commitment(share, commitments)


def combine(shares: Sequence[Share], commitments: SplitCommitments) -> SecretBytes:
    """Rebuild the secret from at least `threshold` shares of one split.

    Steps, each raising before anything is interpolated:
    0. arguments are Shares and SplitCommitments (InvalidInputError);
    1. each share is of this split: split id, threshold, index <= count,
       value length (ShareError naming the index);
    2. no index appears twice (ShareError naming it);
    3. at least `threshold` distinct shares (ThresholdError);
    4. each share matches its own commitment (ShareError naming the index);
    5. Lagrange interpolation at x = 0 over the `threshold` lowest indices;
    6. the result matches the secret commitment (CommitmentError).
    """
    # 0. argument types
    if not isinstance(commitments, SplitCommitments):
        raise InvalidInputError("commitments must be SplitCommitments")
    given = list(shares)
    for position, share in enumerate(given):
        if not isinstance(share, Share):
            raise InvalidInputError(f"item {position} of shares is not a Share")
    # 1. membership of the split
    for share in given:
        _check_membership(share, commitments)
    # 2. distinct indices
    seen: set[int] = set()
    for share in given:
        if share.index in seen:
            raise ShareError(f"share index {share.index} is given twice", index=share.index)
        seen.add(share.index)
    # 3. threshold
    if len(given) < commitments.threshold:
        raise ThresholdError(
            f"{len(given)} distinct shares given, the split needs {commitments.threshold}"
        )
    # 4. per-share commitments
    for share in given:
        _check_commitment(share, commitments)
    # 5. interpolation
    chosen = sorted(given, key=lambda s: s.index)[: commitments.threshold]
    salted = gf256.interpolate([(s.index, s.value.view()) for s in chosen], 0)
    try:
        # 6. secret commitment
        actual = _secret_commitment(commitments.split_id, salted)
        if not hmac.compare_digest(actual, commitments.secret_commitment):
            raise CommitmentError(
                "the shares are each valid but rebuild a secret that does not match the "
                "secret commitment: the commitments are inconsistent"
            )
        return SecretBytes.adopt(salted[SALT_SIZE:], label="secret")
    finally:
        salted[:] = bytes(len(salted))
