"""The audit log: one SQLite row per request, written by one thread in batched transactions (WAL).

Request handlers only put a row on a queue; the writer commits whatever has accumulated every
``FLUSH_S`` seconds (or ``BATCH`` rows), so a slow disk never stalls a response. ``close`` commits
the rest, so a graceful stop loses nothing. Prompts are stored as SHA-256 unless the server was
started with ``--audit-prompts``; API keys only as their id (``key_id``), never the key.

A staged rollout adds, per request, its stage, fail-safe events and (for a shadowed request, filled in
when the re-scoring finishes) agreement and KL, and a ``rollout_events`` table: every stage change,
by whom, from and to, why, with the gates' window statistics at that moment. Logs written before
these existed are upgraded in place when a server opens them (new columns are NULL in old rows).
"""

from __future__ import annotations

import hashlib
import json
import queue
import sqlite3
import threading
from dataclasses import astuple, dataclass, fields
from pathlib import Path

FLUSH_S = 0.25
BATCH = 256


@dataclass
class AuditRow:
    id: str
    created: float  # unix time the request arrived
    endpoint: str
    arm: str
    model: str
    base_model: str
    routed_hash: str | None
    format_version: int | None
    prompt_sha256: str
    prompt: str | None
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float | None
    latency_s: float
    finish_reason: str
    mean_density: float
    layer_density: str  # JSON list, one density per layer
    units_per_token: str  # JSON object: mean, std, min, max, of
    key_id: str | None
    stage: str | None = None  # rollout stage that chose the arm (None: no rollout)
    failsafe: int = 0  # (layer, token) pairs the fail-safe computed densely
    failsafe_reasons: str | None = None  # JSON object: events by reason
    shadow_agreement: float | None = None  # set when a shadow re-scoring of the request finishes
    shadow_kl: float | None = None


_SQL_TYPES = {"str": "TEXT", "float": "REAL", "int": "INTEGER"}  # by the annotation's first type
COLUMNS = [f.name for f in fields(AuditRow)]
_COLUMN_TYPES = {f.name: _SQL_TYPES[str(f.type).split(' ')[0]] for f in fields(AuditRow)}
SCHEMA = "CREATE TABLE IF NOT EXISTS requests ({}, PRIMARY KEY (id))".format(
    ", ".join(f"{name} {kind}" for name, kind in _COLUMN_TYPES.items()))
EVENTS_SCHEMA = ("CREATE TABLE IF NOT EXISTS rollout_events (seq INTEGER PRIMARY KEY AUTOINCREMENT, created REAL, "
                 "actor TEXT, kind TEXT, from_stage TEXT, to_stage TEXT, reason TEXT, settings TEXT, window TEXT)")


def key_id(key: str) -> str:
    """A stable, non-reversible name for an API key (first 12 hex digits of its SHA-256)."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:12]


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def connect(path: str | Path) -> sqlite3.Connection:
    db = sqlite3.connect(str(path), check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(SCHEMA)
    have = {row[1] for row in db.execute("PRAGMA table_info(requests)")}
    for name, kind in _COLUMN_TYPES.items():  # a log from an older server: add the new columns
        if name not in have:
            db.execute(f"ALTER TABLE requests ADD COLUMN {name} {kind}")
    db.execute(EVENTS_SCHEMA)
    db.execute("CREATE INDEX IF NOT EXISTS requests_created ON requests (created)")
    db.commit()
    return db


class AuditLog:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._db = connect(self.path)  # created here so a bad path fails at start-up, not on the first row
        self._queue: queue.Queue[AuditRow | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="adaroute-audit", daemon=True)
        self._thread.start()

    def write(self, row: AuditRow) -> None:
        self._queue.put(row)

    def update_shadow(self, request_id: str, agreement: float, kl: float) -> None:
        self._queue.put(("UPDATE requests SET shadow_agreement = ?, shadow_kl = ? WHERE id = ?",
                         (agreement, kl, request_id)))

    def write_event(self, event) -> None:
        """A RolloutEvent (adaroute.serve.rollout) as a row of rollout_events."""
        self._queue.put(("INSERT INTO rollout_events (created, actor, kind, from_stage, to_stage, reason, settings, "
                         "window) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                         (event.created, event.actor, event.kind, event.from_stage, event.to_stage, event.reason,
                          json.dumps(event.settings), json.dumps(event.window))))

    def close(self) -> None:
        """Commits every queued row and stops the writer."""
        self._queue.put(None)
        self._thread.join()
        self._db.close()

    def _run(self) -> None:
        insert = f"INSERT OR REPLACE INTO requests ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
        done = False
        while not done:
            rows = []
            try:
                item = self._queue.get(timeout=FLUSH_S)
                while True:
                    if item is None:
                        done = True
                        break
                    rows.append(item if isinstance(item, tuple) else (insert, astuple(item)))
                    if len(rows) >= BATCH:
                        break
                    item = self._queue.get_nowait()
            except queue.Empty:
                pass
            if rows:
                with self._db:  # one transaction per batch, statements in the order they came
                    for sql, params in rows:
                        self._db.execute(sql, params)


def layer_json(values: list[float]) -> str:
    return json.dumps([round(v, 5) for v in values])


def summary_json(summary: dict[str, float]) -> str:
    return json.dumps({k: round(v, 3) for k, v in summary.items()})


def summarize(path: str | Path, since: float | None = None) -> dict:
    """Per arm: requests, tokens, finish reasons, TTFT/latency percentiles, density distribution and
    mean per-layer density, over rows created at or after ``since`` (unix time)."""
    db = sqlite3.connect(f"file:{Path(path)}?mode=ro", uri=True)
    try:
        cur = db.execute("SELECT * FROM requests WHERE created >= ? ORDER BY created", (since or 0.0,))
        names = [d[0] for d in cur.description]  # an older log has fewer columns
        rows = [dict(zip(names, r, strict=True)) for r in cur]
    finally:
        db.close()
    arms = sorted({r["arm"] for r in rows})
    return {"requests": len(rows), "since": since, "arms": {arm: _arm_summary([r for r in rows if r["arm"] == arm])
                                                             for arm in arms}}


def _arm_summary(rows: list[dict]) -> dict:
    reasons: dict[str, int] = {}
    for r in rows:
        reasons[r["finish_reason"]] = reasons.get(r["finish_reason"], 0) + 1
    layers = [json.loads(r["layer_density"]) for r in rows if r["completion_tokens"] > 1 and r["layer_density"]]
    per_layer = [sum(col) / len(col) for col in zip(*layers, strict=True)] if layers else []
    return {
        "requests": len(rows),
        "prompt_tokens": sum(r["prompt_tokens"] for r in rows),
        "completion_tokens": sum(r["completion_tokens"] for r in rows),
        "finish_reasons": reasons,
        "ttft_s": _percentiles([r["ttft_s"] for r in rows if r["ttft_s"] is not None]),
        "latency_s": _percentiles([r["latency_s"] for r in rows]),
        "density": _percentiles([r["mean_density"] for r in rows if r["completion_tokens"] > 1], (10, 50, 90)),
        "layer_density": [round(d, 4) for d in per_layer],
    }


def _percentiles(values: list[float], ps: tuple[int, ...] = (50, 95, 99)) -> dict[str, float | None]:
    """Nearest-rank percentiles and the mean (None when there are no values)."""
    out: dict[str, float | None] = {"mean": sum(values) / len(values) if values else None}
    ordered = sorted(values)
    for p in ps:
        out[f"p{p}"] = ordered[min(len(ordered) - 1, max(0, -(-p * len(ordered) // 100) - 1))] if ordered else None
    return out
