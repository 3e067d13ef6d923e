"""Traffic from the server's audit log (SQLite, adaroute.serve.audit): requests and tokens per arm over
time, density distribution per arm, and fail-safe / rollback events.

The per-arm totals and percentiles are the audit module's own ``summarize``; this adds the time
series and the raw density values the figures need. Event tables (fail-safe, rollback) are read
when the log has them; every column is kept, since their schema belongs to the server.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from adaroute.errors import AdarouteError

BUCKET_S = 60.0
MAX_EVENTS = 200


def traffic(path: str | Path) -> dict:
    """The traffic section from the audit database at ``path``."""
    from adaroute.serve.audit import summarize

    path = Path(path)
    if not path.is_file():
        raise AdarouteError(f"--audit {path}: no such file; give the SQLite file the server wrote (serve --audit)")
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            rows = db.execute("SELECT created, arm, prompt_tokens, completion_tokens, mean_density, finish_reason "
                              "FROM requests ORDER BY created").fetchall()
            events = _events(db)
        finally:
            db.close()
        summary = summarize(path)
    except sqlite3.DatabaseError as e:
        raise AdarouteError(f"--audit {path}: not a readable audit log ({e}); give the file serve --audit wrote") from e
    return {"source": str(path), "summary": summary, "per_arm_over_time": _over_time(rows),
            "density_by_arm": _densities(rows), "events": events,
            "errors": sum(1 for r in rows if r[5] == "error")}


def _over_time(rows) -> dict[str, dict[str, list]]:
    """Per arm, per minute since the first request: requests, prompt and completion tokens."""
    if not rows:
        return {}
    start = rows[0][0]
    out: dict[str, dict[int, list[int]]] = {}
    for created, arm, prompt, completion, *_ in rows:
        bucket = out.setdefault(arm, {}).setdefault(int((created - start) // BUCKET_S), [0, 0, 0])
        bucket[0] += 1
        bucket[1] += prompt
        bucket[2] += completion
    return {arm: {"minute": list(b), "requests": [v[0] for v in b.values()],
                  "prompt_tokens": [v[1] for v in b.values()], "completion_tokens": [v[2] for v in b.values()]}
            for arm, b in sorted(out.items())}


def _densities(rows) -> dict[str, list[float]]:
    # One-token answers decode nothing after the prefill (which runs dense): no routed density to show.
    out: dict[str, list[float]] = {}
    for _, arm, _, completion, density, _ in rows:
        if completion > 1 and density is not None:
            out.setdefault(arm, []).append(float(density))
    return out


def _events(db: sqlite3.Connection) -> dict[str, list[dict]]:
    """Rows of every table whose name mentions an event, fail-safe, alert or rollback (newest last)."""
    names = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    wanted = [n for n in names if any(w in n.lower() for w in ("event", "failsafe", "fail_safe", "rollback", "alert"))]
    out = {}
    for name in wanted:
        cur = db.execute(f'SELECT * FROM "{name}" LIMIT {MAX_EVENTS}')
        cols = [c[0] for c in cur.description]
        out[name] = [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]
    return out
