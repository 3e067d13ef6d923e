"""Explainability: which parts of the model one input used, token by token.

Shape legend: T = tokens of the explained text, L = routed layers, F = FFN units of a layer.

One routed forward over the text (no context before it) with a ScoreTape attached gives each
layer's router scores and selection mask; from them: units used per token and layer (the heatmap),
the tokens that needed the most and least of the model (mean share over layers), and for one chosen
token each layer's highest-scoring selected units.
"""

from __future__ import annotations

import torch
from torch import nn

from adaroute.routing.stats import ScoreTape, collecting

DEFAULT_TEXT = ("The with statement wraps a block in a context manager: on exit the manager's __exit__ "
                "method runs, even when the block raised an exception.")
MAX_TOKENS = 96
TOP_UNITS = 5  # per layer, for the chosen token
EXTREMES = 5  # tokens listed as needing the most / least


@torch.inference_mode()
def explain(model: nn.Module, tokenizer, text: str, token: int | None = None, max_tokens: int = MAX_TOKENS) -> dict:
    """Per-token, per-layer unit counts of ``text`` and the chosen ``token``'s top units per layer
    (default: the token that used the most units)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"][:max_tokens]
    if not ids:
        raise ValueError("explain: the text has no tokens")
    tape = ScoreTape()
    with collecting(model, tape):
        model(input_ids=torch.tensor([ids]), use_cache=False)
    entries = sorted(tape.entries, key=lambda e: e[0])
    counts = torch.stack([mask.reshape(len(ids), -1).sum(dim=1) for _, _, mask, _ in entries], dim=1)  # [T, L]
    widths = torch.tensor([mask.shape[-1] for _, _, mask, _ in entries], dtype=torch.float64)  # [L]
    share = (counts.double() / widths).mean(dim=1)  # [T]
    chosen = int(share.argmax()) if token is None else token
    if not 0 <= chosen < len(ids):
        raise ValueError(f"explain: token index {chosen} is outside the text's {len(ids)} tokens")
    order = share.argsort(descending=True).tolist()
    pieces = [tokenizer.decode([i]) for i in ids]
    return {
        "text": tokenizer.decode(ids),
        "tokens": pieces,
        "layers": [layer for layer, *_ in entries],
        "units": [int(w) for w in widths],
        "counts": counts.tolist(),  # [T][L] units used
        "token_share": share.tolist(),
        "most": [{"index": i, "token": pieces[i], "share": float(share[i])} for i in order[:EXTREMES]],
        "least": [{"index": i, "token": pieces[i], "share": float(share[i])} for i in order[::-1][:EXTREMES]],
        "chosen": {"index": chosen, "token": pieces[chosen], "layers": _top_units(entries, len(ids), chosen)},
    }


def _top_units(entries, tokens: int, t: int) -> list[dict]:
    out = []
    for layer, scores, mask, _ in entries:
        s = scores.reshape(tokens, -1)[t].float()  # [F]
        m = mask.reshape(tokens, -1)[t]  # [F]
        picked = torch.where(m, s, torch.full_like(s, -torch.inf))
        k = min(TOP_UNITS, int(m.sum()))
        top = picked.topk(k)
        out.append({"layer": layer, "used": int(m.sum()), "units": top.indices.tolist(),
                    "scores": [round(float(v), 3) for v in top.values]})
    return out
