"""No private seed, share or passphrase in any repr, str or error message.

Every object that signatures.py, sealing.py, kdf.py and credentials.py
define, and every exception they raise on bad input, is formatted every
way Python formats things (repr, str, f-string, %-format, inside
containers, tracebacks with their causes), and the text is searched for
the secrets in raw, escaped, hex, base64 and base32 form, including any
8-byte piece of them. The checker is itself tested on deliberately leaky
classes, so a leaky `__repr__` added later makes this file fail.
"""

from __future__ import annotations

import base64
import traceback
from collections.abc import Callable, Iterator

import pytest

from keyquorum.quorum import credentials as cr
from keyquorum.quorum import kdf
from keyquorum.quorum import sealing as sl
from keyquorum.quorum import signatures as sg
from keyquorum.quorum.errors import KeyquorumError
from keyquorum.quorum.secret import SecretBytes

PASSPHRASE = b"leak test: purple elephant 4417"
SIGNING_SEEDS = bytes((7 * i + 3) % 256 for i in range(sg.SEEDS_SIZE))
SEALING_SEEDS = bytes((11 * i + 5) % 256 for i in range(sl.SEEDS_SIZE))
SHARE = bytes((13 * i + 1) % 256 for i in range(33))
WINDOW = 8


def _randomness() -> Callable[[int], bytes]:
    queue = [SIGNING_SEEDS, SEALING_SEEDS, bytes(range(16)), bytes(12)]

    def random_bytes(n: int) -> bytes:
        out = queue.pop(0)
        assert len(out) == n
        return out

    return random_bytes


CRED = cr.CustodianCredential.generate("leak-test", random_bytes=_randomness())
FAST = kdf.Argon2Params.insecure_for_tests()
FILE = CRED.encrypt(PASSPHRASE, params=FAST)
SEALED_SHARE = CRED.public().sealing_key.seal(SHARE, b"share-info")
SECRETS = {
    "signing seeds": SIGNING_SEEDS,
    "sealing seeds": SEALING_SEEDS,
    "share": SHARE,
    "passphrase": PASSPHRASE,
}


# --- the checker -------------------------------------------------------------


def _forms(secret: bytes) -> Iterator[str]:
    """Every way a piece of `secret` could show up in text."""
    for i in range(len(secret) - WINDOW + 1):
        piece = secret[i : i + WINDOW]
        yield piece.hex()
        yield piece.hex().upper()
        yield piece.decode("latin-1")
        yield repr(piece)[2:-1]
    for shift in range(3):
        for encoder in (base64.b64encode, base64.urlsafe_b64encode):
            encoded = encoder(secret[shift:]).decode().rstrip("=")
            for i in range(0, len(encoded) - 12, 4):
                yield encoded[i : i + 12]
    for shift in range(5):
        encoded = base64.b32encode(secret[shift:]).decode().rstrip("=")
        for i in range(0, len(encoded) - 16, 8):
            yield encoded[i : i + 16]


FORMS = {name: set(_forms(value)) for name, value in SECRETS.items()}


def assert_no_secret(text: str, forms: dict[str, set[str]] = FORMS) -> None:
    """Fail naming the secret if any of its forms appears in `text`."""
    for name, candidates in forms.items():
        for form in candidates:
            assert form not in text, f"{name} appears in {text[:200]!r}"


def _renderings(obj: object) -> Iterator[str]:
    yield repr(obj)
    yield str(obj)
    yield f"{obj}"
    yield f"{obj!r}"
    yield "%r" % (obj,)  # noqa: UP031 - %-formatting is one of the ways to test
    yield "%s" % (obj,)  # noqa: UP031
    yield str([obj])
    yield str((obj,))
    yield str({"k": obj})
    yield repr({"k": [obj]})
    if isinstance(obj, BaseException):
        yield str(obj.args)
        yield "".join(traceback.format_exception(obj))
        yield "".join(traceback.format_exception_only(obj))


