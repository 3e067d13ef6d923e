"""`adaroute eval MODEL --data FILE...`: perplexity per data file and in total.

For a routed model the dense base is evaluated on the same windows too, and the record adds the
perplexity ratio, top-1 agreement with dense, per-layer density, FFN cost shares and the
units-per-token distribution.

``--weights q8|q4|q4_0`` (default: the format a routed directory records, f32 otherwise): the runtime
engine computes every perplexity on the model's weights at that format (adaroute.runtime.formats), dense
and routed alike; at f32 the loaded model itself computes them, unless the model's output head is
routed (``--head-rows``, or a directory converted with it): that runs in the runtime engine only.
"""

from __future__ import annotations

from adaroute.cli.common import (
    add_head_rows_arg,
    add_model_arg,
    apply_head_rows,
    check_json_arg,
    density,
    format_table,
    positive_int,
    setup_threads,
    write_json,
)
from adaroute.data import load_texts
from adaroute.errors import AdarouteError

DEFAULT_WINDOW = 512


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="perplexity of a model on text (routed models: side by side with dense)")
    add_model_arg(p)
    p.add_argument("--data", nargs="+", required=True, metavar="FILE",
                   help="UTF-8 text files, or builtin:calib / builtin:heldout")
    p.add_argument("--max-tokens", type=positive_int, default=None,
                   help="score at most N tokens of each file (default: all; only that much text is tokenised)")
    p.add_argument("--window", type=positive_int, default=None,
                   help=f"window length in tokens, at most the model's context (default {DEFAULT_WINDOW}, or the "
                        "context when shorter)")
    p.add_argument("--density", type=density, default=None,
                   help="routed models: override the calibrated target density for a quick sweep (default: as "
                        "calibrated)")
    p.add_argument("--weights", default=None, metavar="FORMAT",
                   help="weight format: f32, q8 (q8_0), q4 (q4_1) or q4_0; at q8/q4 the runtime engine computes "
                        "the perplexities on quantised weights (default: the routed directory's recorded format, "
                        "else f32)")
    p.add_argument("--no-start", action="store_true",
                   help="score each window cold from its first text token, without the model's start token "
                        "(BOS, else EOS) that every window begins with by default")
    add_head_rows_arg(p)
    p.add_argument("--json", metavar="OUT", help="write results as JSON")
    p.set_defaults(run=run)


def run(args) -> int:
    if args.max_tokens is not None and args.max_tokens < 2:
        raise AdarouteError(f"--max-tokens {args.max_tokens} is too small: perplexity needs at least 2 tokens")
    check_json_arg(args.json)
    texts = load_texts(args.data)  # read all inputs before the slow model load
    from adaroute.eval.perplexity import check_window_fits, start_token
    from adaroute.models import inspect_model, load_model
    from adaroute.runtime.formats import model_format, parse_format

    if args.weights is not None:
        parse_format(args.weights)  # a bad name answers before the model is inspected
    info = inspect_model(args.model)
    fmt = model_format(info, args.weights)
    args.window = args.window or min(DEFAULT_WINDOW, info.context or DEFAULT_WINDOW)
    check_window_fits(args.window, info.context)
    if args.density is not None and not info.routed:
        raise AdarouteError("--density applies to routed models only: convert the model first (adaroute convert)")
    apply_head_rows(None, info, args.head_rows, fmt)  # checks before the slow load
    setup_threads()
    model, tokenizer = load_model(args.model)
    args.start = not args.no_start
    # a tokenizer with neither BOS nor EOS answers here, before any window is scored
    start = start_token(tokenizer) if args.start else None
    apply_head_rows(model, info, args.head_rows, fmt)
    routed = info.routed
    if fmt == "f32" and not getattr(model, "adaroute_head_rows", 0):  # a routed head runs in the runtime only
        evaluate = _eval_routed if routed else _eval_dense
        records = [evaluate(model, tokenizer, t, args) for t in texts]
    else:
        records = _eval_runtime(model, tokenizer, texts, args, fmt, routed)
    payload = {"model": args.model, "routed": routed, "weights": fmt,
               "start_token": start, "results": records,
               "total": _total(records, args)}
    if fmt != "f32":
        print(f"weights: {fmt} (perplexities computed by the runtime engine on {fmt} blocks)")
    elif getattr(model, "adaroute_head_rows", 0):
        print(f"routed head: {model.adaroute_head_rows} exact rows per token (perplexities computed by the runtime "
              "engine)")
    _print(payload, routed)
    write_json(args.json, payload)
    return 0


def _eval_dense(model, tokenizer, text, args) -> dict:
    from adaroute.eval.perplexity import perplexity

    r = perplexity(model, tokenizer, text.text, args.window, args.max_tokens, desc=text.name, start=args.start)
    return {"model": args.model, "data": text.name, "perplexity": r.perplexity, "tokens": r.tokens,
            "windows": r.windows, "window": args.window, "seconds": round(r.seconds, 3)}


