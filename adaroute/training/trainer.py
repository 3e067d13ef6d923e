"""Router training on calibration text, from a model whose FFNs are already RoutedMLPs:

    windows -> sensitivity (one forward+backward) -> per-layer density allocation
            -> capture dense FFN inputs -> per-layer ranking fit -> threshold calibration
            -> optional end-to-end distillation -> re-calibration -> statistics

Shape legend: N = captured tokens, H = hidden size, F = FFN units, L = routed layers.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from adaroute.config import RoutingConfig, TrainConfig
from adaroute.eval.perplexity import start_id
from adaroute.routing.policy import LayerPolicy, allocate_densities, calibrate_thresholds, guard_units
from adaroute.routing.profile import PROFILE_GRID, LayerProfile, units_band
from adaroute.routing.routed_mlp import RoutedMLP
from adaroute.routing.stats import RoutingStats
from adaroute.training.capture import capture_inputs, fisher_gradients, token_windows
from adaroute.training.distill import distill
from adaroute.training.losses import oracle_rate
from adaroute.training.ranking import FitTerms, contribution_energy, fit_layer, hard_dropped_energy
from adaroute.training.selfgen import sample_windows
from adaroute.training.sensitivity import DEFAULT_GRID, cost_table


@dataclass
class TrainReport:
    """What calibration produced; written to calibration.json."""

    layer_density: list[float]
    sensitivity: list[list[float]]
    grid: list[float]
    calib_stats: dict[str, Any]
    dropped_energy: dict[str, list[float]]
    distill_loss: list[float] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)


def train_routers(
    model: nn.Module, tokenizer, texts: list[str], mods: list[RoutedMLP], routing: RoutingConfig, train: TrainConfig,
    checkpoint: Path | None = None,
) -> TrainReport:
    """Fit and calibrate the routers of ``mods`` in place (and train routing adapters when
    ``train.adapt_rank`` > 0); returns a report for calibration.json. ``checkpoint``: where the
    distillation stage keeps its resumable state."""
    prep = prepare_routers(model, tokenizer, texts, mods, routing, train)
    return finish_routers(model, tokenizer, texts, mods, routing, train, prep, checkpoint)


@dataclass
class Prepared:
    """What the density-independent stages produce: captured inputs, sensitivity cost table, codes."""

    inputs: list[torch.Tensor]  # [N, H] per layer
    costs: torch.Tensor  # [L, D]
    held: int
    energy: dict[str, list[float]]
    clock: _Clock


def prepare_routers(model, tokenizer, texts, mods, routing: RoutingConfig, train: TrainConfig) -> Prepared:
    """Capture, activation-aware shadow codes and the sensitivity table: everything before a target
    density matters, so several densities can be finished from one preparation."""
    seed_everything(train.seed)
    clock = _Clock()
    window = min(train.window, getattr(model.config, "max_position_embeddings", None) or train.window)
    windows = token_windows(tokenizer, texts, window, train.calib_tokens, _start(tokenizer, train))  # [B, W]
    _set_guards(mods, routing)
    with clock("capture"):
        inputs, sens_inputs, grads = _capture(model, mods, windows, train)
    held = _holdout_split(inputs[0].shape[0])  # fit on [:held], report dropped energy on [held:]
    energy = {"untrained": _dropped(mods, inputs, held, routing.density)}
    if train.shadow_fit == "gptq":
        with clock("shadow_fit"):
            refit_shadows(mods, inputs, held)
        energy["shadow_fit"] = _dropped(mods, inputs, held, routing.density)
    with clock("sensitivity"):
        costs = cost_table(mods, sens_inputs, grads)
    return Prepared(inputs, costs, held, energy, clock)


def finish_routers(model, tokenizer, texts, mods, routing: RoutingConfig, train: TrainConfig, prep: Prepared,
                   checkpoint: Path | None = None) -> TrainReport:
    """Allocation, optional ranking fit, calibration, distillation (routers and adapters) and
    re-calibration at ``routing.density``, from a preparation."""
    clock, inputs, costs, energy = prep.clock, prep.inputs, prep.costs, dict(prep.energy)
    _set_guards(mods, routing)
    densities = _allocate(costs, routing, len(mods))
    if train.ranking_steps:
        with clock("ranking_fit"):
            _fit_all(mods, inputs, densities, train, prep.held)
        energy["trained"] = _dropped(mods, inputs, prep.held, densities)
    stats = calibrate(mods, inputs, densities, costs, routing)
    distill_loss: list[float] = []
    if train.distill_steps:
        with clock("distill"):
            harder = _distill_densities(costs, routing, train, len(mods))
            if harder != densities:
                calibrate(mods, inputs, harder, costs, routing)
            distill_loss = _distill(model, tokenizer, texts, mods, inputs, harder, train, checkpoint)
            stats = calibrate(mods, inputs, densities, costs, routing)  # scores moved: hit the densities again
    return TrainReport(
        layer_density=densities,
        sensitivity=costs.tolist(),
        grid=list(DEFAULT_GRID),
        calib_stats=summarise_stats(stats),
        dropped_energy=energy,
        distill_loss=distill_loss,
        seconds=dict(clock.seconds),
        tokens=inputs[0].shape[0],
    )


class _Clock:
    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def _capture(model, mods, windows, train: TrainConfig):
    """FFN inputs on every window; Fisher gradients (for sensitivity) on the first few."""
    n_sens = max(1, min(len(windows), train.sensitivity_tokens // windows.shape[1]))
    sens, grads = fisher_gradients(model, mods, windows[:n_sens], train.seed)
    inputs = sens.inputs
    if n_sens < len(windows):
        rest = capture_inputs(model, mods, windows[n_sens:]).inputs
        inputs = [torch.cat([a, b]) for a, b in zip(inputs, rest, strict=True)]
    return inputs, sens.inputs, grads


def refit_shadows(mods: list[RoutedMLP], inputs: list[torch.Tensor], held: int) -> None:
    """Activation-aware int4 codes for each router from its layer's calibration inputs."""
    for m, x in tqdm(list(zip(mods, inputs, strict=True)), desc="shadow fit", unit="layer", leave=False):
        xd = x[:held].double()
        m.router.refit_codes(m.w_gate, m.w_up, xd.t() @ xd / xd.shape[0])  # E[x x^T], [H, H]


