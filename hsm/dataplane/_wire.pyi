"""Types of the C accelerator hsm/dataplane/_wire.c (BatchWrap's per-item loop, Wrap's step 0)."""

Limits = tuple[int, int, int, int]

def scan(request: bytes, limits: Limits, /) -> list[tuple[str, int]] | None: ...
def seal(
    request: bytes,
    limits: Limits,
    keys: list[tuple[memoryview, bytes, int]],
    label: bytes,
    nonces: bytes,
    want_contexts: bool,
    /,
) -> tuple[bytes, list[tuple[int, bytes]] | None]: ...
def parse_wrap(request: bytes, limits: Limits, /) -> tuple[str, bytes, bytes] | None: ...
def parse_unwrap(request: bytes, limits: Limits, /) -> tuple[bytes, bytes, bytes] | None: ...
