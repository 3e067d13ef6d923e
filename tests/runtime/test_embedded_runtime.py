"""The lean runtime on the real embedded model: greedy tokens equal transformers' generate."""

import pytest
import torch

from adaroute.runtime import Engine, chat_prompt_ids, generate, stop_tokens_for

# Prompts whose replies run past 32 tokens, so the comparison covers at least 32 tokens each.
PROMPTS = ["Explain how photosynthesis works.", "Write a short story about a robot.", "def fibonacci(n):"]


@pytest.mark.slow
def test_greedy_tokens_equal_transformers_on_embedded_model(embedded):
    model, tokenizer = embedded
    engine = Engine.from_model(model)
    stops = stop_tokens_for(tokenizer, model)
    for text in PROMPTS:
        prompt = chat_prompt_ids(tokenizer, text)
        ids = torch.tensor([prompt])
        hf = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, do_sample=False,
                            pad_token_id=tokenizer.eos_token_id)[0, len(prompt):].tolist()
        ours = generate(engine, [prompt], 40, stop_tokens=stops).tokens[0]
        assert len(ours) >= 32 and ours == hf, text


@pytest.mark.slow
def test_routed_head_decodes_the_exact_heads_tokens_on_embedded_model(embedded):
    """The embedded model's head through its routed form (q8_0 shadow, 256 exact rows), every FFN dense:
    the same greedy tokens, and per step logits equal to the exact head's in the rows that decide."""
    import dataclasses

    from adaroute.runtime import ExecutionPolicy
    from adaroute.runtime.head import routed_head

    model, tokenizer = embedded
    exact = Engine.from_model(model)
    w = exact.w
    routed = Engine(dataclasses.replace(w, routed_head=routed_head(w.head, 256)), policy=ExecutionPolicy(1))
    assert routed.w.layers[0].ffn is w.layers[0].ffn  # a dense model: only the head differs
    stops = stop_tokens_for(tokenizer, model)
    for text in PROMPTS:
        prompt = chat_prompt_ids(tokenizer, text)
        want = generate(exact, [prompt], 40, stop_tokens=stops).tokens[0]
        assert generate(routed, [prompt], 40, stop_tokens=stops).tokens[0] == want, text
    ids = torch.tensor([chat_prompt_ids(tokenizer, PROMPTS[0])])
    a = exact.forward(ids, exact.new_cache(1, ids.shape[1]), all_logits=True)[0]
    b = routed.forward(ids, routed.new_cache(1, ids.shape[1]), all_logits=True)[0]
    top = a.topk(16, -1).indices
    torch.testing.assert_close(b.gather(1, top), a.gather(1, top), rtol=1e-5, atol=1e-4)
