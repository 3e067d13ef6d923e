"""Text generation for the CLI and the demo, through the lean runtime (greedy at temperature 0)."""

from __future__ import annotations

from torch import nn

from adaroute.runtime import Engine, SamplingConfig, generate_text


def generate(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
             seed: int = 0) -> str:
    """The model's reply to `prompt` (chat template when the tokenizer has one), new text only.

    temperature 0 is greedy and deterministic; otherwise sampling is seeded by `seed`.
    """
    sampling = SamplingConfig(temperature=temperature, seed=seed)
    return generate_text(Engine.from_model(model), tokenizer, prompt, max_new_tokens, sampling, model)
