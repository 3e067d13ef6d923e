"""What the routed output head costs in quality: shadow format x exact rows per token, on held-out text.

    python benchmarks/routed_head.py [MODEL] --data builtin:heldout licences.txt readmes.txt \
        [--tokens 2048] [--rows 0 64 256 1024] [--formats q8_0 q4_1] [--jitter] [--json out/routed_head.json]

The model's final hidden states on the first ``--tokens`` tokens of each text (windows of 512, as
``adaroute eval``) go through the exact head and through ``runtime.head.RoutedHead`` (the same kernels
the engine runs), and each token's two next-token distributions are compared:

    greedy      share of tokens whose argmax is the same
    sampled     1 - total variation distance: the chance that a token sampled from the routed head is
                the one sampled from the exact head, under the best coupling of the two samplers
    KL          KL(exact || routed), nats per token
    ppl ratio   perplexity of the text under the routed head over that under the exact head

rows 0 is the shadow alone. The embedded model's head came from a Q8_0 file, so a q8_0 shadow of it is
exact; ``--jitter`` moves every head weight by up to half its block's q8 step first (uniform, seeded),
which gives a head no 8-bit shadow reproduces, as a model trained in float would have.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from adaroute import load_model
from adaroute.data import load_texts
from adaroute.eval.perplexity import tokenize, windows
from adaroute.kernels import cpu
from adaroute.runtime.head import routed_head


def hidden_states(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(final-norm hidden states [N, H], next tokens [N]) over windows of 512, as eval scores them."""
    xs, ys = [], []
    with torch.inference_mode():
        for w in windows(ids, 512):
            out = model.model(w).last_hidden_state[0]  # the base model's output is after the final norm
            xs.append(out[:-1])
            ys.append(w[0, 1:])
    return torch.cat(xs).contiguous(), torch.cat(ys)


def jittered(head: torch.Tensor, seed: int = 0) -> torch.Tensor:
    blocks = head.view(head.shape[0], -1, 32)
    step = blocks.abs().amax(-1, keepdim=True) / 127
    g = torch.Generator().manual_seed(seed)
    return (blocks + (torch.rand(blocks.shape, generator=g) - 0.5) * step).view_as(head).contiguous()


def compare(x: torch.Tensor, y: torch.Tensor, head: torch.Tensor, fmt: str, rows: int) -> dict:
    exact = cpu.linear(x, head)  # [N, V]
    rh = routed_head(head, max(rows, 1), fmt)
    routed = cpu.linear(x, rh.shadow)
    if rows:
        cpu.head_rows(x, head, routed, rows)
    lp, lq = torch.log_softmax(exact, -1), torch.log_softmax(routed, -1)
    p = lp.exp()
    nll_p, nll_q = -lp.gather(1, y[:, None]).mean(), -lq.gather(1, y[:, None]).mean()
    return {"format": fmt, "rows": rows, "greedy": (exact.argmax(-1) == routed.argmax(-1)).float().mean().item(),
            "sampled": 1 - 0.5 * (p - lq.exp()).abs().sum(-1).mean().item(),
            "kl": (p * (lp - lq)).sum(-1).mean().item(), "ppl_ratio": math.exp(nll_q - nll_p),
            "head_mb": (rh.shadow.numel() + rows * head.shape[1] * 4) / 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="smollm2-135m")
    ap.add_argument("--data", nargs="+", default=["builtin:heldout"])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--rows", type=int, nargs="+", default=[0, 64, 256, 1024])
    ap.add_argument("--formats", nargs="+", default=["q8_0", "q4_1"])
    ap.add_argument("--jitter", action="store_true", help="a head no q8_0 shadow reproduces (see above)")
    ap.add_argument("--json", default="out/routed_head.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    model, tokenizer = load_model(args.model)
    head = model.lm_head.weight.detach().float().contiguous()
    head = jittered(head) if args.jitter else head
    records = []
    print(f"{'text':<22}{'shadow':>8}{'rows':>6}{'head MB':>9}{'greedy':>8}{'sampled':>9}{'KL':>10}{'ppl ratio':>11}")
    for text in load_texts(args.data):
        x, y = hidden_states(model, tokenize(tokenizer, text.text, args.tokens))
        for fmt in args.formats:
            for rows in args.rows:
                r = {"data": text.name, **compare(x, y, head, fmt, rows)}
                records.append(r)
                print(f"{Path(text.name).name[-22:]:<22}{fmt:>8}{rows:>6}{r['head_mb']:>9.1f}{r['greedy']:>8.4f}"
                      f"{r['sampled']:>9.4f}{r['kl']:>10.1e}{r['ppl_ratio']:>11.5f}")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "jitter": args.jitter, "tokens": args.tokens,
                               "exact_head_mb": head.numel() * 4 / 1e6, "records": records}, indent=2) + "\n")


if __name__ == "__main__":
    main()
