"""The model a server answers with: one copy of the weights, one engine per arm, its identity.

Arms: ``dense`` and, for a routed model, ``routed``. Both engines read the same ``ModelWeights``;
the dense arm's execution policy keeps every routed layer at its unit-packed dense FFN, so a routed
directory serves its own dense baseline without a second copy in memory.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from adaroute.runtime import Engine, ExecutionPolicy, chat_prompt_ids, stop_tokens_for
from adaroute.runtime.formats import runtime_weights

ARMS = ("dense", "routed")


@dataclass(frozen=True)
class ModelIdentity:
    """What the audit log records about the model that answered."""

    name: str  # the name clients send as "model"
    base_model: str
    routed_hash: str | None  # SHA-256 of the routed directory's config.json and weights
    format_version: int | None


class ServedModel:
    def __init__(self, model: nn.Module | None, tokenizer, name: str, context: int | None = None,
                 source: Path | None = None, aliases: tuple[str, ...] = (), weights=None,
                 stop_tokens: frozenset[int] = frozenset()):
        """``model``: a loaded model, whose weights the engines run (in its stored format); or None with
        ``weights`` (``ModelWeights``) and the model's own end-of-sequence ids in ``stop_tokens``."""
        self.model, self.tokenizer, self.name, self.aliases = model, tokenizer, name, aliases
        if weights is None:
            weights = runtime_weights(model, None)  # a directory of blocks serves its blocks
        self.context = min(context or weights.max_positions, weights.max_positions)
        self.engines = {"dense": Engine(weights, policy=ExecutionPolicy.always_dense())}
        if weights.routed:
            self.engines["routed"] = Engine(weights)
            self.engines["routed"].start_unit_usage()  # for the metrics' per-layer unit-use imbalance
        self.stop_tokens = stop_tokens_for(tokenizer, model) | set(stop_tokens)
        self.identity = _identity(model, name, source, weights.routed)

    @classmethod
    def from_directory(cls, directory: Path, name: str, context: int | None = None,
                       aliases: tuple[str, ...] = ()) -> ServedModel:
        """A routed directory served from its files alone (``runtime.checkpoint.load_weights``): no
        transformers model is built, so a q4 directory holds about its blocks' size in memory (loaded
        as a model it would hold its weights dequantised to float32 as well)."""
        from adaroute.models.loading import offline
        from adaroute.routing.storage import check_tokenizer, load_tokenizer, read_meta
        from adaroute.runtime.checkpoint import load_weights

        meta = read_meta(directory)
        check_tokenizer(directory)
        with offline():
            tokenizer = load_tokenizer(directory)
        eos = meta["base_config"].get("eos_token_id")  # what the model's generation config would hold
        stops = frozenset([eos] if isinstance(eos, int) else eos or [])
        return cls(None, tokenizer, name, context, directory, aliases, load_weights(directory), stops)

    @property
    def arms(self) -> tuple[str, ...]:
        return tuple(self.engines)

    def chat_ids(self, messages: list[dict]) -> list[int]:
        return chat_prompt_ids(self.tokenizer, messages)

    def text_ids(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt).input_ids)


def _identity(model: nn.Module | None, name: str, source: Path | None, routed: bool) -> ModelIdentity:
    meta = getattr(getattr(model, "config", None), "adaroute", None) or {}
    if routed and source is not None and source.is_dir():
        meta = json.loads((source / "config.json").read_text()).get("adaroute", meta)
        return ModelIdentity(name, str(meta.get("base_model", name)), _hash_dir(source), meta.get("format_version"))
    return ModelIdentity(name, name, None, None)


def _hash_dir(directory: Path) -> str:
    """SHA-256 over config.json and model.safetensors (streamed; ~1 s for the embedded model)."""
    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors"):
        path = directory / name
        if path.is_file():
            with path.open("rb") as f:
                while chunk := f.read(1 << 22):
                    h.update(chunk)
    return h.hexdigest()
