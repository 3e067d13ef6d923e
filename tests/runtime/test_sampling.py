import pytest
import torch

from adaroute.runtime import Engine, SamplingConfig, generate, next_tokens
from adaroute.runtime.generate import chat_prompt_ids, left_pad, stop_tokens_for


def test_seeded_sampling_is_reproducible(tiny):
    engine = Engine.from_model(tiny, kernel="cpu")
    cfg = SamplingConfig(temperature=0.9, top_p=0.9, seed=11)
    a = generate(engine, [[5, 6, 7]], 16, cfg).tokens
    assert a == generate(engine, [[5, 6, 7]], 16, cfg).tokens
    assert a != generate(engine, [[5, 6, 7]], 16, SamplingConfig(temperature=5.0, seed=12)).tokens


def test_tiny_top_p_and_top_k_one_are_greedy():
    logits = torch.randn(3, 50)
    g = torch.Generator().manual_seed(0)
    best = logits.argmax(-1)
    assert torch.equal(next_tokens(logits, SamplingConfig(temperature=1.0, top_p=1e-6), g), best)
    assert torch.equal(next_tokens(logits, SamplingConfig(temperature=1.0, top_k=1), g), best)


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    seen = {int(next_tokens(logits, SamplingConfig(temperature=1.0, top_p=0.7), g)) for _ in range(200)}
    assert seen == {0, 1}


@pytest.mark.parametrize("bad", [{"temperature": -1}, {"top_p": 0.0}, {"top_p": 1.5}, {"top_k": -2}])
def test_sampling_config_validates(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        SamplingConfig(**bad)


def test_left_pad():
    ids, pad = left_pad([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]] and pad.tolist() == [0, 2]
    with pytest.raises(ValueError):
        left_pad([[]])


class _Tok:
    eos_token_id = 7
    chat_template = None

    def __call__(self, text):
        return type("Enc", (), {"input_ids": [ord(c) for c in text]})()


def test_chat_ids_without_template_and_stop_ids():
    assert chat_prompt_ids(_Tok(), "hi") == [104, 105]
    model = type("M", (), {"generation_config": type("G", (), {"eos_token_id": [7, 9]})()})()
    assert stop_tokens_for(_Tok(), model) == {7, 9}
