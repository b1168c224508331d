"""A naive GF(2^8) reference (AES's field), to check quorum/gf256.py against.

The reference multiplies polynomials over GF(2) bit by bit and reduces the
up-to-15-bit product by long division by 0x11b, with ordinary branches: a
different algorithm from the masked shift-and-add in gf256, so a shared
mistake is unlikely.
"""

from __future__ import annotations

MODULUS = 0b1_0001_1011  # x^8 + x^4 + x^3 + x + 1


def ref_mul(a: int, b: int) -> int:
    """Schoolbook product in GF(2)[x], then remainder modulo x^8+x^4+x^3+x+1."""
    product = 0
    for bit in range(8):
        if (b >> bit) & 1:
            product ^= a << bit
    for degree in range(14, 7, -1):
        if (product >> degree) & 1:
            product ^= MODULUS << (degree - 8)
    return product


def ref_pow(a: int, e: int) -> int:
    result = 1
    for _ in range(e):
        result = ref_mul(result, a)
    return result


def ref_eval(coefficients: list[bytes], x: int) -> bytes:
    """sum_j c_j * x^j per byte, term by term (no Horner)."""
    size = len(coefficients[0])
    out = bytearray(size)
    for j, c in enumerate(coefficients):
        xj = ref_pow(x, j)
        for i in range(size):
            out[i] ^= ref_mul(c[i], xj)
    return bytes(out)
