"""The engine's prefill cost, fitted to the step times it reports: what computing ``n`` tokens costs
when ``s`` tokens of context are already in the KV cache.

A step's time is modelled as ``a + b*tokens + c*pairs + d*kv_tokens``: a fixed cost per step, the
weight matmuls (per token), attention (per query-key pair: a token at position ``p`` attends over
``p + 1`` keys) and reading the paged KV once per request in the step (per context token). The last two
are why computing the rest of a prompt after a partial fetch costs more per token than a prefill from
the start: those tokens sit at the end of a long context. A per-token fit alone misjudged exactly that
(bench tiers at 10 Mbit/s: a partial fetch predicted 2% ahead, 13% behind in fact).

The terms are fitted by least squares with exponential forgetting (recent steps weigh most). A model is
used only when the recent steps hold more distinct shapes than it has terms (so at least one residual
checks it: three shapes fit three terms exactly, timing noise included, which was measured to misjudge
by 20%), its terms are told apart and none is negative; otherwise fewer terms, down to the per-token fit.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from shadowserve.engine.remote_kv import pairs_of

TERMS = ("step", "token", "pair", "kv_token")
SUBSETS = ((0, 1, 2, 3), (0, 1, 2), (0, 1))  # the richest model the data determine wins
MAX_CONDITION = 1e6  # of the scaled normal equations: beyond it the terms are not told apart
RECENT_SHAPES = 32  # distinct step shapes remembered, most recent first out of the window last


class PrefillFit:
    """Step seconds against (tokens, pairs, kv_tokens); ``predict`` prices a prefill at a given context."""

    def __init__(self, decay: float = 0.97) -> None:
        self.decay = decay
        self._xtx = np.zeros((4, 4))
        self._xty = np.zeros(4)
        self._w = 0.0
        self._shapes: OrderedDict[tuple[int, int, int], None] = OrderedDict()  # recent distinct steps
        self._coef: tuple[float, float, float, float] | None = None  # solved since the last step, if any

    def add(self, tokens: int, seconds: float, pairs: int = 0, kv_tokens: int = 0) -> None:
        """One step: ``tokens`` run, ``pairs`` query-key pairs attended, ``kv_tokens`` of KV read."""
        x = np.array([1.0, tokens, pairs, kv_tokens])
        self._xtx = self._xtx * self.decay + np.outer(x, x)
        self._xty = self._xty * self.decay + x * seconds
        self._w = self._w * self.decay + 1
        self._shapes[(tokens, pairs, kv_tokens)] = None
        self._shapes.move_to_end((tokens, pairs, kv_tokens))
        if len(self._shapes) > RECENT_SHAPES:
            self._shapes.popitem(last=False)
        self._coef = None

    def coefficients(self) -> tuple[float, float, float, float] | None:
        """(a, b, c, d) of the richest model the steps determine with every term >= 0; None before any step.

        Solved once per new step: a decision prices every split of a prompt with the same fit.
        """
        if self._coef is None:
            self._coef = self._fit()
        return self._coef

    def _fit(self) -> tuple[float, float, float, float] | None:
        if self._w == 0 or self._xtx[1, 1] <= 0:
            return None
        for cols in SUBSETS:
            coef = self._solve(list(cols))
            if coef is not None:
                return coef
        mx, my = self._xtx[0, 1] / self._w, self._xty[0] / self._w
        return 0.0, my / mx, 0.0, 0.0  # too little spread in step sizes (or noise): cost proportional to tokens

    def _solve(self, cols: list[int]) -> tuple[float, float, float, float] | None:
        if len({tuple(shape[c - 1] for c in cols[1:]) for shape in self._shapes}) <= len(cols):
            return None  # no residual left to check the model against
        m = self._xtx[np.ix_(cols, cols)]
        diag = np.sqrt(np.diag(m))
        if np.any(diag <= 0):
            return None
        if np.linalg.cond(m / np.outer(diag, diag)) > MAX_CONDITION:
            return None
        sol = np.linalg.solve(m, self._xty[cols])
        if np.any(sol[1:] < 0) or sol[1] == 0:
            return None
        out = [0.0, 0.0, 0.0, 0.0]
        for i, v in zip(cols, sol):
            out[i] = float(v)
        out[0] = max(0.0, out[0])  # a small negative intercept is noise around a cost-free step
        return out[0], out[1], out[2], out[3]

    def predict(self, tokens: int, context: int = 0, step_tokens: int = 0) -> float | None:
        """Seconds to compute ``tokens`` after ``context`` cached ones, in steps of ``step_tokens`` (0: one)."""
        coef = self.coefficients()
        if coef is None:
            return None
        a, b, c, d = coef
        step = step_tokens if step_tokens > 0 else max(1, tokens)
        total, done = 0.0, 0
        while done < tokens:
            n = min(step, tokens - done)
            s = context + done
            total += a + b * n + c * pairs_of(n, s) + d * (s + n)
            done += n
        return total
