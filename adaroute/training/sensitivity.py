"""Per-layer sensitivity: how much the model's output distribution moves when one layer is routed
at a given density, measured on calibration tokens.

Shape legend: N = tokens, H = hidden size, F = FFN units, L = layers, D = grid densities.

For layer l routed alone at density d, its FFN output changes by e_t(d) (the dropped units' sum).
With g_t the gradient of log p(y_t) for y_t sampled from the model (see ``capture.fisher_gradients``),
0.5 * mean_t (g_t . e_t(d))^2 is the second-order estimate of KL(dense || routed) per token. One
backward pass gives g for every layer at once, and e_t(d) is cheap per layer, so a full [L, D]
cost table costs about one forward+backward over the sample, not L * D forward passes.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from adaroute.routing.policy import calibrate_thresholds, select_units
from adaroute.routing.profile import PROFILE_GRID
from adaroute.routing.routed_mlp import RoutedMLP

DEFAULT_GRID = PROFILE_GRID


def layer_cost_curve(m: RoutedMLP, x: torch.Tensor, g: torch.Tensor, grid: tuple[float, ...]) -> torch.Tensor:
    """[D] estimated KL per token of routing layer ``m`` alone; x, g [N, H]."""
    with torch.no_grad():
        scores = m.router.score(x)  # [N, F]
        h = m.act_fn(x @ m.w_gate.t()) * (x @ m.w_up.t())  # [N, F]
        # g . e = g . (dropped h) W_down^T = (dropped h) . (g W_down), so project g once: [N, F]
        gw = g @ m.w_down_t.t()
        costs = []
        for d, th in zip(grid, calibrate_thresholds(scores, list(grid), m.min_units, m.max_units), strict=True):
            if d >= 1.0:
                costs.append(0.0)
                continue
            dropped = ~select_units(scores, th, m.min_units, m.max_units)  # [N, F]
            proj = (h * gw * dropped).sum(dim=-1)  # [N] = g_t . e_t
            costs.append(float(0.5 * proj.pow(2).mean()))
        return torch.tensor(costs, dtype=torch.float64)


def cost_table(
    mods: list[RoutedMLP], inputs: list[torch.Tensor], grads: list[torch.Tensor], grid: tuple[float, ...] = DEFAULT_GRID
) -> torch.Tensor:
    """[L, D] estimated KL per token of routing each layer alone at each grid density."""
    rows = [
        layer_cost_curve(m, x, g, grid)
        for m, x, g in tqdm(list(zip(mods, inputs, grads, strict=True)), desc="sensitivity", unit="layer", leave=False)
    ]
    return torch.stack(rows)
