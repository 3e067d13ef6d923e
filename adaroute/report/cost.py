"""Cost and return on investment from measured decode throughput and the user's price and traffic.

Model (every number the report prints beside its inputs):
    machine-hours per day   = tokens_per_day / (tokens_per_s * 3600)
    cost per day            = machine-hours per day * price_per_hour     (machines billed while busy)
    cost per 1M tokens      = price_per_hour / (tokens_per_s * 3600) * 1e6
    machines at peak        = ceil(peak_tokens_per_s / tokens_per_s)      (one model copy per machine)
    daily saving            = cost per day, dense - routed
    conversion cost         = conversion_seconds / 3600 * price_per_hour (converted on the same machine)
    payback                 = conversion cost / daily saving              (days; None if nothing is saved)
    energy per 1M tokens    = watts * 1e6 / tokens_per_s / 3.6e6          (kWh, machine power while decoding)
``tokens_per_s`` is the decode throughput of one machine at the serving batch, measured in the same
run for both models.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

# Used when the user gives none; the report marks them as assumptions.
DEFAULT_PRICE_PER_HOUR = 1.0
DEFAULT_TOKENS_PER_DAY = 10_000_000
DEFAULT_PEAK_TOKENS_PER_S = 200.0


@dataclass(frozen=True)
class CostInputs:
    price_per_hour: float  # one machine, currency units per hour
    tokens_per_day: float
    peak_tokens_per_s: float
    conversion_seconds: float  # measured: the routed model's conversion time (calibration.json)
    watts: float | None = None  # machine power while decoding

    def __post_init__(self):
        for name in ("price_per_hour", "tokens_per_day", "peak_tokens_per_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")
        if self.conversion_seconds < 0:
            raise ValueError(f"conversion_seconds: must be >= 0, got {self.conversion_seconds}")
        if self.watts is not None and not self.watts > 0:
            raise ValueError(f"watts: must be > 0, got {self.watts}")


def serving_cost(inputs: CostInputs, tokens_per_s: float) -> dict[str, float | int | None]:
    """Per-model figures at one machine's ``tokens_per_s``."""
    if not tokens_per_s > 0:
        raise ValueError(f"tokens_per_s: must be > 0, got {tokens_per_s}")
    per_hour = tokens_per_s * 3600
    hours = inputs.tokens_per_day / per_hour
    out = {
        "tokens_per_s": tokens_per_s,
        "cost_per_million_tokens": inputs.price_per_hour / per_hour * 1e6,
        "machine_hours_per_day": hours,
        "cost_per_day": hours * inputs.price_per_hour,
        "machines_at_peak": math.ceil(inputs.peak_tokens_per_s / tokens_per_s - 1e-9),
        "kwh_per_million_tokens": None,
    }
    if inputs.watts is not None:
        out["kwh_per_million_tokens"] = inputs.watts * 1e6 / tokens_per_s / 3.6e6
    return out


def compare_cost(inputs: CostInputs, dense_tokens_per_s: float, routed_tokens_per_s: float) -> dict:
    """Dense beside routed, the daily saving and the conversion's payback time."""
    dense, routed = serving_cost(inputs, dense_tokens_per_s), serving_cost(inputs, routed_tokens_per_s)
    saving = dense["cost_per_day"] - routed["cost_per_day"]
    conversion_cost = inputs.conversion_seconds / 3600 * inputs.price_per_hour
    return {
        "inputs": asdict(inputs),
        "dense": dense,
        "routed": routed,
        "daily_saving": saving,
        "saving_share": saving / dense["cost_per_day"],
        "conversion_cost": conversion_cost,
        "payback_days": conversion_cost / saving if saving > 0 else None,
    }
