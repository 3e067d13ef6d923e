"""Quality against density: the learned router beside the hindsight oracle, one point per density.

The learned router is moved to each density with the density override (per-layer densities
re-allocated from the stored sensitivities, thresholds interpolated). The oracle scores units by
their exact contribution |act(gate_i) * up_i| * ||W_down[:, i]|| and gets per-layer thresholds
calibrated on calibration text at the same per-layer densities, so the two differ only in how units
are scored.

Shape legend: N = captured calibration tokens, H = hidden size.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from adaroute.routing.policy import LayerPolicy, calibrate_thresholds
from adaroute.routing.profile import apply_density
from adaroute.routing.quality import compare_with_dense
from adaroute.routing.router import OracleRouter


def oracle_inputs(model: nn.Module, tokenizer, mods, calib_texts: list[str], window: int,
                  max_tokens: int) -> list[torch.Tensor]:
    """Each routed layer's dense FFN inputs x[l] [N, H] on the calibration text (oracle thresholds), in
    windows begun with the start token as ``convert``'s are."""
    from adaroute.eval.perplexity import start_id
    from adaroute.training.capture import capture_inputs, token_windows

    wins = token_windows(tokenizer, calib_texts, window, max_tokens, start_id(tokenizer))
    return capture_inputs(model, mods, wins).inputs


@contextmanager
def oracle_routers(mods, inputs: list[torch.Tensor], per_layer: list[float]) -> Iterator[None]:
    """Swap in exact-contribution routers with thresholds calibrated at ``per_layer`` densities."""
    saved = [(m.router, m.policy) for m in mods]
    try:
        for m, x, d in zip(mods, inputs, per_layer, strict=True):
            m.router = OracleRouter(m.w_gate, m.w_up, m.w_down_t, m.act_fn)
            if d < 1.0:
                with torch.no_grad():
                    th = calibrate_thresholds(m.router.score(x), [d], m.profile.min_units, m.profile.max_units)[0]
                m.set_policy(LayerPolicy(th, m.profile.min_units, m.profile.max_units))
        yield
    finally:
        for m, (router, policy) in zip(mods, saved, strict=True):
            m.router = router
            m.set_policy(policy)


def curve_point(model: nn.Module, tokenizer, mods, text: str, density: float, window: int,
                max_tokens: int | None, inputs: list[torch.Tensor] | None = None, start: bool = True) -> dict:
    """{"density", "learned", "oracle"}: compare_with_dense records at ``density`` (oracle: None
    without calibration ``inputs``; ``start`` as compare_with_dense's). The model's policies are
    restored afterwards."""
    learned = compare_with_dense(model, tokenizer, text, window, max_tokens, density=density,
                                 desc=f"learned {density}", start=start)
    oracle = None
    if inputs is not None:
        saved = [m.policy for m in mods]
        try:
            per_layer = apply_density(mods, density)
            with oracle_routers(mods, inputs, per_layer):
                oracle = compare_with_dense(model, tokenizer, text, window, max_tokens, desc=f"oracle {density}",
                                            cost=False, start=start)
        finally:
            for m, p in zip(mods, saved, strict=True):
                m.set_policy(p)
    return {"density": density, "learned": learned, "oracle": oracle}
