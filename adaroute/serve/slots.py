"""One KV cache shared by sequences of different lengths that join and leave while others decode.

Shape letters:
    L  layers    B  rows (sequences)    K  key/value heads    S  cache slots    D  head dim    P  prompt

The runtime's cache is lock-step: every row writes slot ``pos`` at each step and row b ignores its
first ``pad[b]`` slots (its RoPE positions count from ``pad[b]``). So a sequence of length P can join
at any step as a row with ``pad = pos - P``: its prompt is prefilled alone (exactly as if it were the
only request) and its keys/values are copied into slots pos-P .. pos-1. Three rare moves keep that
possible, each copying only live slots and keeping every row's positions:

- a prompt longer than ``pos`` shifts every row right by the difference first;
- when ``pos`` reaches the end of the cache, every row shifts left by the smallest padding
  (a sequence never needs more than the context, so that frees at least one slot);
- a leaving sequence's row is refilled by the last row, so live rows stay a prefix [0, n) and a
  decode step runs only them (``KVCache.rows``).
When the last sequence leaves, ``pos`` returns to 0.
"""

from __future__ import annotations

import torch

from adaroute.runtime import Engine, KVCache


class SlotCache:
    def __init__(self, engine: Engine, rows: int, max_len: int):
        self.cache = engine.new_cache(rows, max_len)  # k, v [L, B, K, S, D]
        self.pads: list[int] = []  # pad of each live row (host copy of cache.pad[:n])

    @property
    def n(self) -> int:
        return len(self.pads)

    @property
    def pos(self) -> int:
        return self.cache.pos

    @property
    def free(self) -> int:
        return self.cache.batch - self.n

    def join(self, prompt: KVCache, length: int) -> int:
        """Adds a sequence whose ``length`` prompt slots sit at the start of the one-row cache
        ``prompt``; returns its row. Needs a free row and ``length`` <= the cache length."""
        if not self.free:
            raise ValueError("no free row in the batch")
        if length > self.pos:
            self._shift(length - self.pos)
        row, pad = self.n, self.pos - length
        self.cache.k[:, row, :, pad:self.pos] = prompt.k[:, 0, :, :length]
        self.cache.v[:, row, :, pad:self.pos] = prompt.v[:, 0, :, :length]
        self.pads.append(pad)
        self._sync_pad()
        return row

    def leave(self, row: int) -> int | None:
        """Frees ``row``; the last live row moves into it. Returns the row that moved (None if none)."""
        last = self.n - 1
        moved = None
        if row != last:
            self._move_row(last, row)
            self.pads[row] = self.pads[last]
            moved = last
        self.pads.pop()
        if not self.pads:
            self.cache.pos = 0
        self._sync_pad()
        return moved

    def step_view(self) -> KVCache:
        """The live rows as a cache for one decode step (call ``stepped`` after the step)."""
        if self.pos >= self.cache.max_len:
            self._shift(-min(self.pads))
        return self.cache.rows(self.n)

    def stepped(self, view: KVCache) -> None:
        self.cache.pos = view.pos

    def _shift(self, delta: int) -> None:
        """Moves every live row's slots by ``delta`` (positions unchanged: pads move with them)."""
        if delta < 0 and min(self.pads) + delta < 0 or self.pos + delta > self.cache.max_len:
            raise ValueError(f"cannot shift the cache by {delta}: every slot is in use")
        for row, pad in enumerate(self.pads):
            self._copy(row, row, pad, pad + delta, self.pos - pad)
            self.pads[row] = pad + delta
        self.cache.pos += delta
        self._sync_pad()

    def _move_row(self, src: int, dst: int) -> None:
        pad = self.pads[src]
        self._copy(src, dst, pad, pad, self.pos - pad)

    def _copy(self, src: int, dst: int, start: int, to: int, length: int) -> None:
        for t in (self.cache.k, self.cache.v):
            t[:, dst, :, to:to + length] = t[:, src, :, start:start + length].clone()  # [L, K, len, D]

    def _sync_pad(self) -> None:
        n = self.n
        if n:
            self.cache.pad[:n] = torch.tensor(self.pads, dtype=torch.long)
        self.cache.padded = any(self.pads)
