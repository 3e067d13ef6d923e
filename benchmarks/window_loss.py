"""Where a routed model's extra loss goes on one text: by window, by token, by layer group, and how
many tokens change state (an FFN input far below its window's usual size) between dense and routed.

    python benchmarks/window_loss.py DIR --data readmes.txt [--window 512] [--max-tokens 4096]
        [--pick N] [--top 15] [--group 6] [--no-start] [--json out/window_loss.json]

DIR: a routed model directory. Every number is the reference path's (``compare_with_dense``'s
protocol): per window, NLL summed over its scored tokens, routed minus dense ("excess", nats).
The window studied is the one with the largest excess unless ``--pick`` names one (0-based). For it:

- the tokens with the largest excess, with the units per token they got (mean share over layers);
- the excess with one group of ``--group`` consecutive layers run dense and the rest routed as
  converted (which layers the loss comes from; the compounding of routing errors shows here);
- per layer, the tokens whose FFN input norm is under ``LOW_NORM`` x the window's median at that
  layer, dense and routed, and how many are low in one and not the other ("flipped"). In Llama-family
  models a few FFN units write a very large value into one residual dimension for some tokens
  (the "massive activations" of attention-sink tokens); after the RMSNorm such a token's FFN input
  is small in every later layer, and its FFN contributions with it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from adaroute.cli.common import format_table, setup_threads
from adaroute.data import load_texts
from adaroute.eval.perplexity import text_windows
from adaroute.fsio import write_json_atomic
from adaroute.models import load_model
from adaroute.routing import routed_modules
from adaroute.routing.policy import LayerPolicy
from adaroute.routing.quality import compare_with_dense, dense_policies

LOW_NORM = 0.5  # an FFN input under this share of the window's median norm at its layer is "low"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("routed", help="routed model directory")
    p.add_argument("--data", required=True, help="text file (or builtin:heldout)")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=4096)
    p.add_argument("--pick", type=int, help="window to study (default: the one with the largest excess)")
    p.add_argument("--top", type=int, default=15, help="tokens listed")
    p.add_argument("--group", type=int, default=6, help="layers per group run dense together")
    p.add_argument("--no-start", action="store_true", help="windows without the start token (adaroute eval --no-start)")
    p.add_argument("--json", default="out/window_loss.json")
    return p.parse_args(argv)


@torch.inference_mode()
def forward(model, mods, w: torch.Tensor):
    """Logits [W-1, V], FFN input norms [L, W] and selected share per layer [L, W] of one window."""
    norms, share = {}, {}

    class Keep:
        def record(self, layer, scores, mask, soft=None):
            share[layer] = mask.reshape(-1, mask.shape[-1]).float().mean(-1)

    hooks = [m.register_forward_pre_hook(lambda mod, a: norms.__setitem__(mod.layer_idx, a[0][0].norm(dim=-1)))
             for m in mods]
    for m in mods:
        m.collector = Keep()
    try:
        logits = model(input_ids=w, use_cache=False).logits[0, :-1].float()
    finally:
        for h in hooks:
            h.remove()
        for m in mods:
            m.collector = None
    layers = sorted(norms)
    ones = torch.ones(w.shape[1])
    return logits, torch.stack([norms[l] for l in layers]), torch.stack([share.get(l, ones) for l in layers])


def nll(logits: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, w[0, 1:], reduction="none")  # [W-1]


def window_excess(model, mods, w) -> float:
    with dense_policies(mods):
        dense = forward(model, mods, w)[0]
    return float((nll(forward(model, mods, w)[0], w) - nll(dense, w)).sum())


def low_norm(norms: torch.Tensor) -> torch.Tensor:
    """[L, W] bool: FFN inputs under LOW_NORM x their layer's median over the window."""
    return norms < LOW_NORM * norms.median(dim=1, keepdim=True).values


