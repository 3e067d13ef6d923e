"""Tiny routed Llama models for unit tests (hidden 64, FFN 128, 2 layers)."""

import pytest
import torch

from adaroute.routing import LayerPolicy, calibrate_threshold, route_model
from adaroute.routing.policy import guard_units
from tests.fixtures import make_tiny_llama


def calibrated_copy(seed=0, density=0.5):
    """A tiny model routed at ``density`` with thresholds calibrated on random hidden states."""
    model = make_tiny_llama(seed)
    mods = route_model(model)
    g = torch.Generator().manual_seed(seed)
    for m in mods:
        x = torch.randn(256, m.hidden, generator=g)
        lo, hi = guard_units(m.units, 0.05, 0.95)
        with torch.no_grad():
            th = calibrate_threshold(m.router.score(x), density, lo, hi)
        m.set_policy(LayerPolicy(th, lo, hi))
    return model, mods


@pytest.fixture
def tiny_ids():
    return torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(7))
