"""`adaroute report ROUTED -o DIR`: HTML + PNG + JSON report on a routed model.

Sections: KPIs, quality against density, cost / ROI, bias / skew across data groups, load imbalance
and capacity, explainability, and (with --audit) the server's traffic. See adaroute/report/.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from adaroute.cli.common import positive_int, setup_threads
from adaroute.errors import AdarouteError


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="HTML/PNG/JSON report: cost, bias across groups, imbalance, explainability")
    p.add_argument("routed", metavar="ROUTED", help="routed model directory (adaroute convert -o DIR)")
    p.add_argument("--data", nargs="+", default=["builtin:heldout"], metavar="FILE",
                   help="text for the KPIs and the quality curve (default builtin:heldout)")
    p.add_argument("--group", action="append", default=[], metavar="NAME=FILE",
                   help="a data group for the bias audit (repeatable); built-in topic groups are always added")
    p.add_argument("--audit", metavar="DB", help="the server's audit log (SQLite) for the traffic section")
    p.add_argument("--explain", metavar="TEXT", help="text to explain token by token (default: a built-in sentence)")
    p.add_argument("--explain-token", type=int, default=None, metavar="I",
                   help="token index whose top units are listed (default: the token that used the most)")
    p.add_argument("--price-per-hour", type=float, help="one machine's price per hour (default 1.0, assumed)")
    p.add_argument("--tokens-per-day", type=float, help="generated tokens per day (default 1e7, assumed)")
    p.add_argument("--peak-tokens-per-s", type=float, help="peak generated tokens/s (default 200, assumed)")
    p.add_argument("--watts", type=float, help="machine power while decoding, for energy per token")
    p.add_argument("--max-tokens", type=positive_int, default=2048, help="tokens scored per --data file")
    p.add_argument("--group-tokens", type=positive_int, default=1024, help="tokens scored per group")
    p.add_argument("--curve-tokens", type=positive_int, default=1024, help="tokens scored per curve point")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="report directory (replaced whole)")
    p.set_defaults(run=run)


def run(args) -> int:
    from adaroute.report import Budget, ReportRequest, build_report

    for flag in ("price_per_hour", "tokens_per_day", "peak_tokens_per_s", "watts"):
        value = getattr(args, flag)
        if value is not None and not value > 0:
            raise AdarouteError(f"--{flag.replace('_', '-')} {value}: give a positive number")
    _check_routed(args.routed)
    out = _check_output(args.output, args.routed)
    budget = replace(Budget(), data_tokens=args.max_tokens, group_tokens=args.group_tokens,
                     curve_tokens=args.curve_tokens)
    req = ReportRequest(routed=args.routed, output=str(out), data=args.data, groups=parse_groups(args.group),
                        audit=args.audit, explain_text=args.explain, explain_token=args.explain_token,
                        price_per_hour=args.price_per_hour, tokens_per_day=args.tokens_per_day,
                        peak_tokens_per_s=args.peak_tokens_per_s, watts=args.watts, budget=budget)
    if args.audit is not None and not Path(args.audit).is_file():
        raise AdarouteError(f"--audit {args.audit}: no such file; give the SQLite file the server wrote")
    setup_threads()
    report = build_report(req)
    k = report["kpis"]
    flagged = [g["group"] for g in report["groups"]["groups"] if g["flags"]]
    print(f"perplexity ratio {k['perplexity_ratio']:.3f}, top-1 agreement {k['top1_agreement']:.3f}, "
          f"mean density {k['mean_density']:.3f}; " + ", ".join(
              f"batch {s['batch']} {s['routed'] / s['dense']:.2f}x dense" for s in k["speed"]))
    print(f"groups flagged: {', '.join(flagged) if flagged else 'none'}")
    print(f"report written to {out / 'index.html'} in {report['seconds']:.0f} s ({report['cpu_seconds']:.0f} CPU s "
          f"on {report['threads']} threads)")
    return 0


def parse_groups(specs: list[str]) -> dict[str, str]:
    groups: dict[str, str] = {}
    for spec in specs:
        name, sep, file = spec.partition("=")
        if not sep or not name.strip() or not file:
            raise AdarouteError(f"--group {spec!r}: write NAME=FILE, e.g. --group legal=contracts.txt")
        if name in groups:
            raise AdarouteError(f"--group {name!r} is given twice: use one name per group")
        groups[name.strip()] = file
    return groups


def _check_routed(path: str) -> None:
    from adaroute.fsio import is_routed_dir

    if not Path(path).is_dir() or not is_routed_dir(Path(path)):
        raise AdarouteError(f"{path} is not a routed model directory: convert a model first "
                            "(adaroute convert MODEL --calib FILE -o DIR)")


def _check_output(path: str, routed: str) -> Path:
    """A new or empty directory, or an earlier report (replaced whole); never the model's."""
    from adaroute.fsio import check_output_dir

    out = Path(path).expanduser()
    if (out / "report.json").is_file():
        return out
    return check_output_dir(out, inputs=[Path(routed)])
