"""``file:///dir``: one file per key, so several processes on one host can share a cache.

Writes go to a temp file in the same directory and are renamed into place, so a reader sees
either nothing or the complete value, even if the writer dies half-way.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from typing import Any

from shadowserve.errors import StoreError
from shadowserve.store.base import StoreBase, check_key, too_large, writable_view


class FileStore(StoreBase):
    """Values are files ``dir/<first 2 hex>/<key hex>``; the fan-out keeps directories small."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        try:
            os.makedirs(self.root, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create store directory {self.root!r}: {exc.strerror}") from exc

    def _path(self, key: bytes) -> str:
        name = check_key(key).hex()
        return os.path.join(self.root, name[:2], name)

    def put(self, key: bytes, data: bytes | memoryview) -> None:
        path = self._path(key)
        folder = os.path.dirname(path)
        try:
            os.makedirs(folder, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)
            except BaseException:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
                raise
        except OSError as exc:
            raise StoreError(f"cannot write {path!r}: {exc.strerror}") from exc

    def get(self, key: bytes) -> bytes | None:
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"cannot read {path!r}: {exc.strerror}") from exc

    def get_into(self, key: bytes, buffer: Any) -> int | None:
        """Read the file straight into ``buffer`` (no intermediate copy)."""
        dest = writable_view(buffer)
        path = self._path(key)
        try:
            with open(path, "rb", buffering=0) as f:
                size = os.fstat(f.fileno()).st_size
                if size > len(dest):
                    raise too_large(check_key(key), size, len(dest))
                got = 0
                while got < size:
                    n = f.readinto(dest[got:size])
                    if not n:
                        raise StoreError(f"{path!r} shrank while being read")
                    got += n
                return size
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"cannot read {path!r}: {exc.strerror}") from exc

    def contains(self, keys: Sequence[bytes]) -> list[bool]:
        return [os.path.exists(self._path(k)) for k in keys]

    def stats(self) -> dict[str, Any]:
        keys = total = 0
        for folder, _, files in os.walk(self.root):
            for name in files:
                if not name.startswith(".tmp-"):
                    keys += 1
                    try:
                        total += os.path.getsize(os.path.join(folder, name))
                    except OSError:
                        pass
        return {"backend": "file", "root": self.root, "keys": keys, "bytes": total}

    def close(self) -> None:
        """Nothing is held open between calls."""
