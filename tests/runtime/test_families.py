"""The runtime on the other supported families: Qwen2 (q/k/v biases) and Qwen3 (per-head q/k norms).
Their extras take the engine's Python path (the fused CPU step covers Llama-shaped layers only)."""

import math

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

from adaroute.runtime import Engine, generate
from tests.runtime.test_engine import PROMPTS, hf_greedy

SHAPE = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
             bos_token_id=0, eos_token_id=1)


def _random(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.1 * noise if p.ndim == 1 and "norm" in _name(model, p) else noise / math.sqrt(p.shape[-1]))
    return model.to(torch.float32).eval()


def _name(model, param) -> str:
    return next(n for n, p in model.named_parameters() if p is param)


@pytest.fixture(scope="module", params=["qwen2", "qwen3"])
def family_model(request):
    if request.param == "qwen2":
        return _random(Qwen2ForCausalLM(Qwen2Config(**SHAPE)), seed=5)
    return _random(Qwen3ForCausalLM(Qwen3Config(head_dim=16, **SHAPE)), seed=6)


def test_extras_are_present_and_fall_back_from_the_fused_step(family_model):
    engine = Engine.from_model(family_model, kernel="cpu")
    layer = engine.w.layers[0]
    assert layer.qkv_bias is not None or layer.q_norm is not None
    assert engine._fused is None


def test_greedy_tokens_equal_transformers(family_model, kernel_name):
    engine = Engine.from_model(family_model, kernel=kernel_name)
    for prompt in PROMPTS[:3]:
        assert generate(engine, [prompt], 24).tokens[0] == hf_greedy(family_model, prompt, 24)


def test_full_forward_equals_transformers(family_model, kernel_name):
    engine = Engine.from_model(family_model, kernel=kernel_name)
    seq = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    logits = engine.forward(seq, engine.new_cache(1, 8), all_logits=True)[0]
    with torch.no_grad():
        hf = family_model(seq).logits[0]
    torch.testing.assert_close(logits, hf, rtol=1e-4, atol=1e-4)
