"""Text generation for the CLI and the demo, through the lean runtime (greedy at temperature 0)."""

from __future__ import annotations

from adaroute.errors import AdarouteError
from adaroute.runtime import Engine, SamplingConfig, chat_prompt_ids, generate_ids_text


def load_engine(spec: str) -> tuple[Engine, object, object | None]:
    """(engine, tokenizer, model or None) for ``spec``. A routed directory runs straight from its
    files (``runtime.checkpoint.load_weights``: no transformers model, so a q4 directory needs about
    its blocks' size in memory); anything else is loaded as a model and runs on its weights."""
    from adaroute.models import inspect_model, load_model
    from adaroute.models.loading import offline

    info = inspect_model(spec)
    if info.routed:
        from adaroute.routing.storage import check_tokenizer, load_tokenizer
        from adaroute.runtime.checkpoint import load_weights

        directory = info.source.directory
        check_tokenizer(directory)
        with offline():
            tokenizer = load_tokenizer(directory)
        return Engine(load_weights(directory)), tokenizer, None
    model, tokenizer = load_model(spec)
    return Engine.from_model(model), tokenizer, model


def generate(model, tokenizer, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0, seed: int = 0) -> str:
    """``reply`` of an engine on a loaded model's weights (in the format the model is stored in)."""
    return reply(Engine.from_model(model), tokenizer, prompt, max_new_tokens, temperature, seed, model)


def reply(engine: Engine, tokenizer, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
          seed: int = 0, model=None) -> str:
    """The model's reply to `prompt` (chat template when the tokenizer has one), new text only.

    temperature 0 is greedy and deterministic; otherwise sampling is seeded by `seed`. A prompt
    that leaves no room for ``max_new_tokens`` in the model's context is a one-line error.
    ``model``: the loaded model, when there is one (its generation config adds stop tokens).
    """
    sampling = SamplingConfig(temperature=temperature, seed=seed)
    ids = chat_prompt_ids(tokenizer, prompt)
    limit = engine.w.max_positions
    if len(ids) + max_new_tokens > limit:
        raise AdarouteError(f"the prompt is {len(ids)} tokens and --max-new-tokens {max_new_tokens}: together they "
                            f"exceed the model's context of {limit} tokens; shorten the prompt or generate fewer")
    return generate_ids_text(engine, tokenizer, ids, max_new_tokens, sampling, model)
