"""The runtime's weights read straight from a routed directory's model.safetensors, and the block
form that file takes at q8/q4.

    weights = load_weights("out/routed-q4")      # ModelWeights; no transformers model, no float32 copy
    tensors, index = block_state(model, "q4_1")  # what save_routed writes for a q4_1 directory

Shape letters:
    H  hidden    F  FFN units    V  vocabulary

A directory converted at ``--weights q8/q4`` stores every matrix the runtime quantises as GGUF
blocks in GGUF's row layout (uint8 [rows, row bytes]); the safetensors header's ``blocks`` entry
maps each such key to [format, rows, columns]. The blocks are exactly those ``quant_weights.quantise``
makes at load time from the float32 model (the tensors are paired with the float ones they come
from, so there is one rule for which tensor gets which format). A routed FFN's unit store ``w_units``
[F, 3, H] becomes three keys, ``w_units.gate`` and ``w_units.up`` [F, H] and ``w_units.down`` [H, F]
(the down projection in GGUF's own orientation, as the runtime applies it); its router is
the exact one (``routing.router.ExactRouter``: only ``router.unit_bias`` is kept, no int4 shadow);
routing adapters are float16 (as ``quantise`` holds them); norms and biases stay float32.

``load_weights`` builds the runtime's ``ModelWeights`` from the file alone, for float32 and block
directories alike: blocks are copied out of the file into the kernels' g16 layout (``pack16``, a
permutation of bytes), never dequantised, so a q4 model holds about its blocks' size in memory. The
routed layers' policies are ``UnitPolicy`` objects from config.json (or the loaded model's modules,
when a caller has them, so that ``apply_density`` on those modules moves the engine).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from adaroute.kernels.quant_reference import BLOCK, QuantWeight, dequantize, pack16, unpack16
from adaroute.kernels.reference import Adapter
from adaroute.runtime.weights import DenseFFN, LayerWeights, ModelWeights, RoutedFFN, rope_for_config

UNIT_PARTS = ("gate", "up", "down")  # the keys a routed FFN's w_units becomes as blocks (down: [H, F])
BLOCKS_KEY = "blocks"  # safetensors header entry: {key: [format, rows, columns]}


def block_state(model, fmt: str) -> tuple[dict[str, torch.Tensor], dict[str, list]]:
    """``model``'s unique state (routed, loaded, float32) with every matrix the runtime quantises at
    ``fmt`` replaced by its blocks (row layout) and the int4 shadows dropped -> (tensors, index)."""
    from adaroute.routing.storage import unique_state
    from adaroute.runtime.quant_weights import quantise
    from adaroute.runtime.weights import from_model

    state = unique_state(model)
    names = {t.data_ptr(): k for k, t in state.items()}
    for k, t in state.items():
        if k.endswith("mlp.w_units"):  # the three [F, H] views of [F, 3, H] start H floats apart
            step = t.shape[-1] * t.element_size()
            names.update({t.data_ptr() + j * step: f"{k}.{part}" for j, part in enumerate(UNIT_PARTS)})
    floats = from_model(model, max_positions=1)
    blocks = quantise(floats, fmt)
    tensors = {k: t.half() if ".mlp.adapter." in k else t for k, t in state.items()  # adapters as quantise holds them
               if not (k.endswith("mlp.w_units") or k.endswith("router.shadow_q") or k.endswith("router.shadow_scale"))}
    index = {}
    for f, q in _pairs(floats, blocks):
        key = names[f.data_ptr()]
        tensors.pop(key, None)
        rows = unpack16(q)
        tensors[key], index[key] = rows.data.contiguous(), [q.fmt, rows.data.shape[0], q.cols]
    return tensors, index


def float_state(tensors: dict[str, torch.Tensor], index: dict[str, list]) -> dict[str, torch.Tensor]:
    """A block state back in float32 (dequantised; unit stores re-assembled), for loading a module."""
    out = {k: t.float() if t.dtype == torch.float16 else t for k, t in tensors.items() if k not in index}
    for key, (fmt, rows, cols) in index.items():
        base, _, part = key.rpartition(".")
        if part not in UNIT_PARTS or not base.endswith("w_units"):
            out[key] = dequantize(tensors[key], fmt).reshape(rows, cols)
    for key in {k.rpartition(".")[0] for k in index if k.rpartition(".")[0].endswith("mlp.w_units")}:
        gate, up, down = (dequantize(tensors[f"{key}.{p}"], index[f"{key}.{p}"][0]) for p in UNIT_PARTS)
        out[key] = torch.stack([gate, up, down.t()], dim=1)  # [F, 3, H]
    return out


def _pairs(floats: ModelWeights, blocks: ModelWeights):
    """(float tensor, QuantWeight) for every quantised matrix, the tied head once."""
    seen = set()
    candidates = [(floats.embed, blocks.embed), (floats.head, blocks.head)]
    for fl, ql in zip(floats.layers, blocks.layers, strict=True):
        candidates += [(getattr(fl, n), getattr(ql, n)) for n in ("wq", "wk", "wv", "wo")]
        down = "w_down" if isinstance(fl.ffn, DenseFFN) else "w_down_t"
        candidates += [(getattr(fl.ffn, n), getattr(ql.ffn, n)) for n in ("w_gate", "w_up", down)]
    for f, q in candidates:
        if f.data_ptr() not in seen:
            seen.add(f.data_ptr())
            yield f, q


def read_index(file: Path, header: dict | None = None) -> dict[str, list]:
    """The ``blocks`` entry of a model.safetensors header ({} for a float32 file); ``header``: the
    one ``validation.check_safetensors`` returned for it, when the caller has it."""
    from adaroute.routing.validation import check_safetensors

    header = check_safetensors(Path(file)) if header is None else header
    return json.loads((header.get("__metadata__") or {}).get(BLOCKS_KEY, "{}"))


def load_weights(directory: str | Path, max_positions: int | None = None, policies: list | None = None) -> ModelWeights:
    """``ModelWeights`` of a routed directory from its files alone (checked as ``load_routed`` checks
    them). ``policies``: one object per routed layer holding its policy (``RoutedMLP`` modules of the
    same directory loaded as a model); default ``UnitPolicy`` objects from config.json."""
    from adaroute.routing.storage import head_rows, layer_policy, read_meta
    from adaroute.routing.validation import WEIGHTS, check_safetensors
    from adaroute.runtime.head import routed_head

    path = Path(directory)
    meta = read_meta(path)
    header = check_safetensors(path / WEIGHTS)
    index = read_index(path / WEIGHTS, header)
    base = meta["base_config"]
    entries = {e["layer"]: e for e in meta["layers"]}
    if policies is None:
        policies = [layer_policy(e, base["intermediate_size"]) for e in meta["layers"]]
    by_layer = dict(zip(entries, policies, strict=True))
    with open(path / WEIGHTS, "rb") as f:
        keys = {k for k in header if not k.startswith("__")}

        def get(key: str):
            t = _read(f, header, key)
            if ".mlp.adapter." in key and index:  # float16 beside blocks, as the quantised kernels read it
                return t
            if key not in index:
                return t.float() if t.dtype != torch.uint8 else t
            return pack16(QuantWeight(t, index[key][0], index[key][2]))

        def opt(key: str):
            return get(key) if key in keys else None

        layers = []
        for i in range(base["num_hidden_layers"]):
            p = f"model.layers.{i}."
            biases = [opt(p + f"self_attn.{n}_proj.bias") for n in "qkv"]
            ffn = _routed(get, opt, p + "mlp.", by_layer[i]) if i in by_layer else \
                DenseFFN(*(get(p + f"mlp.{n}_proj.weight") for n in ("gate", "up", "down")))
            layers.append(LayerWeights(
                attn_norm=get(p + "input_layernorm.weight"), wq=get(p + "self_attn.q_proj.weight"),
                wk=get(p + "self_attn.k_proj.weight"), wv=get(p + "self_attn.v_proj.weight"),
                wo=get(p + "self_attn.o_proj.weight"),
                qkv_bias=torch.cat(biases) if all(b is not None for b in biases) else None,
                q_norm=opt(p + "self_attn.q_norm.weight"), k_norm=opt(p + "self_attn.k_norm.weight"),
                mlp_norm=get(p + "post_attention_layernorm.weight"), ffn=ffn))
        embed = get("model.embed_tokens.weight")
        head = get("lm_head.weight") if "lm_head.weight" in keys else embed
        final_norm = get("model.norm.weight")
    n_heads = base["num_attention_heads"]
    head_dim = base.get("head_dim") or base["hidden_size"] // n_heads
    cos, sin = _rope(base, max_positions or base["max_position_embeddings"], head_dim)
    from adaroute.runtime.fused_cpu import scoring_layout

    return scoring_layout(ModelWeights(embed=embed, layers=layers, final_norm=final_norm, head=head, n_heads=n_heads,
                                       n_kv_heads=base.get("num_key_value_heads") or n_heads, head_dim=head_dim,
                                       eps=float(base["rms_norm_eps"]), rope_cos=cos, rope_sin=sin,
                                       routed_head=routed_head(head, head_rows(meta))))


def _rope(base: dict, positions: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [S, D] as ``weights._rope_table`` computes them with the family's rotary module. The
    default RoPE is written out here (transformers' ``compute_default_rope_parameters`` and the
    rotary ``forward``, the same float32 operations): importing the modeling code to build that module
    costs ~60 MB of resident memory, half a q4 model. Other RoPE types build the module."""
    params = base.get("rope_parameters") or {}
    if params.get("rope_type") != "default" or base.get("partial_rotary_factor") not in (None, 1.0):
        return rope_for_config(_config(base), positions, head_dim)
    inv_freq = 1.0 / (float(params["rope_theta"]) ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    freqs = torch.arange(positions)[:, None].float() * inv_freq  # [S, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().contiguous(), emb.sin().contiguous()


_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "U8": torch.uint8,
           "I64": torch.int64}


