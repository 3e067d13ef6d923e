"""Model loading and architecture adapters."""

from __future__ import annotations

from adaroute.models.adapters import ArchAdapter, adapter_for, supported_model_types
from adaroute.models.loading import (
    ALIASES,
    ModelInfo,
    ModelSource,
    inspect_model,
    load_dense,
    offline,
    read_config,
    resolve,
)


def load_model(spec: str):
    """Load `spec` → (model, tokenizer).

    `spec` is a Hugging Face model directory, a `.gguf` file, a directory holding one `.gguf`, a routed
    model directory written by `adaroute convert`, or an alias (`smollm2-135m`, the embedded default).
    The model is float32 and in eval mode. Bad specs raise `AdarouteError` with a one-line message.
    """
    source = resolve(spec)
    if is_routed(source):
        from adaroute.routing.storage import load_routed

        with offline():
            return load_routed(source.directory)
    return load_dense(source)


def is_routed(source: ModelSource) -> bool:
    return "adaroute" in read_config(source)


__all__ = [
    "ALIASES",
    "ArchAdapter",
    "ModelInfo",
    "ModelSource",
    "adapter_for",
    "inspect_model",
    "is_routed",
    "load_model",
    "resolve",
    "supported_model_types",
]
