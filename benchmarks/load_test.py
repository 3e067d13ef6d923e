"""Load test of a running `adaroute serve`: streamed chat requests at a fixed concurrency, per arm.

    python benchmarks/load_test.py --url http://127.0.0.1:8000 --requests 200 --concurrency 8 \
        --max-tokens 64 [--arms routed,dense] [--rounds 1] [--audit PATH.sqlite] [--json out/load.json]

For every (arm, concurrency) phase it prints completed requests, errors by HTTP status, throughput
(completion tokens over the phase's wall time), decode tokens/s per stream (tokens after the first
over the time after the first, median), TTFT and latency p50/p95, and with --audit the audit rows the
server wrote for the phase against the requests sent. Bounded: at most 10 000 requests and
--time-limit seconds per phase; loopback addresses only (this is a local benchmark, not a load
generator for other people's servers).
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import ipaddress
import json
import socket
import sqlite3
import statistics
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx

MAX_REQUESTS = 10_000
# Prompts that ask for long answers, so most requests run to max_tokens.
PROMPTS = [
    "Write a long story about a lighthouse keeper who finds a message in a bottle.",
    "Explain in detail how a compiler turns source code into machine code.",
    "Describe a walk through a city market at dawn, with every sound and smell.",
    "Write a detailed guide to planting and caring for a vegetable garden.",
    "Tell the history of the printing press and how it changed Europe.",
    "Explain how the heart pumps blood through the body, step by step.",
    "Write a long letter from a sailor to his family about a storm at sea.",
    "Describe how to bake bread from scratch, from flour to the finished loaf.",
]


def loopback_only(url: str) -> None:
    host = urlparse(url).hostname or ""
    addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    if not addresses or not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses):
        raise SystemExit(f"load_test: {url} is not a loopback address; this benchmark only targets a local server")


async def one_request(client: httpx.AsyncClient, body: dict) -> dict:
    start = time.perf_counter()
    first = last = None
    usage = None
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return {"status": r.status_code, "start": start, "end": time.perf_counter()}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    usage = chunk["usage"]
                if any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                    last = time.perf_counter()
                    first = first or last
    except httpx.HTTPError as e:
        return {"status": type(e).__name__, "start": start, "end": time.perf_counter()}
    tokens = usage["completion_tokens"] if usage else 0
    return {"status": 200, "start": start, "first": first, "last": last, "end": time.perf_counter(),
            "tokens": tokens}


async def phase(url: str, model: str, arm: str | None, n: int, concurrency: int, max_tokens: int,
                headers: dict, time_limit: float) -> tuple[list[dict], float, float]:
    bodies = [{"model": model, "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
               "max_tokens": max_tokens, "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
               **({"arm": arm} if arm else {})} for i in range(n)]
    queue: asyncio.Queue = asyncio.Queue()
    for b in bodies:
        queue.put_nowait(b)
    results: list[dict] = []
    deadline = time.perf_counter() + time_limit

    async def worker(client):
        while not queue.empty() and time.perf_counter() < deadline:
            results.append(await one_request(client, queue.get_nowait()))

    started_unix, start = time.time(), time.perf_counter()
    timeout = httpx.Timeout(time_limit, connect=10.0)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return results, time.perf_counter() - start, started_unix


def timed_stream(url: str, endpoint: str, body: dict, timeout: float = 600) -> tuple[int, float]:
    """Stream one request (``body`` without ``stream``) -> (completion tokens, seconds from the first
    text chunk to the last). Completions carry text in ``choices[].text``, chat in ``delta.content``.

    Timing a server on the machine it runs on, the client's own CPU time per chunk competes with the
    server's compute threads, so this reader is the standard library's (``http.client``, about half
    the CPU per chunk of httpx's line iterator, measured with benchmarks/serve_overhead.py)."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    first = last = None
    tokens = 0
    target = urlparse(url)
    conn = http.client.HTTPConnection(target.hostname, target.port, timeout=timeout)
    try:
        conn.request("POST", target.path.rstrip("/") + endpoint, json.dumps(body),
                     {"Content-Type": "application/json"})
        r = conn.getresponse()
        if r.status != 200:
            raise RuntimeError(f"{endpoint}: HTTP {r.status}: {r.read()[:200]!r}")
        while line := r.readline():
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if any(c.get("text") or (c.get("delta") or {}).get("content") for c in chunk.get("choices") or []):
                last = time.perf_counter()
                first = first or last
    finally:
        conn.close()
    return tokens, (last - first) if first and last else 0.0


def summarize(results: list[dict], wall: float) -> dict:
    ok = [r for r in results if r["status"] == 200]
    errors: dict[str, int] = {}
    for r in results:
        if r["status"] != 200:
            errors[str(r["status"])] = errors.get(str(r["status"]), 0) + 1
    tokens = sum(r["tokens"] for r in ok)
    per_stream = [(r["tokens"] - 1) / (r["last"] - r["first"]) for r in ok
                  if r.get("first") and r["tokens"] > 2 and r["last"] > r["first"]]
    return {"requests": len(results), "completed": len(ok), "errors": errors, "completion_tokens": tokens,
            "wall_s": wall, "throughput_tok_s": tokens / wall if wall else 0.0,
            "decode_tok_s_per_stream": statistics.median(per_stream) if per_stream else None,
            "ttft_s": _pcts([r["first"] - r["start"] for r in ok if r.get("first")]),
            "latency_s": _pcts([r["end"] - r["start"] for r in ok])}


def _pcts(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p95": None}
    q = statistics.quantiles(values, n=20, method="inclusive") if len(values) > 1 else [values[0]] * 19
    return {"p50": statistics.median(values), "p95": q[18]}


def audit_rows(path: str, since: float) -> int:
    db = sqlite3.connect(f"file:{Path(path)}?mode=ro", uri=True)
    try:
        return db.execute("SELECT COUNT(*) FROM requests WHERE created >= ?", (since,)).fetchone()[0]
    finally:
        db.close()


def table(rows: list[dict]) -> str:
    head = ["arm", "conc", "requests", "ok", "errors", "tok/s total", "tok/s per stream", "TTFT p50", "TTFT p95",
            "latency p50", "latency p95", "audit rows"]
    lines = [head]
    for r in rows:
        f = lambda v, d=3: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
        lines.append([r["arm"], str(r["concurrency"]), str(r["requests"]), str(r["completed"]),
                      ",".join(f"{k}:{v}" for k, v in r["errors"].items()) or "0", f(r["throughput_tok_s"], 1),
                      f(r["decode_tok_s_per_stream"], 1), f(r["ttft_s"]["p50"]), f(r["ttft_s"]["p95"]),
                      f(r["latency_s"]["p50"]), f(r["latency_s"]["p95"]), str(r.get("audit_rows", "-"))])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)) for line in lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--requests", default="200", help="requests per phase; a list matches --concurrency (40,200)")
    p.add_argument("--concurrency", default="8", help="one or more, comma-separated (e.g. 1,8)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--arms", default="", help="comma-separated arms to test (default: the server's default arm)")
    p.add_argument("--model", help="model name (default: the first from /v1/models)")
    p.add_argument("--api-key")
    p.add_argument("--audit", help="the server's --audit file: count its rows per phase")
    p.add_argument("--time-limit", type=float, default=900.0, help="seconds per phase at most")
    p.add_argument("--rounds", type=int, default=1, help="split each phase into this many turns, phases alternating")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    concurrency = [int(c) for c in args.concurrency.split(",")]
    counts = [int(n) for n in args.requests.split(",")]
    counts = counts * len(concurrency) if len(counts) == 1 else counts
    if len(counts) != len(concurrency) or not all(0 < n <= MAX_REQUESTS for n in counts):
        raise SystemExit(f"load_test: --requests: one count in 1..{MAX_REQUESTS}, or one per --concurrency value")
    if not 0 < args.rounds <= min(counts):
        raise SystemExit("load_test: --rounds must be in 1..--requests")
    loopback_only(args.url)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    model = args.model or httpx.get(f"{args.url}/v1/models", headers=headers).json()["data"][0]["id"]
    phases = [(arm, c, n) for arm in [a for a in args.arms.split(",") if a] or [None]
              for c, n in zip(concurrency, counts, strict=True)]
    done = {ph: ([], 0.0, 0) for ph in phases}  # results, wall seconds, audit rows
    for r in range(args.rounds):  # phases take turns, so a change in machine load hits them alike
        for arm, conc, total in phases:
            n = total // args.rounds + (r < total % args.rounds)
            results, wall, since = asyncio.run(phase(args.url, model, arm, n, conc, args.max_tokens, headers,
                                                     args.time_limit))
            rows_now = 0
            if args.audit:
                time.sleep(1.0)  # the audit writer commits every 0.25 s
                rows_now = audit_rows(args.audit, since)
            before = done[(arm, conc, total)]
            done[(arm, conc, total)] = (before[0] + results, before[1] + wall, before[2] + rows_now)
            print(f"round {r + 1}: {arm or 'default'} x{conc}: {len(results)} requests in {wall:.1f} s", flush=True)
    rows = []
    for (arm, conc, _), (results, wall, audited) in done.items():
        row = {"arm": arm or "default", "concurrency": conc, **summarize(results, wall)}
        if args.audit:
            row["audit_rows"] = audited
        rows.append(row)
    print(table(rows))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"model": model, "max_tokens": args.max_tokens, "phases": rows},
                                              indent=2) + "\n")


if __name__ == "__main__":
    main()
