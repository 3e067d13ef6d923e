"""Server overhead at concurrency 1: decode tokens/s through HTTP streaming against `adaroute bench`'s
measurement of the same engine in-process, interleaved round by round so both see the same machine.

    adaroute serve DIR --port 8000 &        # the server under test (same threads as here)
    python benchmarks/serve_overhead.py --url http://127.0.0.1:8000 --model DIR [--arms routed,dense]
        [--rounds 5] [--new-tokens 64] [--json out/serve_overhead.json]

Per round and arm: one `bench` run (the runtime engine of that arm, a 64-token prompt from
`bench_prompts`, greedy, decode tokens/s from the second token, as `adaroute bench` computes it), then
one streamed /v1/completions request with the same prompt text and `max_tokens` (tokens after the
first over the time from the first to the last content chunk). The server is idle while the
in-process engine runs and vice versa. Prints medians, the HTTP/bench ratio per arm and
routed/dense for both; writes JSON. Loopback only.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import httpx
from load_test import loopback_only, timed_stream  # benchmarks/load_test.py, beside this script


def http_decode_rate(url: str, model: str, prompt: str, new_tokens: int, arm: str) -> float:
    body = {"model": model, "prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "arm": arm}
    tokens, seconds = timed_stream(url, "/v1/completions", body)
    if tokens < new_tokens:
        raise SystemExit(f"serve_overhead: the server stopped after {tokens} of {new_tokens} tokens; "
                         "choose another prompt length")
    return (tokens - 1) / seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--model", required=True, help="the MODEL the server was started with")
    p.add_argument("--arms", default="routed,dense")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--json")
    args = p.parse_args()
    loopback_only(args.url)

    from adaroute.cli.common import setup_threads
    from adaroute.eval.bench import bench_prompts
    from adaroute.models import load_model
    from adaroute.runtime import Engine, ExecutionPolicy, generate

    setup_threads()
    model, tokenizer = load_model(args.model)
    name = httpx.get(args.url + "/v1/models").json()["data"][0]["id"]
    ids = bench_prompts(tokenizer, 1, args.prompt_tokens)
    prompt = tokenizer.decode(ids[0], skip_special_tokens=True)
    arms = [a for a in args.arms.split(",") if a]
    # the engines `adaroute bench` times (eval.bench.runtime_engine): the routed policy, or always dense
    engines = {arm: Engine.from_model(model, policy=ExecutionPolicy() if arm == "routed"
                                      else ExecutionPolicy.always_dense()) for arm in arms}
    for arm in arms:  # warm-up, both sides
        generate(engines[arm], ids, 8)
        http_decode_rate(args.url, name, prompt, 8, arm)
    rates: dict[str, dict[str, list[float]]] = {arm: {"bench": [], "http": []} for arm in arms}
    for r in range(args.rounds):
        for arm in arms:
            run = generate(engines[arm], ids, args.new_tokens)
            rates[arm]["bench"].append(len(run.step_s) / sum(run.step_s))  # as eval.bench: from the second token
            rates[arm]["http"].append(http_decode_rate(args.url, name, prompt, args.new_tokens, arm))
            print(f"round {r + 1} {arm}: bench {rates[arm]['bench'][-1]:.1f}  http {rates[arm]['http'][-1]:.1f} tok/s",
                  flush=True)
    result = {arm: {k: statistics.median(v) for k, v in rates[arm].items()} for arm in arms}
    print(f"\n{'arm':<8}{'bench tok/s':>13}{'http tok/s':>12}{'http/bench':>12}")
    for arm, m in result.items():
        m["http_over_bench"] = m["http"] / m["bench"]
        print(f"{arm:<8}{m['bench']:>13.1f}{m['http']:>12.1f}{m['http_over_bench']:>12.3f}")
    if {"routed", "dense"} <= set(result):
        for k in ("bench", "http"):
            result[f"routed_over_dense_{k}"] = result["routed"][k] / result["dense"][k]
            print(f"routed/dense ({k}): {result[f'routed_over_dense_{k}']:.3f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"rounds": args.rounds, "new_tokens": args.new_tokens,
                                               "per_round": rates, "medians": result}, indent=2) + "\n")


if __name__ == "__main__":
    main()
