"""The per-token dense fail-safe: out-of-band selections, non-finite outputs and a raising sparse kernel
make a routed layer compute that token densely; events are counted by layer and reason; the compiled
decode step (fused CPU path) agrees with the Python reference path."""

import math

import pytest
import torch

from adaroute.routing.profile import LayerProfile, units_band
from adaroute.runtime import Engine, ExecutionPolicy, generate
from adaroute.runtime.failsafe import REASONS, FaultInjector
from tests.routing.conftest import calibrated_copy

PROMPT = [5, 9, 13, 40, 41]


@pytest.fixture
def routed():
    model, mods = calibrated_copy(seed=3, density=0.5)
    for m in mods:  # a calibrated profile whose current density is its calibrated one
        m.profile = LayerProfile([0.5, 1.0], [m.threshold, -math.inf], [0.0, 0.0], 0.5, "adaptive", m.min_units,
                                 m.max_units, [0, m.units])
    return model, mods


def _decode_logits(engine, steps=6):
    cache = engine.new_cache(1, 32)
    out = [engine.forward(torch.tensor([PROMPT]), cache)]
    for _ in range(steps):
        out.append(engine.forward(torch.tensor([[int(out[-1].argmax())]]), cache))
    return torch.cat(out)  # [steps + 1, V]


def _dense(model, kernel):
    return Engine.from_model(model, kernel=kernel, policy=ExecutionPolicy.always_dense())


