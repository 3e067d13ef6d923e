"""Load imbalance and capacity from selection masks.

Shape legend: T = tokens, F = FFN units of a layer, L = routed layers, B = tokens in flight.

Definitions (what the report prints):
    unit use        share of tokens that selected a unit (0 = never, 1 = every token):
                    ``routing.stats.unit_use``, which the server's imbalance gauge shares
    Gini            of the units' use counts in a layer: 0 = every unit used equally, (F-1)/F = one
                    unit does all the work
    never           share of units no token selected; almost always: selected by >= ALMOST_ALWAYS
    token density   share of all FFN units (over every routed layer) one token used
    union(B)        share of a layer's units that B tokens in flight select together, what one batched
                    sparse step must read; B tokens are drawn at random from the measured ones (in
                    serving they come from different requests), beside the independence model
                    1 - (1 - d)^B that the execution policy uses
    bytes per token weight bytes one decoded token reads at batch 1: attention, head and router
                    (fixed) plus its selected units' rows
"""

from __future__ import annotations

import torch

from adaroute.routing.stats import unit_use

ALMOST_ALWAYS = 0.95
PERCENTILES = (10, 50, 90, 99)
USAGE_BINS = 20  # histogram of unit use over [0, 1]
UNION_BATCHES = tuple(range(1, 9))


def gini(counts: torch.Tensor) -> float:
    """Gini coefficient of non-negative ``counts`` [F] (0 when all are equal or all zero)."""
    x = counts.double().flatten().sort().values
    n, total = x.numel(), float(x.sum())
    if n == 0 or total == 0:
        return 0.0
    rank = torch.arange(1, n + 1, dtype=torch.float64)
    return float(((2 * rank - n - 1) * x).sum() / (n * total))


def percentiles(values: torch.Tensor, ps=PERCENTILES) -> dict[str, float]:
    """{"p10": …}: linear-interpolated percentiles of ``values``, plus the mean."""
    v = values.double().flatten()
    q = torch.quantile(v, torch.tensor([p / 100 for p in ps], dtype=torch.float64))
    return {"mean": float(v.mean()), **{f"p{p}": float(x) for p, x in zip(ps, q, strict=True)}}


def layer_usage(mask: torch.Tensor) -> dict:
    """One layer's mask [T, F] -> use histogram, Gini, never / almost-always shares, token density."""
    tokens, units = mask.shape
    use = unit_use(mask.sum(dim=0), tokens)  # [F]
    hist = torch.histc(use, bins=USAGE_BINS, min=0.0, max=1.0)
    return {
        "density": float(use.mean()),
        "gini": gini(mask.sum(dim=0)),
        "never": float((use == 0).double().mean()),
        "almost_always": float((use >= ALMOST_ALWAYS).double().mean()),
        "usage_histogram": [int(c) for c in hist],
        "token_density": percentiles(mask.sum(dim=1).double() / units),
    }


def token_density(masks: dict[int, torch.Tensor]) -> torch.Tensor:
    """[T]: units a token used over every layer, as a share of all routed units."""
    used = sum(m.sum(dim=1).double() for m in masks.values())
    return used / sum(m.shape[1] for m in masks.values())


def union_growth(masks: dict[int, torch.Tensor], batches=UNION_BATCHES, samples: int = 64, seed: int = 0) -> dict:
    """Mean union share over layers for B tokens in flight, measured and under independence."""
    tokens = next(iter(masks.values())).shape[0]
    g = torch.Generator().manual_seed(seed)
    units = sum(m.shape[1] for m in masks.values())
    measured, independent = [], []
    for b in batches:
        if b > tokens:
            break
        picks = torch.stack([torch.randperm(tokens, generator=g)[:b] for _ in range(samples)])  # [S, B]
        union = sum(float(m[picks].any(dim=1).sum(dim=1).double().mean()) for m in masks.values())
        measured.append(union / units)
        independent.append(sum((1 - (1 - m.double().mean()) ** b) * m.shape[1] for m in masks.values()).item() / units)
    return {"batch": list(batches[: len(measured)]), "measured": measured, "independent": independent}


def bytes_per_token(masks: dict[int, torch.Tensor], unit_bytes: dict[int, int], fixed_bytes: int) -> torch.Tensor:
    """[T]: weight bytes each token reads at batch 1 (``unit_bytes``: one unit's gate, up and down rows)."""
    return fixed_bytes + sum(m.sum(dim=1).double() * unit_bytes[l] for l, m in masks.items())


def imbalance(masks: dict[int, torch.Tensor], unit_bytes: dict[int, int], fixed_bytes: int, dense_bytes: int) -> dict:
    """Everything the load-imbalance section shows, from masks {layer: [T, F]}."""
    per_token_bytes = bytes_per_token(masks, unit_bytes, fixed_bytes)
    return {
        "tokens": next(iter(masks.values())).shape[0],
        "almost_always_threshold": ALMOST_ALWAYS,
        "layers": {str(l): layer_usage(m) for l, m in masks.items()},
        "token_density": percentiles(token_density(masks)),
        "union": union_growth(masks),
        "bytes_per_token": {**percentiles(per_token_bytes), "dense": dense_bytes, "fixed": fixed_bytes},
    }
