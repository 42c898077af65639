"""The engine's step loop on its own thread, fed by HTTP handlers through a command queue.

The engine is not thread-safe, so only this thread touches it. Handlers submit requests and
aborts as small commands; every sampled token is handed back to the handler's event loop with
``call_soon_threadsafe``. No handler ever waits on a step, and a step never waits on a handler.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

from shadowserve.engine.engine import LLMEngine
from shadowserve.engine.request import Request, RequestOutput, SamplingParams
from shadowserve.errors import ShadowServeError

log = logging.getLogger("shadowserve.server")
LIVENESS_INTERVAL = 0.5  # seconds between data-plane checks while the engine is idle


@dataclass
class Event:
    """One thing that happened to a request: accepted, a token, finished, or an error."""

    kind: str  # "accepted" | "token" | "finished" | "error"
    token_id: int | None = None
    output: RequestOutput | None = None
    error: str | None = None
    client_error: bool = False  # True: the request itself was bad (4xx); False: the server failed (5xx)


Sink = Callable[[Event], None]


@dataclass
class _Submit:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    sink: Sink


class EngineLoop:
    """Runs ``engine.step()`` whenever there is work; sleeps on the command queue otherwise."""

    def __init__(
        self,
        engine: LLMEngine,
        on_finish: Callable[[RequestOutput], None] | None = None,
        on_abort: Callable[[], None] | None = None,
    ) -> None:
        self.engine = engine
        self._on_finish = on_finish
        self._on_abort = on_abort
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict[str, Sink] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="shadowserve-engine", daemon=True)
        self.step_errors = 0
        self.fatal: str | None = None

    # ---- called from any thread ----------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def submit(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, sink: Sink) -> None:
        self._commands.put(_Submit(request_id, prompt_token_ids, params, sink))

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.fatal is None

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._commands.put(("wake", None))
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ---- the engine thread ---------------------------------------------------------------------

    def _run(self) -> None:
        try:
            last_check = time.monotonic()
            while not self._stop.is_set():
                self._drain(block=not self.engine.has_unfinished())
                if self.engine.has_unfinished():
                    self._step()
                elif time.monotonic() - last_check > LIVENESS_INTERVAL:
                    self.engine.check_liveness()
                    last_check = time.monotonic()
        except BaseException as exc:  # the loop itself broke: report it and fail every open request
            self.fatal = f"engine loop stopped: {exc!r}"
            log.error("%s\n%s", self.fatal, traceback.format_exc())
        finally:
            for request_id in list(self._sinks):
                self._fail(request_id, "the server is shutting down" if self.fatal is None else self.fatal)

    def _drain(self, block: bool) -> None:
        try:
            cmd = self._commands.get(timeout=0.05) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle(cmd)
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return

    def _handle(self, cmd) -> None:
        if isinstance(cmd, _Submit):
            try:
                self.engine.add_request(cmd.prompt_token_ids, cmd.params, cmd.request_id, on_token=self._token)
            except ShadowServeError as exc:
                cmd.sink(Event("error", error=str(exc), client_error=True))
                return
            self._sinks[cmd.request_id] = cmd.sink
            cmd.sink(Event("accepted"))
        elif cmd[0] == "abort" and cmd[1] in self._sinks:
            self.engine.abort_request(cmd[1])
            self._sinks.pop(cmd[1], None)
            if self._on_abort:
                self._on_abort()

    def _token(self, req: Request, token_id: int) -> None:
        sink = self._sinks.get(req.request_id)
        if sink is not None:
            sink(Event("token", token_id=token_id))

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as exc:  # one bad step must not take the server down: fail what was in it
            self.step_errors += 1
            log.error("engine step failed: %r\n%s", exc, traceback.format_exc())
            for request_id in list(self._sinks):
                self.engine.abort_request(request_id)
                self._fail(request_id, f"the engine failed while running this request: {exc}")
            return
        for out in outputs:
            sink = self._sinks.pop(out.request_id, None)
            if self._on_finish is not None:
                self._on_finish_safe(out)
            if sink is not None:
                sink(Event("finished", output=out))

    def _on_finish_safe(self, out: RequestOutput) -> None:
        try:
            self._on_finish(out)  # type: ignore[misc]
        except Exception:
            log.exception("metrics hook failed")

    def _fail(self, request_id: str, message: str) -> None:
        sink = self._sinks.pop(request_id, None)
        if sink is not None:
            sink(Event("error", error=message))


def asyncio_sink(loop: asyncio.AbstractEventLoop, events: asyncio.Queue) -> Sink:
    """A sink that hands events from the engine thread to a coroutine waiting on ``events``."""

    def sink(event: Event) -> None:
        try:
            loop.call_soon_threadsafe(events.put_nowait, event)
        except RuntimeError:
            pass  # the event loop is closed: the client is gone and so is its handler

    return sink
