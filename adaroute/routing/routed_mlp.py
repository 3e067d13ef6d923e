"""RoutedMLP: a drop-in replacement for a gated (SwiGLU-style) FFN that computes only the units
its router selects, per token.

Shape legend: T = tokens (all leading dims flattened), H = hidden size, F = FFN units.

Weights are kept in the layout a sparse kernel reads: one store ``w_units`` [F, 3, H] holding, for
each unit i, its gate row, its up row and its down column (= row i of down_proj.weight.T) side by
side, so computing a subset of units reads one contiguous 3H block per selected unit (fewer, longer
memory streams than three separate [F, H] matrices). ``w_gate``, ``w_up`` and ``w_down_t`` are
[F, H] views of that store (row stride 3H), not copies.

``forward`` here is the reference: it computes every unit and masks, in plain PyTorch. It defines
the result every fast path must reproduce.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from adaroute.kernels.reference import adapted_down, adapted_gate_up, pack_units
from adaroute.routing.adapter import RoutingAdapter
from adaroute.routing.policy import HoldsPolicy, select_units
from adaroute.routing.router import ShadowRouter


class RoutedMLP(nn.Module, HoldsPolicy):
    def __init__(
        self,
        w_gate: torch.Tensor,
        w_up: torch.Tensor,
        w_down_t: torch.Tensor,
        router: ShadowRouter,
        act_fn: nn.Module,
        layer_idx: int = 0,
    ):
        super().__init__()
        units, hidden = w_gate.shape
        if w_up.shape != (units, hidden) or w_down_t.shape != (units, hidden):
            raise ValueError(
                f"weights: expected w_gate, w_up, w_down_t all [F, H] = {[units, hidden]}, got "
                f"{list(w_up.shape)} and {list(w_down_t.shape)}"
            )
        self.units, self.hidden, self.layer_idx = units, hidden, layer_idx
        # Base weights are a parameter (frozen by default) so a recovery fine-tune can reach them.
        self.w_units = nn.Parameter(pack_units(w_gate.detach(), w_up.detach(), w_down_t.detach()),
                                    requires_grad=False)  # [F, 3, H]
        self.router = router
        self.act_fn = act_fn
        self.threshold: float = -math.inf
        self.min_units: int = 0
        self.max_units: int = units
        self.collector = None  # see adaroute.routing.stats; None = no statistics
        self.soft_tau: float | None = None  # set while training: straight-through soft mask
        self.profile = None  # LayerProfile from calibration (enables density overrides)
        self.adapter: RoutingAdapter | None = None  # low-rank correction of the routed path only

    @classmethod
    def from_linears(
        cls, gate: nn.Linear, up: nn.Linear, down: nn.Linear, act_fn: nn.Module, layer_idx: int, group_size: int
    ) -> RoutedMLP:
        """Build from the dense FFN's three projections (bias-free, as in Llama-family models)."""
        for name, lin in (("gate", gate), ("up", up), ("down", down)):
            if lin.bias is not None:
                raise ValueError(f"{name}_proj: projections with a bias are not supported")
        # Copies, so that training the routed module never edits the original kept for undo.
        w_gate, w_up = gate.weight.detach().clone(), up.weight.detach().clone()  # [F, H]
        w_down_t = down.weight.detach().t().contiguous()  # [F, H]
        router = ShadowRouter.from_weights(w_gate, w_up, w_down_t, group_size, act_fn)
        return cls(w_gate, w_up, w_down_t, router, act_fn, layer_idx)

    # -- weights: [F, H] views of the unit-packed store --------------------------------------------
    @property
    def w_gate(self) -> torch.Tensor:
        return self.w_units[:, 0]

    @property
    def w_up(self) -> torch.Tensor:
        return self.w_units[:, 1]

    @property
    def w_down_t(self) -> torch.Tensor:
        return self.w_units[:, 2]

    # -- policy (``policy`` and ``set_policy`` from HoldsPolicy) -----------------------------------
    @property
    def is_dense(self) -> bool:
        return self.threshold == -math.inf and self.max_units >= self.units

    def select(self, scores: torch.Tensor) -> torch.Tensor:
        """scores [T, F] -> bool mask [T, F]."""
        return select_units(scores, self.threshold, self.min_units, self.max_units)

    # -- compute --------------------------------------------------------------------------------
    def dense_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The dense FFN with the same ops as the original module, so density 1.0 is bit-exact."""
        h = self.act_fn(F.linear(x, self.w_gate)) * F.linear(x, self.w_up)  # [..., F]
        return F.linear(h, self.w_down_t.t())  # [..., H]

    def add_adapter(self, rank: int, generator: torch.Generator) -> RoutingAdapter:
        """Attach a fresh rank-``rank`` routing adapter (a no-op until trained)."""
        self.adapter = RoutingAdapter(self.hidden, self.units, rank).to(self.w_units.device).reset(generator)
        return self.adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., H] -> [..., H]; reference masked path. The adapter applies only while the layer
        routes, so the dense policy stays the original FFN even through this path."""
        if self.is_dense and self.collector is None and self.soft_tau is None:
            return self.dense_forward(x)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.hidden)  # [T, H]
        # Training (soft masks) scores a whole batch per step: the dequantised form is the same score
        # up to rounding at a fraction of the cost; inference uses the exact definition.
        scores = self.router.score(x2) if self.soft_tau is None else self.router.training_score(x2)  # [T, F]
        mask = self.select(scores.detach())  # [T, F]
        adapter = self.adapter.tensors() if self.adapter is not None and not self.is_dense else None
        g, u = adapted_gate_up(x2, self.w_gate, self.w_up, adapter)  # [T, F] each
        h = self.act_fn(g) * u  # [T, F]
        soft = None
        if self.soft_tau is not None:
            # Straight-through: the forward uses the hard mask, the gradient flows through a sigmoid
            # around the threshold, so d loss / d score_i ~ the first-order effect of keeping unit i.
            soft = torch.sigmoid((scores - self._soft_centre(scores)) / self.soft_tau)  # [T, F]
            gate = mask.to(h.dtype) + soft - soft.detach()
        else:
            gate = mask.to(h.dtype)
        if self.collector is not None:
            self.collector.record(self.layer_idx, scores, mask, soft)
        out = adapted_down(h * gate, self.w_down_t, adapter)  # [T, H]
        return out.reshape(*lead, self.hidden)

    def _soft_centre(self, scores: torch.Tensor) -> torch.Tensor | float:
        # Top-k and guarded tokens have no finite threshold: centre on each token's k-th score.
        if math.isfinite(self.threshold):
            return self.threshold
        k = max(1, self.min_units)
        return scores.detach().topk(min(k, self.units), dim=-1).values[:, -1:]

    # -- protocol for training --------------------------------------------------------------------
    def router_parameters(self) -> list[nn.Parameter]:
        return [self.router.shadow_scale, self.router.unit_bias]

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [] if self.adapter is None else list(self.adapter.parameters())

    def base_parameters(self) -> list[nn.Parameter]:
        return [self.w_units]

    def extra_repr(self) -> str:
        return (
            f"layer={self.layer_idx}, units={self.units}, hidden={self.hidden}, threshold={self.threshold:.4g}, "
            f"min_units={self.min_units}, max_units={self.max_units}"
        )
