"""The routed output head: every vocabulary row scored from an 8-bit shadow, exact float32 logits for
the rows that score highest.

Shape letters:    T  tokens    H  hidden size    V  vocabulary    K  exact rows per token

The output head is a fifth of a float32 model's bytes per decoded token (the embedded model: 113 of
538 MB). The routed head reads the head's q8_0 blocks instead (``shadow``: 27 % of the bytes, through
the g16 kernels), takes the K rows per token whose shadow logits are highest (``reference.top_rows``)
and computes their logits exactly from the float32 rows (``kernel.head_rows``); every other row keeps
its shadow logit, so sampling and perplexity still see the whole vocabulary, and greedy decoding
picks the exact argmax whenever it is among the K rows. Measured by ``benchmarks/routed_head.py``
(docs/quantised.md, "A routed head"): with K = 256, greedy agreement 1.000, KL to the exact head
1-4e-5 nats per token and perplexity within 0.03 % on held-out text of three domains, for a head
that is not already q8_0-representable (the embedded model's is: its shadow is exact). A 4-bit
shadow reads 11 MB less but costs 10-100 times the KL (1-3e-3 at K = 1024) for ~1 % of decode speed.

It runs only where the routed FFNs do: an engine whose policy is always dense (the dense arm of a
server, the dense side of an evaluation) uses the exact head. A float32 head only; a block-quantised
head (q8/q4 models) is left exact: it is at most 8 bits already, and its rows are interleaved in the
g16 layout, so K rows would read K groups of 16.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch

from adaroute.kernels.quant_reference import BLOCK, QuantWeight, pack16, quantize

SHADOW_FORMAT = "q8_0"


@dataclass(frozen=True)
class RoutedHead:
    shadow: QuantWeight  # [V, H] the head's blocks (SHADOW_FORMAT), g16 layout
    rows: int  # K

    def logits(self, kernel: ModuleType, x: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
        """x [T, H] (after the final norm) -> logits [T, V]: the shadow's, exact in each token's K
        best rows."""
        out = kernel.linear(x, self.shadow)  # [T, V]
        kernel.head_rows(x, head, out, self.rows)
        return out


def routed_head(head: torch.Tensor, rows: int, fmt: str = SHADOW_FORMAT) -> RoutedHead | None:
    """The routed head of a float32 head [V, H] with K = ``rows`` exact rows per token and a shadow
    in block format ``fmt``; None when it does not apply (rows 0, a quantised head, a head on a GPU,
    a row length that is not a whole number of blocks)."""
    if rows <= 0 or not isinstance(head, torch.Tensor) or head.dtype != torch.float32 or head.is_cuda:
        return None
    if head.shape[1] % BLOCK:
        return None
    return RoutedHead(pack16(quantize(head, fmt)), min(int(rows), head.shape[0]))
