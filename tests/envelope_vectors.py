"""Vectors of envelope format 2 (docs/streaming-format.md), and the check that they hold.

    python -m tests.envelope_vectors --check   # exit 1 if tests/vectors/envelope-v2 drifted
    python -m tests.envelope_vectors --write   # rewrite them (a deliberate format change only)

Inputs are fixed (SHA-256 of a label, so nothing is chosen by hand);
outputs come from `keyquorum.client.framing` and must equal the naive
reference (tests/envelope_reference.py), else generation stops. Invalid
cases are mutations of valid ones, each with the error class and message
its reader must raise; generation stops if the implementation raises
anything else. One JSON file per case.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
from collections.abc import Callable
from pathlib import Path

from keyquorum.client import framing
from keyquorum.quorum.secret import SecretBytes
from tests import envelope_reference as ref

VECTORS = Path(__file__).parent / "vectors" / "envelope-v2"
FRAME = framing.TAG_SIZE


def fixed(label: str, size: int) -> bytes:
    """`size` bytes from SHA-256 chains of `label`."""
    out = b""
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"keyquorum envelope-2 vectors: {label} {counter}".encode()).digest()
        counter += 1
    return out[:size]


DATA_KEY = fixed("data key", 32)
OTHER_KEY = fixed("another data key", 32)
# Opaque to the format; shaped like a KeyService ciphertext of a 32-byte key for
# tenant acme-health, version 1 (docs/dataplane.md): 77 bytes.
WRAPPED = b"\x01\x0bacme-health" + (1).to_bytes(4, "big") + fixed("wrapped key", 12 + 32 + 16)

# name: (plaintext, frame size, what it shows)
VALID: dict[str, tuple[bytes, int, str]] = {
    "empty": (b"", 16, "an empty plaintext: one empty final frame"),
    "one-short-frame": (b"hello", 16, "less than one frame: a final frame of 5 bytes"),
    "one-full-frame": (fixed("p16", 16), 16, "exactly one frame: it is final and full"),
    "three-frames-partial-last": (fixed("p40", 40), 16, "16 + 16 + 8 bytes"),
    "three-full-frames": (fixed("p48", 48), 16, "a multiple of the frame size: no empty frame"),
    "frame-size-1": (b"abc", 1, "the smallest frame size"),
    "default-frame-size": (fixed("p1000", 1000), framing.DEFAULT_FRAME_SIZE, "64 KiB frames"),
}


def seal(name: str) -> bytes:
    plaintext, frame_size, _ = VALID[name]
    with SecretBytes(DATA_KEY) as key:
        out = framing.seal_bytes(key, WRAPPED, plaintext, salt=salt_of(name), frame_size=frame_size)
    expected = ref.seal(DATA_KEY, WRAPPED, plaintext, salt_of(name), frame_size)
    if out != expected:
        raise SystemExit(f"{name}: framing and the reference disagree")
    return out


def salt_of(name: str) -> bytes:
    return fixed(f"salt {name}", 32)


def open_with(envelope: bytes, data_key: bytes) -> bytes:
    """What a reader holding `data_key` makes of `envelope` (raises as it would)."""
    src = io.BytesIO(envelope)
    start, version = framing.read_version(src)
    if version != framing.FRAMED_VERSION:
        raise framing.DeserializationError(f"version {version}")
    header = framing.read_header(src, start)
    out = io.BytesIO()
    with SecretBytes(data_key) as key:
        framing.open_frames(header, key, src, out)
    return out.getvalue()


def _frames(envelope: bytes, frame_size: int) -> tuple[bytes, list[bytes]]:
    size = framing.parse_header(envelope).size
    body = envelope[size:]
    step = frame_size + FRAME
    return envelope[:size], [body[i : i + step] for i in range(0, len(body), step)]


def _flip(envelope: bytes, at: int) -> bytes:
    out = bytearray(envelope)
    out[at] ^= 0x01
    return bytes(out)


def _header_offsets() -> dict[str, int]:
    """Where each header field starts (the valid vectors share one wrapped key)."""
    w = 10 + len(WRAPPED)
    return {"frame_size": 4, "wrapped": 10, "salt": w, "commitment": w + 32, "tag": w + 64}


# name: (build, error class, message part, what it shows)
Case = tuple[Callable[[], tuple[bytes, bytes]], str, str, str]


def _invalid() -> dict[str, Case]:
    three = seal("three-frames-partial-last")
    full = seal("three-full-frames")
    head, frames = _frames(three, 16)
    fhead, fframes = _frames(full, 16)
    at = _header_offsets()
    k = DATA_KEY
    return {
        "truncated-after-header": (
            lambda: (head, k),
            "TruncatedError",
            "ends before its final frame",
            "no frame at all",
        ),
        "truncated-at-frame-boundary": (
            lambda: (head + frames[0] + frames[1], k),
            "TruncatedError",
            "ends before its final frame (after frame 2)",
            "the last frame dropped: frame 2 was not sealed as final",
        ),
        "truncated-inside-last-frame": (
            lambda: (three[:-5], k),
            "DecryptionError",
            "frame 3 does not authenticate",
            "cut inside the final frame",
        ),
        "truncated-inside-a-tag": (
            lambda: (head + frames[0] + frames[1][:10], k),
            "TruncatedError",
            "inside frame 2",
            "fewer bytes than a tag where frame 2 should be",
        ),
        "truncated-inside-header": (
            lambda: (three[: at["salt"] + 3], k),
            "DeserializationError",
            "ends inside its header",
            "cut before the header ends",
        ),
        "frames-swapped": (
            lambda: (head + frames[1] + frames[0] + frames[2], k),
            "DecryptionError",
            "frame 1 does not authenticate",
            "frames 1 and 2 in each other's place",
        ),
        "frame-repeated": (
            lambda: (head + frames[0] + frames[0] + frames[1] + frames[2], k),
            "DecryptionError",
            "frame 2 does not authenticate",
            "frame 1 twice",
        ),
        "final-frame-repeated": (
            lambda: (fhead + fframes[0] + fframes[1] + fframes[2] + fframes[2], k),
            "DecryptionError",
            "data follows the final frame (frame 3)",
            "the full final frame twice: frame 3 is final but more follows",
        ),
        "data-after-final-frame": (
            lambda: (full + b"\x00", k),
            "DecryptionError",
            "data follows the final frame (frame 3)",
            "one byte appended",
        ),
        "frame-from-another-message": (
            lambda: (
                head + _frames(seal("three-full-frames"), 16)[1][0] + frames[1] + frames[2],
                k,
            ),
            "DecryptionError",
            "frame 1 does not authenticate",
            "frame 1 of another message (another salt, another key)",
        ),
        "bit-flip-in-a-frame": (
            lambda: (_flip(three, len(head) + 3), k),
            "DecryptionError",
            "frame 1 does not authenticate",
            "one bit of frame 1's ciphertext",
        ),
        "bit-flip-in-frame-size": (
            lambda: (_flip(three, at["frame_size"] + 3), k),
            "DecryptionError",
            "header does not authenticate",
            "frame size 17 instead of 16",
        ),
        "bit-flip-in-wrapped-key": (
            lambda: (_flip(three, at["wrapped"] + 20), k),
            "DecryptionError",
            "header does not authenticate",
            "one bit of the wrapped key (a reader holding the original data key)",
        ),
        "bit-flip-in-salt": (
            lambda: (_flip(three, at["salt"]), k),
            "DecryptionError",
            "key commitment differs",
            "another salt derives another key and commitment",
        ),
        "bit-flip-in-commitment": (
            lambda: (_flip(three, at["commitment"] + 31), k),
            "DecryptionError",
            "key commitment differs",
            "the stored commitment altered",
        ),
        "bit-flip-in-header-tag": (
            lambda: (_flip(three, at["tag"]), k),
            "DecryptionError",
            "header does not authenticate",
            "the header tag altered",
        ),
        "another-data-key": (
            lambda: (three, OTHER_KEY),
            "DecryptionError",
            "key commitment differs",
            "a reader with another data key",
        ),
        "empty-final-frame-after-full-ones": (
            lambda: (
                ref.seal_frames(
                    k,
                    WRAPPED,
                    [(fixed("p16", 16), False), (b"", True)],
                    salt_of("empty-final-frame"),
                    16,
                ),
                k,
            ),
            "DeserializationError",
            "empty final frame",
            "authentic, but not the format's one encoding of 16 bytes",
        ),
        "bad-magic": (
            lambda: (b"KQX" + three[3:], k),
            "DeserializationError",
            "not a keyquorum envelope",
            "magic",
        ),
        "unknown-version": (
            lambda: (three[:3] + b"\x03" + three[4:], k),
            "UnsupportedVersionError",
            "envelope version 3 is not supported",
            "version byte 3",
        ),
        "frame-size-zero": (
            lambda: (three[:4] + bytes(4) + three[8:], k),
            "DeserializationError",
            "frame size 0 is outside",
            "frame size 0",
        ),
        "frame-size-too-large": (
            lambda: (three[:4] + (framing.MAX_FRAME_SIZE + 1).to_bytes(4, "big") + three[8:], k),
            "DeserializationError",
            "frame size 16777217 is outside",
            "frame size 2^24 + 1, refused before any allocation",
        ),
        "wrapped-key-empty": (
            lambda: (three[:8] + bytes(2) + three[10:], k),
            "DeserializationError",
            "wrapped data key is empty",
            "wrapped-key length 0",
        ),
    }


def build() -> dict[str, dict[str, object]]:
    """Every vector file: relative path -> JSON object."""
    out: dict[str, dict[str, object]] = {}
    for name, (plaintext, frame_size, comment) in VALID.items():
        envelope = seal(name)
        payload_key, commitment = ref.keys(DATA_KEY, salt_of(name))
        header = framing.parse_header(envelope)
        out[f"valid/{name}.json"] = {
            "comment": comment,
            "data_key": DATA_KEY.hex(),
            "wrapped": WRAPPED.hex(),
            "salt": salt_of(name).hex(),
            "frame_size": frame_size,
            "plaintext": plaintext.hex(),
            "payload_key": payload_key.hex(),
            "commitment": commitment.hex(),
            "header": envelope[: header.size].hex(),
            "frames": -(-len(plaintext) // frame_size) if plaintext else 1,
            "envelope": envelope.hex(),
        }
    for name, (make, error, message, comment) in _invalid().items():
        envelope, key = make()
        check_refused(name, envelope, key, error, message)
        out[f"invalid/{name}.json"] = {
            "comment": comment,
            "data_key": key.hex(),
            "envelope": envelope.hex(),
            "error": error,
            "message": message,
        }
    return out


def check_refused(name: str, envelope: bytes, key: bytes, error: str, message: str) -> None:
    try:
        open_with(envelope, key)
    except Exception as e:
        if type(e).__name__ != error or message not in str(e):
            raise SystemExit(f"{name}: expected {error} ({message!r}), got {e!r}") from None
        return
    raise SystemExit(f"{name}: the envelope opened")


def render(obj: dict[str, object]) -> str:
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"


def drift(vectors: Path = VECTORS) -> list[str]:
    """Files that differ from what the code makes, are missing, or are extra."""
    wanted = {path: render(obj) for path, obj in build().items()}
    found = {
        str(p.relative_to(vectors)): p.read_text()
        for p in vectors.glob("*/*.json")
        if p.parent.name in ("valid", "invalid")
    }
    return sorted(
        [p for p, text in wanted.items() if found.get(p) != text]
        + [p for p in found if p not in wanted]
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.envelope_vectors")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true", help="fail if the files drifted")
    mode.add_argument("--write", action="store_true", help="rewrite the files")
    if parser.parse_args().write:
        for path, obj in build().items():
            target = VECTORS / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(render(obj))
        return
    bad = drift()
    if bad:
        print("envelope-v2 vectors drifted:", *bad, sep="\n  ", file=sys.stderr)
        raise SystemExit(1)
    print("envelope-v2 vectors: no drift")


if __name__ == "__main__":
    main()
