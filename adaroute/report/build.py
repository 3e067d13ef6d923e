"""One call from a routed model directory to a report directory (index.html, report.json, PNGs).

    build_report(ReportRequest(routed="out/routed-0.5", data=["builtin:heldout"], output="out/report"))

Measurements run first (progress bars), then the sections are assembled as JSON, the figures are
drawn from that JSON, and the page is rendered from it; the directory is built beside its final
path and renamed into place (adaroute.fsio.atomic_dir), so a report is never half-written.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import torch

from adaroute.report import cost, explain, figures, groups, html, imbalance, measure


@dataclass(frozen=True)
class ReportRequest:
    routed: str
    output: str
    data: list[str] = field(default_factory=lambda: ["builtin:heldout"])
    groups: dict[str, str] = field(default_factory=dict)  # name -> data spec
    audit: str | None = None
    explain_text: str | None = None
    explain_token: int | None = None
    price_per_hour: float | None = None
    tokens_per_day: float | None = None
    peak_tokens_per_s: float | None = None
    watts: float | None = None
    budget: measure.Budget = field(default_factory=measure.Budget)


def build_report(req: ReportRequest, model=None, tokenizer=None) -> dict:
    """Measure, assemble, draw and write; returns report.json's content."""
    from adaroute.data import load_text, load_texts
    from adaroute.fsio import atomic_dir

    start, cpu, timings = time.perf_counter(), time.process_time(), {}
    texts = load_texts(req.data)  # read every input before the slow model load
    group_texts = {name: load_text(spec).text for name, spec in req.groups.items()} | groups.builtin_groups()
    if model is None:
        from adaroute.models import load_model

        model, tokenizer = _timed(timings, "load", load_model, req.routed)
    meta = measure.calibration(req.routed)
    b = _fit(req.budget, model)
    records, tape = _timed(timings, "quality", measure.quality, model, tokenizer, texts, b)
    windows = _timed(timings, "groups", measure.groups, model, tokenizer, group_texts, b)
    calib = _calib_texts(meta)
    points = _timed(timings, "curve", measure.curve, model, tokenizer, texts[0].text, calib, b)
    expl = _timed(timings, "explain", explain.explain, model, tokenizer, req.explain_text or explain.DEFAULT_TEXT,
                  req.explain_token)
    speed = _timed(timings, "speed", measure.speed, model, tokenizer, b)
    cap = measure.capacity(model)
    masks = tape.masks()
    report = {
        "model": req.routed, "created": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "threads": torch.get_num_threads(), "budget": asdict(b),
        "kpis": _kpis(records, masks, speed, req.data),
        "curve": {"points": points, "note": _curve_note(texts[0].name, b, calib is not None)},
        "cost": _cost(req, speed, meta),
        "groups": {**groups.audit(windows, {**req.groups}), "window": b.group_window},
        "imbalance": imbalance.imbalance(masks, cap["unit_bytes"], cap["fixed"], cap["dense"]),
        "explain": {**expl, "default_text": req.explain_text is None},
        "traffic": _traffic(req.audit),
        "quality": [{k: v for k, v in r.items() if k != "per_window"} for r in records],
        "speed": speed,
    }
    # CPU seconds over threads: on a shared machine the wall time says little about an idle one
    report["timings"], report["seconds"] = timings, time.perf_counter() - start
    report["cpu_seconds"] = time.process_time() - cpu
    with atomic_dir(req.output, replace=True) as tmp:
        report["figures"] = _draw(report, tmp)
        report = _finite(report)
        (tmp / "report.json").write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
        (tmp / "index.html").write_text(html.render(report))
    return report


def _fit(b: measure.Budget, model) -> measure.Budget:
    """Windows no longer than the model's context."""
    from dataclasses import replace

    from adaroute.eval.perplexity import context_length

    limit = context_length(model) or b.window
    return replace(b, window=min(b.window, limit), group_window=min(b.group_window, limit))


