"""Turning one engine request's token stream into OpenAI text deltas, with stop strings.

Text is re-decoded from all tokens so multi-token characters come out whole; a delta is held
back while it ends in a partial UTF-8 character or could be the start of a stop string.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shadowserve.engine.request import RequestOutput, SamplingParams

FINISH_REASONS = {"stop": "stop", "length": "length", "abort": "abort"}


@dataclass
class Choice:
    index: int
    request_id: str
    prompt_token_ids: list[int]
    stops: list[str]
    params: SamplingParams
    token_ids: list[int] = field(default_factory=list)
    text: str = ""  # the text so far, cut at a stop string once one appears
    sent: int = 0  # characters of ``text`` already streamed
    finish_reason: str | None = None
    output: RequestOutput | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add_token(self, token_id: int, decode) -> bool:
        """Record a token; True when a stop string ended the choice (the caller aborts the request)."""
        if self.finished:
            return False
        self.token_ids.append(token_id)
        self.text = decode(self.token_ids)
        return self._cut_at_stop()

    def finish(self, output: RequestOutput, decode) -> None:
        if self.finished:
            return
        self.output = output
        self.token_ids = list(output.token_ids)
        self.text = decode(self.token_ids)
        if not self._cut_at_stop():
            self.finish_reason = FINISH_REASONS.get(output.finish_reason or "stop", "stop")

    def _cut_at_stop(self) -> bool:
        for stop in self.stops:
            at = self.text.find(stop)
            if at >= 0:
                self.text = self.text[:at]
                self.finish_reason = "stop"
                return True
        return False

    def _possible_stop_start(self) -> int:
        """Length of the longest tail of the text that could grow into a stop string."""
        hold = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(self.text)), hold, -1):
                if self.text.endswith(stop[:k]):
                    hold = k
                    break
        return hold

    def take_delta(self) -> str:
        """Text not yet streamed that is safe to send now."""
        end = len(self.text)
        if not self.finished:
            if self.text.endswith("\ufffd"):
                end -= 1  # an incomplete multi-byte character
            end = min(end, len(self.text) - self._possible_stop_start())
        if end <= self.sent:
            return ""
        delta = self.text[self.sent:end]
        self.sent = end
        return delta
