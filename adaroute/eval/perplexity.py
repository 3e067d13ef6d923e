"""Perplexity over non-overlapping windows.

Protocol (identical for dense and routed models, so their numbers compare):
1. The text is tokenized once without special tokens; `max_tokens` keeps the first N tokens.
2. Each window is the model's start token followed by the next `window` - 1 text tokens (the
   windows do not overlap; a trailing remainder of at least one token is a last, shorter window).
   The start token is the tokenizer's BOS, else its EOS, as lm-eval-harness conditions rolling
   perplexity; it is what a served request begins with (the chat template's first token), and it
   gives the model its attention sink. Without it (`start=False`, `adaroute eval --no-start`) a
   window is scored cold from its first text token, which is then not scored itself: when that
   token cannot serve as a sink (a text starting with `![`, say) the dense model's own perplexity
   on the window can be tens of times its usual, and every comparison on it is noise.
3. Each window is one forward pass with no cache and no context from earlier windows; every token
   after the window's first (with the start token: every text token) is scored by the cross-entropy
   of its prediction from the tokens before it.
4. perplexity = exp(total negative log-likelihood / total scored tokens). `tokens` in results is
   the number of scored tokens (window length - 1, summed).
Per window this is transformers' own `model(ids, labels=ids).loss`, weighted by scored tokens.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from adaroute.errors import AdarouteError

PREFIX_MARGIN = 64  # tokens past --max-tokens before a prefix cut is trusted not to change the ids


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    nll: float  # summed over scored tokens, nats
    tokens: int  # scored tokens
    windows: int
    seconds: float

    def merge(self, other: PerplexityResult) -> PerplexityResult:
        nll, tokens = self.nll + other.nll, self.tokens + other.tokens
        return PerplexityResult(
            math.exp(nll / tokens), nll, tokens, self.windows + other.windows, self.seconds + other.seconds
        )


def context_length(model: nn.Module) -> int:
    return int(getattr(model.config, "max_position_embeddings", 0) or 0)


def check_window(model: nn.Module, window: int) -> None:
    check_window_fits(window, context_length(model))


def check_window_fits(window: int, limit: int | None) -> None:
    """--window against the model's context (None or 0: unknown, not checked)."""
    if window < 2:
        raise AdarouteError(f"--window {window} is too small: use at least 2 tokens")
    if limit and window > limit:
        raise AdarouteError(
            f"--window {window} is larger than the model's context ({limit}): use --window {limit} or less"
        )


def tokenize(tokenizer, text: str, max_tokens: int | None = None) -> torch.Tensor:
    """[N] token ids of `text` (no special tokens), cut to `max_tokens`.

    With `max_tokens`, only a prefix of the text is tokenised (a 20 MB file must not cost a minute
    for 64 tokens): the prefix grows until it yields a margin of tokens past `max_tokens`, and is cut
    at white space, so the first `max_tokens` ids equal those of the whole text.
    """
    ids = _token_ids(tokenizer, text, max_tokens)
    if len(ids) < 2:
        raise AdarouteError("the text is too short to score: it needs at least 2 tokens")
    return torch.tensor(ids, dtype=torch.long)


