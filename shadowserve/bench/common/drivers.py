"""What a load run sends and what it gets back, and the interface every driver implements.

A load run is three separate steps so each can change alone: a workload makes a list of
:class:`RequestSpec`; a :class:`Driver` executes them (in-process over an engine, or over HTTP
against ``shadowserve serve``) and returns one :class:`RequestRecord` per spec; the metrics are
computed from the records only (``shadowserve.bench.common.metrics``). A new driver only has to turn specs
into records with honest timestamps.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RequestSpec:
    """One request of a workload: its prompt, its output length and when it arrives."""

    prompt_ids: tuple[int, ...]
    max_tokens: int
    arrival_s: float = 0.0  # offset from the start of the run


@dataclass
class RequestRecord:
    """What happened to one request; all times are ``time.perf_counter()`` seconds.

    ``start`` is when the request was handed to the system (its arrival, or later when a
    concurrency limit held it back); ``token_times`` has one entry per output token.
    """

    start: float
    prompt_tokens: int
    ok: bool = True
    error: str | None = None
    first_token: float | None = None
    token_times: list[float] = field(default_factory=list)
    end: float | None = None
    output_tokens: int = 0
    fetched_tokens: int = 0  # prompt tokens whose KV came from the store (0 where unknown)


class Driver(abc.ABC):
    """Executes request specs against a serving system and records each one's timeline."""

    @abc.abstractmethod
    def run(self, specs: list[RequestSpec], max_concurrency: int | None = None,
            progress=None) -> list[RequestRecord]:
        """Send every spec at ``start + spec.arrival_s`` (never more than ``max_concurrency`` in
        flight) and return one record per spec, in spec order. ``progress``, if given, is called
        with no arguments each time a request ends."""


def drive(driver: Driver, specs: list[RequestSpec], max_concurrency: int | None,
          progress: Callable[[], None] | None = None) -> list[RequestRecord]:
    """Run the specs, after one short untimed request (first-step costs stay out of the numbers)."""
    warm = RequestSpec(specs[0].prompt_ids, 2)
    driver.run([warm])
    return driver.run(specs, max_concurrency, progress)
