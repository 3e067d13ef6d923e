"""index.html from report.json: one static page, figures beside it as PNG, no script, no remote asset.

Every section reads only the report's JSON, so the page and the JSON cannot disagree.
"""

from __future__ import annotations

from html import escape

STYLE = """body{font:14px/1.45 system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}.flag{color:#b00;font-weight:600}
.note{color:#555;font-size:.92em}img{max-width:100%;margin:.4em 0}nav a{margin-right:1em}"""

SECTIONS = (("kpis", "KPIs"), ("curve", "Quality against density"), ("cost", "Cost / ROI"),
            ("groups", "Bias / skew audit"), ("imbalance", "Load imbalance and capacity"),
            ("explain", "Explainability"), ("traffic", "Traffic"))


def render(report: dict) -> str:
    body = [f"<h1>adaroute report: {escape(report['model'])}</h1>",
            f"<p class=note>{escape(report['created'])} &middot; {report['threads']} threads &middot; "
            f"measured in {report['seconds']:.0f} s ({report['cpu_seconds']:.0f} CPU s)</p>",
            "<nav>" + "".join(f"<a href='#{k}'>{t}</a>" for k, t in SECTIONS) + "</nav>"]
    for key, title in SECTIONS:
        body.append(f"<h2 id={key}>{title}</h2>" + globals()[f"_{key}"](report))
    return f"<!doctype html><html><head><meta charset=utf-8><title>adaroute report</title><style>{STYLE}</style>" \
           f"</head><body>{''.join(body)}</body></html>\n"


# -- helpers -------------------------------------------------------------------------------------

def _f(v, spec: str = ".3f") -> str:
    if v is None:
        return "-"
    return format(v, spec) if isinstance(v, float) else escape(str(v))


