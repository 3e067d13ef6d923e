"""End-to-end distillation with routers in the loop: KL(dense || routed) on calibration windows.

The routed forward uses hard masks; gradients reach the router through a straight-through
sigmoid around each layer's threshold (``RoutedMLP.soft_tau``), so d loss / d score_i is the
first-order effect on the model's output of keeping unit i. Only router parameters train. The
dense teacher is the same model with dense policies (bit-identical to the base model).

Shape legend: W = window length, V = vocabulary, F = FFN units.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm

from adaroute.routing.quality import dense_policies
from adaroute.routing.routed_mlp import RoutedMLP
from adaroute.routing.stats import ScoreTape, collecting
from adaroute.training.losses import distill_kl, usage_loss, z_loss


@contextmanager
def trainable_only(model: nn.Module, params: list[nn.Parameter]) -> Iterator[None]:
    """Freeze every parameter of ``model`` except ``params`` for the duration of the block."""
    keep = {id(p) for p in params}
    saved = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in saved:
        p.requires_grad_(id(p) in keep)
    try:
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


@contextmanager
def soft_masks(mods: list[RoutedMLP], tau: float) -> Iterator[None]:
    for m in mods:
        m.soft_tau = tau
    try:
        yield
    finally:
        for m in mods:
            m.soft_tau = None


def distill(
    model: nn.Module,
    mods: list[RoutedMLP],
    windows: torch.Tensor,
    usage_targets: dict[int, torch.Tensor],
    steps: int,
    lr: float,
    tau: float,
    z_weight: float,
    usage_weight: float,
) -> list[float]:
    """Train the routers of the routed (non-dense) layers in ``mods``; windows [B, W]. Returns losses."""
    routed = [m for m in mods if not m.is_dense]
    params = [p for m in routed for p in m.router_parameters()]
    opt = torch.optim.Adam(_groups(routed, lr))
    history = []
    with trainable_only(model, params), soft_masks(routed, tau):
        for step in tqdm(range(steps), desc="distill", unit="step", leave=False):
            w = windows[step % len(windows)][None]  # [1, W]
            loss = _step_loss(model, mods, w, usage_targets, z_weight, usage_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            history.append(float(loss.detach()))
    return history


def _groups(routed: list[RoutedMLP], lr: float) -> list[dict]:
    # Scales step relative to their magnitude (see ranking.router_optimizer).
    groups = []
    for m in routed:
        scale = m.router.shadow_scale
        groups.append({"params": [scale], "lr": lr * float(scale.detach().abs().mean())})
        groups.append({"params": [m.router.unit_bias], "lr": lr})
    return groups


def _step_loss(model, mods, w, usage_targets, z_weight, usage_weight) -> torch.Tensor:
    with torch.no_grad(), dense_policies(mods):
        teacher = model(input_ids=w, use_cache=False).logits[0]  # [W, V]
    tape = ScoreTape()
    with collecting(model, tape):
        student = model(input_ids=w, use_cache=False).logits[0]
    loss = distill_kl(student, teacher)
    entries = [(layer, s, soft) for layer, s, _, soft in tape.entries if soft is not None]
    if entries and z_weight:
        loss = loss + z_weight * torch.stack([z_loss(s) for _, s, _ in entries]).mean()
    if entries and usage_weight:
        terms = [usage_loss(soft, usage_targets[layer]) for layer, _, soft in entries if layer in usage_targets]
        loss = loss + usage_weight * torch.stack(terms).mean()
    return loss
