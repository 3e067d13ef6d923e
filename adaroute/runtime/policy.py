"""Execution policy: whether a forward call runs a routed layer sparse or dense.

Sparse execution pays off only while weight bytes dominate. With T tokens in one call the router
runs T times and the union of the T tokens' unit sets is gathered, so a layer at density d reads
about

    union(d, T) + T * r      of the dense FFN's bytes,   union(d, T) = 1 - (1 - d)^T,

where r is the router's share of those bytes (0.105 for the embedded model's int4 shadow). The
independence assumption behind ``union`` overestimates the union a little (selected units of
neighbouring tokens overlap more than chance), so the model is on the cautious side.
``benchmarks/crossover.py`` measures the real ratio; on the embedded model, two threads
(docs/perf.md): d = 0.35 → 0.49 / 0.73 / 1.02 at 1 / 2 / 3 tokens (model: 0.46 / 0.79 / 1.04),
d = 0.5 → 0.62 / 0.94 / 1.09 (model: 0.61 / 0.96 / 1.19).

The default policy therefore decides per layer: one token in flight always runs sparse (decode is
what routing is for), and T > 1 tokens run sparse while the model's byte share stays below
``MAX_SPARSE_SHARE``; prefill and large batches run dense. A fixed crossover (the same for every
layer) can be given instead, per engine or with ``ADAROUTE_SPARSE_MAX_TOKENS``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

# Sparse for T > 1 tokens only where the cost model predicts at most this share of the dense bytes:
# the margin covers the per-token work the byte count leaves out (scoring arithmetic, selection).
MAX_SPARSE_SHARE = 0.9
MAX_MODELLED_TOKENS = 8  # above this many tokens in flight a routed layer always runs dense


def _env_crossover() -> int | None:
    raw = os.environ.get("ADAROUTE_SPARSE_MAX_TOKENS")
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"ADAROUTE_SPARSE_MAX_TOKENS must be an integer, got {raw!r}") from None


def sparse_byte_share(density: float, tokens: int, router_share: float) -> float:
    """Modelled bytes of a sparse call over a dense one, for ``tokens`` tokens in flight."""
    return 1.0 - (1.0 - density) ** tokens + tokens * router_share


@dataclass(frozen=True)
class ExecutionPolicy:
    """``sparse_max_tokens``: None (default) = decided per layer by the cost model above; a number =
    routed layers run sparse when at most this many tokens are in flight (0 = always dense, a huge
    value = always sparse)."""

    sparse_max_tokens: int | None = field(default_factory=_env_crossover)

    def __post_init__(self):
        if self.sparse_max_tokens is not None and self.sparse_max_tokens < 0:
            raise ValueError(f"sparse_max_tokens must be >= 0, got {self.sparse_max_tokens}")

    def layer_max_tokens(self, density: float | None, router_share: float) -> int:
        """Most tokens in flight at which a layer at ``density`` (None: unknown) still runs sparse."""
        if self.sparse_max_tokens is not None:
            return self.sparse_max_tokens
        if density is None:
            return 1
        t = 1
        while t < MAX_MODELLED_TOKENS and sparse_byte_share(density, t + 1, router_share) <= MAX_SPARSE_SHARE:
            t += 1
        return t

    @property
    def dense(self) -> bool:
        """Nothing ever runs sparse (``always_dense``): the engine is the original model."""
        return self.sparse_max_tokens == 0

    def sparse(self, tokens_in_flight: int) -> bool:
        """Whether a layer of unknown density runs sparse (the fixed crossover, or one token)."""
        return tokens_in_flight <= self.layer_max_tokens(None, 0.0)

    @classmethod
    def always_dense(cls) -> ExecutionPolicy:
        return cls(0)

    @classmethod
    def always_sparse(cls) -> ExecutionPolicy:
        return cls(1 << 30)
