"""What shadow re-scoring costs the dense arm: concurrency-1 decode tokens/s in the dense stage against
the shadow stage (fraction 0.2), phases taking turns in one server.

    python benchmarks/shadow_cost.py --routed /tmp/routed-0.5 [--rounds 3] [--requests 10] [--json OUT]

Starts `adaroute serve ROUTED --stage dense --admin-key ...` on a free loopback port, then per round
sends ``--requests`` sequential streamed chat requests (``--max-tokens`` each) in the dense stage and
as many in the shadow stage (switched through the admin API). A request's decode speed is its tokens
after the first over the time from first to last token; each phase's figure is tokens over time
summed over its requests, and the table shows the median over rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
from load_test import timed_stream  # benchmarks/load_test.py, beside this script

KEY = "bench-admin"
QUESTIONS = ["How does a for loop work in Python?", "What is a Python dictionary used for?",
             "Explain what a generator is.", "What does the with statement do?", "How are exceptions handled?"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(routed: str, port: int, threads: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "adaroute", "serve", routed, "--port", str(port), "--stage", "dense",
           "--shadow-fraction", "0.2", "--admin-key", KEY, "--threads", str(threads),
           "--rollout-seed", "1"]  # seed 0's first two dozen draws are all above 0.2: no shadow job at all
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(proc.stdout.read())
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("the server did not start")


def decode(url: str, model: str, question: str, max_tokens: int) -> tuple[int, float]:
    """(tokens after the first, seconds from first to last token) of one streamed answer."""
    body = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
            "temperature": 0}
    tokens, seconds = timed_stream(url, "/v1/chat/completions", body, timeout=300)
    return tokens - 1, seconds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--routed", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=10)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default="out/shadow_cost.json")
    args = ap.parse_args(argv)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start(args.routed, port, args.threads)
    admin = {"Authorization": f"Bearer {KEY}"}
    tps: dict[str, list[float]] = {"dense": [], "shadow": []}
    try:
        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        for _ in range(args.rounds):
            for stage in ("dense", "shadow"):
                httpx.post(url + "/admin/rollout", headers=admin, json={"stage": stage}).raise_for_status()
                runs = [decode(url, model, QUESTIONS[i % len(QUESTIONS)], args.max_tokens)
                        for i in range(args.requests)]
                tps[stage].append(sum(n for n, _ in runs) / sum(t for _, t in runs))
        status = httpx.get(url + "/admin/rollout", headers=admin).json()
        metrics = httpx.get(url + "/metrics").text
    finally:
        proc.terminate()
        proc.wait(60)
    med = {s: statistics.median(v) for s, v in tps.items()}
    cost = 1 - med["shadow"] / med["dense"]
    dropped = next((float(x.split()[-1]) for x in metrics.splitlines()
                    if x.startswith("adaroute:shadow_dropped_total")), 0.0)
    print(f"model {model}, {args.requests} sequential requests x {args.max_tokens} tokens per phase, "
          f"{args.rounds} rounds, {args.threads} threads")
    print(f"{'stage':<8} {'decode tok/s (median)':>22}  rounds")
    for s in tps:
        print(f"{s:<8} {med[s]:>22.2f}  {' '.join(f'{v:.1f}' for v in tps[s])}")
    print(f"shadow cost to the dense arm: {100 * cost:.1f} % (target <= 10 %); shadow samples "
          f"{status['shadow']['samples']}, dropped {dropped:.0f}")
    out = {"routed": args.routed, "tps": tps, "median": med, "cost": cost,
           "shadow_samples": status["shadow"]["samples"], "dropped": dropped, "requests": args.requests,
           "max_tokens": args.max_tokens, "rounds": args.rounds}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