def assert_renders_no_secret(obj: object) -> None:
    for text in _renderings(obj):
        assert_no_secret(text)


# --- the checker catches leaks -----------------------------------------------


class _LeakyHex:
    __slots__ = ()

    def __repr__(self) -> str:
        return f"<Key {SIGNING_SEEDS[10:20].hex()}>"


class _LeakyBase64:
    __slots__ = ()

    def __str__(self) -> str:
        return base64.b64encode(SEALING_SEEDS).decode()


class _LeakyBytes:
    __slots__ = ("seed",)

    def __init__(self) -> None:
        self.seed = SHARE

    def __repr__(self) -> str:
        return f"_LeakyBytes(seed={self.seed!r})"


class _LeakyPassphraseError(Exception):
    def __init__(self) -> None:
        super().__init__("bad passphrase " + PASSPHRASE.decode())


class _LeakyCauseError(KeyquorumError):
    pass


def _leaky_cause() -> BaseException:
    try:
        try:
            raise ValueError(SIGNING_SEEDS[32:].hex().upper())
        except ValueError as e:
            raise _LeakyCauseError("harmless message") from e
    except _LeakyCauseError as outer:
        return outer


@pytest.mark.parametrize(
    "leaky",
    [_LeakyHex(), _LeakyBase64(), _LeakyBytes(), _LeakyPassphraseError(), _leaky_cause()],
    ids=["hex-repr", "base64-str", "bytes-repr", "passphrase-in-message", "secret-in-cause"],
)
def test_checker_catches_a_leaky_object(leaky: object) -> None:
    with pytest.raises(AssertionError, match="appears in"):
        assert_renders_no_secret(leaky)


def test_checker_passes_a_clean_object() -> None:
    assert_renders_no_secret(object())
    assert_renders_no_secret(SecretBytes(PASSPHRASE))


# --- every object we define ------------------------------------------------


def _objects() -> dict[str, object]:
    opened = cr.CustodianCredential.decrypt(FILE, PASSPHRASE, allow_insecure_params=True)
    return {
        "credential": CRED,
        "opened credential": opened,
        "public credential": CRED.public(),
        "signing key": CRED._signing,
        "verify key": CRED.public().verify_key,
        "signature": CRED.sign("approve", b"m"),
        "sealing private key": CRED._sealing,
        "sealing public key": CRED.public().sealing_key,
        "signing seeds": CRED._signing.seeds(),
        "sealing seeds": CRED._sealing.seeds(),
        "opened share": CRED.open_sealed(SEALED_SHARE, b"share-info"),
        "passphrase holder": SecretBytes(PASSPHRASE, label="passphrase"),
        "argon2id key": kdf.argon2id(PASSPHRASE, salt=bytes(16), params=FAST),
        "hkdf output": kdf.hkdf_sha256(SHARE, salt=None, info=b"i", length=32),
        "argon2 params": kdf.Argon2Params(),
    }


def test_fixture_holds_the_known_secrets() -> None:
    # Otherwise the search below would look for the wrong bytes.
    with CRED._signing.seeds() as s, CRED._sealing.seeds() as t:
        assert s.equals(SIGNING_SEEDS)
        assert t.equals(SEALING_SEEDS)
    with CRED.open_sealed(SEALED_SHARE, b"share-info") as share:
        assert share.equals(SHARE)


@pytest.mark.parametrize("name", list(_objects()), ids=str)
def test_object_renders_no_secret(name: str) -> None:
    assert_renders_no_secret(_objects()[name])


def test_all_objects_together() -> None:
    assert_no_secret(str(list(_objects().values())))
    assert_no_secret(repr(_objects()))


def test_files_hold_no_secret_in_the_clear() -> None:
    for data in (FILE, CRED.public().to_bytes()):
        assert_no_secret(data.decode("latin-1"))
        for value in SECRETS.values():
            assert value[:WINDOW] not in data


