"""The router: a per-unit contribution predictor built from an int4 shadow of gate/up.

Shape legend: T = tokens, H = hidden size, F = FFN units, G = group size.

A unit's hindsight contribution to the FFN output is |act(gate_i(x)) * up_i(x)| * ||W_down[:, i]||.
The router evaluates the same formula with int4 copies of gate/up (and the input rounded to int8
per group of 32, so that fast kernels compute it with exact integer dot products), in log space:

    score[t, i] = log(|silu(g_hat[t, i]) * u_hat[t, i]| + 1e-20) + unit_bias[i]

``unit_bias`` starts at log ||W_down[:, i]||, so the untrained score is the log of the hindsight
contribution estimate. Training adjusts the shadow's scales (the int4 codes stay fixed) and the
biases; the formula itself is the contract the fast kernels implement.
"""

from __future__ import annotations

import torch
from torch import nn

from adaroute.kernels.reference import router_scores, router_scores_dequantized
from adaroute.routing.shadow import check_group_size, dequantize, gptq_int4, pack_int4, quantize_int4

_LOG_EPS = 1e-20


class ShadowRouter(nn.Module):
    """Scores FFN units for each token.

    Buffers/parameters (names as in the checkpoint):
        shadow_q      uint8   [2F, H // 2]  buffer, fixed int4 codes of [W_gate; W_up]
        shadow_scale  float32 [2F, H // G]  parameter
        unit_bias     float32 [F]           parameter
    """

    def __init__(self, hidden: int, units: int, group_size: int = 32, act_fn: nn.Module | None = None):
        super().__init__()
        check_group_size(hidden, group_size)
        self.hidden, self.units, self.group_size = hidden, units, group_size
        self.act_fn = act_fn if act_fn is not None else nn.SiLU()
        self.register_buffer("shadow_q", torch.zeros(2 * units, hidden // 2, dtype=torch.uint8))
        self.shadow_scale = nn.Parameter(torch.zeros(2 * units, hidden // group_size))
        self.unit_bias = nn.Parameter(torch.zeros(units))

    @classmethod
    def from_weights(
        cls,
        w_gate: torch.Tensor,
        w_up: torch.Tensor,
        w_down_t: torch.Tensor,
        group_size: int = 32,
        act_fn: nn.Module | None = None,
    ) -> ShadowRouter:
        """Untrained router from the FFN weights: w_gate, w_up [F, H]; w_down_t [F, H]."""
        units, hidden = w_gate.shape
        router = cls(hidden, units, group_size, act_fn)
        q, scale = quantize_int4(torch.cat([w_gate, w_up], dim=0), group_size)  # [2F, H], [2F, H/G]
        with torch.no_grad():
            router.shadow_q.copy_(pack_int4(q))
            router.shadow_scale.copy_(scale)
            router.unit_bias.copy_(w_down_t.detach().float().norm(dim=1).clamp_min(1e-12).log())
        return router

    @torch.no_grad()
    def refit_codes(self, w_gate: torch.Tensor, w_up: torch.Tensor, hessian: torch.Tensor) -> None:
        """Re-choose the int4 codes and scales for calibration inputs with Hessian E[x x^T] [H, H]."""
        q, scale = gptq_int4(torch.cat([w_gate, w_up], dim=0), hessian, self.group_size)  # [2F, H], [2F, H/G]
        self.shadow_q.copy_(pack_int4(q))
        self.shadow_scale.copy_(scale)

    def shadow_weight(self) -> torch.Tensor:
        """Dequantised [W_gate_hat; W_up_hat], [2F, H]."""
        return dequantize(self.shadow_q, self.shadow_scale)

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., H] -> scores [..., F] (log of the predicted contribution).

        The exact definition (x quantised to int8 per group, exact integer group dots with the int4
        codes, then scaled) lives in one place, the reference kernel, so that every fast kernel and
        this module agree; it is differentiable in ``shadow_scale`` and ``unit_bias``.
        """
        return router_scores(x, self.shadow_q, self.shadow_scale, self.unit_bias)

    def training_score(self, x: torch.Tensor) -> torch.Tensor:
        """``score`` up to float rounding, by one dequantised product (fast for training batches)."""
        return router_scores_dequantized(x, self.shadow_q, self.shadow_scale, self.unit_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.score(x)

    def extra_repr(self) -> str:
        return f"hidden={self.hidden}, units={self.units}, group_size={self.group_size}, bits=4"


class ExactRouter(nn.Module):
    """The router of block-quantised routed models: the shadow's formula on the FFN's own gate and up.

        score[t, i] = log(|silu(gate_i(x_t)) * up_i(x_t)| + 1e-20) + unit_bias[i]

    At 4 bits an int4 shadow is as large as gate and up themselves, so the quantised runtime computes
    gate and up of every unit exactly and scores those (``quant_reference.exact_scores`` is the
    definition; the kernels round activations as the g16 layout does). A routed directory stored as
    blocks keeps only ``unit_bias`` (trained with the shadow it replaces); this module scores the
    loaded model's float32 gate and up the same way.

    Parameter (name as in the checkpoint): unit_bias  float32 [F].
    """

    def __init__(self, owner: nn.Module, unit_bias: torch.Tensor):
        super().__init__()
        object.__setattr__(self, "_owner", owner)  # not a submodule: the FFN that holds gate and up
        self.units = unit_bias.shape[0]
        self.unit_bias = nn.Parameter(unit_bias.detach().clone())

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, H] -> scores [T, F]."""
        from adaroute.kernels.quant_reference import exact_scores

        return exact_scores(x, self._owner.w_gate, self._owner.w_up, self.unit_bias)

    training_score = score

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.score(x)

    def extra_repr(self) -> str:
        return f"units={self.units}, exact gate/up"


class OracleRouter(nn.Module):
    """Hindsight oracle with the router interface: scores with the exact contribution.

    score[t, i] = log(|act(gate_i(x_t)) * up_i(x_t)| * ||W_down[:, i]||). It reads the full weights,
    so it is a quality ceiling for benchmarks, not a router anyone would run.
    """

    def __init__(self, w_gate: torch.Tensor, w_up: torch.Tensor, w_down_t: torch.Tensor, act_fn: nn.Module):
        super().__init__()
        self.units = w_gate.shape[0]
        self.act_fn = act_fn
        # Plain attributes (not buffers): the oracle shares the FFN's tensors and is never saved.
        self.w_gate, self.w_up = w_gate.detach(), w_up.detach()
        self.log_norm = w_down_t.detach().float().norm(dim=1).clamp_min(1e-12).log()  # [F]

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, H] -> scores [T, F]."""
        h = self.act_fn(x @ self.w_gate.t()) * (x @ self.w_up.t())  # [T, F]
        return torch.log(h.abs() + _LOG_EPS) + self.log_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.score(x)

