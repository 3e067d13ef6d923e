import torch

from adaroute.config import TrainConfig
from adaroute.routing import route_model
from adaroute.routing.policy import LayerPolicy
from adaroute.training import trainer
from adaroute.training.selfgen import GREEDY_STEPS, sample_windows
from tests.fixtures import make_tiny_llama, make_tiny_tokenizer
from tests.training.test_distill import ADAPT, adapted


def routed_tiny():
    model = make_tiny_llama(0)
    mods = route_model(model)
    for m in mods:  # a sparse policy: samples must still come from the dense model
        m.set_policy(LayerPolicy.topk(8))
    return model, make_tiny_tokenizer(), mods


def test_samples_are_whole_windows_from_ordinary_first_tokens_and_seeded():
    model, tok, mods = routed_tiny()
    a = sample_windows(model, tok, mods, tokens=3 * 24 + 5, window=24, seed=3)
    b = sample_windows(model, tok, mods, tokens=3 * 24 + 5, window=24, seed=3)
    c = sample_windows(model, tok, mods, tokens=3 * 24, window=24, seed=4)
    assert a.shape == (3, 24) and torch.equal(a, b) and not torch.equal(a, c)
    assert not set(a[:, 0].tolist()) & set(tok.all_special_ids)
    assert all(m.policy == LayerPolicy.topk(8) for m in mods)  # the routed policies are restored


def test_samples_follow_the_dense_model_greedily_then_sample():
    model, tok, mods = routed_tiny()
    seqs = sample_windows(model, tok, mods, tokens=2 * 40, window=40, seed=0)  # [2, 40]
    dense = make_tiny_llama(0)
    with torch.no_grad():
        logits = dense(input_ids=seqs).logits  # [2, 40, V]
    greedy = logits.argmax(-1)[:, :-1]  # the dense model's choice for position i + 1
    assert torch.equal(seqs[:, 1 : GREEDY_STEPS + 1], greedy[:, :GREEDY_STEPS])  # the greedy start, cached == full
    assert not torch.equal(seqs[:, GREEDY_STEPS + 1 :], greedy[:, GREEDY_STEPS:])  # then sampled


def test_generated_windows_join_the_distillation_pool(monkeypatch):
    seen = {}
    real = trainer.distill

    def spy(model, mods, windows, *args, **kwargs):
        seen["windows"] = windows
        return real(model, mods, windows, *args, **kwargs)

    monkeypatch.setattr(trainer, "distill", spy)
    train = TrainConfig(**{**ADAPT.to_dict(), "distill_generated": 64})
    adapted(train=train)
    mixed = seen.pop("windows")
    adapted()
    plain = seen["windows"]
    assert mixed.shape[0] == plain.shape[0] + 64 // ADAPT.distill_window
    assert torch.equal(mixed[: plain.shape[0]], plain)
