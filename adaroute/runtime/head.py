"""The routed output head: every vocabulary row scored from a 4-bit shadow, exact logits only for the
rows that score highest.

Shape letters:    T  tokens    H  hidden size    V  vocabulary    K  exact rows per token

The output head is a fifth of a float32 model's bytes per decoded token (the embedded model: 113 of
538 MB), and a token's probability mass sits on a few hundred rows. The routed head reads the head's
q4_1 blocks instead (``shadow``: an eighth of the bytes, the g16 kernels), takes the K rows per token
whose shadow logits are highest (``reference.top_rows``) and computes their logits exactly from the
float32 rows (``kernel.head_rows``); every other row keeps its shadow logit, so sampling and
perplexity still see the whole vocabulary. Greedy decoding picks the exact argmax whenever it is
among the K rows. What it costs in quality (greedy agreement, KL to the exact head, perplexity) is
measured on held-out text by ``benchmarks/routed_head.py`` (docs/quantised.md, "A routed head").

It runs only where the routed FFNs do: an engine whose policy is always dense (the dense arm of a
server, the dense side of an evaluation) uses the exact head. A float32 head only; a block-quantised
head (q8/q4 models) is left exact: its rows are interleaved in the g16 layout, so K rows would read
K groups of 16.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch

from adaroute.kernels.quant_reference import QuantWeight, pack16, quantize

SHADOW_FORMAT = "q4_1"
# Exact rows per token when a routed directory asks for a routed head without saying how many:
# on held-out text of three domains, 1024 rows gave greedy agreement 1.000 and a perplexity within
# 0.25 % of the exact head's (docs/quantised.md).
DEFAULT_ROWS = 1024


@dataclass(frozen=True)
class RoutedHead:
    shadow: QuantWeight  # [V, H] the head's q4_1 blocks, g16 layout
    rows: int  # K

    def logits(self, kernel: ModuleType, x: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
        """x [T, H] (after the final norm) -> logits [T, V]: the shadow's, exact in each token's K
        best rows."""
        out = kernel.linear(x, self.shadow)  # [T, V]
        kernel.head_rows(x, head, out, self.rows)
        return out


def routed_head(head: torch.Tensor, rows: int) -> RoutedHead | None:
    """The routed head of a float32 head [V, H] with K = ``rows`` exact rows per token; None when it
    does not apply (rows 0, a quantised head, a head on a GPU, a row length not a multiple of 32)."""
    if rows <= 0 or not isinstance(head, torch.Tensor) or head.dtype != torch.float32 or head.is_cuda:
        return None
    if head.shape[1] % 32:
        return None
    return RoutedHead(pack16(quantize(head, SHADOW_FORMAT)), min(int(rows), head.shape[0]))
