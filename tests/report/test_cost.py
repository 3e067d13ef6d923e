"""Cost / ROI arithmetic against hand-computed cases."""

import pytest

from adaroute.report.cost import CostInputs, compare_cost, serving_cost

INPUTS = CostInputs(price_per_hour=2.0, tokens_per_day=720_000, peak_tokens_per_s=25, conversion_seconds=1800,
                    watts=360)


def test_one_model_at_ten_tokens_per_second():
    c = serving_cost(INPUTS, 10.0)  # 36 000 tokens per machine-hour
    assert c["cost_per_million_tokens"] == pytest.approx(2.0 / 36_000 * 1e6)  # 55.56
    assert c["machine_hours_per_day"] == pytest.approx(20.0)
    assert c["cost_per_day"] == pytest.approx(40.0)
    assert c["machines_at_peak"] == 3  # 25 / 10 rounded up
    assert c["kwh_per_million_tokens"] == pytest.approx(10.0)  # 360 W for 100 000 s = 36 MJ


def test_machines_at_peak_exact_multiple_is_not_rounded_up():
    inputs = CostInputs(price_per_hour=1, tokens_per_day=1, peak_tokens_per_s=30, conversion_seconds=0)
    assert serving_cost(inputs, 10.0)["machines_at_peak"] == 3
    assert serving_cost(inputs, 10.0)["kwh_per_million_tokens"] is None  # no watts given


def test_saving_and_payback():
    c = compare_cost(INPUTS, dense_tokens_per_s=10.0, routed_tokens_per_s=12.0)
    assert c["routed"]["cost_per_day"] == pytest.approx(40.0 / 1.2)  # 33.33
    assert c["daily_saving"] == pytest.approx(40.0 - 40.0 / 1.2)  # 6.67 per day
    assert c["saving_share"] == pytest.approx(1 / 6)
    assert c["conversion_cost"] == pytest.approx(1.0)  # half an hour at 2 per hour
    assert c["payback_days"] == pytest.approx(1.0 / (40.0 - 40.0 / 1.2))  # 0.15 days
    assert c["routed"]["machines_at_peak"] == 3 and c["inputs"]["watts"] == 360


def test_no_saving_never_pays_back():
    c = compare_cost(INPUTS, dense_tokens_per_s=12.0, routed_tokens_per_s=10.0)
    assert c["daily_saving"] < 0 and c["payback_days"] is None


@pytest.mark.parametrize("field", ["price_per_hour", "tokens_per_day", "peak_tokens_per_s"])
def test_inputs_must_be_positive(field):
    kwargs = {"price_per_hour": 1.0, "tokens_per_day": 1.0, "peak_tokens_per_s": 1.0, "conversion_seconds": 0.0}
    with pytest.raises(ValueError, match=field):
        CostInputs(**{**kwargs, field: 0.0})
