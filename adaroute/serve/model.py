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
    def __init__(self, model: nn.Module, tokenizer, name: str, context: int | None = None, source: Path | None = None,
                 aliases: tuple[str, ...] = ()):
        self.model, self.tokenizer, self.name, self.aliases = model, tokenizer, name, aliases
        weights = runtime_weights(model, None)  # a directory of blocks serves its blocks
        self.context = min(context or weights.max_positions, weights.max_positions)
        self.engines = {"dense": Engine(weights, policy=ExecutionPolicy.always_dense())}
        if weights.routed:
            self.engines["routed"] = Engine(weights)
            self.engines["routed"].start_unit_usage()  # for the metrics' per-layer unit-use imbalance
        self.stop_tokens = stop_tokens_for(tokenizer, model)
        self.identity = _identity(model, name, source, weights.routed)

    @property
    def arms(self) -> tuple[str, ...]:
        return tuple(self.engines)

    def chat_ids(self, messages: list[dict]) -> list[int]:
        return chat_prompt_ids(self.tokenizer, messages)

    def text_ids(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt).input_ids)


def _identity(model: nn.Module, name: str, source: Path | None, routed: bool) -> ModelIdentity:
    meta = getattr(model.config, "adaroute", None) or {}
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
