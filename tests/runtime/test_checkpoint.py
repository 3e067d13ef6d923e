"""Routed directories stored as blocks (format 3) and the runtime's weights read from a checkpoint:
the blocks are exactly those made at load time from the float model, the engine on them gives the
same logits bit for bit, the module path loads them dequantised, and nothing rounds them twice."""

import json

import pytest
import torch
from safetensors import safe_open

from adaroute.config import FORMAT_VERSION, RoutingConfig
from adaroute.errors import AdarouteError
from adaroute.kernels.quant_reference import QuantWeight, dequantize, exact_scores
from adaroute.routing import load_routed, routed_modules, save_routed
from adaroute.routing.profile import LayerProfile, apply_density
from adaroute.routing.router import ExactRouter
from adaroute.runtime import Engine, ExecutionPolicy
from adaroute.runtime.checkpoint import load_weights, read_index
from adaroute.runtime.formats import runtime_weights
from adaroute.runtime.quant_weights import quantise
from adaroute.runtime.weights import RoutedFFN, from_model
from tests.fixtures import make_tiny_tokenizer
from tests.routing.test_adapter import adapted_copy

FORMATS = ["q8_0", "q4_1"]


def _matrices(w):
    out = [("embed", w.embed), ("head", w.head)]
    for i, ly in enumerate(w.layers):
        f = ly.ffn
        down = f.w_down_t if isinstance(f, RoutedFFN) else f.w_down
        out += [(f"{i}.{n}", m) for n, m in (("wq", ly.wq), ("wk", ly.wk), ("wv", ly.wv), ("wo", ly.wo),
                                              ("gate", f.w_gate), ("up", f.w_up), ("down", down))]
    return out


def _logits(weights, ids, policy):
    engine = Engine(weights, policy=policy)
    return engine.forward(ids, engine.new_cache(1, ids.shape[1]), all_logits=True)


@pytest.fixture(scope="module")
def adapted():
    model, _ = adapted_copy(5)
    for m in routed_modules(model):  # profiles, so that apply_density can move the policies
        m.profile = LayerProfile([0.25, 0.5, 0.75], [m.threshold + 0.5, m.threshold, m.threshold - 0.5],
                                 [0.3, 0.2, 0.1], 0.5, "adaptive", m.min_units, m.max_units)
    return model


@pytest.fixture
def tiny_ids():
    return torch.randint(0, 320, (1, 24), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("fmt", FORMATS)
def test_blocks_on_disk_are_the_blocks_made_at_load_time_and_run_bit_for_bit(adapted, fmt, tmp_path, tiny_ids):
    save_routed(adapted, make_tiny_tokenizer(), tmp_path, "tiny", RoutingConfig(), weights=fmt)
    meta = json.loads((tmp_path / "config.json").read_text())["adaroute"]
    assert meta["format_version"] == FORMAT_VERSION == 3 and meta["weights"] == fmt
    assert meta["router"]["kind"] == "exact"
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.mlp.w_units.gate" in keys and "model.layers.0.mlp.w_units" not in keys
    assert not any("shadow" in k for k in keys)  # the exact router keeps only its biases
    # the down projection in GGUF's orientation ([H, F], blocks along F) at the model's format
    assert read_index(tmp_path / "model.safetensors")["model.layers.1.mlp.w_units.down"] == [fmt, 64, 128]

    made = quantise(from_model(adapted), fmt)
    read = load_weights(tmp_path)
    for (name, a), (_, b) in zip(_matrices(made), _matrices(read), strict=True):
        assert isinstance(b, QuantWeight) and (a.fmt, a.layout, a.cols) == (b.fmt, b.layout, b.cols), name
        assert torch.equal(a.data, b.data), name
    for a, b in zip(made.layers, read.layers, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a.ffn.adapter, b.ffn.adapter, strict=True))
        assert torch.equal(a.ffn.unit_bias, b.ffn.unit_bias) and a.ffn.policy() == b.ffn.policy()
    for policy in (ExecutionPolicy.always_dense(), ExecutionPolicy.always_sparse()):
        assert torch.equal(_logits(made, tiny_ids, policy), _logits(read, tiny_ids, policy))


