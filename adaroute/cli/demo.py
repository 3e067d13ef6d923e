"""`adaroute demo`: the main job on the embedded default model."""

from __future__ import annotations

from adaroute.cli.common import check_json_arg, density, positive_int, setup_threads, write_json
from adaroute.errors import AdarouteError


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="main job on the embedded default model: load → evaluate → compare")
    p.add_argument("--model", default="smollm2-135m", help="model to run the demo on (default: smollm2-135m)")
    p.add_argument("--max-tokens", type=positive_int, default=4096, help="held-out tokens to score (default 4096)")
    p.add_argument("--density", type=density, default=0.5, help="target mean FFN density (default 0.5)")
    p.add_argument("--preset", choices=["quick", "default"], default="quick",
                   help="router training preset (default: quick)")
    p.add_argument("--json", metavar="OUT", help="write the demo's numbers as JSON")
    p.set_defaults(run=run)


def run(args) -> int:
    if args.max_tokens < 2:
        raise AdarouteError(f"--max-tokens {args.max_tokens} is too small: perplexity needs at least 2 tokens")
    check_json_arg(args.json)
    from adaroute.demo import run_demo
    from adaroute.models import inspect_model

    if inspect_model(args.model).routed:
        raise AdarouteError(f"{args.model} is already a routed model: the demo converts a dense model")
    setup_threads()
    write_json(args.json, run_demo(args.model, args.max_tokens, args.density, args.preset))
    return 0
