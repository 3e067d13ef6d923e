"""Lean decode runtime for dense and routed Llama-family models.

    engine = Engine.from_model(model)                      # weights shared with the model
    out = generate(engine, [prompt_ids], max_new_tokens=64, sampling=SamplingConfig(temperature=0.7,
                   top_p=0.9, seed=0), stop_tokens=stop_tokens_for(tokenizer, model))
"""

from adaroute.runtime.engine import Engine, UnitCounter
from adaroute.runtime.generate import (
    GenerationResult,
    chat_prompt_ids,
    generate,
    generate_ids_text,
    generate_text,
    left_pad,
    stop_tokens_for,
)
from adaroute.runtime.kv_cache import KVCache
from adaroute.runtime.policy import ExecutionPolicy
from adaroute.runtime.sampling import SamplingConfig, next_tokens
from adaroute.runtime.weights import ModelWeights, from_model

__all__ = [
    "Engine",
    "ExecutionPolicy",
    "GenerationResult",
    "KVCache",
    "ModelWeights",
    "SamplingConfig",
    "UnitCounter",
    "chat_prompt_ids",
    "from_model",
    "generate",
    "generate_ids_text",
    "generate_text",
    "left_pad",
    "next_tokens",
    "stop_tokens_for",
]
