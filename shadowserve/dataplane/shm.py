"""Named shared-memory segments with one owner: the owner unlinks, everyone else only maps.

Python 3.11's ``SharedMemory`` registers every segment it opens with the resource tracker, even
when it only attaches. A data-plane process that is its own interpreter has its own tracker, which
would unlink the engine's segments when that process exits, with a "leaked shared_memory" warning.
So segments are mapped here directly (POSIX shared memory lives under /dev/shm on Linux):

- ``Segment.create``: the owner registers the name with its resource tracker, as a safety net if
  it crashes, and unlinks it (unregistering) on ``close()`` or, failing that, at interpreter exit.
- ``Segment.attach``: maps an existing segment and never registers or unlinks anything.

Names carry the owner's PID (``shadowserve_<pid>_<kind>_<random>``) so leftovers can be traced.
"""

from __future__ import annotations

import mmap
import os
import secrets
import weakref
from multiprocessing import resource_tracker

from shadowserve.errors import FetchError

SHM_DIR = "/dev/shm"
PREFIX = "shadowserve_"
_TRACKER_TYPE = "shared_memory"


def _tracker_name(name: str) -> str:
    return "/" + name  # the form SharedMemory registers and the tracker's shm_unlink expects


def _unlink(name: str) -> None:
    """Remove the name (mappings stay valid until unmapped) and tell the tracker it is handled."""
    try:
        os.unlink(os.path.join(SHM_DIR, name))
    except FileNotFoundError:
        pass
    resource_tracker.unregister(_tracker_name(name), _TRACKER_TYPE)


class Segment:
    """One mapped segment; ``buf`` is a writable memoryview over all of it."""

    def __init__(self, name: str, fd: int, owner: bool) -> None:
        try:
            self.size = os.fstat(fd).st_size
            self._mmap = mmap.mmap(fd, self.size)
        finally:
            os.close(fd)
        self.name = name
        self.buf: memoryview | None = memoryview(self._mmap)
        self._unlinker = weakref.finalize(self, _unlink, name) if owner else None

    @classmethod
    def create(cls, kind: str, size: int) -> Segment:
        """A new segment owned by this process; unlinked by ``close()`` or at interpreter exit."""
        if size <= 0:
            raise ValueError("a shared-memory segment needs a positive size")
        while True:
            name = f"{PREFIX}{os.getpid()}_{kind}_{secrets.token_hex(4)}"
            try:
                fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
                break
            except FileExistsError:
                continue
        try:
            os.ftruncate(fd, size)
        except OSError:
            os.close(fd)
            os.unlink(os.path.join(SHM_DIR, name))
            raise
        resource_tracker.register(_tracker_name(name), _TRACKER_TYPE)
        return cls(name, fd, owner=True)

    @classmethod
    def attach(cls, name: str) -> Segment:
        """Map a segment another process owns; only that owner ever unlinks it."""
        try:
            fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR)
        except FileNotFoundError:
            raise FetchError(f"shared memory segment {name} is gone (its owner exited?)") from None
        return cls(name, fd, owner=False)

    @property
    def owner(self) -> bool:
        return self._unlinker is not None

    def close(self) -> None:
        """Unlink (owner only) and unmap. A view still exported (a live tensor over ``buf``) keeps the
        mapping until it is dropped; the name is gone either way."""
        if self._unlinker is not None:
            self._unlinker()
        if self.buf is None:
            return
        try:
            self.buf.release()
            self._mmap.close()
        except BufferError:
            pass  # unmapped when the last view over it is freed
        self.buf = None
