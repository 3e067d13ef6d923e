"""The main job on the embedded default model, read top to bottom:
load → answer densely → convert (quick preset) → compare quality on held-out text → compare speed.
"""

from __future__ import annotations

import time

from adaroute.convert import convert
from adaroute.data import load_text
from adaroute.eval.bench import bench_table
from adaroute.generate import generate
from adaroute.models import load_model
from adaroute.routing.quality import compare_with_dense_runtime
from adaroute.runtime.formats import runtime_weights
from adaroute.table import format_table

QUESTION = "In one sentence, what is a Python list comprehension?"


def run_demo(model_spec: str = "smollm2-135m", max_tokens: int = 4096, density: float = 0.5,
             preset: str = "quick", new_tokens: int = 48) -> dict:
    """Run the demo, print its table and return the numbers."""
    t0 = time.perf_counter()
    print(f"Loading {model_spec} …", flush=True)
    model, tokenizer = load_model(model_spec)
    dense_answer = generate(model, tokenizer, QUESTION, max_new_tokens=new_tokens)

    print(f"Converting to a routed model at mean FFN density {density} ({preset} preset) …", flush=True)
    routed = convert(model, ["builtin:calib"], density=density, preset=preset, tokenizer=tokenizer,
                     base_model=model_spec).model
    print("Comparing quality on builtin:heldout …", flush=True)
    # by the runtime engine, which runs the routed output head as decoding does (the module has none)
    quality = compare_with_dense_runtime(runtime_weights(routed, None, 512), routed, tokenizer,
                                         load_text("builtin:heldout").text, 512, max_tokens)
    routed_answer = generate(routed, tokenizer, QUESTION, max_new_tokens=new_tokens)
    print("Measuring decode speed (engines interleaved) …", flush=True)
    speed = {r.engine: r for r in bench_table(routed, tokenizer, new_tokens=64)}

    _print_table(quality, speed)
    print(f"\nQ: {QUESTION}\nA (dense):  {dense_answer}\nA (routed): {routed_answer}")
    seconds = time.perf_counter() - t0
    print(f"\nDemo finished in {seconds:.0f} s.")
    return {"quality": quality, "speed": {k: vars(v) for k, v in speed.items()}, "seconds": seconds,
            "answers": {"dense": dense_answer, "routed": routed_answer}}


def _print_table(q: dict, speed: dict) -> None:
    dense, routed, hf = speed["adaroute-dense"], speed["adaroute-routed"], speed["transformers-eager"]
    rows = [
        ["perplexity (builtin:heldout)", q["perplexity_dense"], q["perplexity_routed"]],
        ["perplexity ratio", 1.0, q["perplexity_ratio"]],
        ["top-1 agreement with dense", 1.0, q["top1_agreement"]],
        ["mean FFN density", 1.0, q["mean_density"]],
        ["FFN FLOPs share (router incl.)", 1.0, q["ffn_flops_share"]],
        ["FFN weight bytes share (router incl.)", 1.0, q["ffn_bytes_share"]],
        ["decode tokens/s (batch 1)", dense.decode_tokens_per_s, routed.decode_tokens_per_s],
        ["latency p50 ms/token", dense.latency_p50_ms, routed.latency_p50_ms],
        ["peak RSS MB", dense.peak_rss_mb, routed.peak_rss_mb],
    ]
    print()
    print(format_table(["", "dense (adaroute runtime)", "routed"], rows))
    print(f"transformers eager decode: {hf.decode_tokens_per_s:.1f} tokens/s "
          f"(adaroute dense {dense.decode_tokens_per_s / hf.decode_tokens_per_s:.2f}×, "
          f"routed {routed.decode_tokens_per_s / dense.decode_tokens_per_s:.2f}× adaroute dense, "
          f"ideal from weight bytes {routed.ideal_vs_dense or float('nan'):.2f}×)")
