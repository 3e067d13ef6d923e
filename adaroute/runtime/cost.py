"""Bytes and FLOPs per decoded token: the one place that counts them, for every weight format and path.

Per token at batch 1, of the weights as the runtime holds them: float32 tensors, or GGUF blocks at
q8/q4 (``numel() * element_size()`` is the bytes held either way; FLOPs come from the shapes). A
routed FFN runs dense (every unit: no router, no adapter) or sparse at density d, and then reads

    int4 shadow (float32)   d · (gate + up + down) + the shadow's codes, scales and unit biases
    exact router (q8/q4)    gate and up of every unit (they are the scores) + unit biases, and the
                            down projection whole (``RoutedFFN.dense_down``) or d · its rows
    routing adapter         w_in + w_out + d · w_units (sparse only)

and the output head whole, or, routed with the FFNs (``adaroute.runtime.head``), its 8-bit shadow and
the K rows computed exactly.

FLOPs count a multiply-add as 2 and cover the weight products only (attention over the cache and
the norms are left out): a dense FFN does 6FH; a sparse one d · 6FH plus the shadow's 4FH integer
products, or, with the exact router, 4FH for gate and up plus 2FH (whole down) or d · 2FH for down;
an adapter does 2 per element it reads. Decode on CPUs is bound by the bytes, which is why the
float32 router is an int4 shadow (~10 % of the FFN's bytes, 2/3 of its multiply-adds).
"""

from __future__ import annotations

from collections.abc import Mapping

from adaroute.runtime.weights import DenseFFN, ModelWeights, RoutedFFN

PARTS = ("attention", "ffn", "router", "adapter", "head")
# A routed engine holds at most this share more weight bytes than the dense engine on the same model
# (the sparse runtime's memory promise); ``scoring_copy_fits`` spends what is left of it.
MEMORY_BUDGET = 0.15


def _bytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def _params(*ts) -> int:
    return sum(t.shape[0] * t.shape[1] for t in ts)


def _weights(ffn: DenseFFN | RoutedFFN):
    return (ffn.w_gate, ffn.w_up, ffn.w_down if isinstance(ffn, DenseFFN) else ffn.w_down_t)


def ffn_cost(ffn: DenseFFN | RoutedFFN, density: float | None) -> tuple[dict[str, float], dict[str, float]]:
    """(bytes, FLOPs) of one FFN per token, each by part (ffn, router, adapter); ``density`` None:
    dense (a routed FFN at the dense policy reads no router and no adapter)."""
    ws = _weights(ffn)
    if not isinstance(ffn, RoutedFFN) or density is None:
        return ({"ffn": _bytes(*ws), "router": 0, "adapter": 0},
                {"ffn": 2 * _params(*ws), "router": 0, "adapter": 0})
    d = density
    if ffn.int4_shadow:  # the int4 shadow scores; the selected units' three rows are read
        nbytes = {"ffn": d * _bytes(*ws), "router": _bytes(*ffn.shadow_tensors(), ffn.unit_bias)}
        flops = {"ffn": d * 2 * _params(*ws), "router": 2 * _params(ffn.w_gate, ffn.w_up)}
    else:  # exact router: gate and up of every unit are the scores, the selected units reuse them
        down = 1.0 if ffn.dense_down else d
        nbytes = {"ffn": down * _bytes(ffn.w_down_t), "router": _bytes(ffn.w_gate, ffn.w_up, ffn.unit_bias)}
        flops = {"ffn": down * 2 * _params(ffn.w_down_t), "router": 2 * _params(ffn.w_gate, ffn.w_up)}
    a = ffn.adapter
    adapter = 0.0 if a is None else _bytes(a.w_in, a.w_out) + d * _bytes(a.w_units)
    elements = 0.0 if a is None else a.w_in.numel() + a.w_out.numel() + d * a.w_units.numel()
    return {**nbytes, "adapter": adapter}, {**flops, "adapter": 2 * elements}


def unit_bytes(ffn: DenseFFN | RoutedFFN) -> float:
    """Bytes one more selected unit adds to a sparse token (its rows, its adapter values): 0 where
    every byte is read whatever the selection (the exact router with the whole down projection)."""
    if not isinstance(ffn, RoutedFFN):
        return 0.0
    (b1, _), (b0, _) = ffn_cost(ffn, 1.0), ffn_cost(ffn, 0.0)
    return (sum(b1.values()) - sum(b0.values())) / ffn.w_gate.shape[0]


def router_share(ffn: RoutedFFN) -> float:
    """Bytes a sparse call reads per token whatever it selects (router, adapter projections, and at
    q8/q4 the rows the exact router reads in full) over the FFN's weight bytes."""
    fixed, _ = ffn_cost(ffn, 0.0)
    return sum(fixed.values()) / _bytes(*_weights(ffn))


def _layer_density(density: float | Mapping[int, float] | None, i: int) -> float | None:
    return density.get(i) if isinstance(density, Mapping) else density