def _table(headers: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    cells = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{cells}</table>"


def _img(report: dict, key: str) -> str:
    name = report["figures"].get(key)
    return f"<img src='{escape(name)}' alt='{escape(key)}'>" if name else ""


def _ci(pair) -> str:
    return "-" if not pair else f"{pair[0]:.3f} &ndash; {pair[1]:.3f}"


# -- sections ------------------------------------------------------------------------------------

def _kpis(r: dict) -> str:
    k = r["kpis"]
    rows = [["perplexity (dense / routed)", f"{k['perplexity_dense']:.3f} / {k['perplexity_routed']:.3f}"],
            ["perplexity ratio", _f(k["perplexity_ratio"])], ["top-1 agreement with dense", _f(k["top1_agreement"])],
            ["mean FFN density", _f(k["mean_density"])],
            ["density per token and layer p10 / p50 / p90 / p99",
             " / ".join(_f(k["units_per_token"].get(p)) for p in ("p10", "p50", "p90", "p99"))],
            ["FFN weight-bytes share (router included)", _f(k["ffn_bytes_share"])],
            ["FFN FLOPs share", _f(k["ffn_flops_share"])], ["tokens scored", _f(k["tokens"])]]
    for s in k["speed"]:
        rows.append([f"decode tokens/s at batch {s['batch']}: dense / routed (ratio)",
                     f"{s['dense']:.1f} / {s['routed']:.1f} ({s['routed'] / s['dense']:.2f}&times;)"])
    rows.append(["peak memory (process RSS / routed engine)", f"{k['peak_rss_mb']:.0f} MB / {k['engine_mb']:.0f} MB"])
    note = f"Data: {escape(', '.join(k['data']))}. Speed: adaroute runtime, dense and routed engines interleaved " \
        "in this run (median over rounds)."
    return _table(["measure", "value"], rows) + _img(r, "speed") + f"<p class=note>{note}</p>"


def _curve(r: dict) -> str:
    rows = [[_f(p["density"], ".2f"), _f(p["learned"]["perplexity_ratio"]), _f(p["learned"]["top1_agreement"]),
             _f(p["learned"]["ffn_bytes_share"]), _f(p["oracle"]["perplexity_ratio"]) if p["oracle"] else "-"]
            for p in r["curve"]["points"]]
    return _img(r, "curve") + _table(["density", "ratio, learned", "top-1 agreement", "bytes share", "ratio, oracle"],
                                     rows) + f"<p class=note>{escape(r['curve']['note'])}</p>"


def _cost(r: dict) -> str:
    c = r["cost"]
    inputs = _table(["input", "value", "source"], [[escape(i["name"]), _f(i["value"], ".4g"), escape(i["source"])]
                                                    for i in c["inputs"]])
    rows = []
    for s in c["scenarios"]:
        for arm in ("dense", "routed"):
            a = s[arm]
            rows.append([f"batch {s['batch']}, {arm}", _f(a["tokens_per_s"], ".1f"),
                         _f(a["cost_per_million_tokens"], ".4g"), _f(a["machines_at_peak"]),
                         _f(a["cost_per_day"], ".4g"), _f(a["kwh_per_million_tokens"], ".3g")])
        payback = "never (no saving)" if s["payback_days"] is None else f"{s['payback_days']:.3g} days"
        rows.append([f"batch {s['batch']}: saving", "", "", "",
                     f"{s['daily_saving']:.4g}/day ({s['saving_share']:.1%})", f"payback {payback}"])
    headers = ["scenario", "tokens/s", "cost / 1M tokens", "machines at peak", "cost / day", "kWh / 1M tokens"]
    table = _table(headers, rows)
    return inputs + table + _img(r, "cost") + f"<pre class=note>{escape(c['model'])}</pre>"


def _groups(r: dict) -> str:
    g = r["groups"]
    rows = [[escape(x["group"]), x["windows"], x["tokens"], _f(x["perplexity_ratio"]),
             _ci(x["interval"]["perplexity_ratio"]), _f(x["top1_agreement"]), _ci(x["interval"]["top1_agreement"]),
             _f(x["mean_density"]), _ci(x["interval"]["mean_density"]),
             "<span class=flag>" + escape("; ".join(x["flags"])) + "</span>" if x["flags"] else escape(x["status"])]
            for x in g["groups"]]
    o = g["overall"]
    rows.append(["<b>overall</b>", o["windows"], o["tokens"], _f(o["perplexity_ratio"]), "",
                 _f(o["top1_agreement"]), "", _f(o["mean_density"]), "", ""])
    t = g["tolerance"]
    note = (f"Flagged when a group departs from the overall by more than the tolerance (perplexity ratio "
            f"+{t['perplexity_ratio']:.0%} relative, agreement -{t['top1_agreement']:.2f}, density "
            f"&plusmn;{t['mean_density']:.2f}) and its whole {g['confidence']:.0%} t-interval over windows lies "
            f"beyond the overall value; fewer than {g['min_windows']} windows: no interval, no flag. "
            f"Windows of {g['window']} tokens.")
    return _table(["group", "windows", "tokens", "ppl ratio", "95% CI", "agreement", "95% CI", "density", "95% CI",
                   "status"], rows) + f"<p class=note>{note}</p>" + _img(r, "groups")


def _imbalance(r: dict) -> str:
    m = r["imbalance"]
    td, b = m["token_density"], m["bytes_per_token"]
    summary = _table(["measure", "p10", "p50", "p90", "p99", "mean"], [
        ["token density (all layers)"] + [_f(td[p]) for p in ("p10", "p50", "p90", "p99", "mean")],
        ["MB read per token, batch 1"] + [_f(b[p] / 1e6, ".1f") for p in ("p10", "p50", "p90", "p99", "mean")]])
    union = _table(["tokens in flight"] + [str(x) for x in m["union"]["batch"]],
                   [["measured union"] + [_f(x) for x in m["union"]["measured"]],
                    ["independent tokens"] + [_f(x) for x in m["union"]["independent"]]])
    layers = _table(["layer", "density", "Gini", "never", f">= {m['almost_always_threshold']:.0%}", "p10", "p50", "p90",
                     "p99"], [[k, _f(v["density"]), _f(v["gini"]), _f(v["never"]), _f(v["almost_always"])]
                              + [_f(v["token_density"][p]) for p in ("p10", "p50", "p90", "p99")]
                              for k, v in m["layers"].items()])
    note = (f"From the selection masks of {m['tokens']} tokens. Worst case for capacity: p99 {b['p99'] / 1e6:.1f} MB "
            f"per token against {b['dense'] / 1e6:.1f} MB dense ({b['fixed'] / 1e6:.1f} MB of it fixed: attention, "
            "head, router). A batched sparse step reads the union of its tokens' units, which is why batched "
            "decode turns dense.")
    return summary + f"<p class=note>{note}</p>" + _img(r, "usage") + _img(r, "union") + union + \
        _img(r, "token_density") + f"<details><summary>per layer</summary>{layers}</details>"


def _explain(r: dict) -> str:
    e = r["explain"]
    def tok(x):
        return f"<code>{escape(repr(x['token']))}</code> ({x['share']:.2f})"

    lists = _table(["needed the most", "needed the least"],
                   [[tok(a), tok(b)] for a, b in zip(e["most"], e["least"], strict=False)])
    c = e["chosen"]
    units = _table(["layer", "units used", "top units (score)"],
                   [[x["layer"], x["used"], ", ".join(f"{u} ({v})" for u, v in zip(x["units"], x["scores"],
                                                                                   strict=True))]
                    for x in c["layers"]])
    return (f"<p>Text: <code>{escape(e['text'])}</code>{' (built-in example)' if e['default_text'] else ''}</p>"
            + _img(r, "explain") + lists
            + f"<details><summary>token {c['index']} <code>{escape(repr(c['token']))}</code>: each layer's top units"
              f"</summary>{units}</details>")


def _traffic(r: dict) -> str:
    t = r["traffic"]
    if t is None:
        return "<p class=note>No audit log given: pass <code>--audit DB</code> (the SQLite file of " \
               "<code>adaroute serve --audit</code>) for requests per arm, density per arm and events.</p>"
    arms, fs = t["summary"]["arms"], t["failsafe_by_arm"]
    rows = [[escape(a), s["requests"], s["prompt_tokens"], s["completion_tokens"], _f(s["density"].get("p50")),
             _f(s["latency_s"].get("p50")), fs.get(a, {}).get("events", 0), fs.get(a, {}).get("requests", 0),
             escape(str(s["finish_reasons"]))] for a, s in arms.items()]
    table = _table(["arm", "requests", "prompt tokens", "completion tokens", "density p50", "latency p50 s",
                    "fail-safe events", "requests with fail-safe", "finish reasons"], rows)
    events = _table(["time (UTC)", "kind", "from", "to", "actor", "reason"],
                    [[_time(e["created"]), escape(e["kind"]), _f(e["from_stage"]), _f(e["to_stage"]),
                      escape(e["actor"]), escape(e["reason"])] for e in t["rollout_events"]]) \
        if t["rollout_events"] else "<p class=note>No rollout stage changes or rollbacks in this log.</p>"
    return table + _img(r, "traffic") + _img(r, "density_by_arm") + "<h3>Rollout events</h3>" + events + \
        f"<p class=note>Source: {escape(t['source'])}; {t['errors']} requests ended in an error.</p>"


def _time(unix: float) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(unix, UTC).strftime("%Y-%m-%d %H:%M:%S")
