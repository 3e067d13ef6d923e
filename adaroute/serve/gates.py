"""Rollout gates: the limits the routed arm must keep, judged over a sliding window of requests.

Each gate bounds the mean of one per-request value:

    agreement      (min)  top-1 agreement of routed with dense on a shadowed request's tokens
    kl             (max)  mean KL(dense || routed) per token of a shadowed request
    failsafe_rate  (max)  fail-safe events / routed layer-token slots of a routed request or shadow job
    itl_ratio      (max)  a routed request's inter-token latency over the dense arm's window mean

The decision. Requests, not tokens, are the independent samples (tokens of one answer are
correlated, so a token-level Wilson interval would be far too confident). A gate holds the last
``window`` values; once it has ``min_samples``, every new value is a look at a one-sided normal
confidence bound on the window mean, mean ± z·s/√n. A gate is breached when the whole bound lies on
the wrong side of its limit (for a minimum: mean + z·s/√n < limit), and passes (for auto-promotion)
when it lies on the right side. Looking after every request would make a fixed-level test fire by
chance sooner or later, so the k-th look of a stage spends α·6/(π²k²) of the error budget α (a
union bound over all looks: the chance that a gate whose true mean is within its limit ever fires
during a stage is at most α). A handful of unlucky requests moves a 30-to-200-sample mean too
little to cross the bound; a real breach moves the mean and is caught within about ``min_samples``
samples once it dominates the window.
"""

from __future__ import annotations

import collections
import math
import tomllib
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from statistics import NormalDist

# name -> which side of the limit is good ("min": the mean must stay above it)
GATES = {"agreement": "min", "kl": "max", "failsafe_rate": "max", "itl_ratio": "max"}
AGREEMENT_MARGIN = 0.10  # default minimum agreement = calibration agreement - this
KL_FACTOR = 3.0  # default maximum KL = this x calibration KL (at least KL_FLOOR)
KL_FLOOR = 0.25


@dataclass(frozen=True)
class GateConfig:
    """Limits and the decision's parameters (``--gates FILE.toml`` overrides any of them)."""

    min_agreement: float = 0.80
    max_kl: float = 0.50
    max_failsafe_rate: float = 0.05
    max_itl_ratio: float = 1.25
    min_samples: int = 30
    window: int = 200
    alpha: float = 0.01
    promote_after: int = 100  # passing samples per stage before --auto-promote moves on

    def __post_init__(self) -> None:
        for name in ("min_agreement", "max_failsafe_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}: must be in [0, 1], got {getattr(self, name)}")
        for name in ("max_kl", "max_itl_ratio"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")
        if not 2 <= self.min_samples <= self.window:
            raise ValueError(f"min_samples: must be in [2, window={self.window}], got {self.min_samples}")
        if not 0.0 < self.alpha < 0.5:
            raise ValueError(f"alpha: must be in (0, 0.5), got {self.alpha}")
        if self.promote_after < self.min_samples:
            raise ValueError(f"promote_after: must be >= min_samples ({self.min_samples}), got {self.promote_after}")

    def limit(self, gate: str) -> float:
        return getattr(self, f"{GATES[gate]}_{gate}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_calibration(cls, agreement: float | None, kl: float | None) -> GateConfig:
        """Defaults from the routed model's own calibration quality (class defaults where unknown)."""
        over = {}
        if agreement is not None:
            over["min_agreement"] = round(max(0.0, agreement - AGREEMENT_MARGIN), 4)
        if kl is not None:
            over["max_kl"] = round(max(KL_FLOOR, KL_FACTOR * kl), 4)
        return cls(**over)

    def updated(self, path: str | Path) -> GateConfig:
        """These gates with the keys of a TOML file replacing theirs (unknown keys are an error)."""
        with open(path, "rb") as f:
            table = tomllib.load(f)
        known = {f.name for f in fields(self)}
        unknown = sorted(set(table) - known)
        if unknown:
            raise ValueError(f"{', '.join(unknown)}: unknown gate setting(s); known: {', '.join(sorted(known))}")
        bad = [k for k, v in table.items() if isinstance(v, bool) or not isinstance(v, int | float)]
        if bad:
            raise ValueError(f"{bad[0]}: must be a number, got {table[bad[0]]!r}")
        return GateConfig(**{**self.to_dict(), **table})


class Window:
    """The last ``size`` values with their running sum and sum of squares."""

    def __init__(self, size: int):
        self.values: collections.deque[float] = collections.deque(maxlen=size)
        self.total = self.squares = 0.0

    def add(self, value: float) -> None:
        if len(self.values) == self.values.maxlen:
            old = self.values[0]
            self.total, self.squares = self.total - old, self.squares - old * old
        self.values.append(value)
        self.total, self.squares = self.total + value, self.squares + value * value

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return self.total / self.n if self.n else math.nan

    @property
    def std(self) -> float:
        if self.n < 2:
            return math.nan
        return math.sqrt(max(self.squares - self.n * self.mean ** 2, 0.0) / (self.n - 1))


@dataclass(frozen=True)
class Verdict:
    gate: str
    n: int
    mean: float
    bound: float  # the optimistic confidence bound: a breach when even it is beyond the limit
    limit: float
    breached: bool
    passing: bool

    def to_dict(self) -> dict:
        return {k: (round(v, 5) if isinstance(v, float) and math.isfinite(v) else v) for k, v in asdict(self).items()}


class Gates:
    """One window per gate; ``observe`` adds a value and judges that gate."""

    def __init__(self, config: GateConfig):
        self.config = config
        self.reset()

    def reset(self) -> None:
        self.windows = {g: Window(self.config.window) for g in GATES}
        self.looks = dict.fromkeys(GATES, 0)
        self.samples = dict.fromkeys(GATES, 0)  # values seen since the reset (not only in the window)

    def observe(self, gate: str, value: float) -> Verdict:
        if not math.isfinite(value):
            raise ValueError(f"{gate}: a non-finite sample ({value})")
        self.windows[gate].add(value)
        self.samples[gate] += 1
        if self.windows[gate].n >= self.config.min_samples:
            self.looks[gate] += 1
        return self.verdict(gate)

    def verdict(self, gate: str) -> Verdict:
        w, c = self.windows[gate], self.config
        limit, side = c.limit(gate), GATES[gate]
        if w.n < c.min_samples:
            return Verdict(gate, w.n, w.mean, math.nan, limit, False, False)
        alpha_k = c.alpha * 6 / (math.pi ** 2 * max(self.looks[gate], 1) ** 2)
        half = NormalDist().inv_cdf(1 - alpha_k) * w.std / math.sqrt(w.n)
        # optimistic: the bound on the good side; even it beyond the limit is a breach
        optimistic, pessimistic = (w.mean + half, w.mean - half) if side == "min" else (w.mean - half, w.mean + half)
        breached = optimistic < limit if side == "min" else optimistic > limit
        passing = pessimistic >= limit if side == "min" else pessimistic <= limit
        return Verdict(gate, w.n, w.mean, optimistic, limit, breached, passing)

    def snapshot(self) -> dict[str, dict]:
        return {g: self.verdict(g).to_dict() for g in GATES}

    def promotable(self, gates: tuple[str, ...]) -> bool:
        """Whether ``gates`` have each seen ``promote_after`` samples this stage and pass."""
        return all(self.samples[g] >= self.config.promote_after and self.verdict(g).passing for g in gates)
