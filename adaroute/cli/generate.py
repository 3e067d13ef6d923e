"""`adaroute generate MODEL "prompt"`: the model's reply, greedy at temperature 0."""

from __future__ import annotations

from adaroute.cli.common import add_model_arg, finite_float, positive_int, seed, setup_threads
from adaroute.errors import AdarouteError


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate a reply to a prompt (chat template when the model has one)")
    add_model_arg(p)
    p.add_argument("prompt", help="the user message")
    p.add_argument("--max-new-tokens", type=positive_int, default=128,
                   help="most tokens to generate; prompt + new tokens must fit the model's context (default 128)")
    p.add_argument("--temperature", type=finite_float, default=0.0,
                   help="sampling temperature, 0 = greedy and deterministic (default 0)")
    p.add_argument("--seed", type=seed, default=0, help="sampling seed when --temperature > 0 (default 0)")
    p.set_defaults(run=run)


def run(args) -> int:
    if args.temperature < 0:
        raise AdarouteError(f"--temperature {args.temperature} is negative: use 0 (greedy) or a positive value")
    if not args.prompt.strip():
        raise AdarouteError("the prompt is empty: give some text to answer")
    if "\x00" in args.prompt:
        raise AdarouteError("the prompt contains a NUL character: give plain text")
    from adaroute.models import inspect_model

    context = inspect_model(args.model).context
    if context and args.max_new_tokens >= context:
        raise AdarouteError(f"--max-new-tokens {args.max_new_tokens} does not fit the model's context ({context} "
                            f"tokens, prompt included): use at most {context - 1}")
    setup_threads()
    from adaroute.generate import load_engine, reply

    engine, tokenizer, model = load_engine(args.model)
    print(reply(engine, tokenizer, args.prompt, args.max_new_tokens, args.temperature, args.seed, model))
    return 0
