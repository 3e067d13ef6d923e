"""Architecture adapters: where each layer's FFN, attention and norms live.

Everything else in adaroute reaches into a model only through an adapter, so supporting a new
family is one small file that fills in an `ArchAdapter` and registers it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: the adapters are read before torch is needed
    from torch import nn


@dataclass(frozen=True)
class ArchAdapter:
    """Attribute paths for one model family, relative to the model or to one decoder layer.

    Paths are dotted attribute names (``"model.layers"``). ``gate``/``up``/``down`` are relative to the
    MLP module; a family without a gated FFN leaves ``gate`` as ``None``.
    """

    family: str
    model_types: tuple[str, ...]
    layers: str  # on the model: the ModuleList of decoder layers
    mlp: str  # on a layer
    attention: str  # on a layer
    input_norm: str  # on a layer
    post_attention_norm: str  # on a layer
    final_norm: str  # on the model
    embed: str  # on the model
    head: str  # on the model
    up: str  # on the MLP
    down: str  # on the MLP
    gate: str | None = None  # on the MLP
    attn_projections: tuple[str, ...] = ()  # on the attention module, in (q, k, v, o) order

    def layer_list(self, model: nn.Module) -> nn.ModuleList:
        return get_path(model, self.layers)

    def num_layers(self, model: nn.Module) -> int:
        return len(self.layer_list(model))

    def mlp_path(self, i: int) -> str:
        """Full dotted path of layer i's MLP, as `model.get_submodule` takes it."""
        return f"{self.layers}.{i}.{self.mlp}"

    def get_mlp(self, model: nn.Module, i: int) -> nn.Module:
        return get_path(self.layer_list(model)[i], self.mlp)

    def gate_up_down(self, mlp: nn.Module) -> tuple[nn.Linear | None, nn.Linear, nn.Linear]:
        gate = get_path(mlp, self.gate) if self.gate else None
        return gate, get_path(mlp, self.up), get_path(mlp, self.down)

    def get_attention(self, model: nn.Module, i: int) -> nn.Module:
        return get_path(self.layer_list(model)[i], self.attention)

    def attn_linears(self, model: nn.Module, i: int) -> tuple[nn.Linear, ...]:
        attn = self.get_attention(model, i)
        return tuple(get_path(attn, p) for p in self.attn_projections)

    def norms(self, model: nn.Module, i: int) -> tuple[nn.Module, nn.Module]:
        layer = self.layer_list(model)[i]
        return get_path(layer, self.input_norm), get_path(layer, self.post_attention_norm)


def get_path(root: nn.Module, dotted: str) -> nn.Module:
    obj = root
    for name in dotted.split("."):
        obj = getattr(obj, name)
    return obj