def test_a_block_directory_loads_as_a_dequantised_module_that_runs_only_at_its_format(adapted, tmp_path, tiny_ids):
    save_routed(adapted, make_tiny_tokenizer(), tmp_path, "tiny", RoutingConfig(), weights="q4_1")
    loaded, _ = load_routed(tmp_path)
    tensors = {}
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        for k in f.keys():
            tensors[k] = f.get_tensor(k)
    m = routed_modules(loaded)[0]
    assert isinstance(m.router, ExactRouter)
    assert torch.equal(m.w_gate, dequantize(tensors["model.layers.0.mlp.w_units.gate"], "q4_1"))
    assert torch.equal(loaded.model.layers[0].self_attn.q_proj.weight,
                       dequantize(tensors["model.layers.0.self_attn.q_proj.weight"], "q4_1"))
    x = torch.randn(5, m.hidden)
    assert torch.equal(m.router.score(x), exact_scores(x, m.w_gate, m.w_up, m.router.unit_bias))

    weights = runtime_weights(loaded, None)  # the file's blocks, not a re-quantised copy
    assert weights.layers[0].ffn.w_gate.fmt == "q4_1"
    assert torch.equal(_logits(weights, tiny_ids, ExecutionPolicy.always_sparse()),
                       _logits(load_weights(tmp_path), tiny_ids, ExecutionPolicy.always_sparse()))
    with pytest.raises(AdarouteError, match="runs only at that format"):
        runtime_weights(loaded, "q8")
    with pytest.raises(ValueError, match="runtime_weights"):
        from_model(loaded)
    with pytest.raises(ValueError, match="rounded twice"):
        save_routed(loaded, make_tiny_tokenizer(), tmp_path / "again", "tiny", RoutingConfig(), weights="q4_1")

    # the modules hold the policies the engine reads: a density override moves it
    apply_density(routed_modules(loaded), 0.25)
    moved = runtime_weights(loaded, None)
    assert [ly.ffn.policy() for ly in moved.layers] == [(m.threshold, m.min_units, m.max_units)
                                                         for m in routed_modules(loaded)]


def test_a_float32_directory_read_from_its_file_equals_the_loaded_model(adapted, tmp_path, tiny_ids):
    save_routed(adapted, make_tiny_tokenizer(), tmp_path, "tiny", RoutingConfig())
    loaded, _ = load_routed(tmp_path)
    a, b = runtime_weights(loaded, None), load_weights(tmp_path)  # both with the routed head it asks for
    assert a.routed_head.rows == b.routed_head.rows == 256
    assert torch.equal(a.routed_head.shadow.data, b.routed_head.shadow.data)
    for (name, x), (_, y) in zip(_matrices(a), _matrices(b), strict=True):
        assert torch.equal(x, y), name
    # the default RoPE written out == the family's rotary module, bit for bit
    assert torch.equal(a.rope_cos, b.rope_cos) and torch.equal(a.rope_sin, b.rope_sin)
    for policy in (ExecutionPolicy.always_dense(), ExecutionPolicy.always_sparse()):
        assert torch.equal(_logits(a, tiny_ids, policy), _logits(b, tiny_ids, policy))


def test_a_block_directory_is_about_its_blocks_size(adapted, tmp_path):
    sizes = {}
    for fmt in ("f32", "q8_0", "q4_1"):
        save_routed(adapted, make_tiny_tokenizer(), tmp_path / fmt, "tiny", RoutingConfig(), weights=fmt)
        sizes[fmt] = (tmp_path / fmt / "model.safetensors").stat().st_size
    assert sizes["q8_0"] < 0.4 * sizes["f32"] and sizes["q4_1"] < sizes["q8_0"], sizes


def test_generate_runs_a_block_directory_from_its_files_as_the_loaded_model_would(adapted, tmp_path, capsys):
    from adaroute.cli import main
    from adaroute.generate import generate

    save_routed(adapted, make_tiny_tokenizer(), tmp_path, "tiny", RoutingConfig(), weights="q4_1")
    assert main(["generate", str(tmp_path), "lists and tuples", "--max-new-tokens", "12"]) == 0
    printed = capsys.readouterr().out.rstrip("\n")
    loaded, tokenizer = load_routed(tmp_path)
    assert printed == generate(loaded, tokenizer, "lists and tuples", max_new_tokens=12)


def test_a_block_directory_is_served_from_its_files(adapted, tmp_path):
    from adaroute.serve.model import ServedModel

    save_routed(adapted, make_tiny_tokenizer(), tmp_path, "tiny", RoutingConfig(), weights="q8_0")
    served = ServedModel.from_directory(tmp_path, "tiny")
    assert served.model is None and served.arms == ("dense", "routed")
    assert all(isinstance(ly.ffn.w_gate, QuantWeight) for ly in served.engines["routed"].w.layers)
    assert served.identity.format_version == FORMAT_VERSION and served.identity.routed_hash
    assert adapted.config.eos_token_id in served.stop_tokens
