"""The runtime's view of a Llama-family model: plain tensors per layer, no modules, no copies.

Shape letters:
    H  hidden size       F  FFN units          V  vocabulary
    Q  query heads       K  key/value heads    D  head dim

Weights are read through the architecture adapter and shared with the loaded model (views, not
copies), so building an engine costs no memory beyond the KV cache. A layer whose FFN is a routed
module keeps a handle on that module: its policy (threshold, guards) is read at call time.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch
from torch import nn

from adaroute.kernels.reference import Adapter, is_unit_packed
from adaroute.runtime.head import RoutedHead


@dataclass(frozen=True)
class DenseFFN:
    w_gate: torch.Tensor  # [F, H]
    w_up: torch.Tensor  # [F, H]
    w_down: torch.Tensor  # [H, F]


@dataclass(frozen=True)
class RoutedFFN:
    """Tensors in the unit-contiguous layout plus the module that owns the selection policy.

    The three weights are either plain [F, H] tensors or views (row stride 3H) of one [F, 3, H]
    store, a unit's gate row, up row and down column side by side: then a selected unit is one
    contiguous 12H-byte read, which the gather streams better than three scattered rows. Block-quantised
    with the exact router (no shadow), gate and up are g16 [F, H] and ``w_down_t`` holds the down
    projection itself, [H, F] in the g16 layout (``quant_weights.quantise``): every byte is read, the
    unselected units' activations are zero."""

    w_gate: torch.Tensor  # [F, H]
    w_up: torch.Tensor  # [F, H]
    w_down_t: torch.Tensor  # [F, H]
    shadow_q: torch.Tensor  # [2F, H/2] uint8 (no rows: [0, H/2], the exact router or g16 only)
    shadow_scale: torch.Tensor  # [2F, H/G] (likewise [0, H/G])
    unit_bias: torch.Tensor  # [F]
    module: nn.Module
    adapter: Adapter | None = None  # routing adapter: applied by the sparse path only
    # The int4 shadow in the kernels' scoring layout (``kernels.cpu.shadow_g16``), held instead of the
    # rows where the compiled step scores from it alone (``fused_cpu.scoring_layout``); None: rows.
    shadow_g16: torch.Tensor | None = None

    @property
    def int4_shadow(self) -> bool:
        """Whether an int4 shadow scores this layer (in either layout); False: the exact router."""
        return self.shadow_g16 is not None or self.shadow_q.numel() > 0

    def shadow_tensors(self) -> tuple[torch.Tensor, ...]:
        """The shadow as held: (g16,) or (codes, scales)."""
        return (self.shadow_g16,) if self.shadow_g16 is not None else (self.shadow_q, self.shadow_scale)

    def shadow_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The shadow's row layout (codes [2F, H/2], scales [2F, G]), made from the g16 layout when only
        that is held (for the reference and uncompiled paths; the compiled step reads g16)."""
        if self.shadow_g16 is None or self.shadow_q.numel():
            return self.shadow_q, self.shadow_scale
        from adaroute.kernels.cpu import rows_from_g16

        units, hidden = self.w_gate.shape
        return rows_from_g16(self.shadow_g16, units, hidden, self.shadow_scale.shape[1])

    def policy(self) -> tuple[float, int, int]:
        m = self.module
        return float(m.threshold), int(m.min_units), int(m.max_units)

    def expected_density(self) -> float | None:
        """The density the current threshold gives on calibration text, or None without a profile."""
        profile = getattr(self.module, "profile", None)
        return None if profile is None else profile.density_at(float(self.module.threshold))

    @property
    def dense_down(self) -> bool:
        """The down projection is applied whole to the masked activations ([H, F] g16, exact router)."""
        return getattr(self.w_down_t, "layout", None) == "g16"

    @property
    def router_share(self) -> float:
        """Bytes a sparse call reads per token whatever it selects over the FFN's (``cost.router_share``)."""
        from adaroute.runtime.cost import router_share

        return router_share(self)


