"""Credential unlock and hybrid signatures against the raw library calls they wrap.

Baselines, measured in the same run:
- unlock (parse, checksum, Argon2id at the real RFC 9106 parameters,
  AES-256-GCM, key rebuild) vs one raw `cryptography` Argon2id derivation
  with the same parameters: the ratio shows what the file format adds;
- hybrid sign vs raw Ed25519 sign + raw ML-DSA-65 sign of the same
  message, hybrid verify vs the two raw verifies: the ratio shows what
  domain separation and the checks add.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

from cryptography.hazmat.primitives.asymmetric import ed25519, mldsa
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

from bench.harness import Row, ops_per_second
from keyquorum.quorum import signatures
from keyquorum.quorum.credentials import CustodianCredential
from keyquorum.quorum.kdf import Argon2Params

PASSPHRASE = b"benchmark passphrase"
MESSAGE = b"approve proposal 0123456789abcdef: activate-tenant clinic-42 for 3600 s" * 4


def _paired(
    fn: Callable[[], object], baseline: Callable[[], object], min_time: float, rounds: int
) -> tuple[float, float]:
    """Median rates of `fn` and `baseline`, measured in alternating rounds so
    that load from other processes on the machine hits both alike."""
    ours, theirs = [], []
    for _ in range(rounds):
        ours.append(ops_per_second(fn, min_time=min_time, rounds=1))
        theirs.append(ops_per_second(baseline, min_time=min_time, rounds=1))
    return statistics.median(ours), statistics.median(theirs)


def run(quick: bool) -> list[Row]:
    rounds = 3 if quick else 7
    unlock_time = 0.5 if quick else 2.0
    sign_time = 0.2 if quick else 0.5

    credential = CustodianCredential.generate("bench")
    params = Argon2Params()
    data = credential.encrypt(PASSPHRASE, params=params)
    salt = data[17:33]

    def raw_argon2id() -> bytes:
        return Argon2id(
            salt=salt,
            length=32,
            iterations=params.time_cost,
            lanes=params.lanes,
            memory_cost=params.memory_kib,
        ).derive(PASSPHRASE)

    unlock, argon = _paired(
        lambda: CustodianCredential.decrypt(data, PASSPHRASE), raw_argon2id, unlock_time, rounds
    )

    seeds = bytes(range(64))
    key = signatures.HybridSigningKey.from_seeds(seeds)
    verify_key = key.verify_key()
    signature = key.sign("approve", MESSAGE)
    ed = ed25519.Ed25519PrivateKey.from_private_bytes(seeds[:32])
    ml = mldsa.MLDSA65PrivateKey.from_seed_bytes(seeds[32:])
    ed_pub, ml_pub = ed.public_key(), ml.public_key()
    ed_message = b"keyquorum/v1/approve\0" + MESSAGE
    context = b"keyquorum/v1/approve"
    ed_sig, ml_sig = signature.ed25519, signature.mldsa65

    def raw_sign() -> None:
        ed.sign(ed_message)
        ml.sign(MESSAGE, context)

    def raw_verify() -> None:
        ed_pub.verify(ed_sig, ed_message)
        ml_pub.verify(ml_sig, MESSAGE, context)

    hybrid_sign, base_sign = _paired(
        lambda: key.sign("approve", MESSAGE), raw_sign, sign_time, rounds
    )
    hybrid_verify, base_verify = _paired(
        lambda: verify_key.verify("approve", MESSAGE, signature), raw_verify, sign_time, rounds
    )

    return [
        Row("credential unlock (Argon2id t=3 m=64MiB p=4)", unlock, "raw Argon2id", argon),
        Row("hybrid sign", hybrid_sign, "raw Ed25519 + ML-DSA-65 sign", base_sign),
        Row("hybrid verify", hybrid_verify, "raw Ed25519 + ML-DSA-65 verify", base_verify),
    ]
