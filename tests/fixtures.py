"""Tiny random Llama models on disk, as a Hugging Face directory and as a GGUF file.

Both formats hold the same weights for a given seed and config, so a test can load either and
compare against `make_tiny_llama`. Nothing is downloaded: the tokenizer is a byte-level BPE
trained here on a few of Python's own help topics (`pydoc_data`, part of the standard library).
"""

from __future__ import annotations

import json
import math
from pydoc_data.topics import topics

import gguf
import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

VOCAB_SIZE = 320  # 2 specials + 256 byte symbols + 62 merges
BOS, EOS = "<s>", "</s>"
# Fixed topic keys, so the corpus (and therefore the merges) never changes between runs.
CORPUS_TOPICS = ("if", "while", "for", "try", "with", "function")
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def tiny_config(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=VOCAB_SIZE) -> LlamaConfig:
    # Non-default rope theta and eps, so a loader that drops those keys changes the logits.
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 50000.0},
        tie_word_embeddings=False,  # a separate output.weight exercises one more tensor mapping
        bos_token_id=0,
        eos_token_id=1,
    )


def make_tiny_llama(
    seed=0, hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=VOCAB_SIZE
) -> LlamaForCausalLM:
    """A float32 `LlamaForCausalLM` in eval mode whose weights depend only on `seed` and the shape."""
    config = tiny_config(hidden, intermediate, layers, heads, kv_heads, vocab)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    # Re-draw every weight from our own generator: the default init (std 0.02, norms all ones)
    # gives near-uniform logits that would hide a mis-permuted or swapped tensor under atol.
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.ndim == 1:  # RMSNorm scales: around one, but not all equal
                param.copy_(1.0 + 0.1 * noise)
            else:
                param.copy_(noise / math.sqrt(param.shape[-1]))
    return model


def _train_bpe() -> Tokenizer:
    """GPT-2-style byte-level BPE: what GGUF calls tokenizer model "gpt2", so both formats agree."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[BOS, EOS],  # ids 0 and 1, matching the config
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # any byte encodes: no unknown tokens
        show_progress=False,
    )
    tokenizer.train_from_iterator([topics[key] for key in CORPUS_TOPICS], trainer)
    assert tokenizer.get_vocab_size() == VOCAB_SIZE, tokenizer.get_vocab_size()
    return tokenizer


def make_tiny_tokenizer(save_dir=None) -> PreTrainedTokenizerFast:
    """A real fast tokenizer with bos/eos and a chat template; saved to `save_dir` if given."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_train_bpe(),
        bos_token=BOS,
        eos_token=EOS,
        add_bos_token=True,  # Llama convention; GGUF states the same via tokenizer.ggml.add_bos_token
        add_eos_token=False,
        chat_template=CHAT_TEMPLATE,
    )
    if save_dir is not None:
        tokenizer.save_pretrained(save_dir)
    return tokenizer


def write_hf_dir(path, seed=0, **cfg):
    """Save model (safetensors) and tokenizer as a directory `from_pretrained` can load."""
    model, tokenizer = _model_and_tokenizer(seed, cfg)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_gguf(path, seed=0, **cfg):
    """Write the same model as `make_tiny_llama(seed, **cfg)` to one F32 `.gguf` file."""
    model, tokenizer = _model_and_tokenizer(seed, cfg)
    writer = gguf.GGUFWriter(str(path), arch="llama")
    _add_model_metadata(writer, model.config)
    _add_tokenizer_metadata(writer, tokenizer)
    for name, array in _gguf_tensors(model):
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _model_and_tokenizer(seed, cfg) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    # The tokenizer's vocab is fixed by training, so a file with another `vocab` would be unusable.
    model, tokenizer = make_tiny_llama(seed, **cfg), make_tiny_tokenizer()
    if model.config.vocab_size != len(tokenizer):
        raise ValueError(f"vocab={model.config.vocab_size} on disk needs the tokenizer's {len(tokenizer)}")
    return model, tokenizer


def _add_model_metadata(writer: gguf.GGUFWriter, config: LlamaConfig) -> None:
    # The keys transformers maps to a LlamaConfig (GGUF_CONFIG_MAPPING["llama"]).
    writer.add_name("tiny-llama")  # the loader reads general.name; "mistral" in it would switch arch
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.head_dim)  # read back as head_dim
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)


def _add_tokenizer_metadata(writer: gguf.GGUFWriter, tokenizer: PreTrainedTokenizerFast) -> None:
    vocab = tokenizer.backend_tokenizer.get_vocab(with_added_tokens=True)
    tokens = sorted(vocab, key=vocab.get)  # GGUF lists tokens by id
    special = set(tokenizer.all_special_tokens)
    writer.add_tokenizer_model("gpt2")  # byte-level BPE; "llama" would mean sentencepiece
    writer.add_tokenizer_pre("gpt-2")  # llama.cpp's name for the GPT-2 split regex we trained with
    writer.add_token_list(tokens)
    # CONTROL marks the specials, so transformers re-adds them as unsplittable special tokens.
    types = [gguf.TokenType.CONTROL if token in special else gguf.TokenType.NORMAL for token in tokens]
    writer.add_token_types(types)
    writer.add_token_merges(_merges(tokenizer))
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(tokenizer.chat_template)


def _merges(tokenizer: PreTrainedTokenizerFast) -> list[str]:
    """BPE merges as GGUF wants them: "left right" strings, in rank order."""
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    # Newer `tokenizers` serialize a merge as a pair, older ones as a "left right" string.
    return [m if isinstance(m, str) else " ".join(m) for m in merges]


def _gguf_tensors(model: LlamaForCausalLM):
    """(gguf_name, float32 array) for every weight, in llama.cpp's names and q/k layout."""
    config = model.config
    # The same table transformers inverts when loading, so names round-trip by construction.
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight",))
        if gguf_name is None:
            raise KeyError(f"no GGUF name for {hf_name}")
        array = tensor.detach().to(torch.float32).numpy()
        if gguf_name.endswith("attn_q.weight"):
            array = _llama_cpp_permute(array, config.num_attention_heads)
        elif gguf_name.endswith("attn_k.weight"):
            array = _llama_cpp_permute(array, config.num_key_value_heads)
        yield gguf_name, np.ascontiguousarray(array)


def _llama_cpp_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf `permute` for q/k rows.

    HF rotates the two halves of each head ("rotate_half"); llama.cpp rotates adjacent pairs. The
    converter interleaves each head's halves so llama.cpp's rope matches, and transformers'
    `LlamaTensorProcessor._reverse_permute_weights` undoes it, so we must apply it going in.
    """
    head_rows = weights.shape[0] // n_head
    split = weights.reshape(n_head, 2, head_rows // 2, *weights.shape[1:])
    return split.swapaxes(1, 2).reshape(weights.shape)


def convert_tiny(root, density: float = 0.5):
    """A tiny Llama converted for real with quick settings, calibrated on a few help topics:
    (ConvertResult, routed directory ``root / "routed"``)."""
    from adaroute.config import RoutingConfig, TrainConfig
    from adaroute.convert import convert

    write_hf_dir(root / "dense")
    calib = root / "calib.txt"
    calib.write_text("\n\n".join(topics[k] for k in ("class", "assignment", "import")))
    train = TrainConfig(calib_tokens=1024, window=64, ranking_steps=5, ranking_batch=256, sensitivity_tokens=256)
    result = convert(str(root / "dense"), [str(calib)], output=root / "routed", train=train,
                     routing=RoutingConfig(density=density, layer_min_density=0.2))
    return result, root / "routed"
