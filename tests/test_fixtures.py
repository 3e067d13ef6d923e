"""The tiny-model fixtures load through transformers on both paths and match the in-memory model."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.fixtures import VOCAB_SIZE, make_tiny_llama, make_tiny_tokenizer, write_gguf, write_hf_dir

GGUF_NAME = "tiny.gguf"
# Starts with BOS and reaches the last vocab id, so the whole embedding/output range is used.
INPUT_IDS = torch.tensor([[0, 5, 70, 200, VOCAB_SIZE - 1, 12, 9, 131]])
SENTENCE = "The if statement is used for conditional execution: naïve café 😀"


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(INPUT_IDS).logits


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return write_hf_dir(tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory):
    # A directory of its own: next to a tokenizer.json, transformers builds the tokenizer from
    # that file instead of the GGUF metadata, and the GGUF path would go untested.
    directory = tmp_path_factory.mktemp("gguf")
    write_gguf(directory / GGUF_NAME)
    return directory


def test_model_is_deterministic_and_not_trivial():
    first, again, other = make_tiny_llama(seed=0), make_tiny_llama(seed=0), make_tiny_llama(seed=1)
    assert first.dtype == torch.float32 and not first.training
    assert torch.equal(_logits(first), _logits(again))
    assert not torch.allclose(_logits(first), _logits(other))
    # Logits far from uniform, so an atol-based comparison can catch a mis-loaded tensor.
    assert _logits(first).std() > 0.3


def test_tokenizer_fits_model_and_has_chat_template():
    tokenizer = make_tiny_tokenizer()
    assert len(tokenizer) == VOCAB_SIZE == make_tiny_llama().config.vocab_size
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert prompt == "<s><|user|>\nhi</s>\n"


def test_hf_dir_loads_with_identical_logits(hf_dir):
    model = AutoModelForCausalLM.from_pretrained(hf_dir)
    assert (hf_dir / "model.safetensors").exists()
    assert torch.equal(_logits(model), _logits(make_tiny_llama()))


def test_gguf_loads_with_equal_logits(gguf_dir):
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_NAME, dtype=torch.float32)
    reference = make_tiny_llama()
    for key in ("head_dim", "num_key_value_heads", "max_position_embeddings", "tie_word_embeddings"):
        assert getattr(model.config, key) == getattr(reference.config, key), key
    assert model.config.rope_parameters["rope_theta"] == reference.config.rope_parameters["rope_theta"]
    torch.testing.assert_close(_logits(model), _logits(reference), atol=1e-5, rtol=0)


def test_gguf_round_trips_other_shapes(tmp_path):
    # Equal q and kv head counts take the other branch of the q/k permutation.
    shape = dict(hidden=32, intermediate=48, layers=1, heads=2, kv_heads=2)
    write_gguf(tmp_path / GGUF_NAME, seed=3, **shape)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=GGUF_NAME, dtype=torch.float32)
    torch.testing.assert_close(_logits(model), _logits(make_tiny_llama(seed=3, **shape)), atol=1e-5, rtol=0)


def test_gguf_tokenizer_matches_hf_tokenizer(hf_dir, gguf_dir):
    from_hf = AutoTokenizer.from_pretrained(hf_dir)
    from_gguf = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_NAME)
    ids = from_hf(SENTENCE).input_ids
    assert ids[0] == from_hf.bos_token_id
    assert from_gguf(SENTENCE).input_ids == ids
    assert from_gguf.decode(ids, skip_special_tokens=True) == SENTENCE
    assert from_hf.decode(ids, skip_special_tokens=True) == SENTENCE
    chat = [{"role": "user", "content": SENTENCE}]
    assert from_gguf.apply_chat_template(chat, add_generation_prompt=True) == from_hf.apply_chat_template(
        chat, add_generation_prompt=True
    )
