"""The report's measurements on one routed model, each a call into the library's own tools.

    quality     compare_with_dense on each --data file, masks kept for the imbalance section
    groups      compare_with_dense per data group (per-window records, for intervals)
    curve       learned router beside the oracle at each density (adaroute.eval.quality_curve)
    speed       decode tokens/s, adaroute dense vs routed, batches 1 and 4, interleaved in one run
    capacity    weight bytes per decoded token (runtime's count) for the bytes-per-token figures

Token counts come from a ``Budget`` so the same code runs on a tiny test model in seconds and on
the embedded model within the report's time target.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from torch import nn
from tqdm.auto import tqdm

from adaroute.routing.quality import compare_with_dense
from adaroute.routing.stats import MaskTape
from adaroute.routing.surgery import routed_modules

SPEED_ENGINES = ("adaroute-dense", "adaroute-routed")


@dataclass(frozen=True)
class Budget:
    """How much each measurement reads (tokens) or generates."""

    window: int = 512  # --data windows
    data_tokens: int = 2048  # per --data file
    group_window: int = 128  # short windows: more of them per group, so tighter intervals
    group_tokens: int = 1024  # per group
    curve_densities: tuple[float, ...] = (1.0, 0.7, 0.5, 0.4, 0.3)
    curve_tokens: int = 1024
    oracle_calib_tokens: int = 2048
    mask_tokens: int = 2048  # tokens whose masks are kept for the imbalance statistics
    batches: tuple[int, ...] = (1, 4)
    prompt_tokens: int = 64
    new_tokens: int = 64
    repeats: int = 2


def quality(model: nn.Module, tokenizer, texts, budget: Budget) -> tuple[list[dict], MaskTape]:
    """compare_with_dense per text (``texts``: adaroute.data.Text); the masks of the first tokens."""
    tape = MaskTape(budget.mask_tokens)
    records = [{"data": t.name, **compare_with_dense(model, tokenizer, t.text, budget.window, budget.data_tokens,
                                                     desc=f"quality {t.name}", collector=tape)}
               for t in texts]
    return records, tape


def groups(model: nn.Module, tokenizer, texts: dict[str, str], budget: Budget) -> dict[str, list[dict]]:
    """{group: per-window records} at the model's own density."""
    return {name: compare_with_dense(model, tokenizer, text, budget.group_window, budget.group_tokens,
                                     desc=f"group {name}")["per_window"]
            for name, text in texts.items()}


def curve(model: nn.Module, tokenizer, text: str, calib_texts: list[str] | None, budget: Budget) -> list[dict]:
    """Learned and (with calibration text) oracle points from 1.0 down; the oracle's thresholds come
    from the model's own calibration data."""
    from adaroute.eval.quality_curve import curve_point, oracle_inputs

    mods = routed_modules(model)
    inputs = None
    if calib_texts:
        inputs = oracle_inputs(model, tokenizer, mods, calib_texts, budget.window, budget.oracle_calib_tokens)
    window = min(budget.window, budget.curve_tokens)
    return [_curve_row(curve_point(model, tokenizer, mods, text, d, window, budget.curve_tokens, inputs))
            if d < 1.0 else _dense_row(inputs is not None) for d in budget.curve_densities]


def _dense_row(oracle: bool) -> dict:
    # Density 1.0 runs the dense FFN, bit-identical to the base model (tested), so it is not re-measured.
    exact = {"perplexity_ratio": 1.0, "top1_agreement": 1.0, "mean_density": 1.0, "ffn_bytes_share": 1.0,
             "ffn_flops_share": 1.0, "tokens": 0}
    cost = ("ffn_bytes_share", "ffn_flops_share")
    oracle_record = {k: v for k, v in exact.items() if k not in cost} if oracle else None
    return {"density": 1.0, "learned": exact, "oracle": oracle_record}


def _curve_row(point: dict) -> dict:
    keys = ("perplexity_ratio", "top1_agreement", "mean_density", "ffn_bytes_share", "ffn_flops_share", "tokens")
    row = {"density": point["density"], "learned": {k: point["learned"][k] for k in keys}}
    # the hindsight oracle is a quality ceiling, not a router the runtime runs: no cost of its own
    row["oracle"] = None if point["oracle"] is None else {k: point["oracle"][k] for k in keys if k in point["oracle"]}
    return row


def speed(model: nn.Module, tokenizer, budget: Budget) -> list[dict]:
    """Decode speed records (adaroute dense and routed) at each batch, engines interleaved."""
    from adaroute.eval.bench import bench_prompts, build_engines, run_engines

    max_len = budget.prompt_tokens + budget.new_tokens + 16
    engines = [e for e in build_engines(model, max_len=max_len) if e.name in SPEED_ENGINES]
    records = []
    with tqdm(total=len(budget.batches) * len(engines) * budget.repeats, desc="decode speed", unit="run") as bar:
        for batch in budget.batches:
            prompts = bench_prompts(tokenizer, batch, budget.prompt_tokens)
            records += run_engines(engines, prompts, budget.new_tokens, budget.repeats,
                                   progress=lambda msg: bar.update(1) if msg.startswith("round") else None)
    return [asdict(r) for r in records]


def capacity(model: nn.Module) -> dict[str, object]:
    """Weight bytes per decoded token as the runtime reads them (``adaroute.runtime.cost``): the fixed
    part (attention, head, router and what a sparse layer reads whatever it selects), the dense total,
    and each routed layer's bytes per selected unit."""
    from adaroute.runtime.cost import unit_bytes, weight_bytes
    from adaroute.runtime.formats import runtime_weights

    w = runtime_weights(model, None, max_positions=1)
    fixed = weight_bytes(w, 0.0)  # routed FFNs at density 0: everything but the selected units
    return {"fixed": fixed["attention"] + fixed["head"] + fixed["router"] + fixed["ffn"] + fixed["adapter"],
            "dense": sum(weight_bytes(w).values()),
            "unit_bytes": {m.layer_idx: unit_bytes(w.layers[m.layer_idx].ffn) for m in routed_modules(model)}}


def calibration(directory: str | Path) -> dict:
    """The routed directory's calibration.json ({} when absent)."""
    path = Path(directory) / "calibration.json"
    return json.loads(path.read_text()) if path.is_file() else {}