def _eval_routed(model, tokenizer, text, args) -> dict:
    import time

    from adaroute.routing.quality import compare_with_dense

    t0 = time.perf_counter()
    r = compare_with_dense(model, tokenizer, text.text, args.window, args.max_tokens, args.density, desc=text.name,
                           start=args.start)
    return {"model": args.model, "data": text.name, "perplexity": r["perplexity_routed"], "window": args.window,
            "seconds": round(time.perf_counter() - t0, 3), **r}


def _eval_runtime(model, tokenizer, texts, args, fmt: str, routed: bool) -> list[dict]:
    """Every record computed by the runtime engine on the model's weights at ``fmt`` (built once)."""
    import time

    from adaroute.eval.perplexity import runtime_perplexity
    from adaroute.routing.quality import compare_with_dense_runtime
    from adaroute.runtime.formats import runtime_weights

    if not routed:
        weights = runtime_weights(model, fmt, args.window)
        records = []
        for text in texts:
            r = runtime_perplexity(weights, tokenizer, text.text, args.window, args.max_tokens, desc=text.name,
                                   start=args.start)
            records.append({"model": args.model, "data": text.name, "perplexity": r.perplexity, "tokens": r.tokens,
                            "windows": r.windows, "window": args.window, "seconds": round(r.seconds, 3),
                            "weights": fmt})
        return records
    from adaroute.routing.profile import apply_density
    from adaroute.routing.surgery import routed_modules

    mods = routed_modules(model)
    saved = [m.policy for m in mods]
    try:
        if args.density is not None:  # before the runtime weights are built from the modules
            apply_density(mods, args.density)
        weights = runtime_weights(model, fmt, args.window)
        records = []
        for text in texts:
            t0 = time.perf_counter()
            r = compare_with_dense_runtime(weights, model, tokenizer, text.text, args.window, args.max_tokens,
                                           args.density, desc=text.name, start=args.start)
            records.append({"model": args.model, "data": text.name, "perplexity": r["perplexity_routed"],
                            "window": args.window, "seconds": round(time.perf_counter() - t0, 3),
                            "weights": fmt, **r})
        return records
    finally:
        for m, p in zip(mods, saved, strict=True):
            m.set_policy(p)


def _total(records: list[dict], args) -> dict:
    """Token-weighted totals over all files (perplexities combine through their summed NLL)."""
    import math

    tokens = sum(r["tokens"] for r in records)
    total = {"model": args.model, "data": "total", "tokens": tokens, "window": args.window,
             "seconds": round(sum(r["seconds"] for r in records), 3)}
    for key in ("perplexity", "perplexity_dense", "perplexity_routed"):
        if key in records[0]:
            total[key] = math.exp(sum(math.log(r[key]) * r["tokens"] for r in records) / tokens)
    if "perplexity_dense" in total:
        total["perplexity_ratio"] = total["perplexity_routed"] / total["perplexity_dense"]
        total["top1_agreement"] = sum(r["top1_agreement"] * r["tokens"] for r in records) / tokens
    return total


def _print(payload: dict, routed: bool) -> None:
    rows = [*payload["results"], payload["total"]]
    if not routed:
        print(format_table(["data", "perplexity", "tokens", "seconds"],
                           [[r["data"], r["perplexity"], r["tokens"], r["seconds"]] for r in rows]))
        return
    headers = ["data", "ppl dense", "ppl routed", "ratio", "top-1 agree", "tokens", "seconds"]
    print(format_table(headers, [[r["data"], r["perplexity_dense"], r["perplexity_routed"], r["perplexity_ratio"],
                                  r["top1_agreement"], r["tokens"], r["seconds"]] for r in rows]))
    for r in payload["results"]:
        upt = r.get("units_per_token") or {}
        print(f"{r['data']}: mean density {r['mean_density']:.3f}, FFN bytes share {r['ffn_bytes_share']:.3f} "
              f"(router {r['router_bytes_share']:.3f}), FFN FLOPs share {r['ffn_flops_share']:.3f}, "
              f"units/token share {_summary(upt)}")
        spread = r.get("window_spread")
        if spread and r.get("windows", 0) > 1:
            print(f"{r['data']}: {_spread(spread)}")


def _spread(s: dict) -> str:
    text = f"per-window ratio {s['ratio_min']:.3f}-{s['ratio_max']:.3f}"
    if s["worst_excess_share"] is not None:
        text += (f"; window {s['worst_window'] + 1} holds {100 * s['worst_excess_share']:.0f} % of the extra loss, "
                 f"ratio over the other windows {s['ratio_without_worst']:.3f}")
    return text


def _summary(dist: dict) -> str:
    keys = [k for k in ("mean", "std", "p5", "p50", "p95") if k in dist]
    return ", ".join(f"{k} {dist[k]:.3f}" for k in keys) if keys else "n/a"  # shares of the layer's units
