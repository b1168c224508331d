"""How a custodian is named to people: one name form and one fingerprint form.

A custodian's identity is the SHA-256 fingerprint of their public
credential (64 hex digits, `PublicCredential.fingerprint`); machines keep
and compare that. People see one form only, everywhere: the first 80 bits
as four groups of four base32 characters (RFC 4648, section 6), the form
read aloud at enrolment (`custodian new` prints it), with the name beside
it: ``alice (FKAO-JAYM-D5SP-FPYZ)``. Statements, `status`, `proposal
show`, the audit report and error messages all use `label`; the 64-hex
form appears only in machine output (`--json`) and in the log.

Eighty bits is what the enrolment comparison already rests on: a look-alike
credential needs about 2^80 SHA-256 evaluations to match a given custodian's
groups, and nothing shown later is weaker than that first check.

Names are shown in ASCII (`display_name`): a character outside printable
ASCII, and the characters this form uses as punctuation (backslash,
parentheses, comma), are written as ``\\uXXXX`` (``\\UXXXXXXXX`` above the
BMP). So a name cannot imitate another line, another list item or another
fingerprint, and a Cyrillic a (U+0430) shows as ``\\u0430`` instead of passing
for ``a``. Every name maps to one text and back (the escape is injective).
"""

from __future__ import annotations

import base64
import re

from keyquorum.quorum.errors import InvalidInputError

__all__ = ["describe_fingerprint", "display_fingerprint", "display_name", "label"]

_FINGERPRINT = re.compile(r"[0-9a-f]{64}")
#: Printable ASCII that may stand for itself in a name (section "Names" above).
_PLAIN = frozenset(chr(c) for c in range(0x20, 0x7F)) - set("\\(),")
#: Leading bytes of the fingerprint shown to people: 80 bits, 16 base32 characters.
SHOWN_BYTES = 10


def display_fingerprint(fingerprint: str) -> str:
    """`ABCD-EFGH-IJKL-MNOP`: the people's form of a 64-hex-digit fingerprint."""
    if not isinstance(fingerprint, str) or _FINGERPRINT.fullmatch(fingerprint) is None:
        raise InvalidInputError("a fingerprint is 64 lowercase hex digits")
    text = base64.b32encode(bytes.fromhex(fingerprint)[:SHOWN_BYTES]).decode("ascii")
    return "-".join(text[i : i + 4] for i in range(0, 16, 4))


def describe_fingerprint(text: object) -> str:
    """For messages about a value from outside: its people's form, or what it was."""
    if isinstance(text, str) and _FINGERPRINT.fullmatch(text):
        return display_fingerprint(text)
    shown = display_name(str(text)[:20]) if isinstance(text, str) else type(text).__name__
    return f"{shown!r} (not a fingerprint)"


def display_name(name: str) -> str:
    """The name in printable ASCII, with anything else escaped (module docstring)."""
    out: list[str] = []
    for ch in name:
        if ch in _PLAIN:
            out.append(ch)
        elif ord(ch) <= 0xFFFF:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(f"\\U{ord(ch):08x}")
    return "".join(out)


def label(name: str, fingerprint: str) -> str:
    """`alice (FKAO-JAYM-D5SP-FPYZ)`: how people see a custodian, everywhere."""
    return f"{display_name(name)} ({display_fingerprint(fingerprint)})"