def test_band_violation_computes_the_token_densely(routed, kernel_name):
    model, mods = routed
    healthy = _decode_logits(Engine.from_model(model, kernel=kernel_name))
    for m in mods:  # no real selection has more units than F - 1 and at most 0: every token leaves the band
        m.profile.units_band = [m.units, m.units]
    engine = Engine.from_model(model, kernel=kernel_name)
    guarded = _decode_logits(engine)
    dense = _decode_logits(_dense(model, kernel_name))
    torch.testing.assert_close(guarded, dense, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(healthy, dense, atol=1e-3)  # the routed answer differs: the band did it
    events = engine.failsafe.events()
    assert set(events) == {(i, "band") for i in range(len(mods))} and all(n == 6 for n in events.values())


@pytest.mark.parametrize("kind,reason", [("raise", "error"), ("nan", "nonfinite")])
def test_sparse_path_faults_never_fail_a_step(routed, kernel_name, kind, reason):
    model, _ = routed
    engine = Engine.from_model(model, kernel=kernel_name)
    engine.failsafe.faults = FaultInjector((kind,), rate=1.0, seed=1, every_layer=True)
    guarded = _decode_logits(engine)
    torch.testing.assert_close(guarded, _decode_logits(_dense(model, kernel_name)), rtol=1e-4, atol=1e-4)
    assert set(r for _, r in engine.failsafe.events()) == {reason}
    assert torch.isfinite(guarded).all()


def test_fault_on_a_tenth_of_steps_counts_each_and_finishes(routed):
    model, _ = routed
    engine = Engine.from_model(model, kernel="cpu", policy=ExecutionPolicy.always_sparse())  # every step guarded
    engine.failsafe.faults = FaultInjector(("raise", "nan"), rate=0.1, seed=4)
    out = generate(engine, [PROMPT, PROMPT[:2]], 60)
    assert [len(t) for t in out.tokens] == [60, 60]
    faults = engine.failsafe.faults.faulty_steps
    assert faults > 0 and int(engine.failsafe.totals.sum()) >= faults
    assert set(r for _, r in engine.failsafe.events()) <= {"error", "nonfinite"}


def test_fused_path_agrees_with_the_reference_path(routed):
    model, mods = routed
    for m in mods:  # a band that some tokens leave and others do not
        m.profile.units_band = [0, 64]
    engines = [Engine.from_model(model, kernel="cpu"), Engine.from_model(model, kernel="cpu")]
    engines[1]._fused = None  # the Python path through the same kernels
    for e in engines:
        e.record_units = True
    codes = []
    for e in engines:
        generate(e, [PROMPT], 12)
        codes.append(e.failsafe.totals.clone())
    assert engines[0]._fused is not None
    torch.testing.assert_close(codes[0], codes[1])
    assert 0 < int(codes[0].sum()) < 11 * len(mods)


def test_corrupted_scores_change_the_selection_silently(routed):
    model, _ = routed
    healthy = Engine.from_model(model, kernel="cpu")
    base = _decode_logits(healthy)
    corrupted = Engine.from_model(model, kernel="cpu")
    corrupted.failsafe.faults = FaultInjector(("scores",), rate=1.0, seed=2, every_layer=True)
    assert not torch.allclose(_decode_logits(corrupted), base, atol=1e-4)
    assert int(corrupted.failsafe.totals.sum()) == 0  # a wide band: only the quality gates can see this


def test_no_failsafe_and_healthy_failsafe_give_the_same_tokens(routed, kernel_name):
    model, _ = routed
    on = Engine.from_model(model, kernel=kernel_name)
    off = Engine.from_model(model, kernel=kernel_name)
    off.failsafe = None
    assert generate(on, [PROMPT], 16).tokens == generate(off, [PROMPT], 16).tokens
    assert int(on.failsafe.totals.sum()) == 0


def test_profile_band_round_trip_and_legacy_band():
    counts = torch.arange(1000)
    band = units_band(counts, 2048)
    assert band == [math.floor(0.999 * 0.8), math.ceil(998.001 * 1.25)]
    p = LayerProfile([0.5, 1.0], [0.1, -math.inf], [0.0, 0.0], 0.5, "adaptive", 2, 100, band)
    again = LayerProfile.from_dict(p.to_dict())
    assert again.units_band == band and again.band_at(2048, 0.5) == tuple(band)
    assert again.band_at(2048, 0.25) == (0, math.ceil(band[1] * 0.5))
    legacy = {k: v for k, v in p.to_dict().items() if k != "units_band"}  # a directory from before the band
    old = LayerProfile.from_dict(legacy)
    assert old.units_band is None and old.band_at(1000, 0.5) == (100, 1000)


def test_fault_spec_parsing():
    f = FaultInjector.parse("raise+nan@0.25", seed=3)
    assert f.kinds == ("raise", "nan") and f.rate == 0.25 and not f.every_layer
    assert FaultInjector.parse("scores:all").every_layer
    for bad in ("boom", "raise@x", "nan@2", "raise:some"):
        with pytest.raises(ValueError, match="faults"):
            FaultInjector.parse(bad)
    assert REASONS == ("band", "nonfinite", "error")


def test_calibration_stores_the_band_and_a_saved_model_keeps_it(tmp_path):
    from adaroute.config import RoutingConfig
    from adaroute.routing import load_routed, route_model, save_routed
    from adaroute.routing.profile import PROFILE_GRID
    from adaroute.training.trainer import calibrate
    from tests.fixtures import make_tiny_llama, make_tiny_tokenizer

    model = make_tiny_llama(seed=2)
    mods = route_model(model)
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(512, m.hidden, generator=g) for m in mods]
    calibrate(mods, inputs, [0.5] * len(mods), torch.zeros(len(mods), len(PROFILE_GRID)), RoutingConfig())
    bands = [m.profile.units_band for m in mods]
    for m, x, band in zip(mods, inputs, bands, strict=True):
        counts = m.select(m.router.score(x)).sum(-1)
        assert band == units_band(counts, m.units) and band[0] <= int(counts.median()) <= band[1]
    save_routed(model, make_tiny_tokenizer(), tmp_path / "r", "tiny", RoutingConfig(), {"data": ["random"]})
    loaded, _ = load_routed(tmp_path / "r")
    engine = Engine.from_model(loaded)
    assert engine.failsafe.bands() == [tuple(b) for b in bands]
