import math
from types import SimpleNamespace

import pytest
import torch

from adaroute import AdarouteError
from adaroute.eval.perplexity import check_window, perplexity, start_token, tokenize, windows
from tests.fixtures import make_tiny_llama, make_tiny_tokenizer

TEXT = "The quick brown fox jumps over the lazy dog. " * 30


def _hf_reference_ppl(model, ids, window, start=None):
    """transformers' own loss per window, weighted by scored tokens; with ``start``, each window is that
    token and the next window - 1 ids."""
    nll, scored = 0.0, 0
    with torch.no_grad():
        for chunk in ids.split(window if start is None else window - 1):
            w = chunk if start is None else torch.cat([torch.tensor([start]), chunk])
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
    # with a start token every window begins with it and every id is scored once
    assert [w.tolist() for w in windows(ids, 4, start=99)] == [[[99, 0, 1, 2]], [[99, 3, 4, 5]], [[99, 6, 7, 8]],
                                                                [[99, 9]]]


@pytest.mark.parametrize("window", [16, 37, 128])
@pytest.mark.parametrize("start", [True, False])
def test_matches_transformers_loss(window, start):
    model, tok = make_tiny_llama(seed=1), make_tiny_tokenizer()
    r = perplexity(model, tok, TEXT, window=window, start=start)
    ids = tokenize(tok, TEXT)
    ref, scored = _hf_reference_ppl(model, ids, window, tok.bos_token_id if start else None)
    assert r.tokens == scored == (len(ids) if start else scored)
    assert r.perplexity == pytest.approx(ref, rel=1e-5)


def test_max_tokens_caps_the_text():
    model, tok = make_tiny_llama(), make_tiny_tokenizer()
    r = perplexity(model, tok, TEXT, window=32, max_tokens=70, start=False)
    assert r.tokens == 31 + 31 + 5 and r.windows == 3
    r = perplexity(model, tok, TEXT, window=32, max_tokens=70)  # 31 + 31 + 8 ids, each after the start token
    assert r.tokens == 70 and r.windows == 3


def test_start_token_is_bos_else_eos_else_a_one_line_error():
    tok = make_tiny_tokenizer()
    assert start_token(tok) == tok.bos_token_id
    no_bos = SimpleNamespace(bos_token_id=None, eos_token_id=7)
    assert start_token(no_bos) == 7
    with pytest.raises(AdarouteError, match="--no-start"):
        start_token(SimpleNamespace(bos_token_id=None, eos_token_id=None))


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
