"""Speed bench: decode and prefill throughput, per-token latency and memory, engines side by side.

All engines run in one process and are interleaved (engine A, B, C, then A, B, C again ...) after a
warm-up, so a machine whose load changes during the run slows every engine alike and the ratios
between them stay meaningful. Throughputs are the median over rounds (each round's tokens over its
time), latencies are percentiles over every step of every round. Engines:

    transformers-eager   ``model.generate`` on the model as loaded (routed layers set dense), float32
    adaroute-dense       the lean runtime, every FFN dense, in the dense model's own layout (a routed
                         model's float32 FFNs copied back out of the unit-packed store)
    adaroute-routed      the lean runtime, routed FFNs sparse while decoding (only for routed models)
                         (at a quantised ``weights`` format both are named with it: ``adaroute-dense q4_1``)
    llama.cpp            the same GGUF file through ``llama_cpp``, when that package is importable

Memory: ``peak_rss_mb`` is the process's resident set at its highest while the engine ran (shared
with the engines loaded beside it); ``engine_mb`` is what the engine itself needs: the weights it
reads plus the highest resident growth during its runs (KV cache, activations).
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

MB = 1 << 20


@dataclass
class Run:
    """One timed generation: prefill wall time and each decode step's wall time."""

    prompt_tokens: int
    batch: int
    prefill_s: float
    step_s: list[float]


@dataclass
class BenchRecord:
    engine: str
    batch: int
    new_tokens: int
    decode_tokens_per_s: float
    latency_p50_ms: float
    latency_p95_ms: float
    prefill_tokens_per_s: float
    peak_rss_mb: float
    engine_mb: float
    weight_mb_per_step: float | None = None  # weight bytes one decode step reads (batch 1: per token)
    density: float | None = None
    repeats: int = 0
    vs_dense: float | None = None  # decode tokens/s over adaroute-dense's at the same batch
    ideal_vs_dense: float | None = None  # adaroute-dense's weight bytes per step over this engine's
    note: str = ""


@dataclass
class BenchEngine:
    """An engine under test: ``generate(prompts [B lists of ids], new_tokens) -> Run``."""

    name: str
    generate: Callable[[list[list[int]], int], Run]
    weight_bytes: int  # bytes of weights the engine holds
    bytes_per_step: Callable[[], int | None] = lambda: None  # weight bytes one decode step reads (batch 1)
    density: Callable[[], float | None] = lambda: None
    reset: Callable[[], None] = lambda: None  # forget what earlier runs counted (a new batch size)
    runs: list[Run] = field(default_factory=list)
    peak_rss: int = 0
    growth: int = 0
    weights: object = None  # the runtime's ModelWeights (adaroute engines only)


