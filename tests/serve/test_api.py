"""The OpenAI-compatible API of the real server process, driven by the official `openai` client."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from adaroute.models import load_model
from adaroute.runtime import Engine, chat_prompt_ids, generate, stop_tokens_for
from tests.serve.conftest import wait_rows

KEY = "sesame"
QUESTION = "How does a for loop work?"


@pytest.fixture(scope="module")
def reference(tiny_dir):
    """The runtime's own greedy answer to QUESTION, to compare the server with."""
    model, tok = load_model(str(tiny_dir))
    ids = chat_prompt_ids(tok, [{"role": "user", "content": QUESTION}])
    out = generate(Engine.from_model(model), [ids], 12, stop_tokens=stop_tokens_for(tok, model))
    return tok, ids, out.tokens[0]


@pytest.fixture(scope="module")
def client(server):
    return server.client(KEY)


def _chat(client, **kw):
    args = {"model": "tiny", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 12, "temperature": 0}
    return client.chat.completions.create(**{**args, **kw})


def test_chat_equals_the_runtime_with_usage_and_extension(client, reference):
    tok, ids, tokens = reference
    r = _chat(client)
    assert r.choices[0].message.content == tok.decode(tokens, skip_special_tokens=True)
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), 12)
    ext = r.model_extra["adaroute"]
    assert ext["arm"] == "dense" and ext["ffn_density"] == 1.0 and ext["units_per_token"]["of"] == 128


def test_streamed_chat_equals_whole(client):
    whole = _chat(client).choices[0].message.content
    chunks = list(_chat(client, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12 and not chunks[-1].choices


def test_completions_whole_and_streamed(client):
    r = client.completions.create(model="tiny", prompt="while True:", max_tokens=10, temperature=0)
    assert r.usage.completion_tokens == 10 and r.choices[0].finish_reason == "length"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="while True:", max_tokens=10, temperature=0, stream=True))
    assert streamed == r.choices[0].text


def test_stop_string_cuts_the_text(client):
    whole = _chat(client, max_tokens=30).choices[0].message.content
    stop = whole[len(whole) // 2:len(whole) // 2 + 2]
    assert stop.strip(), "the greedy text should have visible characters to stop at"
    r = _chat(client, max_tokens=30, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == whole[:whole.index(stop)]
    assert r.usage.completion_tokens < 30


def test_seed_makes_sampling_repeatable(client):
    a, b, c = (_chat(client, temperature=1.0, seed=s, max_tokens=20).choices[0].message.content for s in (7, 7, 8))
    assert a == b and a != c


@pytest.mark.parametrize("extra, param", [({"n": 2}, "n"), ({"tools": [{"type": "function", "function": {
    "name": "f", "parameters": {}}}]}, "tools"), ({"logit_bias": {"5": 1}}, "logit_bias")])
def test_unsupported_parameters_are_400(client, extra, param):
    with pytest.raises(openai.BadRequestError) as e:
        _chat(client, **extra)
    assert e.value.body["param"] == param and "not supported" in e.value.body["message"]


def test_api_key_required(server):
    for key in ("wrong", KEY + "x"):
        with pytest.raises(openai.AuthenticationError) as e:
            _chat(server.client(key))
        assert e.value.status_code == 401
    r = httpx.get(server.url + "/v1/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/health").status_code == 200  # health and metrics stay open


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        _chat(client, model="gpt-4")
    assert "tiny" in e.value.body["message"]


def test_prompt_over_the_context_is_400_naming_the_limit(client):
    with pytest.raises(openai.BadRequestError) as e:
        _chat(client, messages=[{"role": "user", "content": "word " * 5000}])
    assert "2048" in e.value.body["message"] and e.value.body["code"] == "context_length_exceeded"


def _post(server, body: bytes | str, path="/v1/chat/completions"):
    return httpx.post(server.url + path, content=body, headers={"Authorization": f"Bearer {KEY}",
                                                                "Content-Type": "application/json"})


def _is_openai_error(r: httpx.Response) -> dict:
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


def test_body_over_the_limit_is_413(server):
    r = _post(server, json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x" * 70000}]}))
    assert r.status_code == 413 and "65536" in _is_openai_error(r)["message"]


@pytest.mark.parametrize("body, param", [
    ("{not json", None),
    (json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "ten"}),
     "max_tokens"),
    (json.dumps({"model": "tiny", "messages": "hi"}), "messages"),
    (json.dumps({"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]}), "messages.0.role"),
    (json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": -1}),
     "temperature"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}]}), "model"),
])
def test_malformed_bodies_are_400_in_openai_shape(server, body, param):
    r = _post(server, body)
    assert r.status_code == 400
    err = _is_openai_error(r)
    assert err["type"] == "invalid_request_error"
    if param is not None:
        assert err["param"] == param and param.split(".")[0] in err["message"]


def test_metrics_use_the_contract_names(server, client):
    _chat(client)
    text = httpx.get(server.url + "/metrics").text
    for name in ("adaroute:num_requests_running{arm=", "adaroute:num_requests_waiting{arm=", "adaroute:queue_capacity",
                 "adaroute:prompt_tokens_total{arm=", "adaroute:generation_tokens_total{arm=",
                 "adaroute:time_to_first_token_seconds_bucket{arm=", "adaroute:inter_token_latency_seconds_bucket",
                 "adaroute:e2e_request_latency_seconds_bucket", 'adaroute:request_success_total{arm="dense",'
                 'finished_reason="length"}', 'adaroute:requests_rejected_total{reason="unauthorized"}',
                 "adaroute:request_ffn_density_bucket", "adaroute:units_per_token_bucket",
                 'adaroute:decode_steps_total{path="dense"}'):
        assert name in text, name


def test_every_request_has_an_audit_row_without_the_prompt(server, client):
    r = _chat(client, max_tokens=5)
    rows = wait_rows(server.audit, f"id = '{r.id.split('-', 1)[1]}'")
    assert len(rows) == 1
    row = rows[0]
    assert row["prompt"] is None and len(row["prompt_sha256"]) == 64
    assert (row["arm"], row["completion_tokens"], row["finish_reason"]) == ("dense", 5, "length")
    assert row["key_id"].startswith("key-") and KEY not in row["key_id"]
    assert row["latency_s"] >= row["ttft_s"] > 0 and len(json.loads(row["layer_density"])) == 2


def test_disconnect_mid_stream_is_logged_cancelled(server):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2000, "stream": True,
            "temperature": 0}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        first = next(line for line in r.iter_lines() if line.startswith("data: "))
    request_id = json.loads(first[6:])["id"].split("-", 1)[1]
    rows = wait_rows(server.audit, f"id = '{request_id}'")
    assert rows and rows[0]["finish_reason"] == "cancelled" and rows[0]["completion_tokens"] < 2000
    assert httpx.get(server.url + "/health").json()["running"] == 0  # the slot is free again

