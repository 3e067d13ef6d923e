"""Integration on the embedded model (slow): a small conversion routes it well on held-out text."""

import pytest
import torch

from adaroute.config import RoutingConfig, TrainConfig

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from adaroute.convert import convert

    torch.set_num_threads(2)
    train = TrainConfig(calib_tokens=2048, window=256, ranking_steps=0, sensitivity_tokens=512)
    out = tmp_path_factory.mktemp("routed")
    return convert("smollm2-135m", ["builtin:calib"], output=out, train=train, routing=RoutingConfig(density=0.5))


def test_routed_embedded_model_stays_close_to_dense(converted):
    from adaroute.data import load_text
    from adaroute.routing.quality import compare_with_dense

    text = load_text("builtin:heldout").text
    r = compare_with_dense(converted.model, converted.tokenizer, text, window=256, max_tokens=1024)
    assert abs(r["mean_density"] - 0.5) < 0.05
    assert r["perplexity_ratio"] < 1.15
    assert r["ffn_bytes_share"] < 0.65
    assert r["units_per_token"]["p90"] > r["units_per_token"]["p10"]


def test_routed_directory_loads_with_the_same_logits(converted):
    from adaroute import load_model

    model, tok = load_model(str(converted.directory))
    ids = tok("The quick brown fox", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, converted.model(ids).logits)
