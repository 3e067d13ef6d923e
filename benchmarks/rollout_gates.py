"""Rollback statistics of the rollout gates on per-request outcomes drawn from measured distributions.

    python benchmarks/rollout_gates.py --routed /tmp/routed-0.5 [--requests 48] [--seeds 20] [--json OUT]

Step 1 (measured, on the real model): the dense arm answers ``--requests`` chat prompts (greedy);
each answer is re-scored teacher-forced by the routed arm exactly as the server's shadow does, for a
healthy arm and for degraded ones (the routed model forced to density 0.05; router scores corrupted in
every layer). Each re-scoring gives one sample (agreement, KL, fail-safe rate).

Step 2 (simulated): for each seed, a stream of requests in the shadow stage (shadow fraction 0.2)
whose shadowed requests draw a measured sample of the arm under test (with replacement) and feed the
gates built from the model's calibration, as the server builds them. Counts: rollbacks of the healthy
arm in ``--stream`` requests, and for each degraded arm whether it was rolled back within the gates'
window (``window`` requests), and after how many requests.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from pydoc_data.topics import topics

import torch

from adaroute.cli.common import format_table, setup_threads
from adaroute.models import load_model
from adaroute.routing.profile import apply_density
from adaroute.routing.surgery import routed_modules
from adaroute.runtime import Engine, ExecutionPolicy, chat_prompt_ids, generate, stop_tokens_for
from adaroute.runtime.failsafe import FaultInjector
from adaroute.serve.gates import GateConfig
from adaroute.serve.rollout import Rollout
from adaroute.serve.rollout_service import calibration_of, calibration_quality
from adaroute.serve.shadow import Rescorer, ShadowJob, ShadowResult


def prompts(n: int) -> list[str]:
    names = sorted(topics)
    return [f"In two sentences, what does the Python documentation topic '{names[(7 * i) % len(names)]}' cover?"
            for i in range(n)]


def dense_answers(model, tok, n: int, max_tokens: int) -> list[tuple[list[int], list[int]]]:
    engine = Engine.from_model(model, policy=ExecutionPolicy.always_dense())
    stops = stop_tokens_for(tok, model)
    out = []
    for text in prompts(n):
        ids = chat_prompt_ids(tok, [{"role": "user", "content": text}])
        answer = generate(engine, [ids], max_tokens, stop_tokens=stops).tokens[0]
        out.append((ids, [t for t in answer if t not in stops]))
    return out


def measure(model, answers, arm: str) -> list[dict]:
    """Shadow samples of one routed arm (healthy or degraded) over the dense answers."""
    mods = routed_modules(model)
    saved = [m.policy for m in mods]
    rescorer = Rescorer(Engine.from_model(model).w)
    if arm == "density 0.05":
        apply_density(mods, 0.05)
    if arm == "corrupted scores":
        rescorer.routed.failsafe.faults = FaultInjector(("scores",), 1.0, seed=0, every_layer=True)
    try:
        results = [rescorer(ShadowJob(str(i), p, a, "dense")) for i, (p, a) in enumerate(answers) if a]
    finally:
        for m, pol in zip(mods, saved, strict=True):
            m.set_policy(pol)
    return [{"agreement": r.agreement, "kl": r.kl, "failsafe_events": r.failsafe_events,
             "failsafe_slots": r.failsafe_slots, "tokens": r.tokens} for r in results]


def simulate(samples: list[dict], gates: GateConfig, seed: int, requests: int, shadow_fraction: float) -> int | None:
    """Requests until the rollout rolled back (None: never, within ``requests``)."""
    rng = random.Random(seed)
    rollout = Rollout("shadow", gates, shadow_fraction=shadow_fraction, seed=seed)
    for i in range(1, requests + 1):
        if rollout.wants_shadow():
            s = rng.choice(samples)
            rollout.on_shadow(ShadowResult(str(i), "dense", s["tokens"], s["agreement"], s["kl"],
                                           s["failsafe_events"], s["failsafe_slots"]))
        if rollout.stage == "dense":
            return i
    return None


def _mean(samples: list[dict], key: str) -> float:
    return sum(x[key] for x in samples) / len(samples)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--routed", required=True)
    ap.add_argument("--requests", type=int, default=48, help="measured requests per arm")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--stream", type=int, default=200, help="requests per simulated run of the healthy arm")
    ap.add_argument("--shadow-fraction", type=float, default=0.2)
    ap.add_argument("--samples", default="out/shadow_samples.json", help="measured samples (reused if present)")
    ap.add_argument("--json", default="out/rollout_gates.json")
    args = ap.parse_args(argv)
    setup_threads()
    model, tok = load_model(args.routed)
    arms = ("healthy", "density 0.05", "corrupted scores")
    cache = Path(args.samples)
    if cache.is_file():
        measured = json.loads(cache.read_text())
    else:
        answers = dense_answers(model, tok, args.requests, args.max_tokens)
        measured = {arm: measure(model, answers, arm) for arm in arms}
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(measured) + "\n")
    calibration = calibration_of(Path(args.routed))
    weights = Engine.from_model(model).w
    agreement, kl = calibration_quality(weights, lambda t: list(tok(t).input_ids), calibration.get("data") or [])
    gates = GateConfig.from_calibration(agreement, kl)
    rows, result = [], {"gates": gates.to_dict(), "calibration": {"agreement": agreement, "kl": kl}, "arms": {}}
    for arm in arms:
        s = measured[arm]
        horizon = args.stream if arm == "healthy" else gates.window
        when = [simulate(s, gates, seed, horizon, args.shadow_fraction) for seed in range(args.seeds)]
        rolled = [w for w in when if w is not None]
        rows.append([arm, len(s), round(_mean(s, "agreement"), 4), round(_mean(s, "kl"), 4),
                     round(sum(x["failsafe_events"] for x in s) / sum(x["failsafe_slots"] for x in s), 5),
                     f"{len(rolled)}/{args.seeds}", horizon, round(sum(rolled) / len(rolled), 1) if rolled else "-"])
        result["arms"][arm] = {"samples": len(s), "rollbacks": len(rolled), "runs": args.seeds, "horizon": horizon,
                               "requests_to_rollback": when}
    print(f"gates from calibration (agreement {agreement:.4f}, KL {kl:.4f}): min_agreement {gates.min_agreement}, "
          f"max_kl {gates.max_kl}, max_failsafe_rate {gates.max_failsafe_rate}, min_samples {gates.min_samples}, "
          f"window {gates.window}; shadow fraction {args.shadow_fraction}")
    print(format_table(["routed arm", "measured requests", "agreement", "KL", "fail-safe rate", "rolled back",
                        "within requests", "mean requests to rollback"], rows))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    torch.manual_seed(0)
    sys.exit(main())