def token_cost(w: ModelWeights, density: float | Mapping[int, float] | None = None,
               routed_head: bool | None = None) -> tuple[dict, dict]:
    """(bytes, FLOPs) per decoded token by part (``PARTS``). Routed FFNs run sparse at ``density`` (one
    number, or per layer index; a layer missing from the mapping runs dense), or dense with None.
    ``routed_head``: whether a routed head (if any) runs; None = where the FFNs run sparse (a routed
    engine also routes the head when a batch runs its layers dense)."""
    nbytes = dict.fromkeys(PARTS, 0.0)
    flops = dict.fromkeys(PARTS, 0.0)
    for i, ly in enumerate(w.layers):
        attn = (ly.wq, ly.wk, ly.wv, ly.wo)
        nbytes["attention"] += _bytes(*attn)
        flops["attention"] += 2 * _params(*attn)
        b, f = ffn_cost(ly.ffn, _layer_density(density, i))
        for part in ("ffn", "router", "adapter"):
            nbytes[part] += b[part]
            flops[part] += f[part]
    nbytes["head"], flops["head"] = head_cost(w, routed=density is not None if routed_head is None else routed_head)
    return nbytes, flops


def head_cost(w: ModelWeights, routed: bool) -> tuple[float, float]:
    """(bytes, FLOPs) of the output head per token: the whole head, or with a routed head running
    (``adaroute.runtime.head``) its 8-bit shadow plus K exact rows."""
    h = w.routed_head
    if h is None or not routed:
        return _bytes(w.head), 2 * _params(w.head)
    row_bytes = _bytes(w.head) / w.head.shape[0]
    return _bytes(h.shadow) + h.rows * row_bytes, 2 * _params(h.shadow) + 2 * h.rows * w.head.shape[1]


def weight_bytes(w: ModelWeights, density: float | Mapping[int, float] | None = None,
                 routed_head: bool | None = None) -> dict[str, int]:
    """Bytes of weights read to decode one token, by part (``token_cost``'s bytes, whole bytes)."""
    return {part: int(v) for part, v in token_cost(w, density, routed_head)[0].items()}


def ffn_shares(w: ModelWeights, layer_density: Mapping[int, float], dense_layers=frozenset()) -> dict[str, float]:
    """FFN cost of the routed layers in ``layer_density`` (each at its density; those in ``dense_layers``
    dense) over the same layers run dense: bytes (router and adapter included, and each on its own)
    and FLOPs."""
    dense_b = dense_f = ffn_b = ffn_f = router_b = adapter_b = 0.0
    for i, d in layer_density.items():
        ffn = w.layers[i].ffn
        (b0, f0), (b, f) = ffn_cost(ffn, None), ffn_cost(ffn, None if i in dense_layers else d)
        dense_b, dense_f = dense_b + b0["ffn"], dense_f + f0["ffn"]
        ffn_b, ffn_f = ffn_b + sum(b.values()), ffn_f + sum(f.values())
        router_b, adapter_b = router_b + b["router"], adapter_b + b["adapter"]
    if not dense_b:
        return {"ffn_bytes_share": 1.0, "router_bytes_share": 0.0, "adapter_bytes_share": 0.0, "ffn_flops_share": 1.0}
    return {"ffn_bytes_share": ffn_b / dense_b, "router_bytes_share": router_b / dense_b,
            "adapter_bytes_share": adapter_b / dense_b, "ffn_flops_share": ffn_f / dense_f}


def _layer_tensors(layer, routed: bool) -> list:
    """The tensors of one layer an engine holds (a dense one skips the router and the adapter)."""
    skip = {"module"} if routed else {"module", "shadow_q", "shadow_scale", "shadow_g16", "unit_bias", "adapter"}
    ffn = []
    for name in layer.ffn.__dataclass_fields__:
        value = None if name in skip else getattr(layer.ffn, name)
        if value is not None:  # an adapter is a tuple of tensors; a layer without one holds None
            ffn += list(value) if isinstance(value, tuple) else [value]
    return [layer.attn_norm, layer.wq, layer.wk, layer.wv, layer.wo, layer.mlp_norm, *ffn]


def held_tensors(w: ModelWeights, routed: bool) -> list:
    """The weights an engine on ``w`` holds: every matrix and norm, and for a routed engine also the
    routers, adapters and the routed head's shadow."""
    held = [w.embed, w.head, w.final_norm] + [t for ly in w.layers for t in _layer_tensors(ly, routed)]
    return held + ([w.routed_head.shadow] if routed and w.routed_head is not None else [])


def distinct_bytes(tensors) -> int:
    """Bytes of ``tensors``, each storage counted once (a tied head is the embedding)."""
    seen, total = set(), 0
    for t in tensors:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def scoring_copy_bytes(w: ModelWeights) -> int:
    """Bytes of the g16 copies of the float32 routers' int4 shadows (``kernels.cpu.shadow_g16``: per 16
    units, 16 H bytes of codes and 128 bytes of scales per scale group)."""
    total = 0
    for ly in w.layers:
        f = ly.ffn
        if isinstance(f, RoutedFFN) and f.shadow_q.numel():
            units, hidden = f.w_gate.shape
            total += -(-units // 16) * (16 * hidden + 128 * f.shadow_scale.shape[1])
    return total


def scoring_copy_fits(w: ModelWeights) -> bool:
    """Whether a routed engine may keep g16 copies of its shadows for scoring (1-5 % of float32 routed
    decode, docs/perf.md items 25-26): only when, with everything else routing holds, it stays within
    ``MEMORY_BUDGET`` of the dense engine's weight bytes. The routed head's shadow (19-20 % of decode
    for about as many bytes) comes first."""
    dense = distinct_bytes(held_tensors(w, routed=False))
    routed = distinct_bytes(held_tensors(w, routed=True)) + scoring_copy_bytes(w)
    return routed <= (1 + MEMORY_BUDGET) * dense
