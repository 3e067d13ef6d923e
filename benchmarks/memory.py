"""Memory of a routed model: its directory's size and the peak resident memory of a process that
loads it and decodes, beside the GGUF file and llama.cpp on that file.

    python benchmarks/memory.py out/routed-q4 --gguf smollm2-135m --new-tokens 128 --json out/memory.json

Each case runs in a fresh interpreter (peak RSS is per process): it imports what it needs, records
its resident memory (VmRSS) as the baseline, then loads the model, decodes ``--new-tokens`` greedy
tokens from a short chat prompt and records the peak (VmHWM). "Peak over baseline" is what the model
and its decoding cost; the baseline is the interpreter with torch and transformers (or llama_cpp)
imported. Cases:
    adaroute-checkpoint   the runtime's weights read from the directory (runtime.checkpoint.load_weights,
                          as ``adaroute generate`` runs a routed directory): blocks, no float32 copy
    adaroute-module       the directory loaded as a transformers model (dequantised float32, as eval's
                          reference and the report use it), then the runtime's weights from the file
    llama.cpp             llama-cpp-python on the GGUF (when installed), same prompt and tokens
The target the issue sets: a q4 directory <= 1.5x the GGUF's size; peak RSS of the q4 routed engine
<= 2x the GGUF's size plus the KV cache.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

PROMPT = "Explain in a few sentences why the sky is blue."

_STATUS = '''
def status():
    out = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out
'''

ADAROUTE = _STATUS + '''
import json, sys, time
import torch, transformers
from adaroute.cli.common import setup_threads
from adaroute.kernels import cpu
from adaroute.runtime import Engine, SamplingConfig, chat_prompt_ids, generate_ids_text
from adaroute.runtime.checkpoint import load_weights
setup_threads()
cpu._lib()
base = status()
start = time.perf_counter()
if MODE == "checkpoint":
    from adaroute.generate import load_engine
    engine, tokenizer, model = load_engine(DIRECTORY)
else:
    from adaroute.models import load_model
    model, tokenizer = load_model(DIRECTORY)
    engine = Engine.from_model(model)
loaded = status()
ids = chat_prompt_ids(tokenizer, PROMPT)
text = generate_ids_text(engine, tokenizer, ids, NEW, SamplingConfig(), model)
w = engine.w
kv = len(w.layers) * 2 * w.n_kv_heads * w.head_dim * 4 * (len(ids) + NEW)
print(json.dumps({"baseline": base["VmRSS"], "after_load": loaded["VmRSS"], "peak": status()["VmHWM"],
                  "kv_bytes": kv, "seconds": time.perf_counter() - start, "text": text[:80]}))
'''

LLAMA_CPP = _STATUS + '''
import json, time
import llama_cpp
base = status()
start = time.perf_counter()
llm = llama_cpp.Llama(model_path=GGUF, n_ctx=512, n_threads=2, verbose=False)
loaded = status()
out = llm.create_chat_completion([{"role": "user", "content": PROMPT}], max_tokens=NEW, temperature=0.0)
print(json.dumps({"baseline": base["VmRSS"], "after_load": loaded["VmRSS"], "peak": status()["VmHWM"],
                  "kv_bytes": None, "seconds": time.perf_counter() - start,
                  "text": out["choices"][0]["message"]["content"][:80]}))
'''


def run_case(code: str, **values) -> dict:
    prelude = "".join(f"{k} = {v!r}\n" for k, v in values.items())
    proc = subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"a case failed:\n{proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("directory", help="a routed model directory (adaroute convert ... --weights q4)")
    p.add_argument("--gguf", help="the GGUF file it compares with (a path or smollm2-135m)")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--cases", nargs="+", default=["adaroute-checkpoint", "adaroute-module", "llama.cpp"])
    p.add_argument("--json", default="out/memory.json")
    args = p.parse_args(argv)

    directory = Path(args.directory)
    gguf = None
    if args.gguf:
        from adaroute.models import resolve

        source = resolve(args.gguf)
        gguf = source.directory / source.gguf_file if source.gguf_file else Path(args.gguf)
    meta = json.loads((directory / "config.json").read_text())["adaroute"]
    sizes = {"directory": directory_bytes(directory), "weights_file": (directory / "model.safetensors").stat().st_size,
             "gguf": gguf.stat().st_size if gguf else None}
    results = {}
    for case in args.cases:
        if case == "llama.cpp":
            try:
                import llama_cpp  # noqa: F401
            except ImportError:
                print("llama.cpp: llama_cpp is not installed (pip install -e .[llamacpp]); skipped")
                continue
            if gguf is None:
                continue
            results[case] = run_case(LLAMA_CPP, GGUF=str(gguf), PROMPT=PROMPT, NEW=args.new_tokens)
        else:
            mode = case.removeprefix("adaroute-")
            results[case] = run_case(ADAROUTE, MODE=mode, DIRECTORY=str(directory), PROMPT=PROMPT,
                                     NEW=args.new_tokens)

    mb = 1e6
    print(f"{directory} (weights {meta.get('weights', 'f32')}): directory {sizes['directory'] / mb:.1f} MB"
          + (f", GGUF {gguf.name} {sizes['gguf'] / mb:.1f} MB: directory / GGUF "
             f"{sizes['directory'] / sizes['gguf']:.2f}x (target <= 1.5x)" if gguf else ""))
    print(f"{'case':<22}{'baseline MB':>12}{'after load':>12}{'peak MB':>10}{'peak - base':>13}{'KV MB':>8}"
          f"{'target MB':>11}  first words")
    for case, r in results.items():
        over = r["peak"] - r["baseline"]
        kv = r["kv_bytes"]
        target = 2 * sizes["gguf"] + (kv or 0) if gguf else None
        r.update(peak_over_baseline=over, target=target)
        print(f"{case:<22}{r['baseline'] / mb:>12.1f}{r['after_load'] / mb:>12.1f}{r['peak'] / mb:>10.1f}"
              f"{over / mb:>13.1f}{(kv or 0) / mb:>8.1f}{(target or 0) / mb:>11.1f}  {r['text'][:40]!r}")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"directory": str(directory), "weights": meta.get("weights", "f32"),
                               "gguf": str(gguf) if gguf else None, "sizes": sizes,
                               "new_tokens": args.new_tokens, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