def group_ablation(model, mods, w, group: int) -> list[dict]:
    saved = [m.policy for m in mods]
    rows = []
    try:
        for start in range(0, len(mods), group):
            for i, m in enumerate(mods):
                m.set_policy(LayerPolicy.dense(m.units) if start <= i < start + group else saved[i])
            rows.append({"dense_layers": f"{mods[start].layer_idx}-{mods[min(start + group, len(mods)) - 1].layer_idx}",
                         "excess": round(window_excess(model, mods, w), 1)})
    finally:
        for m, p in zip(mods, saved, strict=True):
            m.set_policy(p)
    return rows


def study(model, tok, mods, w, args) -> dict:
    with dense_policies(mods):
        d_logits, d_norms, _ = forward(model, mods, w)
    r_logits, r_norms, share = forward(model, mods, w)
    excess = nll(r_logits, w) - nll(d_logits, w)  # [W-1], scored token t+1 from position t
    ids = w[0].tolist()
    pieces = [tok.decode([i]) for i in ids]
    top = []
    for t in excess.argsort(descending=True)[: args.top].tolist():
        top.append({"position": t, "excess": round(float(excess[t]), 2),
                    "context": "".join(pieces[max(0, t - 6): t + 1]), "next": pieces[t + 1],
                    "units_share": round(float(share[:, t].mean()), 3)})
    d_low, r_low = low_norm(d_norms), low_norm(r_norms)
    flipped = (d_low != r_low)[:, :-1]  # [L, W-1]
    worst = int(flipped.sum(1).argmax())
    moved = flipped[worst]
    d_nll = nll(d_logits, w)
    return {
        "excess": round(float(excess.sum()), 1), "top": top,
        "perplexity_dense": round(float(d_nll.mean().exp()), 2),
        "perplexity_ratio": round(float(excess.mean().exp()), 3),
        "low_norm": [{"layer": m.layer_idx, "dense": int(d_low[i].sum()), "routed": int(r_low[i].sum()),
                      "flipped": int(flipped[i].sum())} for i, m in enumerate(mods)],
        "flip_layer": mods[worst].layer_idx,
        "flipped_tokens": int(moved.sum()),
        "flipped_excess": round(float(excess[moved].sum()), 1),
        "flipped_units_share": round(float(share[:, :-1][:, moved].mean()), 3) if bool(moved.any()) else None,
        "other_units_share": round(float(share[:, :-1][:, ~moved].mean()), 3),
        "groups": group_ablation(model, mods, w, args.group),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_threads()
    model, tok = load_model(args.routed)
    mods = routed_modules(model)
    if not mods:
        raise SystemExit(f"{args.routed}: not a routed model directory")
    text = load_texts([args.data])[0]
    wins = text_windows(tok, text.text, args.window, args.max_tokens, not args.no_start)
    # the per-window records compare_with_dense keeps (same windows, same NLL sums)
    records = compare_with_dense(model, tok, text.text, args.window, args.max_tokens, cost=False,
                                 start=not args.no_start)["per_window"]
    per_window = [round(r["nll_routed"] - r["nll_dense"], 1) for r in records]
    pick = args.pick if args.pick is not None else max(range(len(wins)), key=per_window.__getitem__)
    print(f"{text.name}: excess NLL per window (routed - dense, nats): {per_window}; total {sum(per_window):.1f}")
    res = {"data": text.name, "per_window_excess": per_window, "window": pick,
           **study(model, tok, mods, wins[pick], args)}
    print(f"\nwindow {pick}: excess {res['excess']} nats; dense perplexity {res['perplexity_dense']}, routed / dense "
          f"{res['perplexity_ratio']}; largest per token:")
    print(format_table(["pos", "excess", "units", "context", "next"],
                       [[r["position"], r["excess"], r["units_share"], repr(r["context"]), repr(r["next"])]
                        for r in res["top"]]))
    print(f"\nwith one group of layers dense (the rest routed): {res['groups']}")
    print(f"\nFFN input low (< {LOW_NORM} x window median) per layer, dense / routed / flipped: "
          + " ".join(f"{r['layer']}:{r['dense']}/{r['routed']}/{r['flipped']}" for r in res["low_norm"]))
    print(f"most flips at layer {res['flip_layer']}: {res['flipped_tokens']} tokens, excess {res['flipped_excess']} "
          f"nats; units share {res['flipped_units_share']} (other tokens {res['other_units_share']})")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.json, res)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
