import math
from pydoc_data.topics import topics

import pytest
import torch

from adaroute.config import RoutingConfig, TrainConfig
from adaroute.routing import RoutingStats, collecting, route_model
from adaroute.routing.profile import apply_density
from adaroute.training.trainer import train_routers
from tests.fixtures import make_tiny_llama, make_tiny_tokenizer

TEXTS = [topics[k] for k in ("class", "assignment", "import", "lambda")]
TRAIN = TrainConfig(calib_tokens=1024, window=64, ranking_steps=8, ranking_batch=256, sensitivity_tokens=256)


def trained(density=0.5, seed=0, **routing_kw):
    model = make_tiny_llama(0)
    mods = route_model(model)
    cfg = TrainConfig(**{**TRAIN.to_dict(), "seed": seed})
    report = train_routers(model, make_tiny_tokenizer(), TEXTS, mods, RoutingConfig(density=density, **routing_kw), cfg)
    return model, mods, report


def test_training_is_deterministic_under_a_seed():
    _, a, _ = trained(seed=1)
    _, b, _ = trained(seed=1)
    for ma, mb in zip(a, b, strict=True):
        assert torch.equal(ma.router.shadow_scale, mb.router.shadow_scale)
        assert torch.equal(ma.router.unit_bias, mb.router.unit_bias)
        assert ma.policy == mb.policy


@pytest.mark.parametrize("allocation", ["sensitivity", "uniform"])
def test_policy_hits_target_density_on_calibration_data(allocation):
    _, mods, report = trained(0.4, allocation=allocation, layer_min_density=0.2)
    assert abs(report.calib_stats["mean_density"] - 0.4) < 0.01
    assert abs(sum(report.layer_density) / len(mods) - 0.4) < 1e-6
    assert report.calib_stats["units_per_token"]["std"] > 0  # count varies per token


def test_activation_aware_shadow_drops_less_energy_than_round_to_nearest():
    _, _, report = trained(0.5, allocation="uniform")
    before, after = report.dropped_energy["untrained"], report.dropped_energy["shadow_fit"]
    assert sum(after) < sum(before)


def test_density_override_moves_the_measured_density():
    model, mods, _ = trained(0.5)
    ids = make_tiny_tokenizer()(TEXTS[0], return_tensors="pt")["input_ids"][:, :64]
    measured = {}
    for d in (0.3, 0.7, 1.0):
        apply_density(mods, d)
        stats = RoutingStats()
        with torch.no_grad(), collecting(model, stats):
            model(ids)
        measured[d] = stats.mean_density()
    assert measured[0.3] < measured[0.7] < measured[1.0] == 1.0
    assert math.isclose(measured[0.3], 0.3, abs_tol=0.1)


def test_distillation_trains_only_router_parameters_and_keeps_density():
    cfg = TrainConfig(**{**TRAIN.to_dict(), "distill_steps": 3, "distill_lr": 1e-2})
    model = make_tiny_llama(0)
    mods = route_model(model)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "router" not in k}
    report = train_routers(model, make_tiny_tokenizer(), TEXTS, mods, RoutingConfig(density=0.5, layer_min_density=0.2),
                           cfg)
    assert len(report.distill_loss) == 3 and all(math.isfinite(v) for v in report.distill_loss)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in frozen.items())
    assert abs(report.calib_stats["mean_density"] - 0.5) < 0.01  # re-calibrated after distillation
    assert all(m.soft_tau is None for m in mods) and all(p.requires_grad for p in mods[0].router_parameters())


@pytest.mark.parametrize("start", [True, False])
def test_calibration_windows_begin_with_the_start_token(monkeypatch, start):
    from adaroute.training import trainer

    seen = {}

    def stop(model, mods, windows, train):
        seen["windows"] = windows
        raise RuntimeError("captured")

    monkeypatch.setattr(trainer, "_capture", stop)
    model, tok = make_tiny_llama(0), make_tiny_tokenizer()
    cfg = TrainConfig(**{**TRAIN.to_dict(), "start_token": start})
    with pytest.raises(RuntimeError, match="captured"):
        train_routers(model, tok, TEXTS, route_model(model), RoutingConfig(density=0.5), cfg)
    first = seen["windows"][:, 0]
    assert bool((first == tok.bos_token_id).all()) is start