def _dropped(mods, inputs, held: int, density) -> list[float]:
    dens = density if isinstance(density, list) else [density] * len(mods)
    return [hard_dropped_energy(m, x[held:], d) if d < 1.0 else 0.0 for m, x, d in zip(mods, inputs, dens, strict=True)]


def _set_guards(mods: list[RoutedMLP], routing: RoutingConfig) -> None:
    for m in mods:
        lo, hi = guard_units(m.units, routing.min_density, routing.max_density)
        m.set_policy(LayerPolicy(m.threshold, lo, hi))


def _allocate(costs: torch.Tensor, routing: RoutingConfig, layers: int) -> list[float]:
    if routing.allocation == "uniform" or routing.density >= 1.0:
        return [routing.density] * layers
    grid = torch.tensor(DEFAULT_GRID, dtype=torch.float64)
    return allocate_densities(grid, costs, routing.density, routing.layer_min_density, routing.layer_max_density)


def _distill_densities(costs: torch.Tensor, routing: RoutingConfig, train: TrainConfig, layers: int) -> list[float]:
    """Per-layer densities distillation runs at: the allocation for ``train.distill_at`` the target."""
    target = train.distill_at(routing.density)
    harder = dataclasses.replace(routing, density=target, layer_min_density=min(routing.layer_min_density, target))
    return _allocate(costs, harder, layers)


def _holdout_split(n: int) -> int:
    """Index from which captured tokens are kept out of the fit (to report held-out dropped energy)."""
    return max(1, int(n * 0.9))


