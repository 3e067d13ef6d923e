"""`adaroute convert MODEL --calib FILE... --density D -o DIR`: dense -> routed model directory."""

from __future__ import annotations

from pathlib import Path

from adaroute.cli.common import add_model_arg, format_table, positive_int, setup_threads
from adaroute.config import RoutingConfig, TrainConfig
from adaroute.errors import AdarouteError


def add_parser(sub) -> None:
    p = sub.add_parser("convert", help="train and calibrate routers; write a routed model directory")
    add_model_arg(p)
    p.add_argument("--calib", nargs="+", default=["builtin:calib"], metavar="FILE",
                   help="calibration text: UTF-8 files or builtin:calib (default)")
    p.add_argument("--density", type=float, default=0.5, help="target mean FFN density in (0, 1] (default 0.5)")
    p.add_argument("-o", "--output", metavar="DIR", help="output directory (default: routed-<density>)")
    p.add_argument("--preset", choices=["quick", "default"], default="default", help="training preset")
    p.add_argument("--policy", choices=["adaptive", "topk"], default="adaptive",
                   help="adaptive threshold (default) or the fixed top-k baseline")
    p.add_argument("--allocation", choices=["sensitivity", "uniform"], default="sensitivity",
                   help="how density is spread over layers (default: by measured sensitivity)")
    p.add_argument("--calib-tokens", type=positive_int, default=None, help="override the preset's token count")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.set_defaults(run=run)


def run(args) -> int:
    from adaroute.convert import convert

    setup_threads()
    try:
        routing = RoutingConfig(density=args.density, policy=args.policy, allocation=args.allocation,
                                layer_min_density=min(0.15, args.density))
        overrides = {"seed": args.seed} | ({"calib_tokens": args.calib_tokens} if args.calib_tokens else {})
        train = TrainConfig.from_name(args.preset, **overrides)
    except ValueError as e:
        raise AdarouteError(f"bad option: {e}") from e
    output = Path(args.output or f"routed-{args.density:g}")
    result = convert(args.model, args.calib, output=output, routing=routing, train=train)
    stats = result.report.calib_stats
    upt = stats["units_per_token"]
    rows = [
        ["mean density (calibration)", stats["mean_density"]],
        ["units/token share p10 / p50 / p90", f"{upt['p10']:.3f} / {upt['p50']:.3f} / {upt['p90']:.3f}"],
        ["seconds", round(result.calibration["total_seconds"], 1)],
        ["written to", str(result.directory)],
    ]
    print(format_table(["", "value"], rows))
    return 0
