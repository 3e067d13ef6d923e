"""Llama family: Llama, Mistral, Qwen2/Qwen3 and SmolLM share one decoder layout (SwiGLU FFN)."""

from adaroute.models.adapters.base import ArchAdapter

LLAMA = ArchAdapter(
    family="llama",
    model_types=("llama", "mistral", "qwen2", "qwen3"),
    layers="model.layers",
    mlp="mlp",
    attention="self_attn",
    input_norm="input_layernorm",
    post_attention_norm="post_attention_layernorm",
    final_norm="model.norm",
    embed="model.embed_tokens",
    head="lm_head",
    gate="gate_proj",
    up="up_proj",
    down="down_proj",
    attn_projections=("q_proj", "k_proj", "v_proj", "o_proj"),
)
