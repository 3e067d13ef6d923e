"""Text generation for the CLI and the demo, through the lean runtime (greedy at temperature 0)."""

from __future__ import annotations

from torch import nn

from adaroute.errors import AdarouteError
from adaroute.runtime import Engine, SamplingConfig, chat_prompt_ids, generate_ids_text


def generate(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
             seed: int = 0) -> str:
    """The model's reply to `prompt` (chat template when the tokenizer has one), new text only.

    temperature 0 is greedy and deterministic; otherwise sampling is seeded by `seed`. A prompt
    that leaves no room for ``max_new_tokens`` in the model's context is a one-line error.
    """
    sampling = SamplingConfig(temperature=temperature, seed=seed)
    engine = Engine.from_model(model)
    ids = chat_prompt_ids(tokenizer, prompt)
    limit = engine.w.max_positions
    if len(ids) + max_new_tokens > limit:
        raise AdarouteError(f"the prompt is {len(ids)} tokens and --max-new-tokens {max_new_tokens}: together they "
                            f"exceed the model's context of {limit} tokens; shorten the prompt or generate fewer")
    return generate_ids_text(engine, tokenizer, ids, max_new_tokens, sampling, model)
