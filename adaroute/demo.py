"""The main job on the embedded default model, read top to bottom."""

from __future__ import annotations

import time

from adaroute.cli.common import format_table
from adaroute.data import load_text
from adaroute.eval.perplexity import perplexity
from adaroute.generate import generate
from adaroute.models import load_model

QUESTION = "In one sentence, what is a Python list comprehension?"


def run_demo(model_spec: str = "smollm2-135m", max_tokens: int = 8192, new_tokens: int = 48) -> dict:
    """Load → evaluate held-out perplexity → answer a fixed question; print a table, return the numbers."""
    t0 = time.perf_counter()
    print(f"Loading {model_spec} …", flush=True)
    model, tokenizer = load_model(model_spec)
    heldout = load_text("builtin:heldout")
    dense = perplexity(model, tokenizer, heldout.text, window=512, max_tokens=max_tokens, desc="dense perplexity")
    answer = generate(model, tokenizer, QUESTION, max_new_tokens=new_tokens)
    rows = [["dense", dense.perplexity, dense.tokens, dense.seconds]]
    print()
    print(format_table(["model", "perplexity (builtin:heldout)", "tokens", "seconds"], rows))
    print(f"\nQ: {QUESTION}\nA (dense): {answer}")
    print(f"\nDemo finished in {time.perf_counter() - t0:.0f} s.")
    return {"dense_perplexity": dense.perplexity, "tokens": dense.tokens, "answer": answer}
