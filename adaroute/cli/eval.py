"""`adaroute eval MODEL --data FILE...`: perplexity per data file and in total."""

from __future__ import annotations

from adaroute.cli.common import add_model_arg, format_table, positive_int, setup_threads, write_json
from adaroute.data import load_texts
from adaroute.eval.perplexity import check_window, perplexity
from adaroute.models import load_model


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="perplexity of a model on text (non-overlapping windows)")
    add_model_arg(p)
    p.add_argument("--data", nargs="+", required=True, metavar="FILE",
                   help="UTF-8 text files, or builtin:calib / builtin:heldout")
    p.add_argument("--max-tokens", type=positive_int, default=None, help="score at most N tokens of each file")
    p.add_argument("--window", type=positive_int, default=512, help="window length in tokens (default 512)")
    p.add_argument("--json", metavar="OUT", help="write results as JSON")
    p.set_defaults(run=run)


def run(args) -> int:
    setup_threads()
    texts = load_texts(args.data)  # read all inputs before the slow model load
    model, tokenizer = load_model(args.model)
    check_window(model, args.window)
    records, total = [], None
    for t in texts:
        r = perplexity(model, tokenizer, t.text, args.window, args.max_tokens, desc=t.name)
        total = r if total is None else total.merge(r)
        records.append(_record(args, t.name, r))
    payload = {"results": records, "total": _record(args, "total", total)}
    rows = [[r["data"], r["perplexity"], r["tokens"], r["seconds"]] for r in [*records, payload["total"]]]
    print(format_table(["data", "perplexity", "tokens", "seconds"], rows))
    write_json(args.json, payload)
    return 0


def _record(args, name: str, r) -> dict:
    return {"model": args.model, "data": name, "perplexity": r.perplexity, "tokens": r.tokens,
            "windows": r.windows, "window": args.window, "seconds": round(r.seconds, 3)}