@dataclass(frozen=True)
class LayerWeights:
    attn_norm: torch.Tensor  # [H]
    wq: torch.Tensor  # [Q*D, H]
    wk: torch.Tensor  # [K*D, H]
    wv: torch.Tensor  # [K*D, H]
    wo: torch.Tensor  # [H, Q*D]
    qkv_bias: torch.Tensor | None  # [(Q+2K)*D] (Qwen2 has one, Llama does not)
    q_norm: torch.Tensor | None  # [D] per-head RMSNorm before RoPE (Qwen3)
    k_norm: torch.Tensor | None  # [D]
    mlp_norm: torch.Tensor  # [H]
    ffn: DenseFFN | RoutedFFN


@dataclass(frozen=True)
class ModelWeights:
    embed: torch.Tensor  # [V, H]
    layers: list[LayerWeights]
    final_norm: torch.Tensor  # [H]
    head: torch.Tensor  # [V, H] (the embedding itself when tied)
    n_heads: int
    n_kv_heads: int
    head_dim: int
    eps: float
    rope_cos: torch.Tensor  # [S, D]
    rope_sin: torch.Tensor  # [S, D]
    routed_head: RoutedHead | None = None  # the head's routed form, used where the FFNs run routed

    @property
    def hidden(self) -> int:
        return self.embed.shape[1]

    @property
    def max_positions(self) -> int:
        return self.rope_cos.shape[0]

    @property
    def routed(self) -> bool:
        return any(isinstance(layer.ffn, RoutedFFN) for layer in self.layers)

    @functools.cached_property
    def _policy_holders(self) -> list:
        return [ly.ffn.module for ly in self.layers if isinstance(ly.ffn, RoutedFFN)]

    def policies_key(self) -> list:
        """The routed layers' current policies (threshold, min_units, max_units) as one comparable value,
        for caches of what follows from them. Read on every decode step, so plain attribute loads
        (``RoutedFFN.policy`` per layer took ~40 us of a step after the weights had streamed through)."""
        return [(m.threshold, m.min_units, m.max_units) for m in self._policy_holders]

    def weight_bytes(self, density: float | None = None, routed_head: bool | None = None) -> dict[str, int]:
        """Bytes of weights read to decode one token, by part; routed FFNs sparse at ``density`` (router
        included) or, with None, dense (router not read). Counted by ``adaroute.runtime.cost``."""
        from adaroute.runtime.cost import weight_bytes

        return weight_bytes(self, density, routed_head)


def is_routed_mlp(mlp: nn.Module) -> bool:
    """Duck-typed: anything with the routed layout and a router (see adaroute.routing.RoutedMLP)."""
    return hasattr(mlp, "w_down_t") and hasattr(mlp, "router") and hasattr(mlp, "threshold")


def from_model(model: nn.Module, max_positions: int | None = None) -> ModelWeights:
    """Collect a loaded transformers Llama-family model's weights (shared, float32, contiguous)."""
    from adaroute.models import adapter_for  # noqa: PLC0415 (models pulls in transformers)

    if getattr(model, "adaroute_blocks", None) is not None:
        raise ValueError("model: it was loaded from a directory stored as blocks; build its weights with "
                         "adaroute.runtime.formats.runtime_weights, which reads the blocks")
    adapter = adapter_for(model)
    cfg = model.config
    n_heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    layers = [_layer(adapter, model, i) for i in range(adapter.num_layers(model))]
    embed = _t(_path(model, adapter.embed).weight)
    head = _t(_path(model, adapter.head).weight)
    limit = max_positions or cfg.max_position_embeddings
    cos, sin = _rope_table(model, limit, head_dim)
    return ModelWeights(embed=embed, layers=layers, final_norm=_t(_path(model, adapter.final_norm).weight),
                        head=head, n_heads=n_heads, n_kv_heads=getattr(cfg, "num_key_value_heads", n_heads),
                        head_dim=head_dim, eps=float(cfg.rms_norm_eps), rope_cos=cos, rope_sin=sin)


def _layer(adapter, model: nn.Module, i: int) -> LayerWeights:
    q, k, v, o = adapter.attn_linears(model, i)
    attn_norm, mlp_norm = adapter.norms(model, i)
    attn = adapter.get_attention(model, i)
    q_norm, k_norm = (getattr(attn, name, None) for name in ("q_norm", "k_norm"))
    biases = [lin.bias for lin in (q, k, v)]
    qkv_bias = torch.cat([_t(b) for b in biases]) if all(b is not None for b in biases) else None
    if o.bias is not None:
        raise ValueError(f"layer {i}: an output projection with a bias is not supported by the runtime")
    return LayerWeights(attn_norm=_t(attn_norm.weight), wq=_t(q.weight), wk=_t(k.weight), wv=_t(v.weight),
                        wo=_t(o.weight), qkv_bias=qkv_bias, q_norm=_opt(q_norm), k_norm=_opt(k_norm),
                        mlp_norm=_t(mlp_norm.weight),
                        ffn=_ffn(adapter, adapter.get_mlp(model, i)))


