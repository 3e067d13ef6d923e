"""Load-imbalance statistics against small distributions whose answers are known by hand."""

import pytest
import torch

from adaroute.report.imbalance import (
    bytes_per_token,
    gini,
    imbalance,
    layer_usage,
    percentiles,
    token_density,
    union_growth,
)


def test_gini_known_values():
    assert gini(torch.tensor([5, 5, 5, 5])) == 0.0
    assert gini(torch.tensor([0, 0, 0, 8])) == pytest.approx(0.75)  # (n - 1) / n: one unit does everything
    assert gini(torch.tensor([1, 2, 3, 4])) == pytest.approx(10 / 40)  # sum (2i - n - 1) x_i / (n sum x)
    assert gini(torch.zeros(3)) == 0.0


def test_layer_usage_of_a_hand_made_mask():
    # 4 tokens x 4 units: unit 0 used by every token, unit 1 by two, unit 2 never, unit 3 by one
    mask = torch.tensor([[1, 1, 0, 1], [1, 1, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    u = layer_usage(mask)
    assert u["density"] == pytest.approx(7 / 16)
    assert u["never"] == 0.25 and u["almost_always"] == 0.25
    assert u["gini"] == pytest.approx(13 / 28)  # counts [4, 2, 0, 1]
    assert sum(u["usage_histogram"]) == 4
    assert u["token_density"]["mean"] == pytest.approx(7 / 16)
    assert u["token_density"]["p50"] == pytest.approx(0.375)  # token shares 3/4, 2/4, 1/4, 1/4


def test_percentiles_of_a_uniform_grid():
    p = percentiles(torch.arange(101, dtype=torch.float64))
    assert (p["p10"], p["p50"], p["p90"], p["p99"], p["mean"]) == pytest.approx((10, 50, 90, 99, 50))


def test_token_density_pools_layers_by_units():
    a = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)  # layer of 4 units
    b = torch.tensor([[1, 1], [1, 0]], dtype=torch.bool)  # layer of 2 units
    assert token_density({0: a, 1: b}).tolist() == pytest.approx([4 / 6, 1 / 6])


def test_union_of_identical_tokens_stays_at_their_density():
    mask = torch.zeros(16, 10, dtype=torch.bool)
    mask[:, :3] = True
    u = union_growth({0: mask}, batches=(1, 4, 8))
    assert u["measured"] == pytest.approx([0.3, 0.3, 0.3])
    assert u["independent"] == pytest.approx([0.3, 1 - 0.7**4, 1 - 0.7**8])


def test_union_of_disjoint_tokens_grows_linearly():
    mask = torch.eye(16, dtype=torch.bool)  # token t uses unit t only
    u = union_growth({0: mask, 1: mask}, batches=(1, 2, 8))
    assert u["batch"] == [1, 2, 8]
    assert u["measured"] == pytest.approx([1 / 16, 2 / 16, 8 / 16])


def test_union_stops_at_the_tokens_measured():
    assert union_growth({0: torch.ones(3, 4, dtype=torch.bool)})["batch"] == [1, 2, 3]


def test_bytes_per_token_and_summary():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    masks = {0: mask, 1: ~mask}
    b = bytes_per_token(masks, {0: 100, 1: 10}, fixed_bytes=1000)
    assert b.tolist() == [1000 + 2 * 100 + 1 * 10, 1000 + 1 * 100 + 2 * 10]
    s = imbalance(masks, {0: 100, 1: 10}, fixed_bytes=1000, dense_bytes=1330)
    assert s["tokens"] == 2 and set(s["layers"]) == {"0", "1"}
    assert s["bytes_per_token"]["p99"] <= 1210 and s["bytes_per_token"]["dense"] == 1330
