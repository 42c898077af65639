"""Named segments: the owner unlinks (on close, at exit, or by its resource tracker after a crash);
a process that only attaches never unlinks and never warns, even as its own interpreter."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import shadowserve
from shadowserve.dataplane.shm import PREFIX, SHM_DIR, Segment
from shadowserve.errors import FetchError

ENV = dict(os.environ, PYTHONPATH=str(Path(shadowserve.__file__).resolve().parents[1]))


def _exists(name: str) -> bool:
    return os.path.exists(os.path.join(SHM_DIR, name))


def _python(code: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=60, **kw)


def test_owner_creates_attacher_shares_owner_unlinks():
    owner = Segment.create("test", 4096)
    assert owner.name.startswith(f"{PREFIX}{os.getpid()}_test_") and owner.size == 4096 and _exists(owner.name)
    other = Segment.attach(owner.name)
    owner.buf[:3] = b"abc"
    assert bytes(other.buf[:3]) == b"abc"
    other.close()
    assert _exists(owner.name)  # closing an attachment never unlinks
    owner.close()
    assert not _exists(owner.name)
    with pytest.raises(FetchError, match="gone"):
        Segment.attach(owner.name)


def test_an_owner_dropped_without_close_unlinks():
    seg = Segment.create("test", 4096)
    name = seg.name
    del seg
    gc.collect()
    assert not _exists(name)


def test_another_interpreter_attaches_and_exits_without_unlinking():
    owner = Segment.create("test", 4096)
    try:
        done = _python("from shadowserve.dataplane.shm import Segment\n"
                       f"s = Segment.attach({owner.name!r})\n"
                       "s.buf[0] = 42\n")  # and exits without close()
        assert done.returncode == 0 and done.stderr == ""
        assert _exists(owner.name) and owner.buf[0] == 42
    finally:
        owner.close()


def test_an_owner_that_exits_without_close_leaves_nothing_and_says_nothing():
    done = _python("import os\nfrom shadowserve.dataplane.shm import Segment\n"
                   "s = Segment.create('test', 4096)\nprint(s.name)\n")
    assert done.returncode == 0 and done.stderr == ""  # no "leaked shared_memory" from the tracker
    name = done.stdout.strip()
    assert name.startswith(PREFIX) and not _exists(name)


def test_a_killed_owner_is_cleaned_up_by_its_resource_tracker():
    proc = subprocess.Popen([sys.executable, "-c", "import time\nfrom shadowserve.dataplane.shm import Segment\n"
                             "s = Segment.create('test', 4096)\nprint(s.name, flush=True)\ntime.sleep(60)\n"],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    name = proc.stdout.readline().strip()
    assert _exists(name)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10
    while _exists(name):
        assert time.monotonic() < deadline, "a crashed owner's segment was never unlinked"
        time.sleep(0.05)
