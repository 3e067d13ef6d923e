"""Bias / skew flags: they fire on a skewed group, not on balanced ones, and never without an interval."""

import random

import pytest

from adaroute.report.groups import audit, builtin_groups, half_width


def windows(n, log_ratio, agreement, density, noise=0.01, seed=0, tokens=127):
    """Synthetic per-window records as compare_with_dense returns them."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        nll_dense = 3.0 * tokens
        out.append({"nll_dense": nll_dense, "nll_routed": nll_dense + (log_ratio + rng.gauss(0, noise)) * tokens,
                    "agree": round((agreement + rng.gauss(0, noise)) * tokens), "tokens": tokens,
                    "density": density + rng.gauss(0, noise)})
    return out


BALANCED = {f"g{i}": windows(8, 0.03, 0.90, 0.50, seed=i) for i in range(3)}


def test_balanced_groups_raise_no_flag():
    section = audit(BALANCED)
    assert all(g["flags"] == [] and g["status"] == "ok" for g in section["groups"])
    assert section["overall"]["windows"] == 24


def test_skewed_group_is_flagged_on_each_measure():
    section = audit({**BALANCED, "skewed": windows(8, 0.20, 0.75, 0.62, seed=9)})
    skewed = next(g for g in section["groups"] if g["group"] == "skewed")
    assert skewed["status"] == "flagged"
    assert [f.split()[0] for f in skewed["flags"]] == ["perplexity", "top-1", "density"]
    lo, hi = skewed["interval"]["perplexity_ratio"]
    assert lo < skewed["perplexity_ratio"] < hi
    assert all(g["flags"] == [] for g in section["groups"] if g["group"] != "skewed")


def test_better_quality_is_not_a_flag_but_lower_density_is():
    section = audit({**BALANCED, "easy": windows(8, 0.0, 0.97, 0.40, seed=5)})
    easy = next(g for g in section["groups"] if g["group"] == "easy")
    assert len(easy["flags"]) == 1 and "lower" in easy["flags"][0]


def test_noisy_or_small_groups_are_not_flagged():
    noisy = windows(8, 0.10, 0.90, 0.50, noise=0.3, seed=3)  # departure within window-to-window noise
    small = windows(2, 0.30, 0.60, 0.80, seed=4)  # too few windows for an interval
    section = audit({**BALANCED, "noisy": noisy, "small": small})
    by_name = {g["group"]: g for g in section["groups"]}
    assert not any("perplexity" in f for f in by_name["noisy"]["flags"])
    assert by_name["small"]["flags"] == [] and by_name["small"]["status"] == "too few windows"
    assert by_name["small"]["interval"]["perplexity_ratio"] is None


def test_t_interval_half_width():
    assert half_width([1.0, 2.0, 3.0]) == pytest.approx(4.302653 / 3**0.5, rel=1e-5)  # t(0.975, 2) * s / sqrt(n)
    assert half_width([1.0, 2.0]) is None


def test_builtin_groups_cover_the_heldout_text():
    from adaroute.data import builtin_topics

    groups = builtin_groups()
    assert len(groups) >= 3 and all(text.strip() for text in groups.values())
    heldout = builtin_topics()["heldout"]
    joins = 2 * (len(heldout) - len(groups))  # "\n\n" between the documents of a group
    assert sum(len(t) for t in groups.values()) == sum(len(d) for d in heldout.values()) + joins