class RssSampler:
    """Highest resident set size seen while active (sampled every few ms from /proc)."""

    def __init__(self, interval_s: float = 0.005):
        self.interval_s, self.peak, self._stop = interval_s, 0, threading.Event()

    @staticmethod
    def current() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * 4096
        except OSError:  # not Linux: fall back to the lifetime peak
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _loop(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.current())
            time.sleep(self.interval_s)

    @contextmanager
    def watch(self):
        self.peak, self._stop = self.current(), threading.Event()
        thread = threading.Thread(target=self._loop, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join()
            self.peak = max(self.peak, self.current())


# -- engines -------------------------------------------------------------------------------------

@contextmanager
def _dense_routing(model: nn.Module):
    """Temporarily give every routed layer the dense policy (for the transformers baseline)."""
    saved = [(m, m.threshold, m.min_units, m.max_units) for m in model.modules() if hasattr(m, "w_down_t")]
    for m, *_ in saved:
        m.threshold, m.min_units, m.max_units = float("-inf"), 0, m.w_gate.shape[0]
    try:
        yield
    finally:
        for m, threshold, lo, hi in saved:
            m.threshold, m.min_units, m.max_units = threshold, lo, hi


def hf_eager_engine(model: nn.Module, bytes_per_step: Callable[[], int | None] | None = None) -> BenchEngine:
    """``bytes_per_step``: weight bytes one decode step reads (default: every parameter's, an upper
    bound; build_engines passes the runtime's count of the same dense step)."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StepClock(StoppingCriteria):
        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores, **kwargs):
            self.times.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    @torch.inference_mode()
    def generate(prompts, new_tokens):
        ids = torch.tensor(prompts, device=model.device)  # [B, P] (bench prompts share one length)
        clock, start = StepClock(), time.perf_counter()
        with _dense_routing(model):
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                           stopping_criteria=StoppingCriteriaList([clock]))
        steps = [b - a for a, b in zip(clock.times, clock.times[1:], strict=False)]
        return Run(ids.numel(), ids.shape[0], clock.times[0] - start, steps)

    from adaroute.runtime.cost import distinct_bytes

    weights = distinct_bytes(model.parameters())
    return BenchEngine("transformers-eager", generate, weights, bytes_per_step or (lambda: weights))


def runtime_engine(model: nn.Module | None, routed: bool, kernel: str | None = None, name: str | None = None,
                   weights=None) -> BenchEngine:
    """The runtime on ``model``'s weights, or on ``weights`` (a ``ModelWeights``, e.g. a GGUF's blocks)."""
    from adaroute.runtime import Engine, ExecutionPolicy, UnitCounter, generate
    from adaroute.runtime.cost import distinct_bytes, held_tensors
    from adaroute.runtime.formats import runtime_weights

    policy = ExecutionPolicy() if routed else ExecutionPolicy.always_dense()
    engine = Engine(weights or runtime_weights(model, None), kernel=kernel, policy=policy)
    counter = UnitCounter()
    if routed:
        engine.counter = counter

    def run(prompts, new_tokens):
        out = generate(engine, prompts, new_tokens)
        return Run(sum(len(p) for p in prompts), len(prompts), out.prefill_s, out.step_s)

    def density():
        """Realised FFN density over the sparse steps; None when no step ran sparse (then the
        routed layers ran dense, e.g. at a batch above the execution policy's crossover)."""
        return counter.density if routed and counter.slots else None

    def reset():
        nonlocal counter
        counter = UnitCounter()
        if routed:
            engine.counter = counter

    w = engine.w
    held = held_tensors(w, routed) + (engine.made_tensors if routed else [])  # the dense one reads no router
    return BenchEngine(name or ("adaroute-routed" if routed else "adaroute-dense"), run, distinct_bytes(held),
                       lambda: sum(w.weight_bytes(density(), routed_head=routed).values()), density, reset, weights=w)


def llama_cpp_engine(gguf_path: str, threads: int, max_len: int) -> BenchEngine | None:
    """llama.cpp on the GGUF file, or None when ``llama_cpp`` is not installed (never a dependency)."""
    try:
        import llama_cpp
    except ImportError:
        return None
    llm = llama_cpp.Llama(model_path=gguf_path, n_ctx=max_len, n_threads=threads, n_batch=512, verbose=False)

    def generate(prompts, new_tokens):
        if len(prompts) != 1:
            raise NotImplementedError("llama.cpp engine is run at batch 1 only")
        start, times = time.perf_counter(), []
        for _ in llm.generate(prompts[0], top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            times.append(time.perf_counter())
            if len(times) == new_tokens:
                break
        steps = [b - a for a, b in zip(times, times[1:], strict=False)]
        return Run(len(prompts[0]), 1, times[0] - start, steps)

    import os

    size = os.path.getsize(gguf_path)
    return BenchEngine("llama.cpp", generate, size, lambda: size)


def blocks_engine(gguf_path: str, max_len: int, kernel: str | None = None) -> BenchEngine | None:
    """The runtime on the GGUF file's own quantised blocks (None for a float file: adaroute-dense is it)."""
    from adaroute.runtime.quant_step import is_quantised
    from adaroute.runtime.quant_weights import from_gguf, weight_format

    weights = from_gguf(gguf_path, max_len)
    if not is_quantised(weights):
        return None
    return runtime_engine(None, routed=False, kernel=kernel, name=f"adaroute {weight_format(weights)}",
                          weights=weights)


# -- running -------------------------------------------------------------------------------------

def bench_prompts(tokenizer, batch: int, length: int) -> list[list[int]]:
    """``batch`` different prompts of exactly ``length`` tokens, from Python's own documentation."""
    from pydoc_data.topics import topics

    texts = [topics[k] for k in sorted(topics) if len(topics[k]) > 8 * length]
    prompts = [tokenizer(texts[i % len(texts)]).input_ids[:length] for i in range(batch)]
    if any(len(p) < length for p in prompts):
        raise ValueError(f"could not build {batch} prompts of {length} tokens")
    return prompts


def run_engines(engines: Sequence[BenchEngine], prompts: list[list[int]], new_tokens: int, repeats: int = 3,
                warmup_tokens: int = 8, progress: Callable[[str], None] | None = None) -> list[BenchRecord]:
    """Warm every engine up, then ``repeats`` interleaved rounds; one record per engine."""
    live = []
    for e in engines:
        e.runs, e.peak_rss, e.growth = [], 0, 0
        e.reset()
        try:
            e.generate(prompts, warmup_tokens)
            live.append(e)
        except NotImplementedError as err:
            if progress:
                progress(f"{e.name}: skipped ({err})")
    sampler = RssSampler()
    for r in range(repeats):
        for e in live:
            if progress:
                progress(f"round {r + 1}/{repeats}: {e.name}")
            before = sampler.current()
            with sampler.watch():
                e.runs.append(e.generate(prompts, new_tokens))
            e.peak_rss, e.growth = max(e.peak_rss, sampler.peak), max(e.growth, sampler.peak - before)
    return relate_to_dense([_record(e, new_tokens) for e in live])


def relate_to_dense(records: list[BenchRecord]) -> list[BenchRecord]:
    """Fill ``vs_dense`` (achieved) and ``ideal_vs_dense`` (implied by weight bytes per token)
    against the adaroute-dense record of the same batch (at a quantised format: ``adaroute-dense FMT``)."""
    dense = {}
    for r in records:
        if r.engine == "adaroute-dense" or r.engine.startswith("adaroute-dense "):
            dense.setdefault(r.batch, r)
    for r in records:
        base = dense.get(r.batch)
        if base is None:
            continue
        r.vs_dense = round(r.decode_tokens_per_s / base.decode_tokens_per_s, 3)
        if r.weight_mb_per_step and base.weight_mb_per_step:
            r.ideal_vs_dense = round(base.weight_mb_per_step / r.weight_mb_per_step, 3)
    return records


def _record(e: BenchEngine, new_tokens: int) -> BenchRecord:
    steps = [s for run in e.runs for s in run.step_s]
    batch = e.runs[0].batch
    # median over rounds: one round disturbed by another process must not decide a ratio
    decode = statistics.median(batch * len(r.step_s) / sum(r.step_s) for r in e.runs)
    prefill = statistics.median(r.prompt_tokens / r.prefill_s for r in e.runs)
    q = statistics.quantiles(steps, n=20) if len(steps) > 1 else steps * 19
    per_step = e.bytes_per_step()  # per decode step, i.e. per token at batch 1
    if batch > 1 and e.density() is not None:
        per_step = None  # a sparse step reads the union of its tokens' units, which per-token counts do not give
    return BenchRecord(
        engine=e.name, batch=batch, new_tokens=new_tokens, decode_tokens_per_s=round(decode, 2),
        latency_p50_ms=round(1e3 * statistics.median(steps), 2), latency_p95_ms=round(1e3 * q[18], 2),
        prefill_tokens_per_s=round(prefill, 1), peak_rss_mb=round(e.peak_rss / MB, 1),
        engine_mb=round((e.weight_bytes + e.growth) / MB, 1),
        weight_mb_per_step=None if per_step is None else round(per_step / MB, 3),
        density=None if e.density() is None else round(e.density(), 3), repeats=len(e.runs))


def format_table(records: Sequence[BenchRecord]) -> str:
    """A plain-text table. ``vs dense``: decode speed over adaroute-dense's at the same batch;
    ``ideal``: the ratio the weight bytes read per step imply; ``of ideal``: achieved/ideal."""
    width = max([20, *(len(r.engine) + 2 for r in records)])
    head = f"{'engine':<{width}}{'batch':>6}{'decode tok/s':>14}{'vs dense':>10}{'ideal':>8}{'of ideal':>10}" \
           f"{'p50 ms':>9}{'p95 ms':>9}{'prefill tok/s':>15}{'MB/step':>10}{'engine MB':>11}{'density':>9}"
    lines = [head, "-" * len(head)]
    for r in records:
        of_ideal = r.vs_dense / r.ideal_vs_dense if r.vs_dense and r.ideal_vs_dense else None
        lines.append(f"{r.engine:<{width}}{r.batch:>6}{r.decode_tokens_per_s:>14.1f}{_fmt(r.vs_dense, '.2f', 'x'):>10}"
                     f"{_fmt(r.ideal_vs_dense, '.2f', 'x'):>8}{_fmt(of_ideal, '.0%'):>10}"
                     f"{r.latency_p50_ms:>9.1f}{r.latency_p95_ms:>9.1f}{r.prefill_tokens_per_s:>15.1f}"
                     f"{_fmt(r.weight_mb_per_step):>10}{r.engine_mb:>11.0f}{_fmt(r.density, '.2f'):>9}")
    return "\n".join(lines)


def _fmt(v, spec: str = ".0f", suffix: str = "") -> str:
    return "-" if v is None else format(v, spec) + suffix


def write_json(records: Sequence[BenchRecord], path: str, meta: dict | None = None) -> None:
    with open(path, "w") as f:
        json.dump({"meta": meta or {}, "records": [asdict(r) for r in records]}, f, indent=2)


def build_engines(model: nn.Module, gguf_path: str | None = None, threads: int | None = None,
                  max_len: int = 2048, kernel: str | None = None, weights: str | None = None,
                  dense_baseline: str = "original") -> list[BenchEngine]:
    """The engines for one model: transformers eager, adaroute dense, adaroute routed when the model
    has routed layers, and llama.cpp when a GGUF file is given and ``llama_cpp`` is importable.

    ``weights``: the format the adaroute engines run at (``adaroute.runtime.formats``; None = f32); at
    q8/q4 they are named with it (``adaroute-dense q8_0``, ``adaroute-routed q8_0``) and share one set of
    quantised weights. transformers eager always runs the float32 model. ``dense_baseline``: "original"
    runs adaroute-dense on the dense model's own layout (``original_layout``: a float32 routed model's
    FFNs copied out of the unit-packed store), "arm" on the routed weights as the server's dense arm
    does (no copy)."""
    from adaroute.runtime.formats import F32, parse_format, runtime_weights
    from adaroute.runtime.weights import is_routed_mlp, original_layout

    fmt = parse_format(weights)
    held = runtime_weights(model, fmt)  # one set of weights for both adaroute engines
    suffix = "" if fmt == F32 else f" {fmt}"
    if dense_baseline not in ("original", "arm"):
        raise ValueError(f"dense_baseline must be 'original' or 'arm', got {dense_baseline!r}")
    dense_weights = original_layout(held) if dense_baseline == "original" else held
    dense = runtime_engine(None, routed=False, kernel=kernel, name=f"adaroute-dense{suffix}", weights=dense_weights)
    if fmt == F32:
        eager_bytes = dense.bytes_per_step
    elif getattr(model, "adaroute_blocks", None) is None:  # transformers reads the float32 weights
        float_bytes = sum(runtime_weights(model, F32, 1).weight_bytes().values())
        eager_bytes = lambda: float_bytes  # noqa: E731
    else:  # a directory of blocks, loaded dequantised: transformers reads its float32 parameters
        eager_bytes = None
    engines = [hf_eager_engine(model, eager_bytes), dense]
    if any(is_routed_mlp(m) for m in model.modules()):
        engines.append(runtime_engine(None, routed=True, kernel=kernel, name=f"adaroute-routed{suffix}",
                                      weights=held))
    if gguf_path:
        blocks = blocks_engine(gguf_path, max_len, kernel)
        if blocks is not None:
            engines.append(blocks)
        cpp = llama_cpp_engine(gguf_path, threads or torch.get_num_threads(), max_len)
        if cpp is not None:
            engines.append(cpp)
    return engines


def bench_table(model: nn.Module, tokenizer, new_tokens: int = 64, batch: int = 1, prompt_tokens: int = 64,
                repeats: int = 2, gguf_path: str | None = None) -> list[BenchRecord]:
    """One call for a demo: every applicable engine on ``model``, interleaved; print with format_table."""
    prompts = bench_prompts(tokenizer, batch, prompt_tokens)
    engines = build_engines(model, gguf_path, max_len=prompt_tokens + new_tokens + 16)
    return run_engines(engines, prompts, new_tokens, repeats)
