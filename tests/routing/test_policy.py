import math

import pytest
import torch

from adaroute.config import RoutingConfig
from adaroute.routing.policy import (
    LayerPolicy,
    allocate_densities,
    calibrate_threshold,
    guard_units,
    realised_density,
    select_units,
)


def scores(t=200, f=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    # token-dependent offsets make the per-token count vary under one threshold
    return torch.randn(t, f, generator=g) + torch.randn(t, 1, generator=g)


def test_guards_bound_units_per_token():
    s = scores()
    mask = select_units(s, 0.5, min_units=10, max_units=30)
    count = mask.sum(-1)
    assert count.min() >= 10 and count.max() <= 30
    assert count.float().std() > 0  # still varies between the guards


def test_topk_baseline_is_the_same_mechanism():
    s = scores()
    p = LayerPolicy.topk(16)
    mask = select_units(s, p.threshold, p.min_units, p.max_units)
    assert torch.equal(mask.sum(-1), torch.full((200,), 16))
    assert torch.equal(mask, torch.zeros_like(mask).scatter(1, s.topk(16, -1).indices, True))


def test_dense_policy_selects_everything():
    p = LayerPolicy.dense(64)
    assert select_units(scores(), p.threshold, p.min_units, p.max_units).all()


@pytest.mark.parametrize("density", [0.1, 0.3, 0.5, 0.7])
def test_calibration_hits_target_density(density):
    s = scores()
    lo, hi = guard_units(64, 0.05, 0.9)
    th = calibrate_threshold(s, density, lo, hi)
    assert abs(realised_density(s, th, lo, hi) - density) < 0.01
    assert calibrate_threshold(s, 1.0, lo, hi) == -math.inf


def test_allocation_meets_target_and_favours_sensitive_layers():
    grid = torch.tensor([0.1, 0.3, 0.5, 0.7, 1.0], dtype=torch.float64)
    base = torch.tensor([1.0, 0.5, 0.25, 0.1, 0.0], dtype=torch.float64)
    cost = torch.stack([base, 4 * base, 0.25 * base])
    dens = allocate_densities(grid, cost, 0.5, 0.1, 1.0)
    assert abs(sum(dens) / 3 - 0.5) < 1e-9
    assert dens[1] > dens[0] > dens[2]


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="density"):
        RoutingConfig(density=1.5)
    with pytest.raises(ValueError, match="policy"):
        RoutingConfig(policy="random")
    with pytest.raises(ValueError, match="group_size"):
        RoutingConfig(group_size=0)


def test_profile_density_at_inverts_threshold_at():
    import math

    from adaroute.routing.profile import PROFILE_GRID, LayerProfile

    grid = list(PROFILE_GRID)
    thresholds = [2.0 - 0.3 * i for i in range(len(grid) - 1)] + [-math.inf]
    profile = LayerProfile(grid, thresholds, [0.0] * len(grid), 0.5, "adaptive", 0, 100)
    for density in (0.05, 0.12, 0.35, 0.5, 0.77, 0.95):
        assert profile.density_at(profile.threshold_at(density)) == pytest.approx(density)
    assert profile.density_at(-math.inf) == 1.0
    assert profile.density_at(10.0) == grid[0]  # above every calibrated threshold: the sparsest point