def _token_ids(tokenizer, text: str, max_tokens: int | None) -> list[int]:
    def encode(t: str) -> list[int]:
        return tokenizer(t, add_special_tokens=False, return_attention_mask=False)["input_ids"]

    if max_tokens is None:
        return encode(text)
    chars = 8 * (max_tokens + PREFIX_MARGIN)
    while chars < len(text):
        cut = max(text.rfind(" ", 0, chars), text.rfind("\n", 0, chars))
        ids = encode(text[:cut if cut > chars // 2 else chars])
        if len(ids) >= max_tokens + PREFIX_MARGIN:
            return ids[:max_tokens]
        chars *= 2
    return encode(text)[:max_tokens]


def windows(ids: torch.Tensor, window: int, start: int | None = None) -> list[torch.Tensor]:
    """Non-overlapping [1, W] windows of `ids` [N]. With `start`, each is that token followed by the
    next W - 1 ids (a trailing remainder of ≥ 1 id is kept); without, W ids each (a remainder of
    ≥ 2 is kept)."""
    if start is None:
        return [w.unsqueeze(0) for w in ids.split(window) if w.numel() >= 2]
    head = torch.tensor([start], dtype=ids.dtype)
    return [torch.cat([head, w]).unsqueeze(0) for w in ids.split(window - 1)]


def start_id(tokenizer) -> int | None:
    """The tokenizer's BOS, else its EOS, else None: what a window (or a calibration window) begins with."""
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return None


def start_token(tokenizer) -> int:
    """The token every window starts with (``start_id``); a one-line error when there is none."""
    tid = start_id(tokenizer)
    if tid is not None:
        return tid
    raise AdarouteError("the tokenizer has neither a BOS nor an EOS token to start windows with: "
                        "pass --no-start to score windows from their first token")


def text_windows(tokenizer, text: str, window: int, max_tokens: int | None = None,
                 start: bool = True) -> list[torch.Tensor]:
    """The [1, W] windows of `text` under this module's protocol (with or without the start token)."""
    return windows(tokenize(tokenizer, text, max_tokens), window, start_token(tokenizer) if start else None)


def window_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL of one window: logits [1, W, V], ids [1, W] → scalar."""
    return F.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="sum")


@torch.inference_mode()
def iter_logits(model: nn.Module, wins: list[torch.Tensor], desc: str = "") -> Iterator[tuple[torch.Tensor, ...]]:
    """Yield (ids [1, W], logits [1, W, V]) for each window, with a progress bar."""
    for w in tqdm(wins, desc=desc or "windows", unit="win", leave=False):
        yield w, model(input_ids=w, use_cache=False).logits


def perplexity(model: nn.Module, tokenizer, text: str, window: int = 512, max_tokens: int | None = None,
               desc: str = "", start: bool = True) -> PerplexityResult:
    """Perplexity of `model` on `text` under the protocol in this module's docstring."""
    check_window(model, window)
    t0, nll, scored = time.perf_counter(), 0.0, 0  # the time includes tokenisation
    wins = text_windows(tokenizer, text, window, max_tokens, start)
    for w, logits in iter_logits(model, wins, desc):
        nll += window_nll(logits, w).item()
        scored += w.shape[1] - 1
    return PerplexityResult(math.exp(nll / scored), nll, scored, len(wins), time.perf_counter() - t0)


@torch.inference_mode()
def iter_runtime_logits(engine, wins: list[torch.Tensor], desc: str = "") -> Iterator[tuple[torch.Tensor, ...]]:
    """Like ``iter_logits``, with the runtime ``engine`` (adaroute.runtime.Engine) computing each
    window in one forward call from an empty cache: (ids [1, W], logits [1, W, V])."""
    for w in tqdm(wins, desc=desc or "windows", unit="win", leave=False):
        yield w, engine.forward(w, engine.new_cache(1, w.shape[1]), all_logits=True)


def runtime_perplexity(weights, tokenizer, text: str, window: int = 512, max_tokens: int | None = None,
                       desc: str = "", kernel: str | None = None, start: bool = True) -> PerplexityResult:
    """Perplexity computed by the runtime engine on ``weights`` (a ``ModelWeights`` at any format,
    ``adaroute.runtime.formats.runtime_weights``), every FFN dense, under this module's protocol."""
    from adaroute.runtime import Engine, ExecutionPolicy

    engine = Engine(weights, kernel=kernel, policy=ExecutionPolicy.always_dense())
    check_window_fits(window, weights.max_positions)
    t0, nll, scored = time.perf_counter(), 0.0, 0
    wins = text_windows(tokenizer, text, window, max_tokens, start)
    for w, logits in iter_runtime_logits(engine, wins, desc):
        nll += window_nll(logits, w).item()
        scored += w.shape[1] - 1
    return PerplexityResult(math.exp(nll / scored), nll, scored, len(wins), time.perf_counter() - t0)
