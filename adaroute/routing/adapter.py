"""Routing adapters: low-rank corrections of a routed FFN that apply only on its routed path.

Shape legend: H = hidden size, F = FFN units, r = adapter rank.

A routed layer computes only the units its router selects; a small model loses quality there that
the base weights cannot recover without changing the dense model. An adapter adds, per layer, rank-r
corrections to gate, up and down (the formula and layout are the kernel contract,
``adaroute.kernels.reference.Adapter``). It is trained with the routers under the routed selection
(``adaroute.training.distill``) and used only when the layer routes: the dense policy, and therefore
the dense path of an adapted model, is the original model bit for bit.

Bytes read per token at density d: 3 r H (input and output projections) + d F 3 r (selected units'
rows), about 2 % of the dense FFN at r = 16, d = 0.35 on the embedded model.
"""

from __future__ import annotations

import torch
from torch import nn

from adaroute.kernels.reference import Adapter


class RoutingAdapter(nn.Module):
    """Parameters (names as in the checkpoint): w_in [2r, H], w_units [F, 3, r], w_out [H, r]."""

    def __init__(self, hidden: int, units: int, rank: int):
        super().__init__()
        if rank <= 0:
            raise ValueError(f"rank: must be > 0, got {rank}")
        self.hidden, self.units, self.rank = hidden, units, rank
        self.w_in = nn.Parameter(torch.zeros(2 * rank, hidden))
        self.w_units = nn.Parameter(torch.zeros(units, 3, rank))
        self.w_out = nn.Parameter(torch.zeros(hidden, rank))

    @torch.no_grad()
    def reset(self, generator: torch.Generator) -> RoutingAdapter:
        """LoRA start: the input sides random (unit-variance outputs), the output sides zero, so a new
        adapter changes nothing and every factor still gets a gradient."""
        self.w_in.copy_(torch.randn(self.w_in.shape, generator=generator) / self.hidden ** 0.5)
        self.w_units.zero_()
        self.w_units[:, 2] = torch.randn(self.units, self.rank, generator=generator) / self.units ** 0.5
        self.w_out.zero_()
        return self

    def tensors(self) -> Adapter:
        return Adapter(self.w_in, self.w_units, self.w_out)

    def extra_repr(self) -> str:
        return f"hidden={self.hidden}, units={self.units}, rank={self.rank}"
