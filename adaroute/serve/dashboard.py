"""The live dashboard: ``GET /dashboard`` (one page whose own small script draws SVG charts, no remote
asset) and ``GET /dashboard/data`` (JSON it polls every few seconds). Both need the admin key when
the server has one (``Authorization: Bearer KEY``, or ``?key=KEY`` for the page itself).

Every number comes from the server's own Prometheus registry, the same series that Grafana and the
alert rules read (deploy/), so the page cannot disagree with them. The registry holds totals; rates
and latency percentiles need two points in time, so each data request (at most one a second) adds a
snapshot to a short history, and the series are computed between consecutive snapshots.

    stage          adaroute:rollout_stage{stage} == 1, else the default arm (no rollout running)
    share, tok/s   request_success_total / generation_tokens_total per arm, between snapshots
    TTFT, ITL      p50 over the last WINDOW_S from the histograms' bucket increments, per arm
    density        adaroute:layer_density{layer} (the server's sliding window)
    agreement      adaroute:shadow_agreement mean over the last WINDOW_S (when shadow traffic runs)
    events         increments of failsafe_total, alerts_total, rollbacks_total, requests_rejected_total
"""

from __future__ import annotations

import collections
import hmac
import math
import time
from importlib import resources

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse

from adaroute.serve.errors import APIError

HISTORY = 150  # snapshots kept (at one every few seconds: several minutes of charts)
MIN_GAP_S = 1.0  # a data request closer than this to the last snapshot reuses it
WINDOW_S = 60.0  # latency percentiles and agreement over this much history
EVENT_COUNTERS = {"adaroute:failsafe_total": "fail-safe", "adaroute:alerts_total": "alert",
                  "adaroute:rollbacks_total": "rollback", "adaroute:requests_rejected_total": "rejected"}
MAX_EVENTS = 50

Snapshot = dict[tuple[str, tuple[tuple[str, str], ...]], float]  # (sample name, sorted labels) -> value


def snapshot(registry) -> Snapshot:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for family in registry.collect()
            for s in family.samples}


def total(snap: Snapshot, name: str, **labels: str) -> float:
    """Sum of ``name``'s samples whose labels include ``labels``."""
    return sum(v for (n, ls), v in snap.items() if n == name and labels.items() <= dict(ls).items())


