"""Key derivation: HKDF-SHA256 (RFC 5869) and Argon2id (RFC 9106).

Both return `SecretBytes` derived straight into a fresh buffer. Argon2id
parameters are a frozen `Argon2Params` whose constructor refuses anything
weaker than RFC 9106's second recommended option (section 4: t=3, p=4,
m=64 MiB), so a weak setting cannot be chosen by accident, nor read from a
file an attacker rewrote (a downgrade). Tests that need fast derivation
use `Argon2Params.insecure_for_tests(...)`, which marks the result so that
parsers refuse it unless told otherwise.

Lanes are bounded but have no floor beyond the RFC's lanes >= 1: they set
how many threads may fill memory in parallel, not how much memory-time an
attacker must spend per guess, which is what time cost and memory set.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from keyquorum.quorum.errors import InvalidInputError
from keyquorum.quorum.secret import SecretBytes

HKDF_SHA256_MAX_LENGTH = 255 * 32  # RFC 5869, section 2.3: L <= 255 * HashLen

MIN_TIME_COST = 3  # RFC 9106, section 4, second recommended option
MIN_MEMORY_KIB = 64 * 1024
DEFAULT_LANES = 4
MAX_TIME_COST = 64
MAX_MEMORY_KIB = 4 * 1024 * 1024  # 4 GiB: a file cannot make unlock exhaust memory
MAX_LANES = 64
MIN_SALT = 16  # RFC 9106, section 3.1: 128 bits is recommended for password hashing
MAX_SALT = 64
ARGON2_KEY_LENGTH = 32

SecretInput = SecretBytes | bytes | bytearray


@dataclass(frozen=True)
class Argon2Params:
    """Argon2id cost parameters; the defaults are the floor (RFC 9106, section 4).

    `Argon2Params()` and `Argon2Params(t, m, p)` refuse weaker settings;
    `insecure` is True only for objects made by `insecure_for_tests`.
    """

    time_cost: int = MIN_TIME_COST
    memory_kib: int = MIN_MEMORY_KIB
    lanes: int = DEFAULT_LANES
    insecure: bool = field(default=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("time_cost", "memory_kib", "lanes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise InvalidInputError(f"Argon2id {name} must be an int")
        if not 1 <= self.lanes <= MAX_LANES:
            raise InvalidInputError(f"Argon2id lanes must be 1..{MAX_LANES}, got {self.lanes}")
        if not 1 <= self.time_cost <= MAX_TIME_COST:
            raise InvalidInputError(
                f"Argon2id time cost must be 1..{MAX_TIME_COST}, got {self.time_cost}"
            )
        if not 8 * self.lanes <= self.memory_kib <= MAX_MEMORY_KIB:
            # RFC 9106, section 3.1: m >= 8 * p.
            raise InvalidInputError(
                f"Argon2id memory must be {8 * self.lanes}..{MAX_MEMORY_KIB} KiB "
                f"for {self.lanes} lanes, got {self.memory_kib}"
            )
        if not self.insecure and not self.meets_minimum():
            raise InvalidInputError(
                f"Argon2id parameters t={self.time_cost}, m={self.memory_kib} KiB are below "
                f"the minimum t={MIN_TIME_COST}, m={MIN_MEMORY_KIB} KiB (RFC 9106, section 4)"
            )

    def meets_minimum(self) -> bool:
        return self.time_cost >= MIN_TIME_COST and self.memory_kib >= MIN_MEMORY_KIB

    @classmethod
    def insecure_for_tests(
        cls, time_cost: int = 1, memory_kib: int = 64, lanes: int = 1
    ) -> Argon2Params:
        """Cheap parameters for tests only; credential parsers refuse them by default."""
        return cls(time_cost, memory_kib, lanes, insecure=True)


def argon2id(
    passphrase: SecretInput, *, salt: bytes, params: Argon2Params, length: int = ARGON2_KEY_LENGTH
) -> SecretBytes:
    """Argon2id (RFC 9106, section 3) of `passphrase` into a fresh SecretBytes."""
    if not isinstance(passphrase, SecretBytes | bytes | bytearray):
        raise InvalidInputError("passphrase must be SecretBytes or bytes")
    if len(passphrase) == 0:
        raise InvalidInputError("passphrase must not be empty")
    if not isinstance(params, Argon2Params):
        raise InvalidInputError("params must be Argon2Params")
    if not isinstance(salt, bytes) or not MIN_SALT <= len(salt) <= MAX_SALT:
        raise InvalidInputError(f"Argon2id salt must be {MIN_SALT}..{MAX_SALT} bytes")
    if not isinstance(length, int) or not 16 <= length <= 64:
        raise InvalidInputError("Argon2id output length must be 16..64 bytes")
    kdf = Argon2id(
        salt=salt,
        length=length,
        iterations=params.time_cost,
        lanes=params.lanes,
        memory_cost=params.memory_kib,
    )
    out = bytearray(length)
    # The library takes the password as bytes: one short-lived immutable copy.
    secret = passphrase.reveal() if isinstance(passphrase, SecretBytes) else bytes(passphrase)
    kdf.derive_into(secret, out)
    return SecretBytes.adopt(out, label="argon2id key")


def hkdf_sha256(ikm: SecretInput, *, salt: bytes | None, info: bytes, length: int) -> SecretBytes:
    """HKDF-SHA256 extract-and-expand (RFC 5869, section 2) into a fresh SecretBytes.

    `salt=None` means the RFC's default salt of HashLen zero bytes.
    """
    if not isinstance(ikm, SecretBytes | bytes | bytearray):
        raise InvalidInputError("HKDF input key material must be SecretBytes or bytes")
    if len(ikm) == 0:
        raise InvalidInputError("HKDF input key material must not be empty")
    if salt is not None and not isinstance(salt, bytes):
        raise InvalidInputError("HKDF salt must be bytes or None")
    if not isinstance(info, bytes):
        raise InvalidInputError("HKDF info must be bytes")
    if not isinstance(length, int) or isinstance(length, bool):
        raise InvalidInputError("HKDF output length must be an int")
    if not 1 <= length <= HKDF_SHA256_MAX_LENGTH:
        raise InvalidInputError(
            f"HKDF-SHA256 output length must be 1..{HKDF_SHA256_MAX_LENGTH}, got {length}"
        )
    out = bytearray(length)
    material = ikm.view() if isinstance(ikm, SecretBytes) else memoryview(ikm)
    HKDF(hashes.SHA256(), length, salt, info).derive_into(material, out)
    return SecretBytes.adopt(out, label="hkdf output")
