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
