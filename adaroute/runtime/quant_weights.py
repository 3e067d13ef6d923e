"""The runtime's weights read straight from a GGUF file: quantised tensors stay the file's own blocks.

Shape letters:
    H  hidden    F  FFN units    V  vocabulary    Q  query heads    K  key/value heads    D  head dim

No float32 copy of a quantised matrix is ever made (a q4 model needs about the file's size in
memory): each Q8_0/Q4_0/Q4_1 tensor becomes a ``QuantWeight`` over a copy of its bytes (permuted into
the kernels' g16 layout, ``quant_reference.pack16``), float
tensors (the norms) become float32 tensors, and the embedding is looked up row by row from its
blocks. The configuration comes from the file's header; the RoPE table from the family's own
transformers rotary module built from that configuration.

llama.cpp's converter permutes the rows of q and k within each head (its RoPE pairs neighbouring
elements, transformers' pairs halves); that is undone here by reordering whole rows of blocks,
which changes no byte of any block.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from adaroute.errors import AdarouteError
from adaroute.kernels.quant_reference import GGML_NAMES, QuantWeight, pack16
from adaroute.runtime.weights import DenseFFN, LayerWeights, ModelWeights, rope_for_config

_QUANT = {v: k for k, v in GGML_NAMES.items()}  # GGML type name -> our format name
_FLOAT = ("F32", "F16", "BF16")


def from_gguf(path: str | Path, max_positions: int | None = None) -> ModelWeights:
    """Weights of a Llama-family GGUF file for the runtime, quantised tensors kept as blocks.

    Reads the header with adaroute's own walker (milliseconds; ``gguf.GGUFReader`` and
    transformers' config reader parse every metadata array, seconds) and copies each tensor's bytes
    out of a memory map, so the process holds the weights once, at the file's precision."""
    from adaroute.models.gguf_header import read_gguf_header

    path = Path(path)
    header = read_gguf_header(path)
    arch = header.architecture
    if arch != "llama":
        raise AdarouteError(f"{path}: running a GGUF's own blocks supports Llama-architecture files (Llama, "
                            f"Mistral, SmolLM), not {arch!r}; load it as a float model instead")
    cfg = _config(header.fields, arch)
    file = np.memmap(path, dtype=np.uint8, mode="r")
    tensors = {name: (dims, kind, offset) for name, dims, kind, offset in header.tensor_infos}

    def get(name: str, heads: int | None = None):
        if name not in tensors:
            raise AdarouteError(f"{path}: tensor {name} is missing; is this a complete Llama GGUF file?")
        return _tensor(file, name, *tensors[name], heads)

    n_heads, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    layers = [LayerWeights(attn_norm=get(f"blk.{i}.attn_norm.weight"), wq=get(f"blk.{i}.attn_q.weight", n_heads),
                           wk=get(f"blk.{i}.attn_k.weight", n_kv), wv=get(f"blk.{i}.attn_v.weight"),
                           wo=get(f"blk.{i}.attn_output.weight"), qkv_bias=None, q_norm=None, k_norm=None,
                           mlp_norm=get(f"blk.{i}.ffn_norm.weight"),
                           ffn=DenseFFN(get(f"blk.{i}.ffn_gate.weight"), get(f"blk.{i}.ffn_up.weight"),
                                        get(f"blk.{i}.ffn_down.weight")))
              for i in range(cfg.num_hidden_layers)]
    embed = get("token_embd.weight")
    head = get("output.weight") if "output.weight" in tensors else embed  # tied: the embedding itself
    cos, sin = rope_for_config(cfg, max_positions or cfg.max_position_embeddings, cfg.head_dim)
    return ModelWeights(embed=embed, layers=layers, final_norm=get("output_norm.weight"), head=head, n_heads=n_heads,
                        n_kv_heads=n_kv, head_dim=cfg.head_dim, eps=float(cfg.rms_norm_eps), rope_cos=cos,
                        rope_sin=sin)