def _ffn(adapter, mlp: nn.Module) -> DenseFFN | RoutedFFN:
    if is_routed_mlp(mlp):
        r = mlp.router
        a = getattr(mlp, "adapter", None)
        adapter = None if a is None else Adapter(*(_t(p) for p in a.tensors()))
        return RoutedFFN(*unit_weights(mlp.w_gate, mlp.w_up, mlp.w_down_t), _t(r.shadow_q), _t(r.shadow_scale),
                         _t(r.unit_bias), mlp, adapter)
    gate, up, down = adapter.gate_up_down(mlp)
    if gate is None:
        raise ValueError("the runtime needs a gated (SwiGLU) FFN")
    return DenseFFN(_t(gate.weight), _t(up.weight), _t(down.weight))


def original_layout(w: ModelWeights) -> ModelWeights:
    """``w`` as the dense model it came from: every float32 routed FFN as a ``DenseFFN`` (contiguous
    copies of its gate, up and down weights, the same values) and the exact head. The baseline a
    routed model is measured against: the routed model's own dense path (every unit of the unit-packed
    layout) streams ~13 % slower than the dense GEMVs (docs/perf.md, item 27). Quantised FFNs are
    already in the dense layout and stay shared."""
    layers = []
    for ly in w.layers:
        f = ly.ffn
        if isinstance(f, RoutedFFN) and isinstance(f.w_gate, torch.Tensor) and f.w_gate.dtype == torch.float32:
            ly = replace(ly, ffn=DenseFFN(f.w_gate.contiguous(), f.w_up.contiguous(), f.w_down_t.t().contiguous()))
        layers.append(ly)
    return replace(w, layers=layers, routed_head=None)


def unit_weights(w_gate: torch.Tensor, w_up: torch.Tensor, w_down_t: torch.Tensor):
    """The routed weights for the kernels: views of a float32 [F, 3, H] store stay views (the
    kernels take the 3H row stride), anything else becomes contiguous [F, H] tensors."""
    ws = [w.detach() for w in (w_gate, w_up, w_down_t)]
    if ws[0].dtype == torch.float32 and is_unit_packed(*ws):
        return tuple(ws)
    return tuple(_t(w) for w in ws)


def _t(p: torch.Tensor) -> torch.Tensor:
    """A detached contiguous view (a copy only when the storage is not contiguous or not float32/uint8)."""
    t = p.detach()
    if t.dtype not in (torch.float32, torch.uint8):
        t = t.float()
    return t.contiguous()


def _opt(norm: nn.Module | None) -> torch.Tensor | None:
    return None if norm is None else _t(norm.weight)


def _path(model: nn.Module, dotted: str):
    obj = model
    for name in dotted.split("."):
        obj = getattr(obj, name)
    return obj


@torch.no_grad()
def _rope_table(model: nn.Module, positions: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [S, D] from the model's own rotary module, so every RoPE scaling variant is honoured."""
    rotary = model.model.rotary_emb
    device = rotary.inv_freq.device if hasattr(rotary, "inv_freq") else None
    pos = torch.arange(positions, device=device).unsqueeze(0)  # [1, S]
    probe = torch.zeros(1, 1, head_dim, dtype=torch.float32, device=device)
    cos, sin = rotary(probe, pos)  # [1, S, D]
    return cos[0].float().contiguous(), sin[0].float().contiguous()


def rope_for_config(cfg, positions: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``_rope_table`` from a transformers config alone: the family's own rotary module built from it
    (for weights read from files, with no model)."""
    import importlib
    from types import SimpleNamespace

    module = importlib.import_module(f"transformers.models.{cfg.model_type}.modeling_{cfg.model_type}")
    rotary = next(getattr(module, n) for n in dir(module) if n.endswith("RotaryEmbedding"))
    return _rope_table(SimpleNamespace(model=SimpleNamespace(rotary_emb=rotary(cfg))), positions, head_dim)
