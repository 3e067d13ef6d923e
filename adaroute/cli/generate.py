"""`adaroute generate MODEL "prompt"`: the model's reply, greedy at temperature 0."""

from __future__ import annotations

from adaroute.cli.common import add_model_arg, positive_int, setup_threads
from adaroute.errors import AdarouteError
from adaroute.generate import generate
from adaroute.models import load_model


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate a reply to a prompt (chat template when the model has one)")
    add_model_arg(p)
    p.add_argument("prompt", help="the user message")
    p.add_argument("--max-new-tokens", type=positive_int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (temperature > 0)")
    p.set_defaults(run=run)


def run(args) -> int:
    if args.temperature < 0:
        raise AdarouteError(f"--temperature {args.temperature} is negative: use 0 (greedy) or a positive value")
    if not args.prompt.strip():
        raise AdarouteError("the prompt is empty: give some text to answer")
    setup_threads()
    model, tokenizer = load_model(args.model)
    print(generate(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature, args.seed))
    return 0