def _fit_all(mods: list[RoutedMLP], inputs: list[torch.Tensor], densities: list[float], train: TrainConfig,
             held: int) -> None:
    if train.ranking_steps == 0:
        return
    gen = torch.Generator().manual_seed(train.seed)
    terms = FitTerms(train.z_loss, train.usage_loss, train.tau)
    for m, x, d in tqdm(list(zip(mods, inputs, densities, strict=True)), desc="router fit", unit="layer",
                        leave=False):
        if d < 1.0:
            fit_layer(m, x[:held], d, train.ranking_steps, train.ranking_batch, train.lr, terms, gen)


def _start(tokenizer, train: TrainConfig) -> int | None:
    """The token calibration windows begin with (None: cold windows, or a tokenizer without BOS/EOS)."""
    return start_id(tokenizer) if train.start_token else None


def _distill(model, tokenizer, texts, mods, inputs, densities, train: TrainConfig, checkpoint) -> list[float]:
    targets = {}
    gen = torch.Generator().manual_seed(train.seed)
    for m, x, d in zip(mods, inputs, densities, strict=True):
        if d < 1.0:
            targets[m.layer_idx] = oracle_rate(contribution_energy(m, x[:4096]), d)  # [F]
            if train.adapt_rank:
                m.add_adapter(train.adapt_rank, gen)
    limit = getattr(model.config, "max_position_embeddings", None) or train.distill_window
    windows = token_windows(tokenizer, texts, min(train.distill_window, limit), train.distill_tokens,
                            _start(tokenizer, train))  # [B, W]
    if train.distill_generated:
        own = sample_windows(model, tokenizer, mods, train.distill_generated, windows.shape[1], train.seed)
        windows = torch.cat([windows, own])  # [B + B', W]
    return distill(model, mods, windows, targets, train, checkpoint)


def calibrate(mods: list[RoutedMLP], inputs: list[torch.Tensor], densities: list[float], costs: torch.Tensor,
              routing: RoutingConfig, max_tokens: int = 8192) -> RoutingStats:
    """Set each layer's policy to hit its density on the captured inputs, and store its profile.
    Returns the selection statistics of the calibrated policies on the same sample.

    Thresholds come from an even sample of at most ``max_tokens`` tokens: 8192 tokens x F units
    pin a quantile to well under 0.1 % density, and scoring more costs minutes on a CPU.
    """
    stats = RoutingStats()
    grid = list(PROFILE_GRID)
    layers = list(zip(mods, inputs, densities, costs.tolist(), strict=True))
    for m, x, d, cost in tqdm(layers, desc="calibrate", unit="layer", leave=False):
        lo, hi = guard_units(m.units, routing.min_density, routing.max_density)
        with torch.no_grad():
            scores = m.router.score(_even_sample(x, max_tokens))  # [<= max_tokens, F]
        thresholds = calibrate_thresholds(scores, [*grid, d], lo, hi)
        m.profile = LayerProfile(grid, thresholds[:-1], cost, d, routing.policy, lo, hi)
        if d >= 1.0:
            m.set_policy(LayerPolicy.dense(m.units))
        elif routing.policy == "topk":
            m.set_policy(LayerPolicy.topk(max(1, round(d * m.units))))
        else:
            m.set_policy(LayerPolicy(thresholds[-1], lo, hi))
        mask = m.select(scores)  # [<= max_tokens, F]
        stats.record(m.layer_idx, None, mask)
        if d < 1.0:
            m.profile.units_band = units_band(mask.sum(-1), m.units)
    return stats


def _even_sample(x: torch.Tensor, max_tokens: int) -> torch.Tensor:
    """Every k-th row of x [N, H] so that at most ``max_tokens`` remain (deterministic)."""
    return x[:: max(1, -(-x.shape[0] // max_tokens))]


def summarise_stats(stats: RoutingStats) -> dict[str, Any]:
    return {
        "mean_density": stats.mean_density(),
        "layer_density": list(stats.layer_density().values()),
        "units_per_token": stats.units_per_token(),
        "unit_usage": stats.unit_usage_summary(),
    }
