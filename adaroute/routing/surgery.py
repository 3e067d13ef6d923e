"""Module surgery: swap each layer's dense FFN for a RoutedMLP, and undo it.

One chain, as in peft: match (adapter says where the FFN lives) -> parent -> build -> replace.
The original module is kept on the routed one (``original``, outside the module tree, so it is not
saved or moved twice) so ``unroute`` restores exactly the object that was there.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from adaroute.models import adapter_for
from adaroute.routing.routed_mlp import RoutedMLP


def route_model(model: nn.Module, group_size: int = 32, layers: Iterable[int] | None = None) -> list[RoutedMLP]:
    """Replace the FFN of each layer in ``layers`` (default: all) by a dense-policy RoutedMLP.

    Returns the new modules in layer order. Raises ``ValueError`` when nothing matched or a layer
    is already routed.
    """
    adapter = adapter_for(model)
    act_name = getattr(model.config, "hidden_act", "silu")
    indices = list(range(adapter.num_layers(model))) if layers is None else list(layers)
    if not indices:
        raise ValueError("layers: no layers selected for routing")
    return [_swap_one(model, adapter, i, act_name, group_size) for i in indices]


def _swap_one(model: nn.Module, adapter, i: int, act_name: str, group_size: int) -> RoutedMLP:
    from transformers.activations import ACT2FN

    path = adapter.mlp_path(i)
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path)
    dense = getattr(parent, child)
    if isinstance(dense, RoutedMLP):
        raise ValueError(f"layers: layer {i} ({path}) is already routed")
    gate, up, down = adapter.gate_up_down(dense)
    if gate is None:
        raise ValueError(f"model: layer {i} has no gated FFN; the router needs gate and up projections")
    routed = RoutedMLP.from_linears(gate, up, down, ACT2FN[act_name], i, group_size)
    routed.to(device=gate.weight.device)
    object.__setattr__(routed, "original", dense)  # not a submodule: kept only for undo
    setattr(parent, child, routed)
    return routed


def unroute_model(model: nn.Module) -> int:
    """Put every original FFN back. Returns how many were restored; raises if none were routed."""
    restored = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, RoutedMLP):
            original = getattr(module, "original", None)
            if original is None:
                raise ValueError(f"model: {name} was loaded routed and has no original module to restore")
            parent_path, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_path), child, original)
            restored += 1
    if restored == 0:
        raise ValueError("model: no routed modules to undo")
    return restored


def routed_modules(model: nn.Module) -> list[RoutedMLP]:
    """The model's RoutedMLPs in layer order."""
    mods = sorted((m for m in model.modules() if isinstance(m, RoutedMLP)), key=lambda m: m.layer_idx)
    if not mods:
        raise ValueError("model: it has no routed layers; convert it first")
    return mods
