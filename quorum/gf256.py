"""Arithmetic in GF(2^8) and Lagrange interpolation over byte strings.

The field is GF(2)[x] / (x^8 + x^4 + x^3 + x + 1), the AES field of FIPS 197
section 4 (reduction polynomial 0x11b), which SLIP-0039 section "Shamir's
secret sharing" also uses; its vectors check this module from outside.
Addition is XOR. A byte string is treated as independent field elements,
one per byte, so one polynomial per byte position shares a whole string.

Side channels: no table is indexed by a secret byte and no branch depends
on one. Multiplication is a carry-less shift-and-add whose eight steps all
run, with each conditional XOR done by a mask (`-bit` is all ones or
zero); the inverse is the fixed exponentiation a^254 (a^(2^8 - 2)), with
the same squarings and products for every a. The x-coordinates, and so the
Lagrange coefficients, are public; only they decide loop counts, and they
are the only inputs of `inv` in this package. Python cannot promise
constant time: integer operations, the interpreter's dispatch and its
memory allocator may still take data-dependent time. This removes the
gross leaks (cache-timing on log/exp tables, branch prediction on secret
bits); it is not a guarantee.
"""

from __future__ import annotations

from collections.abc import Sequence

from keyquorum.quorum.errors import InvalidInputError

POLYNOMIAL = 0x11B
"""x^8 + x^4 + x^3 + x + 1 (FIPS 197, section 4.2)."""

ByteString = bytes | bytearray | memoryview
Columns = tuple[int, int, int, int, int, int, int, int]


def _check_element(name: str, value: int) -> None:
    # The outcome depends only on whether the input is a byte at all, never on
    # which byte it is, so this is not a branch on secret data.
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 255:
        raise InvalidInputError(f"{name} must be a field element 0..255, got {value!r}")


def _xtime(a: int) -> int:
    """a * x mod 0x11b: shift left and subtract the modulus iff bit 8 appears (masked)."""
    return (a << 1) ^ (POLYNOMIAL & -(a >> 7))


def mul(a: int, b: int) -> int:
    """Product in GF(2^8), branch-free and table-free in both operands."""
    _check_element("a", a)
    _check_element("b", b)
    product = 0
    for _ in range(8):
        product ^= a & -(b & 1)
        b >>= 1
        a = _xtime(a)
    return product


def inv(a: int) -> int:
    """Multiplicative inverse as a^254 (Fermat: a^255 = 1 for a != 0).

    Zero maps to zero, as a^254 does; callers that need a true inverse check
    for zero first, on public values (here: differences of distinct
    x-coordinates, never zero).
    """
    _check_element("a", a)
    # 254 = 0b11111110: a^254 = a^2 * a^4 * ... * a^128, the same seven
    # squarings and six products for every a.
    square = mul(a, a)
    result = square
    for _ in range(6):
        square = mul(square, square)
        result = mul(result, square)
    return result


def _columns(c: int) -> Columns:
    """c * x^i for i = 0..7, so that y * c is the XOR of the columns y's bits select.

    Computed from the public multiplier c only; the secret y picks columns
    with masks, not by indexing.
    """
    c1 = _xtime(c)
    c2 = _xtime(c1)
    c3 = _xtime(c2)
    c4 = _xtime(c3)
    c5 = _xtime(c4)
    c6 = _xtime(c5)
    c7 = _xtime(c6)
    return (c, c1, c2, c3, c4, c5, c6, c7)


def _mul_columns(y: int, cols: Columns) -> int:
    """y * c for the public c whose columns are `cols`; y is a byte (possibly secret)."""
    c0, c1, c2, c3, c4, c5, c6, c7 = cols
    return (
        (c0 & -(y & 1))
        ^ (c1 & -((y >> 1) & 1))
        ^ (c2 & -((y >> 2) & 1))
        ^ (c3 & -((y >> 3) & 1))
        ^ (c4 & -((y >> 4) & 1))
        ^ (c5 & -((y >> 5) & 1))
        ^ (c6 & -((y >> 6) & 1))
        ^ (c7 & -((y >> 7) & 1))
    )


def evaluate(coefficients: Sequence[ByteString], x: int) -> bytearray:
    """f(x) per byte position, where coefficients[j] holds the x^j coefficients.

    Horner's rule; every coefficient string must have the same length. The
    result is a fresh bytearray the caller can wipe.
    """
    _check_element("x", x)
    if len(coefficients) == 0:
        raise InvalidInputError("a polynomial needs at least one coefficient")
    size = len(coefficients[0])
    for j, coefficient in enumerate(coefficients):
        if len(coefficient) != size:
            raise InvalidInputError(
                f"coefficient {j} is {len(coefficient)} bytes, coefficient 0 is {size}"
            )
    cols = _columns(x)
    acc = bytearray(coefficients[-1])
    for coefficient in reversed(coefficients[:-1]):
        for i, c in enumerate(coefficient):
            acc[i] = _mul_columns(acc[i], cols) ^ c
    return acc


def lagrange_coefficients(xs: Sequence[int], x: int) -> list[int]:
    """l_j(x) = prod_{m != j} (x - x_m) / (x_j - x_m) for each j (public values).

    In characteristic 2 subtraction is XOR. The x_j must be distinct; x may
    equal one of them (then l_j is 1 there and 0 elsewhere).
    """
    _check_element("x", x)
    if len(xs) == 0:
        raise InvalidInputError("interpolation needs at least one point")
    seen: set[int] = set()
    for xj in xs:
        _check_element("x-coordinate", xj)
        if xj in seen:
            raise InvalidInputError(f"x-coordinate {xj} appears twice")
        seen.add(xj)
    result = []
    for j, xj in enumerate(xs):
        numerator = 1
        denominator = 1
        for m, xm in enumerate(xs):
            if m != j:
                numerator = mul(numerator, x ^ xm)
                denominator = mul(denominator, xj ^ xm)
        result.append(mul(numerator, inv(denominator)))
    return result


def interpolate(points: Sequence[tuple[int, ByteString]], x: int) -> bytearray:
    """The value at x, per byte position, of the polynomial through `points`.

    `points` are (x_j, y_j) with distinct public x_j and equally long y_j.
    With k points this is the unique polynomial of degree < k. The result is
    a fresh bytearray the caller can wipe.
    """
    if len(points) == 0:
        raise InvalidInputError("interpolation needs at least one point")
    size = len(points[0][1])
    for xj, yj in points:
        if len(yj) != size:
            raise InvalidInputError(
                f"point at x={xj} has {len(yj)} bytes, the first point has {size}"
            )
    weights = lagrange_coefficients([xj for xj, _ in points], x)
    out = bytearray(size)
    for weight, (_, yj) in zip(weights, points, strict=True):
        cols = _columns(weight)
        for i, y in enumerate(yj):
            out[i] ^= _mul_columns(y, cols)
    return out
