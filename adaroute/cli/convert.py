"""`adaroute convert MODEL --calib FILE... --density D -o DIR`: dense -> routed model directory."""

from __future__ import annotations

from pathlib import Path

from adaroute.cli.common import (
    add_head_rows_arg,
    add_model_arg,
    density,
    format_table,
    positive_int,
    seed,
    setup_threads,
)
from adaroute.errors import AdarouteError


def add_parser(sub) -> None:
    p = sub.add_parser("convert", help="train and calibrate routers; write a routed model directory")
    add_model_arg(p)
    p.add_argument("--calib", nargs="+", default=["builtin:calib"], metavar="FILE",
                   help="calibration text: UTF-8 files or builtin:calib (default); several share the calibration "
                        "tokens in proportion to their length")
    p.add_argument("--density", type=density, default=0.5, help="target mean FFN density in (0, 1] (default 0.5)")
    p.add_argument("-o", "--output", metavar="DIR",
                   help="new output directory (default: routed-<density>); never the source model or inside it")
    p.add_argument("--force", action="store_true",
                   help="replace an existing routed model directory at -o whole (never mixes old and new files)")
    p.add_argument("--preset", choices=["quick", "default"], default="default",
                   help="training preset (default: default)")
    p.add_argument("--policy", choices=["adaptive", "topk"], default="adaptive",
                   help="adaptive threshold (default) or the fixed top-k baseline")
    p.add_argument("--allocation", choices=["sensitivity", "uniform"], default="sensitivity",
                   help="how density is spread over layers (default: by measured sensitivity)")
    p.add_argument("--calib-tokens", type=positive_int, default=None,
                   help="calibration tokens, at least one window (default: the preset's, 4096 quick / 16384 default)")
    p.add_argument("--seed", type=seed, default=0, help="random seed (default 0)")
    p.add_argument("--no-adapt", action="store_true",
                   help="skip the distillation stage that trains routing adapters (default preset)")
    p.add_argument("--adapt-rank", type=positive_int, default=None,
                   help="rank of the routing adapters (default: the preset's, 8 in default)")
    p.add_argument("--weights", default="f32", metavar="FORMAT",
                   help="weight format the routed model is stored in and runs at: f32 (default, runs at any "
                        "format), q8 (q8_0) or q4 (q4_1), also q4_0 (the directory holds the blocks)")
    add_head_rows_arg(p, converting=True)
    p.set_defaults(run=run)


def run(args) -> int:
    from adaroute.config import RoutingConfig, TrainConfig
    from adaroute.runtime.formats import parse_format

    weights = parse_format(args.weights)
    if args.head_rows and weights != "f32":
        raise AdarouteError(f"--head-rows: the routed head runs on a float32 head, and --weights {args.weights} "
                            "stores blocks; leave --head-rows out or convert at --weights f32")

    try:
        routing = RoutingConfig(density=args.density, policy=args.policy, allocation=args.allocation,
                                layer_min_density=min(0.15, args.density),
                                **({} if args.head_rows is None else {"head_rows": args.head_rows}))
        overrides = {"seed": args.seed} | ({"calib_tokens": args.calib_tokens} if args.calib_tokens else {})
        overrides |= _adapt_overrides(args, TrainConfig.from_name(args.preset))
        train = TrainConfig.from_name(args.preset, **overrides)
    except ValueError as e:
        raise AdarouteError(f"bad option: {e}") from e
    if train.calib_tokens < train.window:
        raise AdarouteError(f"--calib-tokens {train.calib_tokens} is less than one calibration window "
                            f"({train.window} tokens): use at least {train.window}")
    output = Path(args.output or f"routed-{args.density:g}")
    from adaroute.convert import check_convert_output, convert
    from adaroute.data import load_texts
    from adaroute.models import inspect_model

    check_convert_output(output, args.model, args.calib, args.force)  # before any slow work
    load_texts(args.calib)
    if inspect_model(args.model).routed:
        raise AdarouteError(f"{args.model} is already a routed model: convert its dense base model instead")
    setup_threads()
    print(_budget_line(train, args.density) + f"; weights {_format_line(weights)}", flush=True)
    result = convert(args.model, args.calib, output=output, routing=routing, train=train, force=args.force,
                     weights=weights)
    stats = result.report.calib_stats
    upt = stats["units_per_token"]
    rows = [
        ["mean density (calibration)", stats["mean_density"]],
        ["units/token share p10 / p50 / p90", f"{upt['p10']:.3f} / {upt['p50']:.3f} / {upt['p90']:.3f}"],
        ["weights", weights],
        ["seconds", round(result.calibration["total_seconds"], 1)],
        ["written to", str(result.directory)],
    ]
    print(format_table(["", "value"], rows))
    return 0


def _adapt_overrides(args, preset) -> dict:
    """--no-adapt turns the distillation stage off; --adapt-rank sets the adapters' rank."""
    if args.no_adapt and args.adapt_rank:
        raise AdarouteError("--no-adapt and --adapt-rank contradict each other: give one of them")
    if args.no_adapt:
        return {"distill_steps": 0, "adapt_rank": 0}
    if args.adapt_rank:
        if not preset.distill_steps:
            raise AdarouteError(f"--adapt-rank: the {preset.name} preset has no distillation stage; "
                                "use --preset default")
        return {"adapt_rank": args.adapt_rank}
    return {}


def _format_line(fmt: str) -> str:
    if fmt == "f32":
        return "f32"
    return f"{fmt} (the directory stores {fmt} blocks and runs at that format)"


def _budget_line(train, density: float) -> str:
    from adaroute.config import PRESET_BUDGET_MINUTES

    stages = f"{train.calib_tokens} calibration tokens"
    if train.distill_steps:
        adapters = f", rank-{train.adapt_rank} adapters" if train.adapt_rank else ""
        stages += f", {train.distill_steps} distillation steps of {train.distill_batch} x {train.distill_window} tokens"
        stages += adapters
        if train.distill_at(density) < density:
            stages += f" (distilled at density {train.distill_at(density):.3g})"
    return (f"preset {train.name}: {stages}; budget {PRESET_BUDGET_MINUTES[train.name]} min on 2 idle CPU cores "
            "(longer on a busy machine)")
