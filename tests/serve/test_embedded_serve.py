"""The server on the embedded model: answers as the runtime does, alone and joining a running batch."""

from __future__ import annotations

import threading

import pytest

from adaroute.generate import generate
from tests.serve.conftest import ServerProcess
from tests.serve.test_process import _chat_body, _stream_lines

QUESTION = "What is the capital of France?"


@pytest.mark.slow
def test_embedded_model_answers_like_the_runtime_alone_and_in_a_batch(embedded):
    model, tokenizer = embedded
    expected = generate(model, tokenizer, QUESTION, max_new_tokens=24)
    server = ServerProcess("smollm2-135m")
    try:
        ask = {**_chat_body(QUESTION, 24, stream=False), "model": "smollm2-135m"}
        alone = server.client().chat.completions.create(**ask)
        assert alone.choices[0].message.content.strip() == expected
        lines, started = [], threading.Event()
        body = {**_chat_body("Write a long story about a dragon.", 200), "model": "smollm2-135m"}
        t = threading.Thread(target=_stream_lines, args=(server.url, body, lines, started))
        t.start()
        assert started.wait(60)
        joined = server.client().chat.completions.create(**ask)
        t.join(300)
        assert joined.choices[0].message.content == alone.choices[0].message.content
        assert lines[-1] == "[DONE]" and len(lines) > 30  # the story was decoding while the question joined
    finally:
        server.stop()
