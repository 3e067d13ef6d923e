"""Execution policy: whether a forward call runs the routed layers sparse or dense.

Sparse execution pays off only while weight bytes dominate: with few tokens in flight each selected
row is read once and used a few times. With many tokens (prefill, large batches) the union of the
tokens' unit sets approaches the whole layer and a dense GEMM is faster. The crossover is measured
by ``benchmarks/crossover.py`` on the machine at hand; the default below comes from that script
(see docs/perf.md) and can be overridden per engine or with ``ADAROUTE_SPARSE_MAX_TOKENS``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

# benchmarks/crossover.py, embedded model, density 0.5, one core: sparse/dense time 0.80 at one
# token, 1.22 at two (the router runs per token and the union of two tokens' units is ~3/4 of the
# layer). So only single-token steps go sparse; batched decode runs dense and is never slower.
DEFAULT_SPARSE_MAX_TOKENS = 1


def _default_crossover() -> int:
    raw = os.environ.get("ADAROUTE_SPARSE_MAX_TOKENS")
    if raw is None:
        return DEFAULT_SPARSE_MAX_TOKENS
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"ADAROUTE_SPARSE_MAX_TOKENS must be an integer, got {raw!r}") from None


@dataclass(frozen=True)
class ExecutionPolicy:
    """``sparse_max_tokens``: routed layers run sparse when at most this many tokens are in flight
    (0 = always dense, a huge value = always sparse)."""

    sparse_max_tokens: int = field(default_factory=_default_crossover)

    def __post_init__(self):
        if self.sparse_max_tokens < 0:
            raise ValueError(f"sparse_max_tokens must be >= 0, got {self.sparse_max_tokens}")

    def sparse(self, tokens_in_flight: int) -> bool:
        return tokens_in_flight <= self.sparse_max_tokens

    @classmethod
    def always_dense(cls) -> ExecutionPolicy:
        return cls(0)

    @classmethod
    def always_sparse(cls) -> ExecutionPolicy:
        return cls(1 << 30)
