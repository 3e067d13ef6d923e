"""The runtime's weights read straight from a GGUF file: quantised tensors stay the file's own blocks.

Shape letters:
    H  hidden    F  FFN units    V  vocabulary    Q  query heads    K  key/value heads    D  head dim

No float32 copy of a quantised matrix is ever made (a q4 model needs about the file's size in
memory): each Q8_0/Q4_0/Q4_1 tensor becomes a ``QuantWeight`` over its bytes, F32/F16 tensors (the
norms) become float32 tensors, and the embedding is looked up row by row from its blocks. The
configuration, tokenizer and RoPE table come from transformers' reading of the same file's metadata,
not from its weights.

llama.cpp's converter permutes the rows of q and k within each head (its RoPE pairs neighbouring
elements, transformers' pairs halves); that is undone here by reordering whole rows of blocks,
which changes no byte of any block.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from adaroute.errors import AdarouteError
from adaroute.kernels.quant_reference import GGML_NAMES, QuantWeight
from adaroute.runtime.weights import DenseFFN, LayerWeights, ModelWeights, _rope_table

_QUANT = {v: k for k, v in GGML_NAMES.items()}  # GGML type name -> our format name
_FLOAT = ("F32", "F16", "BF16")


def from_gguf(path: str | Path, max_positions: int | None = None) -> ModelWeights:
    """Weights of a Llama-family GGUF file for the runtime, quantised tensors kept as blocks."""
    import gguf
    from transformers import AutoConfig

    path = Path(path)
    cfg = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    if cfg.model_type not in ("llama", "mistral"):
        raise AdarouteError(f"{path}: running quantised blocks supports Llama and Mistral GGUF files, not "
                            f"{cfg.model_type!r}; convert the model to a directory first")
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    n_heads, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads

    def get(name: str, heads: int | None = None):
        if name not in tensors:
            raise AdarouteError(f"{path}: tensor {name} is missing; is this a complete Llama GGUF file?")
        return _tensor(tensors[name], heads)

    layers = [LayerWeights(attn_norm=get(f"blk.{i}.attn_norm.weight"), wq=get(f"blk.{i}.attn_q.weight", n_heads),
                           wk=get(f"blk.{i}.attn_k.weight", n_kv), wv=get(f"blk.{i}.attn_v.weight"),
                           wo=get(f"blk.{i}.attn_output.weight"), qkv_bias=None, q_norm=None, k_norm=None,
                           mlp_norm=get(f"blk.{i}.ffn_norm.weight"),
                           ffn=DenseFFN(get(f"blk.{i}.ffn_gate.weight"), get(f"blk.{i}.ffn_up.weight"),
                                        get(f"blk.{i}.ffn_down.weight")))
              for i in range(cfg.num_hidden_layers)]
    embed = get("token_embd.weight")
    head = get("output.weight") if "output.weight" in tensors else embed  # tied: the embedding itself
    cos, sin = _rope_table(_rotary_holder(cfg), max_positions or cfg.max_position_embeddings, head_dim)
    return ModelWeights(embed=embed, layers=layers, final_norm=get("output_norm.weight"), head=head, n_heads=n_heads,
                        n_kv_heads=n_kv, head_dim=head_dim, eps=float(cfg.rms_norm_eps), rope_cos=cos, rope_sin=sin)


def _tensor(t, heads: int | None) -> torch.Tensor | QuantWeight:
    """One GGUF tensor: float32 for float types, blocks for quantised ones; rows of q/k un-permuted."""
    kind = t.tensor_type.name
    data = np.asarray(t.data)  # [rows, row bytes] for blocks, [rows, cols] (or [cols]) for floats
    if heads is not None:
        data = data[_unpermute(data.shape[0], heads)]
    if kind in _FLOAT:
        return torch.from_numpy(np.array(data, dtype=np.float32))
    if kind not in _QUANT:
        raise AdarouteError(f"tensor {t.name} is {kind}; the runtime reads F32, F16, BF16, Q8_0, Q4_0 and Q4_1 "
                            "(re-export the GGUF with one of those)")
    return QuantWeight(torch.from_numpy(np.array(data)), _QUANT[kind], int(t.shape[0]))


def _unpermute(rows: int, heads: int) -> np.ndarray:
    """Row order that undoes llama.cpp's q/k permutation (transformers' ``_reverse_permute_weights``)."""
    dim = rows // heads // 2
    return np.arange(rows).reshape(heads, dim, 2).swapaxes(2, 1).reshape(rows)


def _rotary_holder(cfg) -> SimpleNamespace:
    """The family's own rotary module, in the shape ``_rope_table`` reads (model.model.rotary_emb)."""
    module = importlib.import_module(f"transformers.models.{cfg.model_type}.modeling_{cfg.model_type}")
    rotary = next(getattr(module, n) for n in dir(module) if n.endswith("RotaryEmbedding"))
    return SimpleNamespace(model=SimpleNamespace(rotary_emb=rotary(cfg)))
