"""Configuration dataclasses, one per concern, validated on construction.

Every check raises ``ValueError`` naming the offending field, so a bad value fails where it is
written rather than deep inside a training loop.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

FORMAT_VERSION = 3  # 2: routing adapters; 3: q8/q4 models stored as blocks (adaroute.routing.storage reads 1-3)


def _check(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"{name}: {msg}")


@dataclass
class RoutingConfig:
    """How a dense FFN is turned into a routed one.

    density:       target mean share of FFN units computed per token, over all routed layers.
    policy:        "adaptive" (per-layer score threshold, unit count varies per token) or
                   "topk" (fixed k = density * F units per token; the baseline).
    allocation:    "sensitivity" spreads the density over layers by measured loss sensitivity;
                   "uniform" gives every layer the same density.
    min_density / max_density: per-token guards, as shares of F (converted to unit counts per layer).
    layer_min_density / layer_max_density: bounds on any one layer's mean density when allocating.
    group_size:    hidden-dim group of the int4 router shadow (must divide the hidden size).
    head_rows:     routed output head (``adaroute.runtime.head``): exact logits for this many vocabulary
                   rows per token, the rest from the head's 8-bit shadow; 0 = the exact head. Float32
                   models only (a q8/q4 conversion stores 0).
    """

    density: float = 0.5
    policy: str = "adaptive"
    allocation: str = "sensitivity"
    min_density: float = 0.02
    max_density: float = 1.0
    layer_min_density: float = 0.15
    layer_max_density: float = 1.0
    group_size: int = 32
    head_rows: int = 256

    def __post_init__(self) -> None:
        _check(0.0 < self.density <= 1.0, "density", f"must be in (0, 1], got {self.density}")
        _check(self.policy in ("adaptive", "topk"), "policy", f"must be 'adaptive' or 'topk', got {self.policy!r}")
        _check(
            self.allocation in ("sensitivity", "uniform"),
            "allocation",
            f"must be 'sensitivity' or 'uniform', got {self.allocation!r}",
        )
        _check(0.0 <= self.min_density <= 1.0, "min_density", f"must be in [0, 1], got {self.min_density}")
        _check(
            self.min_density < self.max_density <= 1.0,
            "max_density",
            f"must be in (min_density, 1], got {self.max_density}",
        )
        _check(
            0.0 < self.layer_min_density <= self.density <= self.layer_max_density <= 1.0,
            "layer_min_density",
            "need 0 < layer_min_density <= density <= layer_max_density <= 1, got "
            f"{self.layer_min_density} / {self.density} / {self.layer_max_density}",
        )
        _check(self.group_size > 0 and self.group_size % 2 == 0, "group_size", "must be a positive even int")
        _check(self.head_rows >= 0, "head_rows", f"must be >= 0, got {self.head_rows}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RoutingConfig:
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        _check(not unknown, "routing", f"unknown keys {sorted(unknown)}")
        return cls(**d)


_TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    # Demo preset: a small calibration sample; activation-aware shadow, measured allocation.
    "quick": dict(calib_tokens=4096, window=512, sensitivity_tokens=1024, ranking_steps=0, distill_steps=0),
    # Default preset: the quick stages on 4x the tokens, then 150 distillation steps of 256 tokens that
    # train rank-8 routing adapters with the routers (about 1 % of the dense FFN's bytes per token; rank 16
    # gave the same mean perplexity ratio over two seeds and three domains at 0.35 and 0.5, 1.017, with a
    # wider spread between seeds, docs/routing.md), at
    # density 0.25 (at most the target, at least half of it): adapters trained where more units are
    # missing serve better at the target (three unseen domains, docs/routing.md: at 0.35, 1.036 / 1.036 /
    # 1.191 distilled at the target, 1.023 / 1.011 / 1.109 at 0.245; at 0.5, 1.018 / 1.009 / 1.052 at the
    # target, 0.999 / 0.990 / 1.029 at 0.35, 0.996 / 0.976 / 0.991 at 0.25).
    "default": dict(calib_tokens=16384, window=512, sensitivity_tokens=2048, ranking_steps=0, distill_steps=150,
                    distill_window=256, adapt_rank=8, distill_density=0.5, distill_floor=0.25),
}
# Wall-clock budget of each preset on 2 idle CPU cores for the embedded model, printed before converting.
PRESET_BUDGET_MINUTES = {"quick": 10, "default": 30}


@dataclass
class TrainConfig:
    """Router training on calibration text.

    calib_tokens:       tokens of calibration text captured (dense FFN inputs, per layer); with several files each
                        gives a share in proportion to its length, from its start.
    window:             tokens per calibration window.
    ranking_steps:      optimiser steps of the per-layer ranking fit (0 = keep the untrained shadow).
    ranking_batch:      tokens per ranking step.
    lr:                 Adam learning rate for router scales and unit biases.
    z_loss / usage_loss: weights of the router z-loss and the unit-usage term.
    shadow_fit:         "gptq" re-chooses the router's int4 codes for the calibration inputs (activation-
                        aware); "rtn" keeps round-to-nearest codes from the weights alone.
    tau:                temperature (score units, i.e. log-contribution) of the soft mask.
    sensitivity_tokens: tokens used to measure per-layer loss sensitivity (for density allocation).
    distill_steps:      end-to-end distillation steps, KL(dense || routed), routers in the loop.
    distill_batch:      windows per distillation step.
    distill_lr:         learning rate in distillation (router scales relative to their size, biases as is).
    distill_window:     tokens per distillation window.
    distill_tokens:     calibration tokens (shared between files like calib_tokens) the distillation windows are
                        drawn from (at random, seeded).
    distill_generated:  tokens of the dense model's own samples added to that pool (training.selfgen; 0 = none).
    start_token:        calibration and distillation windows begin with the tokenizer's start token (BOS, else
                        EOS), as served requests and `adaroute eval`'s windows do; False: windows begin cold.
    distill_density:    routers and adapters are distilled at this share of the target density (1 = at the
                        target); thresholds are calibrated at the target afterwards. Below 1 the adapters learn
                        to make up for more missing units than serving leaves out (docs/routing.md).
    distill_floor:      ... but at no lower density than this one (nor above the target): ``distill_at``.
    adapt_rank:         rank of the routing adapters trained with the routers in distillation (0 = none).
    adapt_lr:           learning rate of the adapters.
    checkpoint_every:   distillation steps between checkpoints (an interrupted conversion resumes there).
    seed:               seeds every random choice; the same seed gives the same routers.
    """

    calib_tokens: int = 24576
    window: int = 512
    ranking_steps: int = 300
    ranking_batch: int = 2048
    lr: float = 2e-3
    z_loss: float = 1e-4
    usage_loss: float = 1.0
    tau: float = 0.5
    shadow_fit: str = "gptq"
    sensitivity_tokens: int = 4096
    distill_steps: int = 0
    distill_batch: int = 1
    distill_lr: float = 1e-3
    distill_window: int = 256
    distill_tokens: int = 65536
    distill_generated: int = 0
    start_token: bool = True
    distill_density: float = 1.0
    distill_floor: float = 0.0
    adapt_rank: int = 0
    adapt_lr: float = 1e-3
    checkpoint_every: int = 25
    seed: int = 0
    name: str = field(default="custom")

    def __post_init__(self) -> None:
        _check(self.calib_tokens >= 64, "calib_tokens", f"must be >= 64, got {self.calib_tokens}")
        _check(self.window >= 8, "window", f"must be >= 8, got {self.window}")
        for f in ("ranking_steps", "distill_steps", "adapt_rank", "distill_generated"):
            _check(getattr(self, f) >= 0, f, f"must be >= 0, got {getattr(self, f)}")
        for f in ("ranking_batch", "distill_batch", "sensitivity_tokens", "checkpoint_every"):
            _check(getattr(self, f) > 0, f, f"must be > 0, got {getattr(self, f)}")
        _check(self.distill_window >= 8, "distill_window", f"must be >= 8, got {self.distill_window}")
        _check(self.distill_tokens >= self.distill_window, "distill_tokens",
               f"must be >= distill_window ({self.distill_window}), got {self.distill_tokens}")
        for f in ("lr", "distill_lr", "adapt_lr", "tau"):
            _check(getattr(self, f) > 0, f, f"must be > 0, got {getattr(self, f)}")
        _check(0.0 < self.distill_density <= 1.0, "distill_density", f"must be in (0, 1], got {self.distill_density}")
        _check(0.0 <= self.distill_floor <= 1.0, "distill_floor", f"must be in [0, 1], got {self.distill_floor}")
        _check(self.shadow_fit in ("gptq", "rtn"), "shadow_fit", f"must be 'gptq' or 'rtn', got {self.shadow_fit!r}")
        for f in ("z_loss", "usage_loss"):
            _check(getattr(self, f) >= 0, f, f"must be >= 0, got {getattr(self, f)}")

    def distill_at(self, target: float) -> float:
        """The mean density routers and adapters are distilled at for a ``target`` density."""
        return max(target * self.distill_density, min(target, self.distill_floor))

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> TrainConfig:
        """A named preset ('quick' or 'default'), optionally with some fields overridden."""
        if name not in _TRAIN_PRESETS:
            raise ValueError(f"preset: unknown preset {name!r}; choose one of {sorted(_TRAIN_PRESETS)}")
        return cls(**{**_TRAIN_PRESETS[name], **overrides, "name": name})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class ServeConfig:
    """`adaroute serve`: where it listens, how it batches, what it logs.

    arm:            the arm a request gets unless it names one: "dense" (routing off) or "routed";
                    None: routed for a routed model, dense otherwise.
    max_batch:      sequences decoded together per arm; max_queue: requests waiting beyond them
                    (more are answered 429).
    context:        most tokens of prompt + completion per request (None: the model's positions).
    audit:          SQLite file of one row per request (None: no audit log); audit_prompts: store
                    the prompt text too (otherwise only its SHA-256).
    api_keys:       accepted bearer keys for /v1 (empty: no authentication).
    max_body_bytes: larger request bodies are answered 413.
    drain_s:        on SIGTERM, seconds in-flight requests get to finish before they are cancelled.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    arm: str | None = None
    max_batch: int = 8
    max_queue: int = 64
    context: int | None = 2048
    audit: str | None = None
    audit_prompts: bool = False
    api_keys: tuple[str, ...] = ()
    threads: int | None = None
    max_body_bytes: int = 1 << 20
    drain_s: float = 30.0

    def __post_init__(self) -> None:
        _check(1 <= self.port <= 65535, "port", f"must be in 1..65535, got {self.port}")
        _check(self.arm in (None, "dense", "routed"), "arm", f"must be 'dense' or 'routed', got {self.arm!r}")
        for f in ("max_batch", "max_queue", "max_body_bytes"):
            _check(getattr(self, f) >= 1, f, f"must be >= 1, got {getattr(self, f)}")
        _check(self.context is None or self.context >= 2, "context", f"must be >= 2, got {self.context}")
        _check(self.threads is None or self.threads >= 1, "threads", f"must be >= 1, got {self.threads}")
        _check(all(k.strip() for k in self.api_keys), "api_keys", "an API key must not be empty")
        _check(self.drain_s >= 0, "drain_s", f"must be >= 0, got {self.drain_s}")
