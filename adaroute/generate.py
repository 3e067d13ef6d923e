"""Text generation with the chat template, greedy at temperature 0."""

from __future__ import annotations

import torch
from torch import nn


def prompt_ids(tokenizer, prompt: str) -> torch.Tensor:
    """[1, P] ids for `prompt`, wrapped in the tokenizer's chat template when it has one."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return torch.tensor([list(ids)], dtype=torch.long).reshape(1, -1)
    return tokenizer(prompt, return_tensors="pt").input_ids


@torch.inference_mode()
def generate(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
             seed: int = 0) -> str:
    """The model's reply to `prompt` (new text only). temperature 0 → greedy and deterministic."""
    ids = prompt_ids(tokenizer, prompt)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    torch.manual_seed(seed)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         pad_token_id=tokenizer.eos_token_id, top_p=None, top_k=None, **sampling)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
