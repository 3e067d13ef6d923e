"""Distillation text the dense model writes itself (data-free distillation, as LLM-QAT does).

Calibration text is usually one domain (the built-in text is Python documentation). Routers and
adapters distilled only on it learn to imitate the dense model there, and can drift further from it
elsewhere. The dense model's own samples cover whatever the model produces (prose, code, lists,
markup): each sequence starts from a uniformly random ordinary token, takes the most likely next
token for the first few steps (so it settles into something coherent), then samples at temperature 1
from the full distribution. The samples join the calibration windows in the distillation pool only;
capture and threshold calibration still use the user's text, so densities stay calibrated on it.

Shape legend: B = sequences per batch, W = window length, V = vocabulary.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from adaroute.routing.quality import dense_policies
from adaroute.routing.routed_mlp import RoutedMLP

GREEDY_STEPS = 4  # argmax steps after the random first token, then sampling
BATCH = 16  # sequences generated together


@torch.no_grad()
def sample_windows(
    model: nn.Module, tokenizer, mods: list[RoutedMLP], tokens: int, window: int, seed: int
) -> torch.Tensor:
    """About ``tokens`` tokens of the dense model's own text as windows [B, W] (whole windows,
    at least one); deterministic for a seed on a given machine."""
    count = max(1, tokens // window)
    gen = torch.Generator().manual_seed(seed)
    starts = _ordinary_ids(tokenizer, model.config.vocab_size)
    out = []
    with dense_policies(mods), tqdm(total=count * window, desc="self-sample", unit="tok", leave=False) as bar:
        for first in range(0, count, BATCH):
            b = min(BATCH, count - first)
            seed_ids = starts[torch.randint(len(starts), (b,), generator=gen)]  # [B]
            out.append(_sample(model, seed_ids, window, gen, bar))
    return torch.cat(out)  # [count, W]


def _sample(model: nn.Module, first: torch.Tensor, window: int, gen: torch.Generator, bar) -> torch.Tensor:
    """One batch: first tokens [B] -> sequences [B, W], decoded with the model's KV cache."""
    seqs = first[:, None]  # [B, 1]
    step = model(input_ids=seqs, use_cache=True)
    for i in range(1, window):
        logits = step.logits[:, -1].float()  # [B, V]
        if i <= GREEDY_STEPS:
            nxt = logits.argmax(-1, keepdim=True)  # [B, 1]
        else:
            nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)  # [B, 1]
        seqs = torch.cat([seqs, nxt], dim=1)
        bar.update(len(first))
        if i < window - 1:
            step = model(input_ids=nxt, cache=step.cache, use_cache=True)
    bar.update(len(first))
    return seqs


def _ordinary_ids(tokenizer, vocab: int) -> torch.Tensor:
    """Token ids a sequence may start from: the model's vocabulary without special tokens."""
    special = set(tokenizer.all_special_ids)
    return torch.tensor([i for i in range(min(vocab, len(tokenizer))) if i not in special], dtype=torch.long)
