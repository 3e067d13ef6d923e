"""Integration tests on the embedded default model."""

import json
import math

import pytest
import torch

from adaroute.cli import main
from adaroute.data import load_text
from adaroute.eval.perplexity import perplexity, tokenize
from adaroute.generate import generate

pytestmark = pytest.mark.slow


def test_embedded_model_shape(embedded):
    model, tok = embedded
    assert model.config.num_hidden_layers == 30 and model.config.intermediate_size == 1536
    assert tok.chat_template


def test_heldout_perplexity_is_sane(embedded):
    model, tok = embedded
    r = perplexity(model, tok, load_text("builtin:heldout").text, window=512, max_tokens=2048)
    assert math.isfinite(r.perplexity) and 3 < r.perplexity < 40


def test_greedy_generation_is_deterministic(embedded):
    model, tok = embedded
    a = generate(model, tok, "What is the capital of France?", max_new_tokens=12)
    assert a == generate(model, tok, "What is the capital of France?", max_new_tokens=12)
    assert "Paris" in a


def test_eval_cli_agrees_with_transformers_loss(embedded, tmp_path):
    model, tok = embedded
    text = load_text("builtin:heldout").text[:6000]
    (tmp_path / "some.txt").write_text(text)
    out = tmp_path / "out.json"
    assert main(["eval", "smollm2-135m", "--data", str(tmp_path / "some.txt"), "--window", "256",
                 "--json", str(out)]) == 0
    got = json.loads(out.read_text())["total"]
    nll, n = 0.0, 0
    with torch.no_grad():  # each window: the start token (BOS) and the next 255 text tokens
        for chunk in tokenize(tok, text).split(255):
            w = torch.cat([torch.tensor([tok.bos_token_id]), chunk])
            nll += model(input_ids=w[None], labels=w[None]).loss.item() * (w.numel() - 1)
            n += w.numel() - 1
    assert got["tokens"] == n
    assert got["perplexity"] == pytest.approx(math.exp(nll / n), rel=0.01)
