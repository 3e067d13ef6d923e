import math

import pytest
import torch

from adaroute import AdarouteError
from adaroute.eval.perplexity import check_window, perplexity, tokenize, windows
from tests.fixtures import make_tiny_llama, make_tiny_tokenizer

TEXT = "The quick brown fox jumps over the lazy dog. " * 30


def _hf_reference_ppl(model, ids, window):
    """transformers' own loss per window, weighted by scored tokens."""
    nll, scored = 0.0, 0
    with torch.no_grad():
        for w in ids.split(window):
            if w.numel() < 2:
                continue
            loss = model(input_ids=w[None], labels=w[None]).loss.item()
            nll += loss * (w.numel() - 1)
            scored += w.numel() - 1
    return math.exp(nll / scored), scored


def test_windows_are_non_overlapping_and_keep_the_remainder():
    ids = torch.arange(10)
    assert [w.tolist() for w in windows(ids, 4)] == [[[0, 1, 2, 3]], [[4, 5, 6, 7]], [[8, 9]]]
    assert len(windows(torch.arange(9), 4)) == 2  # a 1-token remainder scores nothing


@pytest.mark.parametrize("window", [16, 37, 128])
def test_matches_transformers_loss(window):
    model, tok = make_tiny_llama(seed=1), make_tiny_tokenizer()
    r = perplexity(model, tok, TEXT, window=window)
    ref, scored = _hf_reference_ppl(model, tokenize(tok, TEXT), window)
    assert r.tokens == scored
    assert r.perplexity == pytest.approx(ref, rel=1e-5)


def test_max_tokens_caps_the_text():
    model, tok = make_tiny_llama(), make_tiny_tokenizer()
    r = perplexity(model, tok, TEXT, window=32, max_tokens=70)
    assert r.tokens == 31 + 31 + 5 and r.windows == 3


def test_window_checks():
    model = make_tiny_llama()
    with pytest.raises(AdarouteError, match="larger than the model's context \\(256\\)"):
        check_window(model, 257)
    with pytest.raises(AdarouteError, match="too small"):
        check_window(model, 1)


def test_text_too_short():
    with pytest.raises(AdarouteError, match="too short"):
        tokenize(make_tiny_tokenizer(), "a")


@pytest.mark.parametrize("max_tokens", [2, 37, 500, 5000])
def test_bounded_tokenisation_equals_the_whole_texts_prefix(max_tokens):
    """--max-tokens tokenises only a prefix of the text, with the same ids as the whole text's start."""
    from pydoc_data.topics import topics

    tok = make_tiny_tokenizer()
    text = "\n\n".join(topics[k] for k in sorted(topics)[:40])
    whole = tok(text, add_special_tokens=False)["input_ids"]
    assert tokenize(tok, text, max_tokens).tolist() == whole[:max_tokens]
    one_line = "word " * 4_000_000  # 20 MB on one line: only a prefix is tokenised
    assert tokenize(tok, one_line, 64).tolist() == tok("word " * 100, add_special_tokens=False)["input_ids"][:64]
