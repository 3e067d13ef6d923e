from pydoc_data.topics import topics

import pytest
import torch

from adaroute.errors import AdarouteError
from adaroute.training import capture
from adaroute.training.capture import token_windows
from tests.fixtures import make_tiny_tokenizer

TOK = make_tiny_tokenizer()
LONG = topics["class"] + topics["assignment"] + topics["import"]  # ~15k tokens with the tiny tokenizer
SHORT = topics["lambda"]  # ~330


def ids(text: str) -> list[int]:
    return TOK(text, add_special_tokens=False)["input_ids"]


def test_one_text_gives_its_first_tokens():
    w = token_windows(TOK, [LONG], 32, 8 * 32 + 5)
    assert torch.equal(w, torch.tensor(ids(LONG)[: 8 * 32]).reshape(8, 32))


def test_every_text_gives_a_share_in_proportion_to_its_length():
    first, second = ids(LONG), ids(SHORT)
    budget = 64 * 32
    w = token_windows(TOK, [LONG, SHORT], 32, budget).flatten().tolist()
    k1 = budget * len(first) // (len(first) + len(second))
    k2 = budget * len(second) // (len(first) + len(second))
    assert k2 > 32  # the second text's share is over a window
    kept = (first[:k1] + second[:k2])[: len(w)]
    assert w == kept
    assert len(w) == (k1 + k2) // 32 * 32


def test_all_tokens_when_the_texts_hold_fewer_than_the_budget():
    both = ids(SHORT) + ids(LONG)
    w = token_windows(TOK, [SHORT, LONG], 64, 10**6)
    assert torch.equal(w.flatten(), torch.tensor(both[: len(both) // 64 * 64]))


def test_a_very_long_text_is_read_from_its_start_only(monkeypatch):
    monkeypatch.setattr(capture, "CHARS_PER_TOKEN_CAP", 4)  # cap = 4 characters per wanted token
    text = "".join(f"alpha{i:05d} " for i in range(3000))  # 36k characters
    seen = []

    class Counting:
        def __call__(self, t, **kw):
            seen.append(len(t))
            return TOK(t, **kw)

    w = token_windows(Counting(), [text, SHORT], 16, 1000)
    assert seen == [4000, len(SHORT)]
    assert w.shape[1] == 16 and w.numel() <= 1000
    head = ids(text[:4000])
    assert w.flatten().tolist()[:64] == head[:64]


def test_too_little_text_is_a_one_line_error():
    with pytest.raises(AdarouteError, match="fewer than one window"):
        token_windows(TOK, ["a b"], 64, 1024)


def test_windows_begin_with_the_start_token_when_given():
    text_ids = ids(LONG)
    w = token_windows(TOK, [LONG], 32, 4 * 31, start=TOK.bos_token_id)  # 4 windows of the start token + 31
    assert w.shape == (4, 32)
    assert (w[:, 0] == TOK.bos_token_id).all()
    assert w[:, 1:].flatten().tolist() == text_ids[: 4 * 31]
