import pytest
import torch

from adaroute import AdarouteError, adapter_for, load_model
from adaroute.models import resolve, supported_model_types
from tests.fixtures import make_tiny_llama, write_gguf, write_hf_dir


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.tensor([[0, 5, 17, 42, 99, 3, 250]])


def test_hf_dir_loads_with_same_logits(tmp_path):
    write_hf_dir(tmp_path / "m", seed=3)
    model, tok = load_model(str(tmp_path / "m"))
    assert not model.training and model.dtype == torch.float32
    torch.testing.assert_close(_logits(model, IDS), _logits(make_tiny_llama(seed=3), IDS))
    assert tok.decode(tok("hello world")["input_ids"], skip_special_tokens=True) == "hello world"


def test_gguf_file_and_directory_holding_one_gguf_load(tmp_path):
    path = write_gguf(tmp_path / "tiny.gguf", seed=4)
    reference = _logits(make_tiny_llama(seed=4), IDS)
    for spec in (str(path), str(tmp_path)):
        model, _ = load_model(spec)
        torch.testing.assert_close(_logits(model, IDS), reference, atol=1e-5, rtol=1e-5)


def test_adapter_finds_ffn_attention_and_norms():
    model = make_tiny_llama()
    a = adapter_for(model)
    assert a.num_layers(model) == 2
    gate, up, down = a.gate_up_down(a.get_mlp(model, 1))
    assert gate is model.model.layers[1].mlp.gate_proj and down is model.model.layers[1].mlp.down_proj
    assert up.weight.shape == (128, 64)
    assert model.get_submodule(a.mlp_path(0)) is model.model.layers[0].mlp
    q, k, v, o = a.attn_linears(model, 0)
    assert q is model.model.layers[0].self_attn.q_proj and o.weight.shape == (64, 64)
    assert a.norms(model, 0)[0] is model.model.layers[0].input_layernorm


def test_unsupported_architecture_names_supported_ones():
    with pytest.raises(AdarouteError, match="unsupported architecture 'gpt2'.*llama"):
        adapter_for("gpt2")
    assert {"llama", "mistral", "qwen2"} <= set(supported_model_types())


@pytest.mark.parametrize(
    "spec, message",
    [("does/not/exist", "no such model"), ("smollm3-nope", "aliases: smollm2-135m")],
)
def test_bad_specs(spec, message):
    with pytest.raises(AdarouteError, match=message):
        resolve(spec)


def test_directory_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(AdarouteError, match="is a directory but not a model"):
        load_model(str(tmp_path))


def test_file_that_is_not_gguf(tmp_path):
    (tmp_path / "weights.txt").write_text("hi")
    with pytest.raises(AdarouteError, match="not a .gguf model"):
        load_model(str(tmp_path / "weights.txt"))


def test_corrupt_gguf_is_a_clear_error(tmp_path):
    (tmp_path / "broken.gguf").write_bytes(b"GGUF not really")
    with pytest.raises(AdarouteError, match="broken.gguf"):
        load_model(str(tmp_path / "broken.gguf"))


def test_unsupported_family_in_a_directory(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)).save_pretrained(tmp_path)
    with pytest.raises(AdarouteError, match="unsupported architecture 'gpt2'"):
        load_model(str(tmp_path))
