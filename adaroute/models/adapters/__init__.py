"""Registry of architecture adapters, keyed by Hugging Face `model_type`.

To add a family: write one file that defines an `ArchAdapter` and add it to `_ADAPTERS`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: the adapters are read before torch is needed
    from torch import nn

from adaroute.errors import AdarouteError
from adaroute.models.adapters.base import ArchAdapter, get_path
from adaroute.models.adapters.llama import LLAMA

_ADAPTERS: tuple[ArchAdapter, ...] = (LLAMA,)
_BY_TYPE = {t: a for a in _ADAPTERS for t in a.model_types}


def supported_model_types() -> list[str]:
    return sorted(_BY_TYPE)


def adapter_for(model_or_type: nn.Module | str) -> ArchAdapter:
    """The adapter for a model (or a `model_type` string); a clear error for unsupported families."""
    if isinstance(model_or_type, str):
        model_type = model_or_type
    else:
        model_type = getattr(getattr(model_or_type, "config", None), "model_type", None)
    if model_type not in _BY_TYPE:
        raise AdarouteError(
            f"unsupported architecture {model_type!r}: adaroute supports {', '.join(supported_model_types())}"
        )
    return _BY_TYPE[model_type]


__all__ = ["ArchAdapter", "adapter_for", "get_path", "supported_model_types"]