# --- every error the negative paths raise ------------------------------------


def _flip(data: bytes, index: int) -> bytes:
    out = bytearray(data)
    out[index] ^= 1
    return bytes(out)


NEGATIVE: dict[str, Callable[[], object]] = {
    "wrong passphrase": lambda: cr.CustodianCredential.decrypt(
        FILE, PASSPHRASE + b"!", allow_insecure_params=True
    ),
    "corrupted file": lambda: cr.CustodianCredential.decrypt(
        _flip(FILE, 100), PASSPHRASE, allow_insecure_params=True
    ),
    "truncated file": lambda: cr.CustodianCredential.decrypt(FILE[:-1], PASSPHRASE),
    "downgrade": lambda: cr.CustodianCredential.decrypt(FILE, PASSPHRASE),
    "wrong magic": lambda: cr.CustodianCredential.decrypt(b"X" + FILE[1:], PASSPHRASE),
    "empty passphrase": lambda: cr.CustodianCredential.decrypt(
        FILE, b"", allow_insecure_params=True
    ),
    "seal open wrong info": lambda: CRED.open_sealed(SEALED_SHARE, b"other"),
    "seal open flipped": lambda: CRED.open_sealed(_flip(SEALED_SHARE, 1150), b"share-info"),
    "seal open too short": lambda: CRED.open_sealed(SEALED_SHARE[:100], b"share-info"),
    "signing seeds too long": lambda: sg.HybridSigningKey.from_seeds(SIGNING_SEEDS + b"\0"),
    "signing seeds too short": lambda: sg.HybridSigningKey.from_seeds(SIGNING_SEEDS[:-1]),
    "sealing seeds too long": lambda: sl.SealingPrivateKey.from_seeds(SEALING_SEEDS + b"\0"),
    "ed25519 seed too short": lambda: sg.sign_ed25519_from_seed(SIGNING_SEEDS[:31], b"m"),
    "mldsa seed too long": lambda: sg.sign_mldsa65_from_seed(SIGNING_SEEDS[:33], b"m", b""),
    "seed as signature hex": lambda: sg.HybridSignature.from_hex(SIGNING_SEEDS.hex()),
    "seed as signature bytes": lambda: sg.HybridSignature.from_bytes(SIGNING_SEEDS),
    "seed as verify key": lambda: sg.HybridVerifyKey.from_json(
        {"ed25519": SIGNING_SEEDS.hex(), "ml_dsa_65": SEALING_SEEDS.hex()}
    ),
    "seed as sealing key": lambda: sl.SealingPublicKey.from_bytes(SEALING_SEEDS),
    "share as public file": lambda: cr.PublicCredential.from_bytes(SHARE),
    "passphrase as name": lambda: cr.check_name(PASSPHRASE.decode() + "\n"),
    "passphrase as domain": lambda: CRED.sign(PASSPHRASE.decode(), b"m"),
    "bad signature": lambda: CRED.public().verify_key.verify(
        "approve", SHARE, CRED.sign("approve", b"m")
    ),
    "argon2id short salt": lambda: kdf.argon2id(PASSPHRASE, salt=SHARE[:8], params=FAST),
    "hkdf too long": lambda: kdf.hkdf_sha256(SHARE, salt=None, info=b"", length=9000),
}


def _raised(call: Callable[[], object]) -> BaseException:
    try:
        call()
    except KeyquorumError as e:
        return e
    raise AssertionError("expected a KeyquorumError")


@pytest.mark.parametrize("case", list(NEGATIVE), ids=str)
def test_error_renders_no_secret(case: str) -> None:
    error = _raised(NEGATIVE[case])
    assert_renders_no_secret(error)
    cause = error.__cause__ or error.__context__
    while cause is not None:
        assert_renders_no_secret(cause)
        cause = cause.__cause__ or cause.__context__
