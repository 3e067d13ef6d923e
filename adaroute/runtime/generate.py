"""The generation loop: prefill once, then one decode step per token, for one or several sequences.

Shape letters: B sequences, P padded prompt length, V vocabulary.

Several sequences are left-padded to a common length and decoded in lock-step (one token each per
step). A sequence that emits a stop token is finished; it keeps a slot in the batch, but its later
tokens are discarded, and the loop ends when every sequence is finished or has its token budget.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

from adaroute.runtime.engine import Engine
from adaroute.runtime.sampling import SamplingConfig, next_tokens


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # new tokens per sequence, a stop token included when one ended it
    finish_reasons: list[str]  # "stop" or "length"
    prompt_lengths: list[int]
    prefill_s: float = 0.0
    step_s: list[float] = field(default_factory=list)  # wall time of each decode step

    @property
    def new_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [B, P] padded on the left, and the padding per sequence [B]."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    pad = torch.tensor([width - len(p) for p in prompts])
    ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts], dtype=torch.long)
    return ids, pad


def generate(engine: Engine, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             sampling: SamplingConfig | None = None, stop_tokens: Iterable[int] = (),
             on_token: Callable[[int, int], None] | None = None) -> GenerationResult:
    """Decode up to ``max_new_tokens`` per prompt. ``on_token(sequence, token)`` streams tokens out."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    sampling = sampling or SamplingConfig()
    stops = set(stop_tokens)
    ids, pad = left_pad(prompts)
    cache = engine.new_cache(len(prompts), ids.shape[1] + max_new_tokens, pad)
    rng = None if sampling.greedy else sampling.generator()
    result = GenerationResult([[] for _ in prompts], ["length"] * len(prompts), [len(p) for p in prompts])
    start = time.perf_counter()
    logits = engine.forward(ids, cache)  # [B, V]
    result.prefill_s = time.perf_counter() - start
    live = [True] * len(prompts)
    for step in range(max_new_tokens):
        chosen = next_tokens(logits, sampling, rng)  # [B]
        _record(chosen.tolist(), live, stops, result, on_token)
        if not any(live) or step == max_new_tokens - 1:
            break
        start = time.perf_counter()
        logits = engine.forward(chosen.unsqueeze(1), cache)
        result.step_s.append(time.perf_counter() - start)
    return result


def _record(chosen: list[int], live: list[bool], stops: set[int], result: GenerationResult, on_token) -> None:
    for b, token in enumerate(chosen):
        if not live[b]:
            continue
        result.tokens[b].append(token)
        if on_token is not None:
            on_token(b, token)
        if token in stops:
            live[b] = False
            result.finish_reasons[b] = "stop"


def stop_tokens_for(tokenizer, model=None) -> set[int]:
    """End-of-sequence ids from the tokenizer and, when given, the model's generation config."""
    ids = set()
    for source in (tokenizer, getattr(model, "generation_config", None)):
        eos = getattr(source, "eos_token_id", None)
        if eos is not None:
            ids.update([eos] if isinstance(eos, int) else eos)
    return ids


def chat_prompt_ids(tokenizer, prompt: str | list[dict], system: str | None = None) -> list[int]:
    """Prompt ids through the tokenizer's chat template when it has one, plain encoding otherwise."""
    if not getattr(tokenizer, "chat_template", None):
        return tokenizer(prompt if isinstance(prompt, str) else prompt[-1]["content"]).input_ids
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)


def generate_text(engine: Engine, tokenizer, prompt: str, max_new_tokens: int = 64,
                  sampling: SamplingConfig | None = None, model=None) -> str:
    """The reply to one chat prompt, without the stop token."""
    return generate_ids_text(engine, tokenizer, chat_prompt_ids(tokenizer, prompt), max_new_tokens, sampling, model)


def generate_ids_text(engine: Engine, tokenizer, ids: list[int], max_new_tokens: int = 64,
                      sampling: SamplingConfig | None = None, model=None) -> str:
    """The reply to already-templated prompt ids, without the stop token."""
    stops = stop_tokens_for(tokenizer, model)
    out = generate(engine, [ids], max_new_tokens, sampling, stops)
    return tokenizer.decode([t for t in out.tokens[0] if t not in stops], skip_special_tokens=True).strip()
