"""`adaroute rollout status|set --url URL`: read or change a server's rollout stage from the shell,
and the `adaroute serve` options that start one (``--stage``, fractions, ``--gates``, ``--auto-promote``).

    adaroute rollout status --url http://127.0.0.1:8000 --admin-key KEY
    adaroute rollout set --url http://127.0.0.1:8000 --admin-key KEY --stage canary --canary-fraction 0.2

The admin key may also come from ADAROUTE_ADMIN_KEY (so it stays out of the shell history).
"""

from __future__ import annotations

import os
from pathlib import Path

from adaroute.cli.common import check_json_arg, density, finite_float, seed, write_json
from adaroute.errors import AdarouteError

STAGES = ("dense", "shadow", "canary", "routed")  # as adaroute.serve.rollout.STAGES (kept import-free)


def fraction(text: str) -> float:
    value = finite_float(text)
    if not 0.0 <= value <= 1.0:
        raise ValueError(text)
    return value


fraction.__name__ = "fraction in [0, 1]"  # argparse names the type in its error message


def add_parser(sub) -> None:
    p = sub.add_parser("rollout", help="show or change a server's rollout stage (needs its --admin-key)")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    status = actions.add_parser("status", help="stage, fractions, gates, window statistics, KPIs per arm")
    change = actions.add_parser("set", help="change the stage and/or the canary and shadow fractions")
    for q in (status, change):
        q.add_argument("--url", required=True, help="the server, e.g. http://127.0.0.1:8000")
        q.add_argument("--admin-key", help="the server's --admin-key (default: $ADAROUTE_ADMIN_KEY)")
        q.add_argument("--json", metavar="OUT", help="also write the server's answer as JSON")
    change.add_argument("--stage", choices=STAGES)
    change.add_argument("--canary-fraction", type=fraction)
    change.add_argument("--shadow-fraction", type=fraction)
    change.add_argument("--reason", help="why (kept in the audit log's rollout events)")
    p.set_defaults(run=run)


def run(args) -> int:
    import httpx  # noqa: PLC0415

    check_json_arg(args.json)
    key = args.admin_key or os.environ.get("ADAROUTE_ADMIN_KEY")
    if not key:
        raise AdarouteError("give --admin-key or set ADAROUTE_ADMIN_KEY (the key the server was started with)")
    body = {k: v for k, v in (("stage", getattr(args, "stage", None)),
                              ("canary_fraction", getattr(args, "canary_fraction", None)),
                              ("shadow_fraction", getattr(args, "shadow_fraction", None)),
                              ("reason", getattr(args, "reason", None))) if v is not None}
    if args.action == "set" and not body.keys() - {"reason"}:
        raise AdarouteError("set: give --stage, --canary-fraction or --shadow-fraction")
    url = args.url.rstrip("/") + "/admin/rollout"
    headers = {"Authorization": f"Bearer {key}"}
    try:
        r = (httpx.post(url, json=body, headers=headers, timeout=30) if args.action == "set"
             else httpx.get(url, headers=headers, timeout=30))
    except httpx.HTTPError as e:
        raise AdarouteError(f"{args.url}: cannot reach the server ({e})") from None
    if r.status_code != 200:
        raise AdarouteError(f"{args.url}: {r.status_code} {_message(r)}")
    status = r.json()
    print(format_status(status))
    write_json(args.json, status)
    return 0


def _message(r) -> str:
    try:
        return r.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return "the server has no rollout admin API here (start it with --stage and --admin-key)"


def format_status(s: dict) -> str:
    from adaroute.cli.common import format_table  # noqa: PLC0415

    lines = [f"stage {s['stage']}  canary_fraction {s['canary_fraction']}  shadow_fraction {s['shadow_fraction']}"
             f"  auto_promote {s['auto_promote']}"]
    gates = [[g, v["n"], _r(v["mean"]), _r(v["bound"]), v["limit"], "BREACH" if v["breached"] else
              "pass" if v["passing"] else "-"] for g, v in s["window"].items()]
    lines.append(format_table(["gate", "n", "window mean", "bound", "limit", "verdict"], gates))
    arms = [[arm, k.get("requests"), _r(k.get("latency_p50_s")), _r(k.get("latency_p95_s")), _r(k.get("tokens_per_s")),
             _r(k.get("mean_density")), _r(k.get("failsafe_rate"))] for arm, k in s["arms"].items()]
    lines.append(format_table(["arm", "requests", "latency p50 s", "latency p95 s", "tokens/s", "density",
                               "fail-safe rate"], arms))
    sh = s["shadow"]
    lines.append(f"shadow: {sh['samples']} samples, agreement {_r(sh['agreement'])}, KL {_r(sh['kl'])}")
    for e in s["events"][-5:]:
        lines.append(f"event: {e['kind']} {e['from_stage']} -> {e['to_stage']} by {e['actor']}: {e['reason']}")
    return "\n".join(lines)


def _r(value):
    return "-" if value is None or value != value else round(value, 4)


