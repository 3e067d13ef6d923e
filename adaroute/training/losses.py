"""Router losses. Each takes tensors and returns a scalar; nothing here holds state.

Shape legend: T = tokens, F = FFN units, V = vocabulary.

Why these losses:
- ``dropped_energy``: with a per-layer threshold, the FFN output error of a token is the sum of the
  dropped units' vectors h_i * W_down[:, i]; treating their directions as uncorrelated, its squared
  norm is the sum of the dropped units' squared contributions c_i^2. Thresholding the *true*
  contributions at a layer-wide level is exactly the selection that minimises this total at a
  fixed mean density (it greedily keeps the largest c^2). So the router is trained to minimise the
  (soft) dropped energy at its own threshold, which it sets at the target density: a ranking loss
  that weighs each mistake by what it costs, and whose gradient concentrates on units near the
  decision boundary.
- ``z_loss``: the threshold rule is invariant to a common shift of a layer's scores; without an
  anchor the scores drift while training (ST-MoE's router z-loss keeps router logits small for the
  same reason). The thresholds are re-calibrated afterwards, so the anchor costs nothing.
- ``usage_loss``: Bernoulli KL between each unit's soft selection rate and the rate at which the
  hindsight oracle selects it at the same density; it is large exactly for units that the router
  never (or always) picks while the oracle does not agree, i.e. units dead or saturated by accident.
- ``distill_kl``: KL(dense || routed) on next-token distributions, the teacher-weighted direction
  that matches how perplexity punishes the routed model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_mask(scores: torch.Tensor, threshold: torch.Tensor | float, tau: float) -> torch.Tensor:
    """sigmoid((scores - threshold) / tau), [T, F]."""
    return torch.sigmoid((scores - threshold) / tau)


def quantile_threshold(scores: torch.Tensor, density: float) -> torch.Tensor:
    """Detached layer-wide threshold that keeps a ``density`` share of the entries of [T, F]."""
    flat = scores.detach().flatten()
    k = max(1, min(flat.numel(), round(density * flat.numel())))
    return flat.topk(k).values[-1]


def dropped_energy(scores: torch.Tensor, energy: torch.Tensor, density: float, tau: float) -> torch.Tensor:
    """Share of the squared contribution ``energy`` [T, F] that the soft-thresholded router drops."""
    keep = soft_mask(scores, quantile_threshold(scores, density), tau)  # [T, F]
    return (energy * (1.0 - keep)).sum() / energy.sum().clamp_min(1e-30)


def z_loss(scores: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of logsumexp(scores)^2, scores [T, F]."""
    return torch.logsumexp(scores, dim=-1).pow(2).mean()


def usage_loss(keep: torch.Tensor, target_rate: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Mean Bernoulli KL(target || soft usage) over units; keep [T, F] soft mask, target_rate [F]."""
    p = keep.mean(dim=0).clamp(eps, 1 - eps)  # [F]
    r = target_rate.clamp(eps, 1 - eps)
    return (r * (r / p).log() + (1 - r) * ((1 - r) / (1 - p)).log()).mean()


def oracle_rate(energy: torch.Tensor, density: float) -> torch.Tensor:
    """[F] share of tokens for which the layer-wide hindsight threshold keeps each unit."""
    return (energy >= quantile_threshold(energy, density)).float().mean(dim=0)


def distill_kl(routed_logits: torch.Tensor, dense_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(dense || routed); logits [T, V]."""
    target = F.log_softmax(dense_logits.float(), dim=-1)
    return F.kl_div(F.log_softmax(routed_logits.float(), dim=-1), target, log_target=True, reduction="batchmean")
