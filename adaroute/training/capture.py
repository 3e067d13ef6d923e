"""Calibration capture: tokenise calibration text into windows and record each routed layer's
dense FFN inputs (and, for sensitivity, the gradient of the model's log-likelihood at each FFN
output).

Shape legend: N = captured tokens, W = window length, H = hidden size, L = routed layers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from adaroute.errors import AdarouteError
from adaroute.routing.routed_mlp import RoutedMLP


def token_windows(tokenizer, texts: list[str], window: int, max_tokens: int, start: int | None = None) -> torch.Tensor:
    """Tokenise ``texts``, take ``max_tokens`` text tokens, from the start of each text a share in
    proportion to its length (all of them when they hold fewer), concatenate in order and cut into
    [B, W] non-overlapping windows. One text gives its first ``max_tokens`` tokens; with several, a
    long first file does not crowd out the others. With ``start``, each window is that token followed
    by W - 1 text tokens, as every served request and every window of ``adaroute eval`` begins."""
    cap = max_tokens * CHARS_PER_TOKEN_CAP  # a longer text is tokenised from its start up to here
    pieces = [tokenizer(t[:cap], add_special_tokens=False)["input_ids"] for t in texts]
    # tokens each text holds: counted, or estimated from its characters when it was cut at ``cap``
    sizes = [len(ids) * len(t) / max(1, min(len(t), cap)) for ids, t in zip(pieces, texts, strict=True)]
    total = sum(sizes)
    share = [len(ids) if total <= max_tokens else int(max_tokens * n / total) for ids, n in zip(pieces, sizes,
                                                                                                strict=True)]
    ids = [i for piece, k in zip(pieces, share, strict=True) for i in piece[:k]]
    body = window - (start is not None)  # text tokens per window
    usable = min(len(ids), max_tokens) // body * body
    if usable == 0:
        raise AdarouteError(f"the calibration text is {len(ids)} tokens, fewer than one window of {window}: give "
                            "more text (--calib FILE...; builtin:calib has enough)")
    wins = torch.tensor(ids[:usable], dtype=torch.long).reshape(-1, body)  # [B, W or W - 1]
    if start is None:
        return wins
    return torch.cat([torch.full((wins.shape[0], 1), start, dtype=torch.long), wins], dim=1)  # [B, W]


CHARS_PER_TOKEN_CAP = 64  # no text needs more characters than this per token wanted


@dataclass
class Capture:
    """Dense FFN inputs per routed layer, x[l] [N, H], in window order."""

    inputs: list[torch.Tensor]

    @property
    def tokens(self) -> int:
        return self.inputs[0].shape[0]


@contextmanager
def _record_inputs(mods: list[RoutedMLP], sink: list[list[torch.Tensor]]) -> Iterator[None]:
    # A forward pre-hook is the least intrusive way to observe a module's input.
    def keep(i):
        def hook(_m, args):
            sink[i].append(args[0].detach().reshape(-1, args[0].shape[-1]))  # [W, H]
        return hook

    handles = [m.register_forward_pre_hook(keep(i)) for i, m in enumerate(mods)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def capture_inputs(model: nn.Module, mods: list[RoutedMLP], windows: torch.Tensor, desc: str = "capture") -> Capture:
    """Run ``windows`` [B, W] through ``model`` and keep every routed layer's FFN input."""
    sink: list[list[torch.Tensor]] = [[] for _ in mods]
    with _record_inputs(mods, sink):
        for w in tqdm(windows, desc=desc, unit="win", leave=False):
            model(input_ids=w[None], use_cache=False)
    return Capture([torch.cat(s) for s in sink])


def fisher_gradients(
    model: nn.Module, mods: list[RoutedMLP], windows: torch.Tensor, seed: int, desc: str = "sensitivity"
) -> tuple[Capture, list[torch.Tensor]]:
    """FFN inputs and d log p(y) / d FFN-output per layer, with y sampled from the model itself.

    With y drawn from the model's own prediction, E[g g^T] is the Fisher information, so for a
    perturbation e of one FFN output, 0.5 * E[(g . e)^2] is the second-order KL(dense || perturbed).
    Returns (inputs, grads) with grads[l] [N, H].
    """
    gen = torch.Generator().manual_seed(seed)
    sink: list[list[torch.Tensor]] = [[] for _ in mods]
    grads: list[list[torch.Tensor]] = [[] for _ in mods]
    outs: list[torch.Tensor] = [None] * len(mods)  # type: ignore[list-item]

    def keep_out(i):
        def hook(_m, _args, out):
            out.retain_grad()
            outs[i] = out
        return hook

    def need_grad(_m, args):
        # Frozen models produce inputs without grad; the gradient at the output still needs a graph.
        x = args[0]
        return (x if x.requires_grad else x.detach().requires_grad_(), *args[1:])

    handles = [m.register_forward_hook(keep_out(i)) for i, m in enumerate(mods)]
    handles += [m.register_forward_pre_hook(need_grad) for m in mods]
    try:
        with _record_inputs(mods, sink):
            for w in tqdm(windows, desc=desc, unit="win", leave=False):
                logits = model(input_ids=w[None], use_cache=False).logits[0]  # [W, V]
                logp = F.log_softmax(logits.float(), dim=-1)
                y = torch.multinomial(logp.detach().exp(), 1, generator=gen)  # [W, 1]
                logp.gather(1, y).sum().backward()
                for i, o in enumerate(outs):
                    grads[i].append(o.grad.detach().reshape(-1, o.shape[-1]))
                model.zero_grad(set_to_none=True)
    finally:
        for h in handles:
            h.remove()
    return Capture([torch.cat(s) for s in sink]), [torch.cat(g) for g in grads]
