import math

import pytest
import torch

from adaroute.config import RoutingConfig, TrainConfig
from adaroute.routing import route_model
from adaroute.training import distill as distill_mod
from adaroute.training.trainer import train_routers
from tests.fixtures import make_tiny_llama, make_tiny_tokenizer
from tests.training.test_trainer import TEXTS, TRAIN

ADAPT = TrainConfig(**{**TRAIN.to_dict(), "ranking_steps": 0, "distill_steps": 4, "distill_lr": 1e-2, "adapt_rank": 4,
                       "adapt_lr": 1e-2, "distill_window": 32, "distill_tokens": 512, "distill_batch": 2,
                       "checkpoint_every": 2})
ROUTING = RoutingConfig(density=0.5, layer_min_density=0.2)


def adapted(checkpoint=None, train=ADAPT):
    model = make_tiny_llama(0)
    mods = route_model(model)
    report = train_routers(model, make_tiny_tokenizer(), TEXTS, mods, ROUTING, train, checkpoint)
    return model, mods, report


def trainable_state(mods) -> list[torch.Tensor]:
    return [p.detach().clone() for m in mods for p in (*m.router_parameters(), *m.adapter_parameters())]


def test_adapters_train_with_the_routers_and_leave_the_base_untouched():
    base = make_tiny_llama(0).state_dict()
    model, mods, report = adapted()
    assert len(report.distill_loss) == 4 and all(math.isfinite(v) for v in report.distill_loss)
    state = model.state_dict()
    for key, value in base.items():  # every original weight, in its routed home
        if key.endswith(("gate_proj.weight", "up_proj.weight", "down_proj.weight")):
            continue
        assert torch.equal(state[key], value), key
    for m, layer in zip(mods, range(2), strict=True):
        prefix = f"model.layers.{layer}.mlp."
        assert torch.equal(m.w_gate, base[prefix + "gate_proj.weight"])
        assert torch.equal(m.w_down_t, base[prefix + "down_proj.weight"].t())
        assert m.adapter is not None and m.adapter.w_out.abs().sum() > 0  # the output side trained
    assert abs(report.calib_stats["mean_density"] - 0.5) < 0.01  # re-calibrated on the adapted model
    assert all(m.soft_tau is None for m in mods)


def test_adapter_training_is_deterministic_under_a_seed():
    _, a, _ = adapted()
    _, b, _ = adapted()
    assert all(torch.equal(x, y) for x, y in zip(trainable_state(a), trainable_state(b), strict=True))
    assert [m.policy for m in a] == [m.policy for m in b]


def test_an_interrupted_distillation_resumes_where_it_stopped(tmp_path, monkeypatch):
    _, full, full_report = adapted()
    ckpt = tmp_path / "distill.pt"
    real = distill_mod._step_loss
    calls = {"n": 0}

    def dies_at_step_three(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # as if the process were stopped after the step-2 checkpoint
        return real(*args, **kwargs)

    monkeypatch.setattr(distill_mod, "_step_loss", dies_at_step_three)
    with pytest.raises(KeyboardInterrupt):
        adapted(ckpt)
    assert torch.load(ckpt, weights_only=True)["step"] == 2
    monkeypatch.setattr(distill_mod, "_step_loss", real)
    _, resumed, report = adapted(ckpt)
    assert report.distill_loss == full_report.distill_loss
    assert all(torch.equal(x, y) for x, y in zip(trainable_state(full), trainable_state(resumed), strict=True))


def test_a_checkpoint_of_another_configuration_is_not_resumed(tmp_path):
    ckpt = tmp_path / "distill.pt"
    adapted(ckpt, TrainConfig(**{**ADAPT.to_dict(), "distill_steps": 2}))
    _, mods, report = adapted(ckpt)
    _, fresh, _ = adapted()
    assert len(report.distill_loss) == 4
    assert all(torch.equal(x, y) for x, y in zip(trainable_state(fresh), trainable_state(mods), strict=True))


def test_distillation_at_a_share_of_the_target_density_ends_calibrated_at_the_target(monkeypatch):
    from adaroute.training import trainer

    seen = []
    real = trainer._distill

    def spy(model, tokenizer, texts, mods, inputs, densities, *args):
        seen.append(list(densities))
        return real(model, tokenizer, texts, mods, inputs, densities, *args)

    monkeypatch.setattr(trainer, "_distill", spy)
    _, _, at_target = adapted()
    _, mods, harder = adapted(train=TrainConfig(**{**ADAPT.to_dict(), "distill_density": 0.6}))
    assert seen[0] == at_target.layer_density  # the default distils at the target's allocation
    assert sum(seen[1]) / len(seen[1]) < sum(seen[0]) / len(seen[0]) - 0.1  # here at a lower one
    assert harder.layer_density == at_target.layer_density  # and then serves the target's
    assert abs(harder.calib_stats["mean_density"] - 0.5) < 0.01
    assert all(m.adapter is not None for m in mods if not m.is_dense)


def test_distillation_density_per_target():
    """The default preset distils at density 0.25, never above the target nor below half of it."""
    cfg = TrainConfig.from_name("default")
    assert [cfg.distill_at(t) for t in (0.7, 0.5, 0.35, 0.25, 0.2)] == [0.35, 0.25, 0.25, 0.25, 0.2]
    assert TrainConfig(distill_density=0.7).distill_at(0.5) == 0.35  # without a floor: the share alone
    with pytest.raises(ValueError, match="distill_floor"):
        TrainConfig(distill_floor=1.5)
