"""The decode engine: one forward step of a Llama-family model over the KV cache.

Shape letters:
    B  sequences    T  new tokens per sequence    N = B*T tokens in flight
    H  hidden       V  vocabulary                 F  FFN units

Every weight-heavy product goes through a kernel from the registry (``adaroute.kernels``); the
engine itself only wires layers together. Per forward call and routed layer the execution policy
decides, from the number of tokens in flight and the layer's density, whether it runs sparse
(decode, small batches at low density) or dense (prefill, larger batches). A routed layer that runs
sparse is guarded by the per-token dense fail-safe (``failsafe.py``) unless ``engine.failsafe`` is None.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import nn

from adaroute.kernels import default_kernel, get_kernel
from adaroute.runtime.attention import attend
from adaroute.runtime.cost import scoring_copy_fits
from adaroute.runtime.failsafe import FailSafe
from adaroute.runtime.kv_cache import KVCache
from adaroute.runtime.policy import ExecutionPolicy
from adaroute.runtime.quant_step import fused_decoder
from adaroute.runtime.weights import DenseFFN, LayerWeights, ModelWeights, RoutedFFN


class UnitCounter:
    """Units computed per routed layer, summed over the sparse calls it observed. The sum stays a
    tensor (on the kernel's device) until read, so counting adds no device-to-host copy per layer;
    a compiled step's counts are kept as they come and summed when read (``add_step``)."""

    _FOLD = 256  # steps kept before they are summed

    def __init__(self):
        self._units: torch.Tensor | int = 0  # selected units, summed over tokens and layers
        self._slots = 0  # tokens x layer width, same sums
        self._steps: list[tuple[torch.Tensor, int]] = []  # (units per token [L, N], -1 for dense layers; width)

    def add(self, counts: torch.Tensor, width: int) -> None:
        self._units = self._units + counts.sum()
        self._slots += counts.numel() * width

    def add_step(self, counts: torch.Tensor, width: int) -> None:
        """One compiled step's units per token and layer [L, N] (-1 where a layer ran dense), copied:
        a copy is all a decode step pays (counting on the spot cost ~0.1 ms of an 8 ms step)."""
        self._steps.append((counts.clone(), width))
        if len(self._steps) >= self._FOLD:
            self._fold()

    def _fold(self) -> None:
        groups: dict[tuple, list[torch.Tensor]] = {}
        for counts, width in self._steps:
            groups.setdefault((tuple(counts.shape), width), []).append(counts)
        for (shape, width), steps in groups.items():
            c = torch.stack(steps)  # [S, L, N]; a layer run dense is -1 for every token of its step
            self._units = self._units + c.clamp_min(0).sum()
            self._slots += int((c[:, :, 0] >= 0).sum()) * shape[1] * width
        self._steps = []

    @property
    def slots(self) -> int:
        self._fold()
        return self._slots

    @property
    def units(self) -> int:
        self._fold()
        return int(self._units)

    @property
    def density(self) -> float:
        return self.units / self.slots if self.slots else float("nan")


class Engine:
    def __init__(self, weights: ModelWeights, kernel: ModuleType | str | None = None,
                 policy: ExecutionPolicy | None = None):
        self.w = weights
        device = weights.embed.device.type
        self.kernel = get_kernel(kernel) if isinstance(kernel, str) else (kernel or default_kernel(device))
        self.policy = policy or ExecutionPolicy()
        self.counter: UnitCounter | None = None  # set one to measure the realised density
        # With record_units set, forward leaves units per token and layer of its call here: [L, N],
        # -1 for layers that ran dense (a server's per-request density); None otherwise.
        self.record_units = False
        self.last_units: torch.Tensor | None = None
        # The per-token fail-safe of routed layers (None: off); with record_units set, forward
        # leaves each token's event code per layer here: [L, N], 0 where it ran as routed.
        self.failsafe = FailSafe(weights) if weights.routed else None
        self.last_failsafe: torch.Tensor | None = None
        # Weights from ``runtime_weights`` / ``load_weights`` hold the routers' shadows in the g16 layout
        # the step scores from (``fused_cpu.scoring_layout``). Weights holding rows are scored from g16
        # copies only while the engine's memory stays within the budget (``cost.scoring_copy_fits``).
        self.scoring_copy = weights.routed and scoring_copy_fits(weights)
        # The CPU kernels can run every layer of a decode step in one library call (same kernels,
        # no Python between them); None for other kernels and for layers it does not cover.
        cpu = getattr(self.kernel, "NAME", None) == "cpu"
        self._fused = fused_decoder(weights, self.scoring_copy) if cpu else None
        self._limits_key, self._limits = None, []
        self._usage: torch.Tensor | None = None

    @property
    def made_tensors(self) -> list[torch.Tensor]:
        """Tensors the engine made beside the weights it was given (the routers' scoring layout for the
        compiled CPU step): memory it holds while it lives."""
        return list(getattr(self._fused, "held", []))  # only the float32 step makes any

    @property
    def unit_usage(self) -> torch.Tensor | None:
        """Per routed layer and unit, how many tokens selected the unit while the layer ran sparse:
        [L, F] int64, cumulative, counted by the kernels from each token's final selection (dense layers
        and dense calls add nothing). None (the default): not counted; ``start_unit_usage`` turns it on."""
        return self._usage

    @unit_usage.setter
    def unit_usage(self, usage: torch.Tensor | None) -> None:
        shape = self._usage_shape()
        if usage is not None and (tuple(usage.shape) != shape or usage.dtype != torch.int64
                                  or not usage.is_contiguous() or usage.device != self.w.embed.device):
            raise ValueError(f"unit_usage must be a contiguous int64 tensor of shape {shape} on "
                             f"{self.w.embed.device}, got {usage.dtype} {tuple(usage.shape)} on {usage.device}")
        self._usage = usage

    def start_unit_usage(self) -> torch.Tensor:
        """Turns the unit-usage counter on from zero and returns it ([L, F], F the widest layer's units)."""
        self.unit_usage = torch.zeros(self._usage_shape(), dtype=torch.int64, device=self.w.embed.device)
        return self._usage

    def _usage_shape(self) -> tuple[int, int]:
        return len(self.w.layers), max(ly.ffn.w_gate.shape[0] for ly in self.w.layers)

    @classmethod
    def from_model(cls, model: nn.Module, kernel: ModuleType | str | None = None,
                   policy: ExecutionPolicy | None = None, max_positions: int | None = None) -> Engine:
        """An engine on ``model``'s weights in the format it is stored in (``formats.runtime_weights``)."""
        from adaroute.runtime.formats import runtime_weights

        return cls(runtime_weights(model, None, max_positions), kernel, policy)

    def new_cache(self, batch: int, max_len: int, pad: torch.Tensor | None = None) -> KVCache:
        if max_len > self.w.max_positions:
            raise ValueError(f"max_len {max_len} exceeds the model's {self.w.max_positions} positions")
        return KVCache(len(self.w.layers), batch, self.w.n_kv_heads, self.w.head_dim, max_len, pad,
                       device=self.w.embed.device)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, cache: KVCache, all_logits: bool = False) -> torch.Tensor:
        """tokens [B, T] -> logits of the last position [B, V] (or of every position [B, T, V])."""
        b, t = tokens.shape
        limits = self.sparse_limits()
        x = self.w.embed[tokens.reshape(-1).to(self.w.embed.device)]  # [N, H]
        fs = self.failsafe
        codes = None
        if fs is not None:
            fs.begin_step()
            codes = torch.zeros(len(self.w.layers), b * t, dtype=torch.long)  # [L, N]
        if self._fused is not None and b * t <= self._fused.max_tokens and cache.k.dtype == torch.float32:
            counts = self._fused(x, cache, b, limits, fs, codes, self._usage)  # [L, N], -1 for layers run dense
            self.last_units = counts.clone() if self.record_units else None
            if self.counter is not None and b * t <= max(limits, default=0):
                self.counter.add_step(counts, self._fused.units)
        else:
            units = torch.full((len(self.w.layers), b * t), -1, dtype=torch.long) if self.record_units else None
            for i, layer in enumerate(self.w.layers):
                counts = self._layer(x, layer, i, cache, b * t <= limits[i], codes)
                if units is not None and counts is not None:
                    units[i] = counts.to(units.device)
            self.last_units = units
        if fs is not None:
            fs.record(codes)
        self.last_failsafe = codes if self.record_units else None
        cache.advance(t)
        x = x.view(b, t, -1) if all_logits else x.view(b, t, -1)[:, -1]  # [B, (T,) H]
        x = self.kernel.rmsnorm(x.reshape(-1, self.w.hidden).contiguous(), self.w.final_norm, self.w.eps)
        head = self.w.routed_head
        if head is not None and not self.policy.dense:  # the output head routed with the FFNs
            logits = head.logits(self.kernel, x, self.w.head)
        else:
            logits = self.kernel.linear(x, self.w.head)  # [B*(T), V]
        return logits.view(b, t, -1) if all_logits else logits

    def sparse_limits(self) -> list[int]:
        """Per layer, the most tokens in flight at which it runs sparse (0 for dense layers), from
        the execution policy and each routed layer's current threshold; recomputed on change."""
        key = (self.policy, self.w.policies_key())
        if key != self._limits_key:
            self._limits = [self.policy.layer_max_tokens(ly.ffn.expected_density(), ly.ffn.router_share)
                            if isinstance(ly.ffn, RoutedFFN) else 0 for ly in self.w.layers]
            self._limits_key = key
        return self._limits

    def _layer(self, x: torch.Tensor, layer: LayerWeights, i: int, cache: KVCache,
               sparse: bool, codes: torch.Tensor | None = None) -> torch.Tensor | None:
        """Updates the residual stream x [N, H] in place; units per token [N] when the FFN ran sparse."""
        k = self.kernel
        h = k.rmsnorm(x, layer.attn_norm, self.w.eps)  # [N, H]
        qkv = k.linear_multi(h, [layer.wq, layer.wk, layer.wv])  # [N, (Q+2K)*D]
        k.linear(attend(k, qkv, layer, self.w, cache, i), layer.wo, residual=x)
        h = k.rmsnorm(x, layer.mlp_norm, self.w.eps)  # [N, H]
        return self._ffn(layer.ffn, h, x, sparse, i, codes)

    def _ffn(self, ffn: DenseFFN | RoutedFFN, h: torch.Tensor, x: torch.Tensor, sparse: bool, i: int = 0,
             codes: torch.Tensor | None = None) -> torch.Tensor | None:
        k = self.kernel
        if isinstance(ffn, DenseFFN):
            k.dense_ffn(h, ffn.w_gate, ffn.w_up, ffn.w_down, residual=x)
            return None
        threshold, min_units, max_units = ffn.policy()
        units = ffn.w_gate.shape[0]
        if not sparse or (threshold == float("-inf") and max_units >= units):
            k.unit_ffn(h, ffn.w_gate, ffn.w_up, ffn.w_down_t, residual=x)
            return None
        usage = self._usage[i, :units] if self._usage is not None else None  # [F]
        if self.failsafe is not None and codes is not None:
            counts = self.failsafe.routed_ffn(k, ffn, h, x, i, codes[i], usage, self.scoring_copy)
        else:
            _, counts = k.routed_ffn(h, ffn.w_gate, ffn.w_up, ffn.w_down_t, *ffn.shadow_rows(),
                                     ffn.unit_bias, threshold, min_units, max_units, residual=x, adapter=ffn.adapter,
                                     usage=usage, scoring_copy=self.scoring_copy)
        if self.counter is not None:
            self.counter.add(counts, units)
        return counts
