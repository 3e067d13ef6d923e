"""Traffic from the server's audit log (SQLite, adaroute.serve.audit): requests and tokens per arm over
time, density distribution per arm, fail-safe events per arm and the rollout's stage changes and
rollbacks.

Per-arm totals and percentiles are the audit module's own ``summarize``, stage changes and per-stage
KPIs its rollout view (``rollout_summary``); this adds the per-minute series and the raw density
values the figures need. Logs written before fail-safe counting existed have no ``failsafe`` column
and report none.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from adaroute.errors import AdarouteError

BUCKET_S = 60.0


def traffic(path: str | Path) -> dict:
    """The traffic section from the audit database at ``path``."""
    from adaroute.serve.audit import summarize
    from adaroute.serve.rollout_audit import rollout_summary

    path = Path(path)
    if not path.is_file():
        raise AdarouteError(f"--audit {path}: no such file; give the SQLite file the server wrote (serve --audit)")
    try:
        rows = _rows(path)
        summary, rollout = summarize(path), rollout_summary(path)
    except sqlite3.DatabaseError as e:
        raise AdarouteError(f"--audit {path}: not a readable audit log ({e}); give the file serve --audit wrote") from e
    return {"source": str(path), "summary": summary, "start": rows[0]["created"] if rows else None,
            "per_arm_over_time": _over_time(rows),
            "density_by_arm": _densities(rows), "failsafe_by_arm": _failsafe(rows),
            "rollout_events": rollout["events"], "stages": rollout["stages"],
            "errors": sum(1 for r in rows if r["finish_reason"] == "error")}


def _rows(path: Path) -> list[dict]:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    try:
        columns = {r[1] for r in db.execute("PRAGMA table_info(requests)")}
        failsafe = "failsafe" if "failsafe" in columns else "0 AS failsafe"
        return [dict(r) for r in db.execute(
            f"SELECT created, arm, prompt_tokens, completion_tokens, mean_density, finish_reason, {failsafe} "
            "FROM requests ORDER BY created")]
    finally:
        db.close()


def _over_time(rows: list[dict]) -> dict[str, dict[str, list]]:
    """Per arm, per minute since the first request: requests, prompt and completion tokens, fail-safes."""
    if not rows:
        return {}
    start = rows[0]["created"]
    keys = ("requests", "prompt_tokens", "completion_tokens", "failsafe")
    out: dict[str, dict[int, dict[str, int]]] = {}
    for r in rows:
        minute = int((r["created"] - start) // BUCKET_S)
        bucket = out.setdefault(r["arm"], {}).setdefault(minute, dict.fromkeys(keys, 0))
        bucket["requests"] += 1
        for k in keys[1:]:
            bucket[k] += r[k] or 0
    return {arm: {"minute": list(b), **{k: [v[k] for v in b.values()] for k in keys}} for arm, b in sorted(out.items())}


def _densities(rows: list[dict]) -> dict[str, list[float]]:
    # One-token answers decode nothing after the prefill (which runs dense): no routed density to show.
    out: dict[str, list[float]] = {}
    for r in rows:
        if r["completion_tokens"] > 1 and r["mean_density"] is not None:
            out.setdefault(r["arm"], []).append(float(r["mean_density"]))
    return out


def _failsafe(rows: list[dict]) -> dict[str, dict[str, int]]:
    """Per arm: (layer, token) fail-safe events and the requests that had any."""
    out: dict[str, dict[str, int]] = {}
    for r in rows:
        arm = out.setdefault(r["arm"], {"events": 0, "requests": 0})
        arm["events"] += r["failsafe"] or 0
        arm["requests"] += 1 if r["failsafe"] else 0
    return out
