"""The runtime on a GGUF's own blocks: equal to its dequantised float32 twin, fused step == kernel by
kernel, and no float copy of a quantised matrix."""

import dataclasses
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from adaroute.kernels.quant_reference import QuantWeight
from adaroute.models.gguf_export import export_gguf
from adaroute.runtime import Engine, ExecutionPolicy, generate
from adaroute.runtime.quant_step import QuantDecoder
from adaroute.runtime.quant_weights import from_gguf
from tests.fixtures import write_gguf

FORMATS = ["Q8_0", "Q4_0", "Q4_1"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("quant")
    f32 = write_gguf(d / "tiny.F32.gguf", seed=4)
    return {"F32": f32, **{fmt: export_gguf(f32, d / f"tiny.{fmt}.gguf", fmt) for fmt in FORMATS}}


def dequantised(w, ffn_only: bool = False):
    """The same weights with every quantised matrix expanded to float32 (dense and routed layers;
    with ``ffn_only``, the FFNs' only)."""
    def f(t):
        return t.dequantize() if isinstance(t, QuantWeight) else t

    def fields(obj, names):
        return dataclasses.replace(obj, **{n: f(getattr(obj, n)) for n in names})

    layers = [dataclasses.replace(fields(ly, () if ffn_only else ("wq", "wk", "wv", "wo")),
                                  ffn=fields(ly.ffn, [n for n in ("w_gate", "w_up", "w_down", "w_down_t")
                                                      if hasattr(ly.ffn, n)])) for ly in w.layers]
    if ffn_only:
        return dataclasses.replace(w, layers=layers)
    return dataclasses.replace(w, embed=f(w.embed), head=f(w.head), layers=layers)


def logits(engine, ids):
    return engine.forward(ids, engine.new_cache(ids.shape[0], ids.shape[1] + 4), all_logits=True)


@pytest.mark.parametrize("fmt", FORMATS)
def test_blocks_equal_the_dequantised_model_and_transformers(files, fmt):
    w = from_gguf(files[fmt], 64)
    assert all(isinstance(m, QuantWeight) for m in (w.layers[0].wq, w.layers[1].ffn.w_down, w.head))
    ids = torch.randint(0, w.embed.shape[0], (2, 11), generator=torch.Generator().manual_seed(0))
    got = logits(Engine(w), ids)
    # The kernels round activations to int16 per block of 32 (quant_reference.round_activations), which
    # moves these logits by ~3e-4 (the embedded model's perplexity: equal to four digits, docs/quantised.md)
    torch.testing.assert_close(got, logits(Engine(dequantised(w)), ids), rtol=1e-3, atol=1e-3)
    hf = AutoModelForCausalLM.from_pretrained(files[fmt].parent, gguf_file=files[fmt].name, dtype=torch.float32)
    with torch.inference_mode():
        torch.testing.assert_close(got, hf(ids).logits, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("fmt", FORMATS)
def test_fused_step_equals_kernel_by_kernel(files, fmt):
    fused = Engine(from_gguf(files[fmt], 64))
    assert isinstance(fused._fused, QuantDecoder)
    python = Engine(from_gguf(files[fmt], 64))
    python._fused = None
    prompts = [[5, 9, 2, 7], [1, 3, 3, 8]]
    a, b = generate(fused, prompts, 12), generate(python, prompts, 12)
    assert a.tokens == b.tokens


def test_f32_file_runs_the_float_path(files):
    w = from_gguf(files["F32"], 64)
    assert w.layers[0].wq.dtype == torch.float32
    q = from_gguf(files["Q4_1"], 64)
    def held(t):
        return t.numel() * t.element_size()

    assert held(q.layers[0].wq) == held(w.layers[0].wq) * 20 // 128  # q4_1: 20 bytes per 32 floats


@pytest.mark.parametrize("fmt", ["q8_0", "q4_1"])
def test_quantised_routed_model_equals_its_dequantised_twin(fmt):
    """The quantise pass on a routed model: sparse decode on the blocks == the float engine on the
    same FFN blocks dequantised (same router, same thresholds and guards). Attention and head stay
    blocks in both: their int16 activations move hidden states by ~1e-4, which can move a unit across
    its threshold (the dense test above covers them)."""
    from adaroute.routing import route_model
    from adaroute.runtime import ExecutionPolicy
    from adaroute.runtime.quant_weights import quantise
    from adaroute.runtime.weights import from_model
    from tests.fixtures import make_tiny_llama

    model = make_tiny_llama(seed=3)
    for m in route_model(model):
        m.threshold, m.min_units, m.max_units = -6.0, 8, 100
    w = quantise(from_model(model), fmt, router="shadow")  # the float twin needs the shadow
    ffn = w.layers[0].ffn
    assert ffn.w_gate.data.untyped_storage().data_ptr() == ffn.w_down_t.data.untyped_storage().data_ptr()
    seq = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    out = {}
    for name, weights in (("blocks", w), ("float", dequantised(w, ffn_only=True))):
        engine = Engine(weights, policy=ExecutionPolicy.always_sparse())
        cache = engine.new_cache(1, 8)
        out[name] = torch.stack([engine.forward(seq[:, i:i + 1], cache)[0] for i in range(seq.shape[1])])
    torch.testing.assert_close(out["blocks"], out["float"], rtol=1e-4, atol=1e-4)


def test_quantised_routed_layers_take_the_exact_router():
    """By default every routed layer of a quantised model scores gate/up exactly (g16 gate/up, the
    down projection [H, F] in g16 applied to the masked activations): at density 0.5 it reads every
    weight byte plus the units' biases; "shadow" keeps the unit-packed store and the int4 shadow."""
    from adaroute.routing import route_model
    from adaroute.runtime.quant_weights import quantise
    from adaroute.runtime.weights import from_model
    from tests.fixtures import make_tiny_llama

    model = make_tiny_llama(seed=3, hidden=128, intermediate=512)
    route_model(model)
    w = from_model(model)
    for fmt in ("q8_0", "q4_1"):
        q = quantise(w, fmt)
        ffn = q.layers[0].ffn
        assert ffn.shadow_q.numel() == 0 and ffn.w_gate.layout == "g16" and ffn.w_down_t.layout == "g16"
        assert ffn.w_down_t.shape == (128, 512) and ffn.w_down_t.fmt == fmt
        biases = sum(ly.ffn.unit_bias.numel() * 4 for ly in q.layers)
        assert sum(q.weight_bytes(0.5).values()) == sum(q.weight_bytes(None).values()) + biases
        shadow = quantise(w, fmt, router="shadow").layers[0].ffn
        assert shadow.shadow_q.numel() > 0 and shadow.w_gate.layout == "rows"
    assert quantise(w, "q4_1").head.fmt == "q8_0"


def test_bench_runs_the_files_own_blocks(files):
    from adaroute.eval.bench import build_engines, run_engines

    model = AutoModelForCausalLM.from_pretrained(files["Q4_1"].parent, gguf_file=files["Q4_1"].name,
                                                 dtype=torch.float32)
    engines = build_engines(model, str(files["Q4_1"]), max_len=32)
    names = [e.name for e in engines]
    assert "adaroute q4_1" in names
    records = {r.engine: r for r in run_engines(engines, [[1, 2, 3, 4]], 6, repeats=1)}
    q4, dense = records["adaroute q4_1"], records["adaroute-dense"]
    assert q4.weight_mb_per_step < dense.weight_mb_per_step / 3  # 20 bytes per 32 weights against 128
    assert not [e for e in build_engines(model, str(files["F32"]), max_len=32) if e.name.startswith("adaroute q")]


@pytest.mark.parametrize(("fmt", "router", "rank"), [("q8_0", "shadow", 0), ("q8_0", "exact", 0),
                                                     ("q4_1", "exact", 0), ("q4_1", "exact", 4)])
def test_fused_routed_quantised_step_equals_kernel_by_kernel(fmt, router, rank):
    """Routed quantised layers in the one-call step: the same logits, units per token, fail-safe
    events (a band some tokens leave) and unit usage as the engine's Python path, bit for bit, with
    and without routing adapters; and injected faults in the sparse kernel are caught there as in
    the float step."""
    from adaroute.routing.profile import LayerProfile
    from adaroute.runtime.failsafe import FaultInjector
    from adaroute.runtime.quant_weights import quantise
    from adaroute.runtime.weights import from_model
    from tests.routing.conftest import calibrated_copy

    model, mods = calibrated_copy(seed=3, density=0.5)
    for m in mods:  # a band that some tokens leave and others do not
        m.profile = LayerProfile([0.5, 1.0], [m.threshold, -math.inf], [0.0, 0.0], 0.5, "adaptive", m.min_units,
                                 m.max_units, [0, 64])
        if rank:
            m.add_adapter(rank, torch.Generator().manual_seed(1))
            with torch.no_grad():  # reset() starts B at zero (a no-op adapter): make it do something
                for p in m.adapter.parameters():
                    p.normal_(0, 0.2, generator=torch.Generator().manual_seed(2))
    w = quantise(from_model(model), fmt, router=router)
    assert (w.layers[0].ffn.adapter is not None) == bool(rank)
    engines = [Engine(w), Engine(w)]
    engines[1]._fused = None
    assert isinstance(engines[0]._fused, QuantDecoder)
    usage, runs = [e.start_unit_usage() for e in engines], []
    for e in engines:
        e.record_units = True
        cache = e.new_cache(1, 32)
        out = [e.forward(torch.tensor([[5, 9, 13, 40, 41]]), cache)]
        for _ in range(8):
            out.append(e.forward(out[-1].argmax(-1, keepdim=True), cache))
            runs.append((out[-1], e.last_units.clone(), e.last_failsafe.clone()))
    half = len(runs) // 2
    for (la, ua, fa), (lb, ub, fb) in zip(runs[:half], runs[half:], strict=True):
        assert torch.equal(la, lb) and torch.equal(ua, ub) and torch.equal(fa, fb)
    assert torch.equal(usage[0], usage[1]) and int(usage[0].sum()) > 0
    events = engines[0].failsafe.totals
    assert torch.equal(events, engines[1].failsafe.totals) and 0 < int(events.sum()) < 8 * len(mods)
    faulty = Engine(w)
    faulty.failsafe.faults = FaultInjector(("raise", "nan"), rate=1.0, seed=1, every_layer=True)
    dense = Engine(w, policy=ExecutionPolicy.always_dense())
    ids = torch.tensor([[5, 9, 13]])
    torch.testing.assert_close(faulty.forward(ids[:, :1], faulty.new_cache(1, 4)),
                               dense.forward(ids[:, :1], dense.new_cache(1, 4)), rtol=1e-4, atol=1e-4)