def _read(f, header: dict, key: str) -> torch.Tensor:
    """One tensor of a safetensors file read into its own buffer.

    Written here rather than through ``safetensors.safe_open``: that maps the whole file and hands out
    tensors that are views of the mapping, so every page stays resident for as long as any tensor
    lives (measured: the q4 directory's 118 MB of file pages beside the g16 copies the kernels read).
    The runtime keeps its own layout of each tensor, so it reads each one once, through the page
    cache, and the file costs nothing after loading. The header was checked by ``check_safetensors``."""
    entry = header[key]
    begin, end = entry["data_offsets"]
    if entry["dtype"] not in _DTYPES:
        raise ValueError(f"{key}: dtype {entry['dtype']} is not one the runtime reads")
    out = torch.empty(entry["shape"], dtype=_DTYPES[entry["dtype"]])
    f.seek(header["__data_start__"] + begin)
    if f.readinto(memoryview(out.view(torch.uint8).numpy()).cast("B")) != end - begin:
        raise ValueError(f"{key}: the file ends inside the tensor")
    return out


def _routed(get, opt, p: str, policy) -> RoutedFFN:
    """A routed FFN: float32 views of the [F, 3, H] store, or blocks for the exact router."""
    if opt(p + "router.shadow_q") is not None:
        units = get(p + "w_units")  # [F, 3, H]
        gate, up, down_t = units[:, 0], units[:, 1], units[:, 2]
        shadow_q, shadow_scale = get(p + "router.shadow_q"), get(p + "router.shadow_scale")
    else:  # blocks: g16 gate/up and the down projection [H, F], as quantise lays them out
        gate, up, down_t = (get(p + f"w_units.{part}") for part in UNIT_PARTS)
        h = gate.cols  # no int4 shadow (as quantise leaves it: zero rows of the shadow's widths)
        shadow_q, shadow_scale = torch.empty(0, h // 2, dtype=torch.uint8), torch.empty(0, h // BLOCK)
    w_in = opt(p + "adapter.w_in")
    adapter = None if w_in is None else Adapter(w_in, get(p + "adapter.w_units"), get(p + "adapter.w_out"))
    return RoutedFFN(gate, up, down_t, shadow_q, shadow_scale, get(p + "router.unit_bias"), policy, adapter)


def _config(base: dict):
    """The transformers config a directory's ``base_config`` describes."""
    from transformers import AutoConfig

    base = dict(base)
    return AutoConfig.for_model(base.pop("model_type"), **base)
