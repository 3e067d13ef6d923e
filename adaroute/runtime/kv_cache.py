"""Pre-allocated key/value cache for B sequences decoded in lock-step.

Shape letters:
    L  layers    B  sequences    K  key/value heads    S  cache slots    D  head dim

Sequences of different prompt lengths are left-padded to one length, so every sequence writes the
same slot at each step; the first ``pad[b]`` slots of sequence b are never attended to and its
positions count from its first real token (as transformers does with an attention mask). The
attention kernel writes the slots; the engine advances ``pos`` once per forward call.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, head_dim: int, max_len: int,
                 pad: torch.Tensor | None = None, dtype: torch.dtype = torch.float32, device="cpu"):
        shape = (n_layers, batch, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # [L, B, K, S, D]
        self.v = torch.zeros(shape, dtype=dtype, device=device)  # [L, B, K, S, D]
        pad = torch.zeros(batch, dtype=torch.long) if pad is None else pad.to(torch.long).contiguous()
        if pad.shape != (batch,):
            raise ValueError(f"pad must have one entry per sequence ({batch}), got shape {tuple(pad.shape)}")
        self.pad = pad.to(device)  # [B]
        self.padded = bool(pad.any())
        self.pos = 0  # slots filled so far (same for every sequence)

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def pad_or_none(self) -> torch.Tensor | None:
        """The padding, or None when no sequence is padded (kernels then skip masking)."""
        return self.pad if self.padded else None

    def check_room(self, t: int) -> None:
        if self.pos + t > self.max_len:
            raise ValueError(f"KV cache full: {self.pos + t} slots needed, {self.max_len} allocated")

    def advance(self, t: int) -> None:
        self.pos += t

    def rows(self, n: int) -> KVCache:
        """The first n sequences as a cache of their own: the same storage (writes land here), the
        same ``pos`` at the time of the call (a server decodes the live prefix of a larger cache)."""
        view = object.__new__(KVCache)
        view.k, view.v, view.pad = self.k[:, :n], self.v[:, :n], self.pad[:n]  # [L, n, K, S, D], [n]
        view.padded, view.pos = self.padded, self.pos
        return view

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()
