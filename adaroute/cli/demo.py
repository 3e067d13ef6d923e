"""`adaroute demo`: the main job on the embedded default model."""

from __future__ import annotations

from adaroute.cli.common import positive_int, setup_threads, write_json


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="main job on the embedded default model: load → evaluate → compare")
    p.add_argument("--model", default="smollm2-135m", help="model to run the demo on (default: smollm2-135m)")
    p.add_argument("--max-tokens", type=positive_int, default=4096, help="held-out tokens to score")
    p.add_argument("--density", type=float, default=0.5, help="target mean FFN density (default 0.5)")
    p.add_argument("--preset", choices=["quick", "default"], default="quick", help="router training preset")
    p.add_argument("--json", metavar="OUT", help="write the demo's numbers as JSON")
    p.set_defaults(run=run)


def run(args) -> int:
    from adaroute.demo import run_demo

    setup_threads()
    write_json(args.json, run_demo(args.model, args.max_tokens, args.density, args.preset))
    return 0
