"""The data-plane process itself: ``python -m shadowserve.dataplane.child COMMANDS_FD EVENTS_FD``.

It is its own interpreter, started by dataplane/process.py, never a multiprocessing child: nothing
of the engine's program (a user's script with no ``__main__`` guard) is imported here. Its
``DataPlaneSpec`` arrives as the first message on the command pipe; after that come commands, and
``None`` to stop. It stops by itself when either pipe breaks, so it never outlives the engine.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from multiprocessing.connection import Connection

import torch

from shadowserve.dataplane.spec import DataPlaneSpec, build_pipeline


def serve(spec: DataPlaneSpec, commands: Connection, events: Connection) -> None:
    """Build the pipeline on the reserved cores, then run commands until told to stop."""
    if spec.cores:
        os.sched_setaffinity(0, spec.cores)
    # The pipeline's parallelism is its stage workers; torch's intra-op threads on top of them would
    # oversubscribe the reserved cores (spinning OpenMP teams starve the decompress threads).
    torch.set_num_threads(1)
    send_lock = threading.Lock()

    def send(msg) -> None:
        with send_lock:
            try:
                events.send(msg)
            except (BrokenPipeError, OSError):
                os._exit(0)  # the engine is gone; nothing left to serve

    try:
        pool = spec.pool_handle.attach()
        pipeline = build_pipeline(spec, pool.tensor)
    except Exception as exc:
        send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    send(("ready", os.getpid()))

    def heartbeat() -> None:
        while True:
            time.sleep(spec.config.heartbeat_interval)
            send(("heartbeat", pipeline.stats()))

    threading.Thread(target=heartbeat, daemon=True).start()
    while True:
        try:
            cmd = commands.recv()
        except (EOFError, OSError):
            break  # the engine exited (or was killed): stop with it
        if cmd is None:
            break
        pipeline.submit(cmd, lambda c: send(("done", c)))
    pipeline.close()
    pool.close()


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        sys.exit("usage: python -m shadowserve.dataplane.child COMMANDS_FD EVENTS_FD (started by the engine)")
    # Ctrl-C in a terminal reaches the whole process group; the engine decides when this process stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    commands = Connection(int(args[0]), writable=False)
    events = Connection(int(args[1]), readable=False)
    try:
        spec = commands.recv()
    except (EOFError, OSError):
        return  # the engine went away before sending anything
    except Exception as exc:  # the spec did not unpickle here (a mismatched install?)
        try:
            events.send(("failed", f"{type(exc).__name__}: {exc}"))
        except OSError:
            pass
        return
    serve(spec, commands, events)


if __name__ == "__main__":
    main()