def by_label(snap: Snapshot, name: str, label: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for (n, ls), v in snap.items():
        if n == name and label in dict(ls):
            key = dict(ls)[label]
            out[key] = out.get(key, 0.0) + v
    return out


def quantile(q: float, new: Snapshot, old: Snapshot, name: str, **labels: str) -> float | None:
    """The q-quantile of a histogram's observations between two snapshots, interpolated within a
    bucket as Prometheus' histogram_quantile does (None without observations)."""
    buckets = sorted((float(dict(ls)["le"]), v - old.get((n, ls), 0.0)) for (n, ls), v in new.items()
                     if n == name + "_bucket" and labels.items() <= dict(ls).items())
    merged: dict[float, float] = collections.defaultdict(float)
    for le, count in buckets:
        merged[le] += count
    bounds = sorted(merged)
    if not bounds or merged[bounds[-1]] <= 0:
        return None
    rank, lower, below = q * merged[bounds[-1]], 0.0, 0.0
    for le in bounds:
        if merged[le] >= rank:
            if math.isinf(le):
                return lower  # in the open top bucket: its lower bound, as Prometheus answers
            return lower + (le - lower) * (rank - below) / max(merged[le] - below, 1e-12)
        lower, below = le, merged[le]
    return lower


class DashboardState:
    """Snapshots of the registry and the event feed derived from them."""

    def __init__(self, service):
        self.service = service
        self.history: collections.deque[tuple[float, Snapshot]] = collections.deque(maxlen=HISTORY)
        self.events: collections.deque[dict] = collections.deque(maxlen=MAX_EVENTS)

    def sample(self) -> None:
        now = time.time()
        if self.history and now - self.history[-1][0] < MIN_GAP_S:
            return
        svc = self.service
        svc.metrics.set_queue(svc.scheduler.counts())
        snap = snapshot(svc.metrics.registry)
        if self.history:
            self._events(now, self.history[-1][1], snap)
        self.history.append((now, snap))

    def _events(self, now: float, old: Snapshot, new: Snapshot) -> None:
        for (name, labels), value in new.items():
            kind = EVENT_COUNTERS.get(name)
            grew = value - old.get((name, labels), 0.0)
            if kind and grew > 0:
                detail = ", ".join(f"{k}={v}" for k, v in labels) or name
                self.events.append({"time": now, "kind": kind, "detail": detail, "count": int(grew)})

    def data(self) -> dict:
        self.sample()
        now, snap = self.history[-1]
        arms = list(self.service.model.arms)
        past = self._at(now - WINDOW_S)
        return {
            "time": now, "model": self.service.model.name, "arms": arms, "stage": self._stage(snap),
            "queue": {"running": total(snap, "adaroute:num_requests_running"),
                      "waiting": total(snap, "adaroute:num_requests_waiting"),
                      "capacity": total(snap, "adaroute:queue_capacity")},
            "requests": {a: total(snap, "adaroute:request_success_total", arm=a) for a in arms},
            "latency": {a: {"ttft_p50": quantile(0.5, snap, past, "adaroute:time_to_first_token_seconds", arm=a),
                            "itl_p50": quantile(0.5, snap, past, "adaroute:inter_token_latency_seconds", arm=a)}
                        for a in arms},
            "layer_density": _layers(by_label(snap, "adaroute:layer_density", "layer")),
            "shadow_agreement": _mean(snap, past, "adaroute:shadow_agreement"),
            "series": self._series(arms),
            "events": list(self.events)[::-1],
        }

    def _stage(self, snap: Snapshot) -> dict:
        current = [s for s, v in by_label(snap, "adaroute:rollout_stage", "stage").items() if v == 1]
        if current:
            return {"name": current[0], "source": "rollout"}
        return {"name": self.service.default_arm, "source": "default arm (no rollout running)"}

    def _at(self, t: float) -> Snapshot:
        """The newest snapshot taken at or before ``t`` (the oldest one if none is that old)."""
        older = [s for when, s in self.history if when <= t]
        return older[-1] if older else self.history[0][1]

    def _series(self, arms: list[str]) -> dict:
        """Per consecutive pair of snapshots: tokens/s and traffic share per arm, mean TTFT and ITL."""
        out = {"time": [], "tokens_per_s": {a: [] for a in arms}, "share": {a: [] for a in arms},
               "ttft_s": {a: [] for a in arms}, "itl_s": {a: [] for a in arms}}
        pairs = list(zip(self.history, list(self.history)[1:], strict=False))
        for (t0, old), (t1, new) in pairs:
            out["time"].append(t1)
            done = {a: delta(new, old, "adaroute:request_success_total", arm=a) for a in arms}
            for a in arms:
                out["tokens_per_s"][a].append(delta(new, old, "adaroute:generation_tokens_total", arm=a) / (t1 - t0))
                out["share"][a].append(done[a] / sum(done.values()) if sum(done.values()) else None)
                out["ttft_s"][a].append(_mean(new, old, "adaroute:time_to_first_token_seconds", arm=a))
                out["itl_s"][a].append(_mean(new, old, "adaroute:inter_token_latency_seconds", arm=a))
        return out


def delta(new: Snapshot, old: Snapshot, name: str, **labels: str) -> float:
    return total(new, name, **labels) - total(old, name, **labels)


def _mean(new: Snapshot, old: Snapshot, name: str, **labels: str) -> float | None:
    """Mean of a histogram's observations between two snapshots (None without any)."""
    count = delta(new, old, name + "_count", **labels)
    return delta(new, old, name + "_sum", **labels) / count if count > 0 else None


def _layers(values: dict[str, float]) -> list[float]:
    return [values[k] for k in sorted(values, key=int)]


def authorize_admin(admin_key: str | None):
    """A dependency: with an admin key set, the request must carry it (header or ``key`` query)."""

    async def check(request: Request) -> None:
        if admin_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        given = given.strip() if scheme.lower() == "bearer" else request.query_params.get("key", "")
        if not hmac.compare_digest(given.encode(), admin_key.encode()):
            raise APIError(401, "the dashboard needs the admin key: send Authorization: Bearer <key> or open "
                           "/dashboard?key=<key>", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    return check


def router(admin_key: str | None = None) -> APIRouter:
    """/dashboard and /dashboard/data, for ``create_app(service, extra_routers=(router(key),))``."""
    r = APIRouter(dependencies=[Depends(authorize_admin(admin_key))])
    page = resources.files("adaroute.serve").joinpath("static/dashboard.html").read_text()

    def state(request: Request) -> DashboardState:
        app = request.app
        if not hasattr(app.state, "dashboard"):
            app.state.dashboard = DashboardState(app.state.service)
        return app.state.dashboard

    @r.get("/dashboard", response_class=HTMLResponse)
    async def dashboard() -> HTMLResponse:
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})

    @r.get("/dashboard/data")
    async def data(request: Request) -> dict:
        return state(request).data()

    return r