def _timed(timings: dict, name: str, fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    timings[name] = round(time.perf_counter() - t, 1)
    return out


def _calib_texts(meta: dict) -> list[str] | None:
    """The text the model was calibrated on (for the oracle's thresholds), None when unavailable."""
    from adaroute.data import load_texts
    from adaroute.errors import AdarouteError

    try:
        return [t.text for t in load_texts(meta.get("data") or [])]
    except AdarouteError:
        return None


def _kpis(records: list[dict], masks: dict, speed: list[dict], data: list[str]) -> dict:
    tokens = sum(r["tokens"] for r in records)

    def mean(key):
        return sum(r[key] * r["tokens"] for r in records) / tokens

    nll = {arm: sum(math.log(r[f"perplexity_{arm}"]) * r["tokens"] for r in records) / tokens
           for arm in ("dense", "routed")}
    shares = torch.cat([m.sum(dim=1).double() / m.shape[1] for m in masks.values()])  # per token and layer
    by_batch = {(s["engine"], s["batch"]): s for s in speed}
    routed = [s for s in speed if s["engine"] == "adaroute-routed"]
    return {
        "data": data, "tokens": tokens,
        "perplexity_dense": math.exp(nll["dense"]), "perplexity_routed": math.exp(nll["routed"]),
        "perplexity_ratio": math.exp(nll["routed"] - nll["dense"]),
        "top1_agreement": mean("top1_agreement"), "mean_density": mean("mean_density"),
        "ffn_bytes_share": mean("ffn_bytes_share"), "ffn_flops_share": mean("ffn_flops_share"),
        "units_per_token": imbalance.percentiles(shares),
        "speed": [{"batch": s["batch"], "dense": by_batch[("adaroute-dense", s["batch"])]["decode_tokens_per_s"],
                   "routed": s["decode_tokens_per_s"]} for s in routed],
        "peak_rss_mb": max(s["peak_rss_mb"] for s in speed),
        "engine_mb": max(s["engine_mb"] for s in routed),
    }


def _curve_note(name: str, b: measure.Budget, oracle: bool) -> str:
    note = (f"Perplexity ratio on the first {b.curve_tokens} tokens of {name} (windows of "
            f"{min(b.window, b.curve_tokens)}), the learned router moved along the curve with the density override. "
            "Density 1.0 runs the dense FFN (bit-identical to the base model, tested), so it is not re-measured.")
    if oracle:
        return note + (f" The hindsight oracle scores units by their exact contribution, with per-layer thresholds "
                       f"calibrated on {b.oracle_calib_tokens} tokens of the model's own calibration text.")
    return note + " No oracle: the model's calibration text is not available here."


def _cost(req: ReportRequest, speed: list[dict], meta: dict) -> dict:
    given = {"price_per_hour": req.price_per_hour, "tokens_per_day": req.tokens_per_day,
             "peak_tokens_per_s": req.peak_tokens_per_s}
    defaults = {"price_per_hour": cost.DEFAULT_PRICE_PER_HOUR, "tokens_per_day": cost.DEFAULT_TOKENS_PER_DAY,
                "peak_tokens_per_s": cost.DEFAULT_PEAK_TOKENS_PER_S}
    conversion = meta.get("total_seconds")
    inputs = cost.CostInputs(**{k: v if v is not None else defaults[k] for k, v in given.items()},
                             conversion_seconds=conversion or 0.0, watts=req.watts)
    listed = [{"name": k, "value": getattr(inputs, k), "source": "given" if v is not None else "assumed (default)"}
              for k, v in given.items()]
    listed.append({"name": "conversion_seconds", "value": inputs.conversion_seconds,
                   "source": "measured at conversion (calibration.json)" if conversion else "unknown (taken as 0)"})
    listed.append({"name": "watts", "value": req.watts, "source": "given" if req.watts else "not given: no energy"})
    tps = {(s["engine"], s["batch"]): s["decode_tokens_per_s"] for s in speed}
    scenarios = [{"batch": bt, **cost.compare_cost(inputs, tps[("adaroute-dense", bt)], tps[(e, bt)])}
                 for e, bt in tps if e == "adaroute-routed"]
    for s in scenarios:
        s["dense"]["tokens_per_s_source"] = s["routed"]["tokens_per_s_source"] = f"measured, batch {s['batch']}"
    return {"inputs": listed, "scenarios": scenarios, "model": cost.__doc__.split("\n\n")[1].strip()}


def _traffic(audit: str | None) -> dict | None:
    if audit is None:
        return None
    from adaroute.report.traffic import traffic

    return traffic(audit)


def _draw(report: dict, out: Path) -> dict[str, str]:
    drawn = {
        "curve": figures.plot_curve(report["curve"]["points"], out / "curve.png"),
        "speed": figures.plot_speed(report["speed"], out / "speed.png"),
        "cost": figures.plot_cost(report["cost"]["scenarios"], out / "cost.png"),
        "groups": figures.plot_groups(report["groups"], out / "groups.png"),
        "usage": figures.plot_usage(report["imbalance"], out / "usage.png"),
        "token_density": figures.plot_token_density(report["imbalance"], out / "token_density.png"),
        "union": figures.plot_union(report["imbalance"], out / "union.png"),
        "explain": figures.plot_explain(report["explain"], out / "explain.png"),
    }
    if report["traffic"] and report["traffic"]["per_arm_over_time"]:
        drawn["traffic"] = figures.plot_traffic(report["traffic"], out / "traffic.png")
        drawn["density_by_arm"] = figures.plot_density_by_arm(report["traffic"], out / "density_by_arm.png")
    return drawn


def _finite(obj):
    """NaN and infinities become null: report.json stays strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj
