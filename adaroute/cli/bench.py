"""`adaroute bench MODEL`: decode and prefill speed, engines side by side in one process."""

from __future__ import annotations

import sys

from adaroute.cli.common import (
    add_head_rows_arg,
    add_model_arg,
    apply_head_rows,
    check_json_arg,
    positive_int,
    setup_threads,
    write_json,
)
from adaroute.errors import AdarouteError

MAX_BATCH = 64


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="decode/prefill speed: transformers eager vs adaroute dense vs routed")
    add_model_arg(p)
    p.add_argument("--batch", default="1", help=f"comma-separated batch sizes up to {MAX_BATCH}, e.g. 1,4 (default 1)")
    p.add_argument("--new-tokens", type=positive_int, default=128, help="tokens decoded per run (default 128)")
    p.add_argument("--prompt-tokens", type=positive_int, default=64, help="prompt length per sequence (default 64)")
    p.add_argument("--repeats", type=positive_int, default=3, help="interleaved rounds after the warm-up (default 3)")
    p.add_argument("--kernel", default=None, help="kernel for the adaroute engines (default: fastest available)")
    p.add_argument("--weights", default=None, metavar="FORMAT",
                   help="weight format of the adaroute engines: f32, q8 (q8_0), q4 (q4_1) or q4_0 (default: the "
                        "routed directory's recorded format, else f32); transformers-eager stays float32")
    add_head_rows_arg(p)
    p.add_argument("--dense-baseline", choices=["original", "arm"], default="original",
                   help="adaroute-dense on a routed float32 model: 'original' = the dense model's own layout (the "
                        "FFNs copied out of the routed store: more memory), 'arm' = the routed model's dense arm, "
                        "as the server runs it (no copy)")
    p.add_argument("--json", metavar="OUT", help="write one record per engine and batch size")
    p.set_defaults(run=run)


def parse_batches(text: str) -> list[int]:
    try:
        batches = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        batches = []
    if not batches or any(not 0 < b <= MAX_BATCH for b in batches):
        raise AdarouteError(f"--batch {text!r}: give integers from 1 to {MAX_BATCH} separated by commas, e.g. 1,4")
    return batches


def run(args) -> int:
    batches = parse_batches(args.batch)
    if args.new_tokens < 2:
        raise AdarouteError("--new-tokens: give at least 2 (the first token comes from the prefill; decode "
                            "speed is timed from the second)")
    check_json_arg(args.json)
    from tqdm import tqdm

    from adaroute.eval.bench import bench_prompts, build_engines, format_table, run_engines
    from adaroute.kernels import known_kernels
    from adaroute.models import inspect_model, load_model
    from adaroute.runtime.formats import model_format, parse_format

    if args.weights is not None:
        parse_format(args.weights)  # a bad name answers before the model is inspected
    if args.kernel is not None and args.kernel not in known_kernels():
        raise AdarouteError(f"--kernel {args.kernel!r}: choose one of {', '.join(known_kernels())}")
    info = inspect_model(args.model)
    fmt = model_format(info, args.weights)
    max_len = args.prompt_tokens + args.new_tokens + 16
    if info.context and max_len > info.context:
        raise AdarouteError(f"--prompt-tokens {args.prompt_tokens} + --new-tokens {args.new_tokens} (+16) exceed the "
                            f"model's context of {info.context} tokens: use fewer")
    apply_head_rows(None, info, args.head_rows, fmt)  # checks before the slow load
    setup_threads()
    source = info.source
    model, tokenizer = load_model(args.model)
    apply_head_rows(model, info, args.head_rows, fmt)
    gguf = str(source.directory / source.gguf_file) if source.gguf_file else None
    engines = build_engines(model, gguf, max_len=max_len, kernel=args.kernel, weights=fmt,
                            dense_baseline=args.dense_baseline)
    records = []
    for batch in batches:
        prompts = bench_prompts(tokenizer, batch, args.prompt_tokens)
        with tqdm(total=len(engines) * args.repeats, desc=f"bench batch {batch}", file=sys.stderr) as bar:
            records += run_engines(engines, prompts, args.new_tokens, args.repeats,
                                   progress=lambda msg: bar.update(1) if msg.startswith("round") else None)
    import torch

    print(f"threads: {torch.get_num_threads()}  prompt: {args.prompt_tokens} tokens  new: {args.new_tokens} tokens"
          + ("" if fmt == "f32" else f"  weights: {fmt}")
          + ("  adaroute-dense: the routed model's dense arm" if args.dense_baseline == "arm" else ""))
    print(format_table(records))
    write_json(args.json, {"model": args.model, "threads": torch.get_num_threads(), "weights": fmt,
                           "dense_baseline": args.dense_baseline, "records": [r.__dict__ for r in records]})
    return 0
