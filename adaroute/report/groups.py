"""Bias / skew audit: quality and density per data group, flagged against the overall.

A group is scored in windows (``compare_with_dense``'s per-window records). Per group: perplexity
ratio (pooled over its windows), top-1 agreement and mean density, each with a 95 % t-interval over
the group's windows (window-to-window spread; n = windows). The overall is pooled over every
group's windows.

A group is flagged when its departure from the overall exceeds the tolerance AND its whole interval
lies beyond the overall value on that side, i.e. the departure is both large enough to matter and
not explained by window-to-window noise. Quality is flagged only when worse than overall; density
both ways (less compute may mean an under-served kind of input, more is a capacity question).
Groups with fewer than MIN_WINDOWS windows get no interval and are marked, never flagged.

Built-in groups cut ``builtin:heldout`` (Python's documentation topics never used in calibration)
by topic, so the section is never empty.
"""

from __future__ import annotations

import math
import statistics

from scipy import stats

TOLERANCE = {
    "perplexity_ratio": 0.03,  # relative: group ratio / overall ratio above 1.03
    "top1_agreement": 0.05,  # absolute: 5 points below overall
    "mean_density": 0.05,  # absolute, either way
}
MIN_WINDOWS = 3
CONFIDENCE = 0.95
# Topic-key prefixes of the built-in held-out text -> group; other topics form the last group.
BUILTIN_TOPIC_GROUPS = (("string", "builtin: strings"), ("types", "builtin: built-in types"))
BUILTIN_OTHER = "builtin: statements and expressions"


def builtin_groups() -> dict[str, str]:
    """{group name: text} cut from ``builtin:heldout`` by topic (empty groups dropped)."""
    from adaroute.data import builtin_topics

    texts: dict[str, list[str]] = {}
    for key, doc in builtin_topics()["heldout"].items():
        name = next((g for prefix, g in BUILTIN_TOPIC_GROUPS if key.startswith(prefix)), BUILTIN_OTHER)
        texts.setdefault(name, []).append(doc)
    return {name: "\n\n".join(docs) for name, docs in texts.items()}


def window_values(windows: list[dict]) -> dict[str, list[float]]:
    """Per-window metrics from ``compare_with_dense``'s ``per_window`` records."""
    return {
        "log_ratio": [(w["nll_routed"] - w["nll_dense"]) / w["tokens"] for w in windows],
        "top1_agreement": [w["agree"] / w["tokens"] for w in windows],
        "mean_density": [w["density"] for w in windows],
    }


def pooled(windows: list[dict]) -> dict[str, float]:
    """Token-weighted point estimates over ``windows``."""
    tokens = sum(w["tokens"] for w in windows)
    return {
        "perplexity_ratio": math.exp(sum(w["nll_routed"] - w["nll_dense"] for w in windows) / tokens),
        "top1_agreement": sum(w["agree"] for w in windows) / tokens,
        "mean_density": sum(w["density"] * w["tokens"] for w in windows) / tokens,
        "tokens": tokens,
        "windows": len(windows),
    }


def half_width(values: list[float]) -> float | None:
    """Half-width of the t-interval for the mean of ``values`` (None below MIN_WINDOWS)."""
    n = len(values)
    if n < MIN_WINDOWS:
        return None
    return float(stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1)) * statistics.stdev(values) / math.sqrt(n)


def intervals(point: dict[str, float], values: dict[str, list[float]]) -> dict[str, list[float] | None]:
    """95 % intervals around the pooled points (the ratio's through its log)."""
    out = {}
    h = half_width(values["log_ratio"])
    log_r = math.log(point["perplexity_ratio"])
    out["perplexity_ratio"] = None if h is None else [math.exp(log_r - h), math.exp(log_r + h)]
    for key in ("top1_agreement", "mean_density"):
        h = half_width(values[key])
        out[key] = None if h is None else [point[key] - h, point[key] + h]
    return out


def flags(group: dict, overall: dict) -> list[str]:
    """Why ``group`` departs from ``overall`` beyond tolerance (empty: it does not)."""
    ci = group["interval"]
    out = []
    r, r0 = group["perplexity_ratio"], overall["perplexity_ratio"]
    if ci["perplexity_ratio"] and r / r0 - 1 > TOLERANCE["perplexity_ratio"] and ci["perplexity_ratio"][0] > r0:
        out.append(f"perplexity ratio {r:.3f} vs {r0:.3f} overall (95% CI {_ci(ci['perplexity_ratio'])})")
    a, a0 = group["top1_agreement"], overall["top1_agreement"]
    if ci["top1_agreement"] and a0 - a > TOLERANCE["top1_agreement"] and ci["top1_agreement"][1] < a0:
        out.append(f"top-1 agreement {a:.3f} vs {a0:.3f} overall (95% CI {_ci(ci['top1_agreement'])})")
    d, d0, cd = group["mean_density"], overall["mean_density"], ci["mean_density"]
    if cd and abs(d - d0) > TOLERANCE["mean_density"] and (cd[0] > d0 or cd[1] < d0):
        side = "higher" if d > d0 else "lower"
        out.append(f"density {d:.3f} {side} than {d0:.3f} overall (95% CI {_ci(cd)})")
    return out


def _ci(pair: list[float]) -> str:
    return f"{pair[0]:.3f}-{pair[1]:.3f}"


def audit(groups: dict[str, list[dict]], sources: dict[str, str] | None = None) -> dict:
    """{group: per-window records} -> the section: overall, per-group points, intervals and flags."""
    every = [w for ws in groups.values() for w in ws]
    overall = pooled(every)
    rows = []
    for name, windows in groups.items():
        point = pooled(windows)
        row = {"group": name, "source": (sources or {}).get(name, name), **point,
               "interval": intervals(point, window_values(windows))}
        row["flags"] = flags(row, overall)
        row["status"] = "flagged" if row["flags"] else ("ok" if row["interval"]["mean_density"] else "too few windows")
        rows.append(row)
    return {"overall": overall, "groups": rows, "tolerance": TOLERANCE, "min_windows": MIN_WINDOWS,
            "confidence": CONFIDENCE}
