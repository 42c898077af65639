"""The control plane's view of the data plane's local tier: which chunk keys it holds now.

The tier lives in the data plane (in the offload process's memory, out of reach), so the data plane
reports its key changes on completions and the control plane replays them here. Lookups answer from
this directory first and ask the store only for the rest; the fetch-or-recompute decision prices tier
chunks without network time. It is a hint: a stale entry only means the pipeline reads the store.
"""

from __future__ import annotations


class TierDirectory:
    """Keys the local tier holds, as last reported; cleared when the data plane restarts."""

    def __init__(self) -> None:
        self._keys: set[bytes] = set()

    def apply(self, events: list[tuple[bytes, bool]]) -> None:
        for key, present in events:
            if present:
                self._keys.add(key)
            else:
                self._keys.discard(key)

    def clear(self) -> None:
        self._keys.clear()

    def __contains__(self, key: bytes) -> bool:
        return key in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def run(self, keys: list[bytes]) -> int:
        """How many leading ``keys`` the tier holds."""
        n = 0
        while n < len(keys) and keys[n] in self._keys:
            n += 1
        return n

    def longest_prefix(self, store, keys: list[bytes]) -> int:
        """Leading chunks held by the tier or the store; the store is asked only past the tier's run."""
        held = self._keys
        run = self.run(keys)
        if run == len(keys):
            return run
        if not held:
            return store.longest_prefix(keys)  # tier off or empty: the store's own (cheapest) call
        hit = run
        for key, stored in zip(keys[run:], store.contains(keys[run:])):
            if not (stored or key in held):
                break
            hit += 1
        return hit
