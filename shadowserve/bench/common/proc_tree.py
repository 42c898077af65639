"""What a server's process tree holds, read from /proc: children, shared-memory segments, descriptors.

The soak benchmark compares these before and after a run to find leaks; it reads /proc directly
(Linux only) so no extra dependency is needed and nothing is counted twice.
"""

from __future__ import annotations

import os

from shadowserve.dataplane.process import CHILD_MODULE


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (which may hold spaces), or None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` that are alive now."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None and int(fields[1]) == pid:
                out.append(int(entry))
    return out


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(children(p))
    return found


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def dataplane_pid(server_pid: int) -> int | None:
    """The server's data-plane process: its child running the data plane's own module."""
    for pid in children(server_pid):
        if CHILD_MODULE in cmdline(pid):
            return pid
    return None


def _links(pid: int) -> list[str]:
    """What each open descriptor of one process points at, as /proc names it (raises if it is gone)."""
    fd_dir = f"/proc/{pid}/fd"
    out = []
    for fd in os.listdir(fd_dir):
        try:
            out.append(os.readlink(f"{fd_dir}/{fd}"))
        except OSError:
            continue  # closed while we looked
    return out


def fd_targets(pid: int) -> list[str]:
    """What each open descriptor of one process points at: a path, a pipe, or a socket named by its
    TCP ports and state (so a leak report says which connection stayed open)."""
    sockets = _socket_names(pid)
    out = []
    for target in _links(pid):
        inode = target[len("socket:["):-1] if target.startswith("socket:[") else None
        out.append(sockets.get(inode, "socket") if inode else target)
    return sorted(out)


_TCP_STATES = {"01": "ESTABLISHED", "06": "TIME_WAIT", "07": "CLOSE", "08": "CLOSE_WAIT", "0A": "LISTEN"}


def _port(address: str) -> int:
    """The port of a /proc/net/tcp address (``0100007F:1F90``)."""
    return int(address.rsplit(":", 1)[1], 16)


def _socket_names(pid: int) -> dict[str, str]:
    """inode -> ``tcp :LOCAL->:REMOTE STATE`` (or ``unix``) for the sockets in the process's namespace."""
    names: dict[str, str] = {}
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{table}") as f:
                next(f)
                for line in f:
                    parts = line.split()
                    local, remote, state, inode = parts[1], parts[2], parts[3], parts[9]
                    names[inode] = f"tcp :{_port(local)}->:{_port(remote)} {_TCP_STATES.get(state, state)}"
        except (OSError, StopIteration, IndexError):
            continue
    try:
        with open(f"/proc/{pid}/net/unix") as f:
            next(f)
            for line in f:
                parts = line.split()
                if len(parts) >= 7:
                    names.setdefault(parts[6], "unix " + (parts[7] if len(parts) > 7 else ""))
    except (OSError, StopIteration):
        pass
    return names


def shm_segments(pid: int) -> set[str]:
    """/dev/shm entries that ``pid`` or its descendants map or hold open."""
    names: set[str] = set()
    for p in descendants(pid):
        try:
            with open(f"/proc/{p}/maps") as f:
                for line in f:
                    parts = line.split(maxsplit=5)
                    if len(parts) == 6 and parts[5].startswith("/dev/shm/"):
                        names.add(parts[5].strip().removesuffix(" (deleted)"))
            names.update(t.removesuffix(" (deleted)") for t in _links(p) if t.startswith("/dev/shm/"))
        except OSError:
            continue  # the process ended while we looked
    return names
