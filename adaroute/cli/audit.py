"""`adaroute audit DB`: what a server's audit log says, per arm (requests, tokens, latency, density), and
for a staged rollout the timeline of stage changes and each stage's KPIs per arm."""

from __future__ import annotations

import re
import sqlite3
import time
from datetime import datetime
from pathlib import Path

from adaroute.cli.common import format_table, write_json
from adaroute.errors import AdarouteError

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def add_parser(sub) -> None:
    p = sub.add_parser("audit", help="summarise a server's audit log (requests, tokens, latency, density per arm)")
    p.add_argument("db", metavar="DB", help="the SQLite file written by `adaroute serve --audit`")
    p.add_argument("--since", help="only requests since: an ISO time (2026-01-31T12:00) or an age (90s, 30m, 2h, 7d)")
    p.add_argument("--json", metavar="OUT", help="also write the summary as JSON")
    p.set_defaults(run=run)


def run(args) -> int:
    path = Path(args.db)
    if not path.is_file():
        raise AdarouteError(f"no audit log at {path}: give the file passed to `adaroute serve --audit`")
    try:
        since = _since(args.since)
        from adaroute.serve.audit import summarize
        from adaroute.serve.rollout_audit import rollout_summary

        summary = summarize(path, since)
        summary["rollout"] = rollout_summary(path, since)
    except sqlite3.Error as e:
        raise AdarouteError(f"{path} is not an adaroute audit log ({e})") from None
    print(_table(summary))
    if summary["rollout"]["events"]:
        print(_rollout_table(summary["rollout"]))
    write_json(args.json, summary)
    return 0


def _since(text: str | None) -> float | None:
    if text is None:
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd])", text.strip())
    if m:
        return time.time() - float(m.group(1)) * _UNITS[m.group(2)]
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise AdarouteError(f"--since {text!r}: give an ISO time (2026-01-31T12:00) or an age (30m, 2h, 7d)") from None


def _table(summary: dict) -> str:
    headers = ["arm", "requests", "prompt tok", "completion tok", "TTFT p50 s", "TTFT p95 s", "latency p50 s",
               "latency p95 s", "density p10", "density p50", "density p90", "finish reasons"]
    rows = []
    for arm, s in summary["arms"].items():
        reasons = " ".join(f"{k}={v}" for k, v in sorted(s["finish_reasons"].items()))
        rows.append([arm, s["requests"], s["prompt_tokens"], s["completion_tokens"], _n(s["ttft_s"]["p50"]),
                     _n(s["ttft_s"]["p95"]), _n(s["latency_s"]["p50"]), _n(s["latency_s"]["p95"]),
                     _n(s["density"]["p10"]), _n(s["density"]["p50"]), _n(s["density"]["p90"]), reasons])
    lines = [f"{summary['requests']} requests", format_table(headers, rows)]
    for arm, s in summary["arms"].items():
        if s["layer_density"]:
            lines.append(f"{arm} per-layer density: " + " ".join(f"{d:.2f}" for d in s["layer_density"]))
    return "\n".join(lines)


def _rollout_table(view: dict) -> str:
    lines = ["rollout timeline:"]
    for e in view["events"]:
        when = datetime.fromtimestamp(e["created"]).isoformat(timespec="seconds")
        lines.append(f"  {when}  {e['kind']:<8} {e['from_stage'] or '-':>6} -> {e['to_stage']:<6}  by {e['actor']}: "
                     f"{e['reason']}")
    headers = ["stage", "arm", "requests", "latency p50 s", "latency p95 s", "tokens/s", "density", "fail-safe events",
               "shadowed", "agreement", "KL"]
    rows = [[stage, arm, k["requests"], _n(k["latency_s"]["p50"]), _n(k["latency_s"]["p95"]), _n(k["tokens_per_s"]),
             _n(k["mean_density"]), k["failsafe_events"], k["shadowed"], _n(k["shadow_agreement"]), _n(k["shadow_kl"])]
            for stage, arms in view["stages"].items() for arm, k in arms.items()]
    return "\n".join([*lines, format_table(headers, rows)])


def _n(value: float | None):
    return "-" if value is None else round(value, 4)
