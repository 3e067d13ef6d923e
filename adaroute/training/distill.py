"""End-to-end distillation with routers in the loop: KL(dense || routed) on calibration windows.

The routed forward uses hard masks; gradients reach the router through a straight-through
sigmoid around each layer's threshold (``RoutedMLP.soft_tau``), so d loss / d score_i is the
first-order effect on the model's output of keeping unit i. Router parameters train, and with them
the routing adapters where layers have them (``RoutedMLP.add_adapter``): the adapters learn to make
up, under the routed selection, for the units a token does not compute. The base weights never
train. The dense teacher is the same model with dense policies (bit-identical to the base model,
adapters unused).

Shape legend: B = windows per step, W = window length, V = vocabulary, F = FFN units.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from adaroute.config import TrainConfig
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
    train: TrainConfig,
    checkpoint: Path | None = None,
) -> list[float]:
    """Train the routers (and adapters, where attached) of the routed layers of ``mods`` on windows
    [B, W], ``train.distill_batch`` windows per step drawn with a per-step seed. Returns the losses.

    With ``checkpoint``, the trainable state is written there every ``train.checkpoint_every`` steps
    and a run that finds a checkpoint of the same configuration continues from it; since the stages
    before distillation are deterministic, the resumed run ends where an uninterrupted one would.
    """
    routed = [m for m in mods if not m.is_dense]
    params = [p for m in routed for p in (*m.router_parameters(), *m.adapter_parameters())]
    opt = torch.optim.Adam(_groups(routed, train))
    history: list[float] = []
    key = _fingerprint(train, params)
    start = resume(checkpoint, key, params, opt, history)
    with trainable_only(model, params):
        for step in tqdm(range(start, train.distill_steps), desc="distill", unit="step", initial=start,
                         total=train.distill_steps, leave=False):
            pick = torch.randint(len(windows), (train.distill_batch,),
                                 generator=torch.Generator().manual_seed(train.seed * 1_000_003 + step))
            loss = _step_loss(model, mods, windows[pick], usage_targets, train)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            history.append(float(loss.detach()))
            done = step + 1
            if checkpoint is not None and (done % train.checkpoint_every == 0 or done == train.distill_steps):
                save_checkpoint(checkpoint, key, done, params, opt, history)
    return history


def _groups(routed: list[RoutedMLP], train: TrainConfig) -> list[dict]:
    # Scales step relative to their magnitude (see ranking.router_optimizer).
    groups = []
    for m in routed:
        scale = m.router.shadow_scale
        groups.append({"params": [scale], "lr": train.distill_lr * float(scale.detach().abs().mean())})
        groups.append({"params": [m.router.unit_bias], "lr": train.distill_lr})
        if m.adapter is not None:
            groups.append({"params": m.adapter_parameters(), "lr": train.adapt_lr})
    return groups


def _fingerprint(train: TrainConfig, params: list[nn.Parameter]) -> str:
    """What a checkpoint must match to be resumed: the training config and the trainable shapes."""
    return json.dumps([train.to_dict(), [list(p.shape) for p in params]], sort_keys=True)


def save_checkpoint(path: Path, key: str, step: int, params, opt, history: list[float]) -> None:
    """Atomically (write, then rename) store the trainable state after ``step`` steps."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"key": key, "step": step, "params": [p.detach() for p in params], "opt": opt.state_dict(),
                "history": history}, tmp)
    os.replace(tmp, path)


def resume(path: Path | None, key: str, params, opt, history: list[float]) -> int:
    """Load a matching checkpoint into ``params``, ``opt`` and ``history``; returns the step to start at
    (0 without one). A checkpoint of another configuration is ignored (and overwritten later)."""
    if path is None or not path.exists():
        return 0
    state = torch.load(path, weights_only=True)
    if state.get("key") != key:
        return 0
    with torch.no_grad():
        for p, saved in zip(params, state["params"], strict=True):
            p.copy_(saved)
    opt.load_state_dict(state["opt"])
    history[:] = state["history"]
    return int(state["step"])


def _step_loss(model, mods, w, usage_targets, train: TrainConfig) -> torch.Tensor:
    """KL(dense || routed) over the windows w [B, W] plus the weighted router terms."""
    with torch.no_grad(), dense_policies(mods):
        teacher = model(input_ids=w, use_cache=False).logits.flatten(0, 1)  # [B*W, V]
    tape = ScoreTape()
    with collecting(model, tape), soft_masks([m for m in mods if not m.is_dense], train.tau):
        student = model(input_ids=w, use_cache=False).logits.flatten(0, 1)
    loss = distill_kl(student, teacher)
    entries = [(layer, s, soft) for layer, s, _, soft in tape.entries if soft is not None]
    if entries and train.z_loss:
        loss = loss + train.z_loss * torch.stack([z_loss(s) for _, s, _ in entries]).mean()
    if entries and train.usage_loss:
        terms = [usage_loss(soft, usage_targets[layer]) for layer, _, soft in entries if layer in usage_targets]
        loss = loss + train.usage_loss * torch.stack(terms).mean()
    return loss
