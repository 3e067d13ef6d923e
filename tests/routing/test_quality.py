import math

import pytest

from adaroute.routing.quality import window_spread


def _win(dense: float, routed: float, tokens: int = 100) -> dict:
    return {"nll_dense": dense, "nll_routed": routed, "tokens": tokens}


def test_window_spread_names_the_window_that_holds_the_extra_loss():
    wins = [_win(200.0, 200.0), _win(500.0, 560.0), _win(300.0, 310.0), _win(250.0, 260.0, tokens=50)]
    s = window_spread(wins)
    assert s["worst_window"] == 1
    assert s["worst_excess_share"] == pytest.approx(60.0 / 80.0)
    assert s["ratio_min"] == pytest.approx(1.0)
    assert s["ratio_max"] == pytest.approx(math.exp(60.0 / 100))
    # the other windows' ratio: their summed extra NLL over their scored tokens
    assert s["ratio_without_worst"] == pytest.approx(math.exp(20.0 / 250))
    # the worst window and the others add up to the file's extra NLL
    assert math.log(s["ratio_max"]) * 100 + math.log(s["ratio_without_worst"]) * 250 == pytest.approx(80.0)


def test_window_spread_without_extra_loss_or_other_windows():
    better = window_spread([_win(300.0, 290.0), _win(200.0, 195.0)])
    assert better["worst_window"] == 1 and better["worst_excess_share"] is None
    assert better["ratio_max"] == pytest.approx(math.exp(-5.0 / 100))
    one = window_spread([_win(100.0, 110.0)])
    assert one["worst_window"] == 0 and one["worst_excess_share"] == pytest.approx(1.0)
    assert one["ratio_without_worst"] is None


def test_window_spread_range_leaves_out_a_short_remainder():
    s = window_spread([_win(300.0, 303.0), _win(280.0, 290.0), _win(20.0, 30.0, tokens=8)])
    assert s["ratio_min"] == pytest.approx(math.exp(3.0 / 100))
    assert s["ratio_max"] == pytest.approx(math.exp(10.0 / 100))  # not the 8-token window's exp(10 / 8)
    assert s["worst_window"] == 1  # ties go to the first; the remainder still counts in the excess
    assert s["ratio_without_worst"] == pytest.approx(math.exp(13.0 / 108))