# -- the options `adaroute serve` takes for a rollout ------------------------------------------------
def add_serve_options(p) -> None:
    p.add_argument("--stage", choices=STAGES, help="start a staged rollout of a routed model in this stage "
                   "(the rollout then chooses each request's arm)")
    p.add_argument("--canary-fraction", type=fraction, default=0.1, help="canary: share of clients routed")
    p.add_argument("--shadow-fraction", type=fraction, default=0.2, help="share of requests re-scored by the "
                   "routed arm in the background (a quarter of it in the routed stage)")
    p.add_argument("--gates", metavar="FILE.toml", help="gate limits (default: from the model's calibration)")
    p.add_argument("--auto-promote", action="store_true", help="walk shadow -> canary -> routed as gates pass")
    p.add_argument("--rollout-seed", type=seed, default=0, help="seed of the canary and shadow sampling")
    p.add_argument("--density", type=density, help="move the routed arm to this mean density (a quick what-if)")
    p.add_argument("--faults", metavar="SPEC", help="inject faults into the routed arm's sparse path, e.g. "
                   "raise+nan@0.1 or scores@1:all (testing the fail-safe and the gates)")


def check_serve_options(args) -> None:
    """Checks that need no model (before it loads)."""
    if args.gates is not None and not Path(args.gates).is_file():
        raise AdarouteError(f"--gates {args.gates}: no such file")
    if args.auto_promote and args.stage is None:
        raise AdarouteError("--auto-promote needs --stage (the stage it starts from)")
    if args.faults:
        from adaroute.runtime.failsafe import FaultInjector  # noqa: PLC0415

        try:
            FaultInjector.parse(args.faults)
        except ValueError as e:
            raise AdarouteError(f"--faults: {e}") from None


def attach(args, service) -> tuple:
    """Applies --density and --faults, starts the rollout; returns the routers to mount."""
    if args.stage is not None and "routed" not in service.model.arms:
        raise AdarouteError(f"--stage: a rollout needs a routed model; {args.model} serves only the dense arm")
    # gates first: they come from the model at its calibrated operating point, not from a what-if
    gates, calibration = _gates(args, service) if args.stage is not None else (None, {})
    if args.density is not None or args.faults:
        _what_if(args, service)
    if args.stage is None:
        return ()
    from adaroute.runtime.failsafe import FaultInjector  # noqa: PLC0415
    from adaroute.serve.admin import admin_router  # noqa: PLC0415
    from adaroute.serve.rollout import Rollout  # noqa: PLC0415
    from adaroute.serve.rollout_service import StagedRollout  # noqa: PLC0415

    _log_alerts()
    rollout = Rollout(args.stage, gates, args.canary_fraction, args.shadow_fraction, args.auto_promote,
                      args.rollout_seed)
    staged = StagedRollout(service, rollout, (calibration.get("calib_stats") or {}).get("mean_density"))
    print(f"adaroute serve: rollout stage {rollout.stage} (canary {rollout.canary_fraction}, shadow "
          f"{rollout.shadow_fraction}); gates {gates.to_dict()}", flush=True)
    if args.faults:  # the shadow re-scores the routed arm as served, faults included
        staged.shadow.rescorer.routed.failsafe.faults = FaultInjector.parse(args.faults, args.rollout_seed + 1)
    return (admin_router(staged, args.admin_key),) if args.admin_key else ()


def _gates(args, service):
    """(gates, calibration.json) of the served routed model, with --gates applied."""
    from adaroute.models import is_routed, resolve  # noqa: PLC0415
    from adaroute.serve.rollout_service import calibration_of, default_gates  # noqa: PLC0415

    source = resolve(args.model)
    calibration = calibration_of(source.directory if is_routed(source) else None)
    gates = default_gates(service, calibration)
    if args.gates:
        try:
            gates = gates.updated(args.gates)
        except (ValueError, TypeError) as e:
            raise AdarouteError(f"--gates {args.gates}: {e}") from None
    return gates, calibration


def _log_alerts() -> None:
    """Rollbacks and fail-safe warnings as timestamped WARNING lines on stderr (uvicorn configures only its own)."""
    import logging  # noqa: PLC0415

    for name in ("adaroute.serve", "adaroute.runtime"):
        logger = logging.getLogger(name)
        if not logger.handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            logger.addHandler(handler)
            logger.setLevel(logging.WARNING)


def _what_if(args, service) -> None:
    from adaroute.routing.profile import apply_density  # noqa: PLC0415
    from adaroute.routing.surgery import routed_modules  # noqa: PLC0415
    from adaroute.runtime.failsafe import FaultInjector  # noqa: PLC0415

    if "routed" not in service.model.arms:
        raise AdarouteError("--density and --faults need a routed model")
    if args.density is not None:
        try:
            apply_density(routed_modules(service.model.model), args.density)
        except ValueError as e:
            raise AdarouteError(f"--density: {e}") from None
    if args.faults:
        service.model.engines["routed"].failsafe.faults = FaultInjector.parse(args.faults, args.rollout_seed)
