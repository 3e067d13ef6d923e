"""Per-layer router fit on captured FFN inputs: learn the shadow's scales and the unit biases so
that the router ranks units by their hindsight contribution (see ``losses`` for why this loss).

Shape legend: N = captured tokens, B = batch tokens, H = hidden size, F = FFN units.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adaroute.routing.policy import select_units
from adaroute.routing.routed_mlp import RoutedMLP
from adaroute.training.losses import (
    dropped_energy,
    oracle_rate,
    quantile_threshold,
    soft_mask,
    usage_loss,
    z_loss,
)


@dataclass
class FitTerms:
    """Which terms the fit uses (the ablation switches them off one at a time)."""

    z_loss: float
    usage_loss: float
    tau: float


def contribution_energy(m: RoutedMLP, x: torch.Tensor) -> torch.Tensor:
    """Squared hindsight contribution (|act(g) * u| * ||W_down[:, i]||)^2, x [B, H] -> [B, F]."""
    with torch.no_grad():
        h = m.act_fn(x @ m.w_gate.t()) * (x @ m.w_up.t())  # [B, F]
        return (h * m.w_down_t.norm(dim=1)).pow(2)


def hard_dropped_energy(m: RoutedMLP, x: torch.Tensor, density: float) -> float:
    """Share of contribution energy dropped by the router's layer-wide threshold at ``density``."""
    with torch.no_grad():
        scores = m.router.score(x)  # [B, F]
        energy = contribution_energy(m, x)
        k = max(1, round(density * scores.numel()))
        keep = scores >= scores.flatten().topk(k).values[-1]
        return float((energy * ~keep).sum() / energy.sum())


def fit_layer(
    m: RoutedMLP,
    x: torch.Tensor,
    density: float,
    steps: int,
    batch: int,
    lr: float,
    terms: FitTerms,
    gen: torch.Generator,
) -> list[float]:
    """Adam on the router's scales and biases; returns the loss per step. x [N, H] captured inputs."""
    opt = router_optimizer(m, lr)
    history = []
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (min(batch, x.shape[0]),), generator=gen)
        loss = layer_loss(m, x[idx], density, terms)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append(float(loss.detach()))
    return history


def router_optimizer(m: RoutedMLP, lr: float) -> torch.optim.Optimizer:
    """Adam with the scales' step sized relative to their magnitude (~1e-2): Adam's steps are absolute,
    so one rate for scales and log-space biases would move the scales by tens of percent per step."""
    scale, bias = m.router.shadow_scale, m.router.unit_bias
    return torch.optim.Adam(
        [{"params": [scale], "lr": lr * float(scale.detach().abs().mean())}, {"params": [bias], "lr": lr}]
    )


def layer_loss(m: RoutedMLP, xb: torch.Tensor, density: float, terms: FitTerms) -> torch.Tensor:
    """dropped energy + z-loss + usage for one batch xb [B, H]."""
    energy = contribution_energy(m, xb)  # [B, F]
    scores = m.router.score(xb)  # [B, F]
    loss = dropped_energy(scores, energy, density, terms.tau)
    if terms.z_loss:
        loss = loss + terms.z_loss * z_loss(scores)
    if terms.usage_loss:
        keep = soft_mask(scores, quantile_threshold(scores, density), terms.tau)
        loss = loss + terms.usage_loss * usage_loss(keep, oracle_rate(energy, density))
    return loss


def selection_overlap(m: RoutedMLP, x: torch.Tensor) -> float:
    """Share of the router's selected units that the oracle, at the same per-token count, also picks."""
    with torch.no_grad():
        mask = select_units(m.router.score(x), m.threshold, m.min_units, m.max_units)  # [B, F]
        energy = contribution_energy(m, x)
        k = mask.sum(dim=-1, keepdim=True)  # [B, 1]
        rank = energy.argsort(dim=-1, descending=True).argsort(dim=-1)  # [B, F]
        oracle = rank < k
        return float((mask & oracle).sum() / mask.sum().clamp_min(1))
