"""GF(2^8) arithmetic and interpolation, against a naive reference (tests/gf256_reference.py).

The reference multiplies polynomials over GF(2) bit by bit and reduces the
up-to-15-bit product by long division by 0x11b, with ordinary branches: a
different algorithm from the masked shift-and-add in gf256, so a shared
mistake is unlikely.
"""

from __future__ import annotations

import ast
import inspect
import textwrap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keyquorum.quorum import gf256
from keyquorum.quorum.errors import InvalidInputError
from tests.gf256_reference import ref_eval, ref_mul


def test_reference_agrees_with_fips197_examples() -> None:
    # FIPS 197, section 4.2 and 4.2.1: {57}*{83} = {c1}, {57}*{13} = {fe}, xtime chain.
    assert ref_mul(0x57, 0x83) == 0xC1
    assert ref_mul(0x57, 0x13) == 0xFE
    assert [ref_mul(0x57, m) for m in (0x02, 0x04, 0x08, 0x10)] == [0xAE, 0x47, 0x8E, 0x07]


@pytest.mark.parametrize(
    ("a", "b", "product"),
    [(0x57, 0x83, 0xC1), (0x57, 0x13, 0xFE), (0x57, 0x02, 0xAE), (0x57, 0x10, 0x07)],
    ids=["57*83=c1", "57*13=fe", "57*02=ae", "57*10=07"],
)
def test_fips197_products(a: int, b: int, product: int) -> None:
    assert gf256.mul(a, b) == product
    assert gf256.mul(b, a) == product


def test_multiplication_exhaustively_matches_reference() -> None:
    mismatches = [
        (a, b) for a in range(256) for b in range(256) if gf256.mul(a, b) != ref_mul(a, b)
    ]
    assert mismatches == []


def test_every_nonzero_element_has_its_inverse() -> None:
    for a in range(1, 256):
        b = gf256.inv(a)
        assert ref_mul(a, b) == 1, f"inv({a:#04x}) = {b:#04x}"
        assert b == next(c for c in range(1, 256) if ref_mul(a, c) == 1)
    assert gf256.inv(0) == 0  # a^254 at 0, documented


@pytest.mark.parametrize(
    "bad",
    [-1, 256, 1 << 40, True],
    ids=["negative", "256", "huge", "bool"],
)
def test_elements_outside_the_field_are_refused(bad: int) -> None:
    with pytest.raises(InvalidInputError, match="field element"):
        gf256.mul(bad, 1)
    with pytest.raises(InvalidInputError, match="field element"):
        gf256.mul(1, bad)
    with pytest.raises(InvalidInputError, match="field element"):
        gf256.inv(bad)


_polynomials = st.integers(min_value=1, max_value=6).flatmap(
    lambda degree_plus_one: st.integers(min_value=1, max_value=8).flatmap(
        lambda size: st.lists(
            st.binary(min_size=size, max_size=size),
            min_size=degree_plus_one,
            max_size=degree_plus_one,
        )
    )
)


@settings(max_examples=60, deadline=None)
@given(coefficients=_polynomials, x=st.integers(min_value=0, max_value=255))
def test_evaluate_matches_term_by_term_reference(coefficients: list[bytes], x: int) -> None:
    assert gf256.evaluate(coefficients, x) == ref_eval(coefficients, x)


@settings(max_examples=60, deadline=None)
@given(
    coefficients=_polynomials,
    data=st.data(),
)
def test_interpolation_recovers_the_polynomial_everywhere(
    coefficients: list[bytes], data: st.DataObject
) -> None:
    k = len(coefficients)
    xs = data.draw(
        st.lists(st.integers(min_value=0, max_value=255), min_size=k, max_size=k, unique=True)
    )
    x = data.draw(st.integers(min_value=0, max_value=255))
    points = [(xj, ref_eval(coefficients, xj)) for xj in xs]
    assert gf256.interpolate(points, x) == ref_eval(coefficients, x)


def test_interpolation_at_a_given_point_returns_its_value() -> None:
    points = [(1, b"\x10\x20"), (2, b"\x33\x44"), (9, b"\xfe\x01")]
    for x, y in points:
        assert gf256.interpolate(points, x) == y


def test_lagrange_coefficients_sum_to_one() -> None:
    # The constant polynomial 1 is reproduced, so sum_j l_j(x) = 1 for every x.
    xs = [3, 7, 200, 255]
    for x in range(256):
        total = 0
        for weight in gf256.lagrange_coefficients(xs, x):
            total ^= weight
        assert total == 1


@pytest.mark.parametrize(
    ("points", "x", "message"),
    [
        ([], 0, "at least one point"),
        ([(1, b"a"), (1, b"b")], 0, "appears twice"),
        ([(1, b"a"), (2, b"bc")], 0, "has 2 bytes"),
        ([(256, b"a")], 0, "field element"),
        ([(1, b"a")], 256, "field element"),
        ([(-1, b"a")], 0, "field element"),
    ],
    ids=["no points", "duplicate x", "unequal lengths", "x-coordinate 256", "x 256", "x -1"],
)
def test_interpolation_preconditions(points: list[tuple[int, bytes]], x: int, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        gf256.interpolate(points, x)


@pytest.mark.parametrize(
    ("coefficients", "x", "message"),
    [
        ([], 1, "at least one coefficient"),
        ([b"ab", b"c"], 1, "coefficient 1 is 1 bytes"),
        ([b"a"], 256, "field element"),
    ],
    ids=["no coefficients", "unequal lengths", "x 256"],
)
def test_evaluate_preconditions(coefficients: list[bytes], x: int, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        gf256.evaluate(coefficients, x)


KERNELS = ["mul", "inv", "_xtime", "_columns", "_mul_columns"]


@pytest.mark.parametrize("name", KERNELS)
def test_arithmetic_kernels_have_no_branch_and_no_lookup(name: str) -> None:
    """The functions that touch secret bytes neither branch nor index a table.

    `_check_element` (called by mul and inv) branches only on whether the
    argument is a byte at all, and is not a kernel.
    """
    source = textwrap.dedent(inspect.getsource(getattr(gf256, name)))
    body = ast.parse(source).body[0]
    assert isinstance(body, ast.FunctionDef)
    for node in ast.walk(body):
        assert not isinstance(node, ast.If | ast.IfExp | ast.While | ast.Match), (
            f"{name} branches at line {node.lineno}"
        )
        assert not isinstance(node, ast.BoolOp | ast.Compare), f"{name} compares or short-cuts"
        assert not isinstance(node, ast.Subscript), f"{name} indexes at line {node.lineno}"


def test_module_holds_no_lookup_table() -> None:
    tables = [
        name
        for name, value in vars(gf256).items()
        if not name.startswith("__")
        and isinstance(value, list | tuple | bytes | bytearray | dict)
        and len(value) >= 16
    ]
    assert tables == []
