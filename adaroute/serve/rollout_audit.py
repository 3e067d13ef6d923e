"""The rollout view of an audit log: the timeline of stage changes and the KPIs of each stage per arm.

A request's stage is the one that chose its arm (``requests.stage``); a log written without a
rollout (or before rollouts existed) has no events and no stages, and gets an empty view.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from adaroute.serve.audit import _percentiles


def rollout_summary(path: str | Path, since: float | None = None) -> dict:
    db = sqlite3.connect(f"file:{Path(path)}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    try:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        columns = {r[1] for r in db.execute("PRAGMA table_info(requests)")}
        events = ([dict(r) for r in db.execute("SELECT * FROM rollout_events WHERE created >= ? ORDER BY seq",
                                               (since or 0.0,))] if "rollout_events" in tables else [])
        rows = ([dict(r) for r in db.execute("SELECT * FROM requests WHERE created >= ? AND stage IS NOT NULL",
                                             (since or 0.0,))] if "stage" in columns else [])
    finally:
        db.close()
    for e in events:
        e["settings"], e["window"] = json.loads(e["settings"] or "{}"), json.loads(e["window"] or "{}")
    stages = {}
    for stage in dict.fromkeys(r["stage"] for r in rows):
        of_stage = [r for r in rows if r["stage"] == stage]
        stages[stage] = {arm: _kpis([r for r in of_stage if r["arm"] == arm])
                         for arm in sorted({r["arm"] for r in of_stage})}
    return {"events": events, "stages": stages}


def _kpis(rows: list[dict]) -> dict:
    """Per stage and arm: requests, latency, tokens/s, density, fail-safe events, shadow quality."""
    busy = sum(r["latency_s"] for r in rows)
    shadowed = [r for r in rows if r["shadow_agreement"] is not None]
    decoded = [r for r in rows if r["completion_tokens"] > 1]
    return {
        "requests": len(rows),
        "latency_s": _percentiles([r["latency_s"] for r in rows]),
        "tokens_per_s": sum(r["completion_tokens"] for r in rows) / busy if busy else None,
        "mean_density": sum(r["mean_density"] for r in decoded) / len(decoded) if decoded else None,
        "failsafe_events": sum(r["failsafe"] or 0 for r in rows),
        "failsafe_requests": sum(1 for r in rows if r["failsafe"]),
        "shadowed": len(shadowed),
        "shadow_agreement": sum(r["shadow_agreement"] for r in shadowed) / len(shadowed) if shadowed else None,
        "shadow_kl": sum(r["shadow_kl"] for r in shadowed) / len(shadowed) if shadowed else None,
    }
