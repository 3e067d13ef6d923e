"""The server process as a whole: batching through HTTP, back-pressure, SIGTERM, arms, CLI checks, audit CLI."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from adaroute.config import FORMAT_VERSION
from tests.serve.conftest import ServerProcess, free_port, wait_rows


def _stream_lines(url: str, body: dict, lines: list, started: threading.Event | None = None) -> None:
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                lines.append(line[6:])
                if started is not None:
                    started.set()


def _chat_body(content: str, max_tokens: int, stream: bool = True) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0, "stream": stream}


def _text(lines: list[str]) -> str:
    chunks = [json.loads(x) for x in lines if x != "[DONE]"]
    return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])


def test_a_request_joining_mid_decode_answers_as_when_alone(tiny_dir):
    server = ServerProcess(tiny_dir)
    try:
        long_lines, started = [], threading.Event()
        t = threading.Thread(target=_stream_lines, args=(server.url, _chat_body("tell me everything", 1500),
                                                         long_lines, started))
        t.start()
        assert started.wait(30)
        joined = server.client().chat.completions.create(**_chat_body("a short question", 24, stream=False))
        still_running = httpx.get(server.url + "/health").json()["running"]
        t.join(120)
        alone = server.client().chat.completions.create(**_chat_body("a short question", 24, stream=False))
        assert still_running == 1, "the long request should still be decoding"
        assert joined.choices[0].message.content == alone.choices[0].message.content, (joined, alone)
        assert long_lines[-1] == "[DONE]" and json.loads(long_lines[-2])["choices"][0]["finish_reason"] == "length"
    finally:
        server.stop()


def test_a_full_queue_answers_429_with_retry_after(tiny_dir):
    server = ServerProcess(tiny_dir, "--max-batch", "1", "--max-queue", "1")
    try:
        # one request decodes first, so that the queue's one place is what the others compete for
        # (sent all at once, two may reach the queue before the engine takes the first)
        long_lines, started = [], threading.Event()
        first = threading.Thread(target=_stream_lines, args=(server.url, _chat_body("tell me everything", 1500),
                                                             long_lines, started))
        first.start()
        assert started.wait(30)
        results = []

        def one():
            try:
                r = httpx.post(server.url + "/v1/chat/completions", json=_chat_body("hi", 24, stream=False),
                               timeout=120)
                results.append((r.status_code, r.headers.get("retry-after"), r.json()))
            except httpx.HTTPError as e:
                results.append((type(e).__name__, None, None))

        threads = [threading.Thread(target=one) for _ in range(7)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        first.join(120)
        codes = sorted(r[0] for r in results)
        assert set(codes) == {200, 429} and codes.count(200) >= 1, codes
        assert long_lines[-1] == "[DONE]"
        busy = next(r for r in results if r[0] == 429)
        assert busy[1] == "1" and busy[2]["error"]["type"] == "rate_limit_error"
        assert 'adaroute:requests_rejected_total{reason="queue_full"}' in httpx.get(server.url + "/metrics").text
    finally:
        server.stop()


def test_sigterm_under_load_exits_0_with_a_row_per_request(tiny_dir, tmp_path):
    audit = tmp_path / "audit.sqlite"
    # a drain long enough for a slow machine: the test is about finishing, not about the deadline
    server = ServerProcess(tiny_dir, "--max-batch", "4", "--drain", "300", audit=audit)
    streams = [[] for _ in range(8)]
    starts = [threading.Event() for _ in range(8)]
    threads = [threading.Thread(target=_stream_lines, args=(server.url, _chat_body(f"question {i}", 300), s, e))
               for i, (s, e) in enumerate(zip(streams, starts, strict=True))]
    for t in threads:
        t.start()
    assert all(e.wait(60) for e in starts[:4])  # four decode, four wait for a row
    code, out = server.terminate(timeout=330)
    for t in threads:
        t.join(60)
    assert code == 0, out
    assert "stopped" in out
    completed = {json.loads(s[0])["id"].split("-", 1)[1]: json.loads(s[-2])["choices"][0]["finish_reason"]
                 for s in streams if s and s[-1] == "[DONE]"}
    rows = {r["id"]: r for r in wait_rows(audit, count=len(completed), timeout=1)}
    assert len(completed) == 8, "requests in flight at SIGTERM finish (drain)"
    got = {i: (rows.get(i, {}).get("finish_reason"), reason) for i, reason in completed.items()}
    assert all(row == reason in ("stop", "length") for row, reason in got.values()), got
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "/health")


@pytest.fixture(scope="module")
def routed_server(tiny_routed_dir, tmp_path_factory):
    s = ServerProcess(tiny_routed_dir, audit=tmp_path_factory.mktemp("audit") / "routed.sqlite")
    yield s
    s.stop()


def test_a_routed_model_serves_both_arms_from_one_copy(routed_server):
    client = routed_server.client()
    name = client.models.list().data[0].id
    ask = {"model": name, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 16, "temperature": 0}
    routed = client.chat.completions.create(**ask).model_extra["adaroute"]
    dense = client.chat.completions.create(**ask, extra_body={"arm": "dense"}).model_extra["adaroute"]
    assert routed["arm"] == "routed" and 0.2 < routed["ffn_density"] < 0.8
    assert routed["units_per_token"]["min"] <= routed["units_per_token"]["mean"] <= routed["units_per_token"]["max"]
    assert dense["arm"] == "dense" and dense["ffn_density"] == 1.0
    metrics = httpx.get(routed_server.url + "/metrics").text
    for line in ('adaroute:decode_steps_total{path="sparse"}', 'adaroute:decode_steps_total{path="dense"}',
                 'adaroute:request_success_total{arm="routed",finished_reason="length"} 1.0',
                 'adaroute:request_success_total{arm="dense",finished_reason="length"} 1.0'):
        assert line in metrics, line
    rows = wait_rows(routed_server.audit, count=2)
    routed_row = next(r for r in rows if r["arm"] == "routed")
    assert routed_row["routed_hash"] and len(routed_row["routed_hash"]) == 64
    assert routed_row["base_model"] == "tiny" and routed_row["format_version"] == FORMAT_VERSION


def test_layer_density_gauges_fill_over_a_window(routed_server):
    client = routed_server.client()
    name = client.models.list().data[0].id
    client.chat.completions.create(model=name, messages=[{"role": "user", "content": "go"}], max_tokens=40,
                                   temperature=0)
    metrics = httpx.get(routed_server.url + "/metrics").text
    values = [float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
              if line.startswith("adaroute:layer_density{")]
    assert len(values) == 2 and all(0.0 < v < 1.0 for v in values)


def test_audit_cli_summarises_per_arm(routed_server, tmp_path):
    wait_rows(routed_server.audit, count=2)
    out = tmp_path / "summary.json"
    r = subprocess.run([sys.executable, "-m", "adaroute", "audit", str(routed_server.audit), "--since", "1h",
                        "--json", str(out)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    summary = json.loads(out.read_text())
    assert {"dense", "routed"} <= set(summary["arms"])
    routed = summary["arms"]["routed"]
    assert routed["requests"] >= 1 and routed["completion_tokens"] >= 16 and len(routed["layer_density"]) == 2
    assert routed["latency_s"]["p50"] > 0 and 0 < routed["density"]["p50"] < 1
    assert "routed per-layer density" in r.stdout


def _serve_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "adaroute", "serve", *args], capture_output=True, text=True,
                          timeout=120)


def test_cli_checks_options_before_loading_the_model(tiny_dir, tmp_path):
    start = time.monotonic()
    cases = ((["--port", "70000"], "--port"), (["--audit", str(tmp_path / "no" / "a.sqlite")], "does not exist"),
             (["--audit", str(tmp_path)], "is a directory"), (["--threads", "0"], "--threads"))
    for args, words in cases:
        r = _serve_cli("no-such-model", *args)
        assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr, r.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        r = _serve_cli("no-such-model", "--port", str(busy.getsockname()[1]))
        assert r.returncode == 2 and "cannot listen" in r.stderr
    assert time.monotonic() - start < 60


def test_cli_rejects_the_routed_arm_for_a_dense_model(tiny_dir):
    r = _serve_cli(str(tiny_dir), "--arm", "routed", "--port", str(free_port()))
    assert r.returncode == 2 and "routed" in r.stderr and "Traceback" not in r.stderr


def test_auth_errors_reach_openai_client_as_exceptions(tiny_dir):
    server = ServerProcess(tiny_dir, "--api-key", "k1", "--api-key", "k2")
    try:
        for key in ("k1", "k2"):
            assert server.client(key).models.list().data[0].id == "tiny"
        with pytest.raises(openai.AuthenticationError):
            server.client("k3").models.list()
    finally:
        server.stop()
