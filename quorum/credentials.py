"""Custodian credentials: the private file a custodian keeps, the public one they share.

A `CustodianCredential` is a name, a hybrid signing key
(`signatures.HybridSigningKey`) and an HPKE sealing key
(`sealing.SealingPrivateKey`). It lives on the custodian's machine in a
file encrypted under their passphrase; its `PublicCredential` goes into
the log's roster and is named by its `fingerprint`.

Private file, version 1 (all integers big-endian):

    magic       6   b"KQCRED"
    version     1   1
    time_cost   4   Argon2id t  (RFC 9106, section 3.1)
    memory_kib  4   Argon2id m
    lanes       1   Argon2id p
    salt_len    1   16..64
    salt        salt_len
    nonce       12  AES-256-GCM nonce (NIST SP 800-38D, section 8.2.2)
    name_len    1   1..255
    name        name_len bytes of UTF-8
    ciphertext  176 AES-256-GCM(Argon2id(passphrase, salt), nonce,
                    signing seeds (64) || sealing seeds (96), aad=header)
    checksum    32  SHA-256 of every byte before it

The header (magic to name) is the associated data, so parameters, salt
and name cannot be changed without the AEAD noticing. The checksum is
not a MAC; it exists so that accidental damage ("file is corrupted") is
told apart from a wrong passphrase (`WrongPassphraseError`). The magic,
version byte and trailing checksum frame every version, so the checksum
is checked before the version is read: a flipped version bit is damage,
an intact file of a later version is `UnsupportedVersionError`.

Argon2id parameters below RFC 9106's second recommended option (t=3,
p=4, m=64 MiB; see `kdf.Argon2Params`) are refused when reading a file,
not only when writing one, so a rewritten file cannot downgrade the
work an attacker must do per guess. Tests open fast-parameter files with
`allow_insecure_params=True`.

Public file: RFC 8785 canonical JSON (`canonical.py`):
`{"format": "keyquorum/public-credential", "version": 1, "name": ...,
"verify_key": {"ed25519": hex, "ml_dsa_65": hex}, "sealing_key": hex}`.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn

from keyquorum.quorum import aead, canonical, people
from keyquorum.quorum.errors import (
    DecryptionError,
    DeserializationError,
    InvalidInputError,
    UnsupportedVersionError,
    WrongPassphraseError,
)
from keyquorum.quorum.kdf import MAX_SALT, MIN_SALT, Argon2Params, argon2id
from keyquorum.quorum.sealing import SEEDS_SIZE as SEALING_SEEDS_SIZE
from keyquorum.quorum.sealing import SealingPrivateKey, SealingPublicKey
from keyquorum.quorum.secret import SecretBytes
from keyquorum.quorum.signatures import SEEDS_SIZE as SIGNING_SEEDS_SIZE
from keyquorum.quorum.signatures import HybridSignature, HybridSigningKey, HybridVerifyKey

MAGIC = b"KQCRED"
VERSION = 1
SALT_SIZE = 16  # RFC 9106, section 3.1: 128-bit salt
CHECKSUM_SIZE = 32
PLAINTEXT_SIZE = SIGNING_SEEDS_SIZE + SEALING_SEEDS_SIZE
CIPHERTEXT_SIZE = PLAINTEXT_SIZE + aead.TAG_SIZE
MAX_NAME = 64  # characters
MAX_NAME_BYTES = 255
MAX_FILE = 1024
MAX_PUBLIC_FILE = 16 * 1024

PUBLIC_FORMAT = "keyquorum/public-credential"
PUBLIC_VERSION = 1

_PARAMS = struct.Struct(">IIB")  # time_cost, memory_kib, lanes
_FRAME = len(MAGIC) + 1 + CHECKSUM_SIZE

Passphrase = SecretBytes | bytes | bytearray


def check_name(name: object) -> str:
    """A custodian name: 1..64 printable characters, NFC, no outer whitespace.

    Names are shown in statements and read aloud, so one name has one
    encoding (Unicode NFC) and contains no control or line-break character.
    """
    if not isinstance(name, str):
        raise InvalidInputError("custodian name must be a str")
    if not 1 <= len(name) <= MAX_NAME:
        raise InvalidInputError(f"custodian name must be 1..{MAX_NAME} characters")
    if not name.isprintable():
        raise InvalidInputError("custodian name must be printable (no control characters)")
    if name != name.strip():
        raise InvalidInputError("custodian name must not start or end with whitespace")
    if unicodedata.normalize("NFC", name) != name:
        raise InvalidInputError("custodian name must be in Unicode NFC form")
    if len(name.encode("utf-8")) > MAX_NAME_BYTES:
        raise InvalidInputError(f"custodian name must be at most {MAX_NAME_BYTES} bytes of UTF-8")
    return name


# --- public credential -----------------------------------------------------


@dataclass(frozen=True, repr=False)
class PublicCredential:
    """What a custodian shares: name, verify key, sealing key (public, immutable)."""

    name: str
    verify_key: HybridVerifyKey
    sealing_key: SealingPublicKey
    _encoded: bytes = field(init=False, compare=False)

    def __post_init__(self) -> None:
        check_name(self.name)
        if not isinstance(self.verify_key, HybridVerifyKey):
            raise InvalidInputError("verify_key must be a HybridVerifyKey")
        if not isinstance(self.sealing_key, SealingPublicKey):
            raise InvalidInputError("sealing_key must be a SealingPublicKey")
        object.__setattr__(self, "_encoded", canonical.encode(self.to_json()))

    def to_json(self) -> dict[str, Any]:
        """The JSON object of the public file; the log's roster holds this."""
        return {
            "format": PUBLIC_FORMAT,
            "version": PUBLIC_VERSION,
            "name": self.name,
            "verify_key": self.verify_key.to_json(),
            "sealing_key": self.sealing_key.to_bytes().hex(),
        }

    @classmethod
    def from_json(cls, value: object) -> PublicCredential:
        if not isinstance(value, dict):
            raise DeserializationError("public credential: expected a JSON object")
        if value.get("format") != PUBLIC_FORMAT:
            raise DeserializationError(f"public credential: format must be {PUBLIC_FORMAT!r}")
        version = value.get("version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise DeserializationError("public credential: version must be an integer")
        if version != PUBLIC_VERSION:
            raise UnsupportedVersionError(
                f"public credential version {version} is not supported (expected {PUBLIC_VERSION})"
            )
        expected = {"format", "version", "name", "verify_key", "sealing_key"}
        if set(value) != expected:
            raise DeserializationError(
                f"public credential: expected fields {sorted(expected)}, "
                f"got {sorted(map(str, value))}"
            )
        try:
            name = check_name(value["name"])
        except InvalidInputError as e:
            raise DeserializationError(f"public credential: {e}") from e
        verify_key = HybridVerifyKey.from_json(value["verify_key"])
        raw = canonical.hex_bytes(value["sealing_key"], field="sealing_key")
        sealing_key = SealingPublicKey.from_bytes(raw)
        return cls(name, verify_key, sealing_key)

    def to_bytes(self) -> bytes:
        """The public file: the RFC 8785 bytes of `to_json()`."""
        return self._encoded

    @classmethod
    def from_bytes(cls, data: bytes) -> PublicCredential:
        if not isinstance(data, bytes):
            raise DeserializationError("public credential file must be bytes")
        if len(data) > MAX_PUBLIC_FILE:
            raise DeserializationError(
                f"public credential file too large: {len(data)} > {MAX_PUBLIC_FILE} bytes"
            )
        # Checked here rather than left to the JSON parser, whose
        # UnicodeDecodeError would keep the whole input in the error chain.
        bad_byte = _first_non_utf8(data)
        if bad_byte is not None:
            raise DeserializationError(f"public credential file is not UTF-8 (byte {bad_byte})")
        return cls.from_json(canonical.decode(data))

    @property
    def fingerprint(self) -> str:
        """Hex SHA-256 of the canonical public JSON: the custodian's id in the log."""
        return hashlib.sha256(self._encoded).hexdigest()

    @property
    def short_fingerprint(self) -> str:
        """The first 80 bits of the fingerprint as 4 groups of 4 base32 characters.

        Read aloud at the ceremony to compare files ("ABCD-EFGH-IJKL-MNOP"),
        and the one form people see everywhere after (`people.py`). Base32
        (RFC 4648, section 6) avoids 0/O and 1/I/L confusion.
        """
        return people.display_fingerprint(self.fingerprint)

    @property
    def label(self) -> str:
        """`alice (FKAO-JAYM-D5SP-FPYZ)`: how people see this custodian (`people.label`)."""
        return people.label(self.name, self.fingerprint)

    def __repr__(self) -> str:
        return f"<PublicCredential {self.name!r} {self.short_fingerprint}>"


# --- private credential ----------------------------------------------------


class CustodianCredential:
    """A custodian's private keys (opaque: never prints, pickles or copies)."""

    __slots__ = ("_name", "_public", "_sealing", "_signing")

    _name: str
    _signing: HybridSigningKey
    _sealing: SealingPrivateKey
    _public: PublicCredential

    def __init__(
        self, name: str, signing_key: HybridSigningKey, sealing_key: SealingPrivateKey
    ) -> None:
        if not isinstance(signing_key, HybridSigningKey):
            raise InvalidInputError("signing_key must be a HybridSigningKey")
        if not isinstance(sealing_key, SealingPrivateKey):
            raise InvalidInputError("sealing_key must be a SealingPrivateKey")
        self._name = check_name(name)
        self._signing = signing_key
        self._sealing = sealing_key
        self._public = PublicCredential(
            self._name, signing_key.verify_key(), sealing_key.public_key()
        )

    @classmethod
    def generate(
        cls, name: str, *, random_bytes: Callable[[int], bytes] = secrets.token_bytes
    ) -> CustodianCredential:
        """A new credential with fresh keys."""
        check_name(name)
        return cls(
            name,
            HybridSigningKey.generate(random_bytes=random_bytes),
            SealingPrivateKey.generate(random_bytes=random_bytes),
        )

    @property
    def name(self) -> str:
        return self._name

    @property
    def fingerprint(self) -> str:
        return self._public.fingerprint

    def public(self) -> PublicCredential:
        return self._public

    def sign(self, domain: str, message: bytes) -> HybridSignature:
        """Hybrid signature of `message` in `domain` (see signatures.py)."""
        return self._signing.sign(domain, message)

    def open_sealed(self, ciphertext: bytes, info: bytes) -> SecretBytes:
        """Open an HPKE ciphertext sealed to this credential (see sealing.py)."""
        return self._sealing.open(ciphertext, info)

    def encrypt(
        self,
        passphrase: Passphrase,
        *,
        params: Argon2Params | None = None,
        random_bytes: Callable[[int], bytes] = secrets.token_bytes,
    ) -> bytes:
        """The private file (version 1) under `passphrase`; the passphrase is not kept."""
        params = Argon2Params() if params is None else params
        if not isinstance(params, Argon2Params):
            raise InvalidInputError("params must be Argon2Params")
        salt = random_bytes(SALT_SIZE)
        nonce = random_bytes(aead.NONCE_SIZE)
        if not isinstance(salt, bytes) or len(salt) != SALT_SIZE:
            raise InvalidInputError(f"random_bytes must return {SALT_SIZE} bytes")
        if not isinstance(nonce, bytes) or len(nonce) != aead.NONCE_SIZE:
            raise InvalidInputError(f"random_bytes must return {aead.NONCE_SIZE} bytes")
        header = _header(params, salt, nonce, self._name)
        with (
            argon2id(passphrase, salt=salt, params=params) as key,
            self._signing.seeds() as signing,
            self._sealing.seeds() as sealing,
        ):
            buf = bytearray(signing.view())
            buf += sealing.view()
            with SecretBytes.adopt(buf, label="credential plaintext") as plaintext:
                ciphertext = aead.encrypt(key, nonce, plaintext.view(), header)
        body = header + ciphertext
        return body + hashlib.sha256(body).digest()

    @classmethod
    def decrypt(
        cls, data: bytes, passphrase: Passphrase, *, allow_insecure_params: bool = False
    ) -> CustodianCredential:
        """Open a private file; see the module docstring for the checks and their errors."""
        # 0. Frame: bytes, size, magic.
        if not isinstance(data, bytes | bytearray):
            raise InvalidInputError("credential file must be bytes")
        data = bytes(data)
        if len(data) > MAX_FILE:
            raise DeserializationError(f"credential file too large: {len(data)} > {MAX_FILE} bytes")
        if len(data) < _FRAME:
            raise DeserializationError(
                f"credential file is truncated: {len(data)} bytes is shorter than any version"
            )
        if data[: len(MAGIC)] != MAGIC:
            raise DeserializationError(
                "not a keyquorum credential file: wrong magic bytes "
                "(another format, or the file is corrupted)"
            )
        # 1. Checksum over everything before it, before any field is trusted.
        body, checksum = data[:-CHECKSUM_SIZE], data[-CHECKSUM_SIZE:]
        if not hmac.compare_digest(hashlib.sha256(body).digest(), checksum):
            expected = _v1_length(data)
            if len(data) < expected:
                raise DeserializationError(
                    f"credential file is corrupted: truncated ({len(data)} of {expected} bytes)"
                )
            raise DeserializationError("credential file is corrupted (checksum mismatch)")
        # 2. Version.
        version = data[len(MAGIC)]
        if version != VERSION:
            raise UnsupportedVersionError(
                f"credential file version {version} is not supported (this build reads {VERSION})"
            )
        # 3. Version 1 layout, exact length.
        params, salt, nonce, name, header_end = _parse_v1_header(body, allow_insecure_params)
        ciphertext = body[header_end:]
        if len(ciphertext) != CIPHERTEXT_SIZE:
            raise DeserializationError(
                f"credential file is corrupted: ciphertext is {len(ciphertext)} bytes, "
                f"expected {CIPHERTEXT_SIZE}"
            )
        # 4. Passphrase: Argon2id, then the AEAD with the header as associated data.
        with argon2id(passphrase, salt=salt, params=params) as key:
            try:
                plain = aead.decrypt(key, nonce, ciphertext, body[:header_end])
            except DecryptionError as e:
                raise WrongPassphraseError(f"wrong passphrase for credential {name!r}") from e
        # 5. Keys from the seeds.
        with (
            SecretBytes.adopt(plain, label="credential plaintext") as seeds,
            SecretBytes(seeds.view()[:SIGNING_SEEDS_SIZE], label="signing seeds") as signing,
            SecretBytes(seeds.view()[SIGNING_SEEDS_SIZE:], label="sealing seeds") as sealing,
        ):
            return cls(
                name, HybridSigningKey.from_seeds(signing), SealingPrivateKey.from_seeds(sealing)
            )

    def __repr__(self) -> str:
        return f"<CustodianCredential {self._name!r} {self._public.short_fingerprint}>"

    __str__ = __repr__

    def __reduce__(self) -> NoReturn:
        raise TypeError("CustodianCredential cannot be pickled")

    def __copy__(self) -> NoReturn:
        raise TypeError("CustodianCredential cannot be copied")

    def __deepcopy__(self, memo: object) -> NoReturn:
        raise TypeError("CustodianCredential cannot be copied")


def _first_non_utf8(data: bytes) -> int | None:
    """Offset of the first byte that is not valid UTF-8, or None."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start
    return None


def _header(params: Argon2Params, salt: bytes, nonce: bytes, name: str) -> bytes:
    encoded = name.encode("utf-8")
    return b"".join(
        [
            MAGIC,
            bytes([VERSION]),
            _PARAMS.pack(params.time_cost, params.memory_kib, params.lanes),
            bytes([len(salt)]),
            salt,
            nonce,
            bytes([len(encoded)]),
            encoded,
        ]
    )


def _v1_length(data: bytes) -> int:
    """The length a version 1 file with this header has (a lower bound while the
    header itself is cut short), to tell a truncated file from a damaged one."""
    tail = CIPHERTEXT_SIZE + CHECKSUM_SIZE
    pos = len(MAGIC) + 1 + _PARAMS.size
    if len(data) <= pos:
        return pos + 1 + MIN_SALT + aead.NONCE_SIZE + 2 + tail
    pos += 1 + data[pos] + aead.NONCE_SIZE
    if len(data) <= pos:
        return pos + 2 + tail
    return pos + 1 + data[pos] + tail


def _parse_v1_header(
    body: bytes, allow_insecure_params: bool
) -> tuple[Argon2Params, bytes, bytes, str, int]:
    """Fields of a version 1 header whose checksum matched; offsets checked first."""
    pos = len(MAGIC) + 1
    if len(body) < pos + _PARAMS.size + 1:
        raise DeserializationError("credential file is corrupted: header is truncated")
    time_cost, memory_kib, lanes = _PARAMS.unpack_from(body, pos)
    pos += _PARAMS.size
    salt_len = body[pos]
    pos += 1
    if not MIN_SALT <= salt_len <= MAX_SALT:
        raise DeserializationError(
            f"credential file: salt must be {MIN_SALT}..{MAX_SALT} bytes, got {salt_len}"
        )
    if len(body) < pos + salt_len + aead.NONCE_SIZE + 1:
        raise DeserializationError("credential file is corrupted: header is truncated")
    salt = body[pos : pos + salt_len]
    pos += salt_len
    nonce = body[pos : pos + aead.NONCE_SIZE]
    pos += aead.NONCE_SIZE
    name_len = body[pos]
    pos += 1
    if len(body) < pos + name_len:
        raise DeserializationError("credential file is corrupted: header is truncated")
    try:
        name = check_name(body[pos : pos + name_len].decode("utf-8"))
    except (UnicodeDecodeError, InvalidInputError) as e:
        raise DeserializationError(f"credential file: bad custodian name: {e}") from e
    pos += name_len
    params = _read_params(time_cost, memory_kib, lanes, allow_insecure_params)
    return params, salt, nonce, name, pos


def _read_params(
    time_cost: int, memory_kib: int, lanes: int, allow_insecure_params: bool
) -> Argon2Params:
    try:
        return Argon2Params(time_cost, memory_kib, lanes)
    except InvalidInputError as e:
        if allow_insecure_params:
            try:
                return Argon2Params.insecure_for_tests(time_cost, memory_kib, lanes)
            except InvalidInputError as e2:
                raise DeserializationError(f"credential file: {e2}") from e2
        raise DeserializationError(
            f"credential file: {e}; refusing to unlock with weaker parameters (downgrade)"
        ) from e
