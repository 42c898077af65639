"""The ``KVStore`` contract every backend meets, and the helpers they share.

``open_store(url)``, which picks a backend by URL scheme, is in ``store/registry.py``: it sits above
every backend, while this module sits below them all.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from shadowserve.errors import StoreError

MAX_KEY_LEN = 1024


@runtime_checkable
class KVStore(Protocol):
    """A shared byte store for KV chunks keyed by chained chunk hashes."""

    def put(self, key: bytes, data: bytes | memoryview) -> None: ...
    def get(self, key: bytes) -> bytes | None: ...
    def get_into(self, key: bytes, buffer: Any) -> int | None: ...
    def get_many_into(self, keys: Sequence[bytes], buffers: Sequence[Any]) -> list[int | None]: ...
    def contains(self, keys: Sequence[bytes]) -> list[bool]: ...
    def longest_prefix(self, keys: Sequence[bytes]) -> int: ...
    def stats(self) -> dict[str, Any]: ...
    def close(self) -> None: ...


def check_key(key: Any) -> bytes:
    """Keys are non-empty bytes of at most ``MAX_KEY_LEN``; anything else is a caller bug."""
    if isinstance(key, (bytearray, memoryview)):
        key = bytes(key)
    if not isinstance(key, bytes):
        raise StoreError(f"store keys must be bytes, got {type(key).__name__}")
    if not 0 < len(key) <= MAX_KEY_LEN:
        raise StoreError(f"store keys must be 1..{MAX_KEY_LEN} bytes, got {len(key)}")
    return key


def writable_view(buffer: Any) -> memoryview:
    """A flat writable byte view of ``buffer`` (bytearray, numpy array, mmap, memoryview)."""
    try:
        view = memoryview(buffer)
    except TypeError as exc:
        raise StoreError(f"destination of type {type(buffer).__name__} is not a buffer") from exc
    if view.readonly:
        raise StoreError("destination buffer is read-only")
    if view.format != "B" or view.ndim != 1:
        if not view.contiguous:
            raise StoreError("destination buffer must be contiguous")
        view = view.cast("B")
    return view


class _TooLarge(StoreError):
    """A value does not fit its destination buffer (the store itself is fine)."""


def too_large(key: bytes, size: int, capacity: int) -> StoreError:
    return _TooLarge(f"value for key {key.hex()} is {size} bytes but the destination buffer holds {capacity}")


class StoreBase:
    """Shared behaviour: batched calls fall back to single ones, context-manager support."""

    def get_many_into(self, keys: Sequence[bytes], buffers: Sequence[Any]) -> list[int | None]:
        """Fetch each key into its buffer; backends that can pipeline override this.

        A value too large for its buffer does not stop the others: all are fetched, then the
        first such error is raised (the same behaviour as the pipelined backends).
        """
        if len(keys) != len(buffers):
            raise StoreError(f"{len(keys)} keys but {len(buffers)} buffers")
        out: list[int | None] = []
        error: StoreError | None = None
        for key, buffer in zip(keys, buffers, strict=True):
            try:
                out.append(self.get_into(key, buffer))  # type: ignore[attr-defined]
            except _TooLarge as exc:
                out.append(None)
                error = error or exc
        if error is not None:
            raise error
        return out

    def longest_prefix(self, keys: Sequence[bytes]) -> int:
        """How many leading chained keys are present (a gap ends the usable prefix)."""
        n = 0
        for present in self.contains(keys):  # type: ignore[attr-defined]
            if not present:
                break
            n += 1
        return n

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()  # type: ignore[attr-defined]
