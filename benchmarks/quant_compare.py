"""adaroute and llama.cpp side by side at equal precision: the same model's F32, Q8_0 and Q4_1 GGUF
files, each run by adaroute on the file's own blocks and by llama.cpp, interleaved in one process;
with ``--routed DIR [DIR ...]``, a routed model of the same base at each file's format too: the
directory converted at that format (``adaroute convert --weights``: its stored blocks), else a float32
one quantised when loaded (``adaroute.runtime.formats.runtime_weights``).

    python benchmarks/make_gguf.py -o out/gguf                     # F32 and Q8_0 files of the embedded model
    python benchmarks/quant_compare.py out/gguf/*.F32.gguf out/gguf/*.Q8_0.gguf smollm2-135m \
        [--routed DIR [DIR ...]] [--threads 2] [--repeats 3] [--new-tokens 128] [--ppl-tokens 2048] [--json OUT]

Prints per engine: decode tokens/s (median over interleaved rounds), MB of weights read per token,
effective GB/s (their product), perplexity on the same held-out windows (``builtin:heldout``, 512-token
windows, the README's protocol; routed: every token sparse, as ``adaroute eval``) and, per file, each
engine's speed over llama.cpp's.
"""

from __future__ import annotations

import argparse
import json
import math
import os

import torch

from adaroute import load_model
from adaroute.data import load_text
from adaroute.eval.bench import _fmt, bench_prompts, llama_cpp_engine, run_engines, runtime_engine
from adaroute.eval.perplexity import text_windows, window_nll
from adaroute.models.loading import resolve
from adaroute.runtime import Engine, ExecutionPolicy
from adaroute.runtime.formats import runtime_weights
from adaroute.runtime.quant_weights import from_gguf, weight_format


def runtime_ppl(weights, wins, policy=None) -> float:
    engine, nll, scored = Engine(weights, policy=policy), 0.0, 0
    for w in wins:
        logits = engine.forward(w, engine.new_cache(1, w.shape[1]), all_logits=True)  # [1, W, V]
        nll += window_nll(logits, w).item()
        scored += w.shape[1] - 1
    return math.exp(nll / scored)


def llama_cpp_ppl(path: str, wins, threads: int) -> float | None:
    try:
        import llama_cpp
    except ImportError:
        return None
    window = max(w.shape[1] for w in wins)
    llm = llama_cpp.Llama(model_path=path, n_ctx=window, n_batch=window, n_threads=threads, logits_all=True,
                          verbose=False)
    nll, scored = 0.0, 0
    for w in wins:
        llm.reset()
        llm.eval(w[0].tolist())
        logits = torch.from_numpy(llm.scores[: w.shape[1]].copy()).unsqueeze(0)  # [1, W, V]
        nll += window_nll(logits, w).item()
        scored += w.shape[1] - 1
    return math.exp(nll / scored)


def _routed_for(models: dict, fmt: str) -> str | None:
    """The directory to run at ``fmt``: the one stored in it as blocks, else a float32 one."""
    stored = {d: getattr(m, "adaroute_blocks", (None, None))[1] for d, m in models.items()}
    return next((d for d, s in stored.items() if s == fmt), next((d for d, s in stored.items() if s is None), None))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", help=".gguf files (or the smollm2-135m alias)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--ppl-tokens", type=int, default=2048, help="held-out tokens for perplexity (0: skip)")
    p.add_argument("--no-start", action="store_true", help="perplexity windows without the start token")
    p.add_argument("--routed", metavar="DIR", nargs="+", default=[],
                   help="routed model directories of the same base model: per file, the one stored in that "
                        "file's format (adaroute convert --weights), else a float32 one quantised when loaded")
    p.add_argument("--json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    routed = {d: load_model(d)[0] for d in args.routed}
    from transformers import AutoTokenizer

    paths = [str(s.directory / s.gguf_file) for s in map(resolve, args.models)]
    tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(paths[0]), gguf_file=os.path.basename(paths[0]))
    max_len = args.prompt_tokens + args.new_tokens + 16
    engines, rows = [], []
    for path in paths:
        weights = from_gguf(path, max(max_len, 512))
        fmt = weight_format(weights)
        ours = runtime_engine(None, routed=False, name=f"adaroute {fmt}", weights=weights)
        cpp = llama_cpp_engine(path, args.threads, max_len)
        if cpp is not None:
            cpp.name = f"llama.cpp {fmt}"
        extra = None
        source = _routed_for(routed, fmt if fmt != "mixed" else "f32")
        if source is not None:
            rw = runtime_weights(routed[source], fmt if fmt != "mixed" else "f32", max(max_len, 512))
            extra = runtime_engine(None, routed=True, name=f"adaroute routed {fmt}", weights=rw)
            extra.source = source
        engines += [e for e in (ours, cpp, extra) if e is not None]
        rows.append((path, fmt, weights, ours, cpp, extra))
    prompts = bench_prompts(tokenizer, 1, args.prompt_tokens)
    records = {r.engine: r for r in run_engines(engines, prompts, args.new_tokens, args.repeats)}
    wins = text_windows(tokenizer, load_text("builtin:heldout").text, 512, args.ppl_tokens,
                        not args.no_start) if args.ppl_tokens else []
    out = []
    print(f"threads {args.threads}, batch 1, {args.new_tokens} new tokens, {args.repeats} interleaved rounds, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'engine':<24}{'tok/s':>8}{'MB/token':>10}{'GB/s':>7}{'ppl':>9}{'vs llama.cpp':>14}")
    for path, fmt, weights, ours, cpp, extra in rows:
        ppl = {ours.name: runtime_ppl(weights, wins) if wins else None}
        if cpp is not None:
            ppl[cpp.name] = llama_cpp_ppl(path, wins, args.threads) if wins else None
        if extra is not None:
            ppl[extra.name] = runtime_ppl(extra.weights, wins, ExecutionPolicy.always_sparse()) if wins else None
        base = records.get(cpp.name) if cpp is not None else None
        for e in (ours, cpp, extra):
            if e is None:
                continue
            r = records[e.name]
            mb = e.bytes_per_step() / 1e6
            ratio = r.decode_tokens_per_s / base.decode_tokens_per_s if base else None
            out.append({"engine": e.name, "file": path if e is not extra else e.source, "format": fmt,
                        "tokens_per_s": r.decode_tokens_per_s, "density": r.density,
                        "mb_per_token": round(mb, 1), "gb_per_s": round(mb * r.decode_tokens_per_s / 1e3, 2),
                        "perplexity": ppl.get(e.name), "vs_llama_cpp": ratio})
            row = out[-1]
            print(f"{e.name:<24}{r.decode_tokens_per_s:>8.1f}{mb:>10.1f}{row['gb_per_s']:>7.1f}"
                  f"{_fmt(row['perplexity'], '.3f'):>9}{_fmt(ratio, '.2f', 'x'):>14}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "load": os.getloadavg(), "rows": out}, f, indent=2)


if __name__ == "__main__":
    main()