def _config(fields: dict, arch: str):
    """A transformers LlamaConfig from the header's metadata (the keys transformers' GGUF reader maps)."""
    from transformers import LlamaConfig

    def key(name, default=None):
        value = fields.get(f"{arch}.{name}", default)
        if value is None:
            raise AdarouteError(f"GGUF metadata {arch}.{name} is missing: re-export the file")
        return value

    scaling = fields.get(f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", None):
        raise AdarouteError(f"RoPE scaling {scaling!r} is not supported for running a GGUF's own blocks")
    heads = key("attention.head_count")
    hidden = key("embedding_length")
    return LlamaConfig(hidden_size=hidden, intermediate_size=key("feed_forward_length"),
                       num_hidden_layers=key("block_count"), num_attention_heads=heads,
                       num_key_value_heads=key("attention.head_count_kv", heads),
                       head_dim=key("rope.dimension_count", hidden // heads),
                       max_position_embeddings=key("context_length"),
                       rms_norm_eps=key("attention.layer_norm_rms_epsilon"),
                       rope_parameters={"rope_type": "default", "rope_theta": float(key("rope.freq_base", 10000.0))})


def _tensor(file: np.ndarray, name: str, dims: tuple[int, ...], kind: int, offset: int,
            heads: int | None) -> torch.Tensor | QuantWeight:
    """One tensor copied out of the file: float32 for float types, blocks for quantised ones; rows
    of q/k un-permuted. ``dims`` are GGUF's (ne0 = columns first)."""
    import gguf

    ggml = gguf.GGMLQuantizationType(kind)
    block, type_size = gguf.GGML_QUANT_SIZES[ggml]
    cols, rows = dims[0], int(np.prod(dims[1:], dtype=np.int64))
    row_bytes = cols // block * type_size
    data = file[offset:offset + rows * row_bytes].reshape(rows, row_bytes)  # [rows, row bytes]
    if heads is not None:
        data = data[_unpermute(rows, heads)]
    if ggml.name in _FLOAT:
        values = np.ascontiguousarray(data).view({"F32": np.float32, "F16": np.float16}.get(ggml.name, np.uint16))
        if ggml.name == "BF16":  # bfloat16 bits are float32's upper half
            values = (values.astype(np.uint32) << 16).view(np.float32)
        out = torch.from_numpy(values.astype(np.float32))
        return out.reshape(cols) if len(dims) == 1 else out
    if ggml.name not in _QUANT:
        raise AdarouteError(f"tensor {name} is {ggml.name}; the runtime reads F32, F16, BF16, Q8_0, Q4_0 and "
                            "Q4_1 (re-export the GGUF with one of those)")
    return pack16(QuantWeight(torch.from_numpy(np.array(data)), _QUANT[ggml.name], cols))


def _unpermute(rows: int, heads: int) -> np.ndarray:
    """Row order that undoes llama.cpp's q/k permutation (transformers' ``_reverse_permute_weights``)."""
    dim = rows // heads // 2
    return np.arange(rows).reshape(heads, dim, 2).swapaxes(2, 1).reshape(rows)


def weight_format(w: ModelWeights) -> str:
    """The format of the attention matrices and FFN gate/up ("f32", "q4_1", ...; "mixed" when they
    differ). The embedding, head and routed down projections are left out: GGUF files often keep the
    head at higher precision, and the shadow router keeps its down rows at 8 bits under 4-bit gate/up
    (``quantise``)."""
    fmts = {getattr(m, "fmt", "f32") for ly in w.layers
            for m in (ly.wq, ly.wk, ly.wv, ly.wo, ly.ffn.w_gate, ly.ffn.w_up)}
    return fmts.pop() if len(fmts) == 1 else "mixed"


def quantise(w: ModelWeights, fmt: str, router: str = "auto") -> ModelWeights:
    """A pass over built weights: every float matrix (projections, FFN units, embedding and head)
    quantised to ``fmt`` ("q8_0", "q4_0", "q4_1") with ggml's rounding; norms, RoPE tables and router
    tensors stay as they are. A routed FFN's three unit matrices become views of one unit-packed
    block store [F, bytes of three rows], so a selected unit is one contiguous read, as in float32.

    ``router`` per routed layer: "exact" (the default, also "auto": gate and up of every unit through
    the g16 kernels and scored exactly, the down projection [H, F] of the selected units' activations)
    or "shadow" (the int4
    shadow scores every unit, then the selected units' three rows are gathered from one unit-packed
    store). By bytes the shadow wins at q8_0 and low density (docs/quantised.md), but its gather runs
    the row layout's compute-bound kernels: measured, the exact router decodes 1.3-1.6x faster at
    q8_0 and q4_1, densities 0.5 and 0.35 (docs/perf.md, item 21)."""
    from adaroute.kernels.quant_cpu import half_adapter
    from adaroute.kernels.quant_reference import quantize

    done: dict[int, QuantWeight] = {}  # by data_ptr: the tied head stays the embedding
    # In a 4-bit model the embedding/head stays at 8 bits, as GGUF files keep it (the embedded file's
    # token_embd is Q8_0; at 4 bits it alone cost 5 % perplexity), and so do the shadow router's down
    # rows: the unit layout blocks them along H while a GGUF blocks ffn_down along F, so from a 4-bit
    # source they would be rounded to 4 bits twice (8 % perplexity on the embedded model). The exact
    # router keeps ffn_down's own orientation (blocks along F) at the model's format.
    head_fmt = "q8_0" if fmt.startswith("q4") else fmt

    def q(t, to=fmt):
        if isinstance(t, QuantWeight):
            return t
        if t.data_ptr() not in done:
            done[t.data_ptr()] = pack16(quantize(t, to))
        return done[t.data_ptr()]

    def ffn(f):
        if isinstance(f, DenseFFN):
            return DenseFFN(q(f.w_gate), q(f.w_up), q(f.w_down))
        if getattr(f, "adapter", None) is not None and router == "shadow":
            raise ValueError("routing adapters on quantised units run with the exact router: use router='exact'")
        if router in ("auto", "exact"):
            # every gate/up row is read: the g16 layout (the dense kernels' speed); the down projection
            # [H, F] blocked along F as GGUF stores ffn_down, applied densely to the masked activations
            # (gathering 340-612-byte rows with gaps was no faster than reading them all: docs/perf.md 22)
            gate, up, down = (pack16(quantize(m.contiguous(), fmt)) for m in (f.w_gate, f.w_up, f.w_down_t.t()))
            adapter = None if f.adapter is None else half_adapter(f.adapter)  # float16: half the bytes
            return dataclasses.replace(f, w_gate=gate, w_up=up, w_down_t=down, adapter=adapter,
                                       shadow_q=f.shadow_q[:0], shadow_scale=f.shadow_scale[:0], shadow_g16=None)
        fmts = (fmt, fmt, head_fmt)  # down rows at 8 bits under 4-bit gate/up (above)
        parts = [quantize(m.contiguous(), to) for m, to in zip((f.w_gate, f.w_up, f.w_down_t), fmts, strict=True)]
        store = torch.cat([p.data for p in parts], dim=1)  # [F, bytes of a unit's three rows]
        h, ends = f.w_gate.shape[1], torch.tensor([p.data.shape[1] for p in parts]).cumsum(0).tolist()
        views = {name: QuantWeight(store[:, end - p.data.shape[1]:end], to, h)
                 for name, p, end, to in zip(("w_gate", "w_up", "w_down_t"), parts, ends, fmts, strict=True)}
        return dataclasses.replace(f, **views)

    layers = [dataclasses.replace(ly, wq=q(ly.wq), wk=q(ly.wk), wv=q(ly.wv), wo=q(ly.wo), ffn=ffn(ly.ffn))
              for ly in w.layers]
    # a routed head routes a float32 head (runtime.head); the quantised head is read whole
    return dataclasses.replace(w, embed=q(w.embed, head_fmt), head=q(w.head, head_fmt), layers=layers,
                               routed_head=None)
