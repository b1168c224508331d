"""A `Store` that reports its appends to the metrics, delegating everything else.

The daemon is given this wrapper instead of the store itself when metrics
are on (`server run --metrics-listen`), so append latency and the time of
the last published checkpoint are measured where they happen without a
hook inside the daemon. Each `Store` method is delegated explicitly (mypy
checks the wrapper against the protocol); anything else a store offers
beyond the protocol (PostgreSQL's `wait_for_append`, which the follower
looks up by name) is reached through `__getattr__`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from keyquorum.hsm.stores.base import Head, LogRecord, ShredSalt, Store


class AppendObserver:
    """What an `ObservedStore` reports; the default reports nowhere."""

    def appended(self, seconds: float, ok: bool) -> None:
        """One `append` took `seconds` and committed (ok) or raised."""

    def checkpoint_published(self, at: float) -> None:
        """A checkpoint was stored at wall-clock time `at`."""


class ObservedStore:
    """`Store` over `inner`, timing `append` and noting each checkpoint stored."""

    def __init__(
        self,
        inner: Store,
        observer: AppendObserver,
        *,
        clock: Callable[[], float] = time.perf_counter,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.inner = inner
        self._observer = observer
        self._clock = clock
        self._wall = wall_clock

    def append(
        self,
        entries: Sequence[LogRecord],
        *,
        expected_size: int,
        checkpoint: str,
        shred_salts: Sequence[ShredSalt] = (),
        erase_tenants: Sequence[str] = (),
        replace_salts: Sequence[ShredSalt] = (),
    ) -> None:
        start = self._clock()
        ok = False
        try:
            self.inner.append(
                entries,
                expected_size=expected_size,
                checkpoint=checkpoint,
                shred_salts=shred_salts,
                erase_tenants=erase_tenants,
                replace_salts=replace_salts,
            )
            ok = True
        finally:
            self._observer.appended(self._clock() - start, ok)
        # The append stored the checkpoint that covers it, in its transaction.
        self._observer.checkpoint_published(self._wall())

    def put_checkpoint(self, size: int, note_text: str) -> None:
        self.inner.put_checkpoint(size, note_text)
        self._observer.checkpoint_published(self._wall())

    def size(self) -> int:
        return self.inner.size()

    def head(self) -> Head:
        return self.inner.head()

    def read(self, start: int, end: int) -> list[bytes]:
        return self.inner.read(start, end)

    def read_all(self) -> Iterator[bytes]:
        return self.inner.read_all()

    def leaf_hashes(self) -> list[bytes]:
        return self.inner.leaf_hashes()

    def latest_checkpoint(self) -> tuple[int, str] | None:
        return self.inner.latest_checkpoint()

    def checkpoint_at(self, size: int) -> str | None:
        return self.inner.checkpoint_at(size)

    def checkpoints(self) -> list[tuple[int, str]]:
        return self.inner.checkpoints()

    def put_shred_salt(self, tenant: str, version: int, salt: bytes) -> None:
        self.inner.put_shred_salt(tenant, version, salt)

    def get_shred_salt(self, tenant: str, version: int) -> bytes | None:
        return self.inner.get_shred_salt(tenant, version)

    def erase_shred_salts(self, tenant: str) -> int:
        return self.inner.erase_shred_salts(tenant)

    def reserve_block(self, counter: str, block: int, limit: int) -> tuple[int, int]:
        return self.inner.reserve_block(counter, block, limit)

    def counters(self) -> dict[str, int]:
        return self.inner.counters()

    def get_meta(self, key: str) -> str | None:
        return self.inner.get_meta(key)

    def set_meta(self, key: str, value: str) -> None:
        self.inner.set_meta(key, value)

    def schema_version(self) -> int:
        return self.inner.schema_version()

    def durability_settings(self) -> dict[str, str]:
        return self.inner.durability_settings()

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, name: str) -> Any:
        # Only reached for names not defined above (e.g. wait_for_append).
        return getattr(self.inner, name)

    def __repr__(self) -> str:
        return repr(self.inner)
