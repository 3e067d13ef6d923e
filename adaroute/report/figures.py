"""The report's figures as PNG files (matplotlib, Agg backend: no display needed).

Each ``plot_*`` takes its section's JSON (as report.json holds it) and a path, and writes one image.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 (after choosing the backend)
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

DPI = 80
DENSE, ROUTED, ORACLE = "#7f7f7f", "#1f77b4", "#ff7f0e"


def _save(fig, path: Path) -> str:
    for ax in fig.axes:
        if ax.get_xlabel() in ("layer", "tokens in flight B"):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path.name


def plot_curve(rows: list[dict], path: Path) -> str:
    fig, ax = plt.subplots(figsize=(6, 3.6))
    d = [r["density"] for r in rows]
    ax.plot(d, [r["learned"]["perplexity_ratio"] for r in rows], "o-", color=ROUTED, label="learned router")
    if all(r["oracle"] for r in rows):
        ax.plot(d, [r["oracle"]["perplexity_ratio"] for r in rows], "s--", color=ORACLE, label="hindsight oracle")
    ax.axhline(1.0, color=DENSE, lw=0.8)
    ax.set(xlabel="mean FFN density", ylabel="perplexity ratio (routed / dense)", title="Quality against density")
    ax.invert_xaxis()
    ax.legend()
    return _save(fig, path)


def _grouped_bars(ax, labels: list[str], bars: dict[str, tuple[list[float], str]], fmt: str) -> None:
    """One group of bars per label, one bar per series {name: (values, colour)}, values printed on top."""
    x, width = np.arange(len(labels)), 0.8 / len(bars)
    for i, (name, (values, color)) in enumerate(bars.items()):
        drawn = ax.bar(x + (i - (len(bars) - 1) / 2) * width, values, width, color=color, label=name)
        ax.bar_label(drawn, fmt=fmt, fontsize=8)
    ax.set_xticks(x, labels)
    ax.legend(loc="upper left")


def plot_speed(records: list[dict], path: Path) -> str:
    batches = sorted({r["batch"] for r in records})
    fig, ax = plt.subplots(figsize=(6, 3.4))
    def tps(engine):
        return [next((r["decode_tokens_per_s"] for r in records if r["engine"] == engine and r["batch"] == b), 0)
                for b in batches]

    _grouped_bars(ax, [f"batch {b}" for b in batches],
                  {e: (tps(e), c) for e, c in (("adaroute-dense", DENSE), ("adaroute-routed", ROUTED))}, "%.0f")
    ax.set(ylabel="decode tokens/s", title="Decode throughput, measured in this run")
    return _save(fig, path)


def plot_cost(scenarios: list[dict], path: Path) -> str:
    fig, ax = plt.subplots(figsize=(6, 3.4))
    cost = {arm: [s[arm]["cost_per_million_tokens"] for s in scenarios] for arm in ("dense", "routed")}
    _grouped_bars(ax, [f"batch {s['batch']}" for s in scenarios],
                  {"dense": (cost["dense"], DENSE), "routed": (cost["routed"], ROUTED)}, "%.3g")
    ax.set(ylabel="cost per 1M tokens", title="Serving cost at the measured throughput")
    return _save(fig, path)


def plot_groups(section: dict, path: Path) -> str:
    rows = section["groups"]
    fig, axes = plt.subplots(1, 2, figsize=(8, 0.5 * len(rows) + 1.6), sharey=True)
    y = np.arange(len(rows))
    for ax, key, label in ((axes[0], "perplexity_ratio", "perplexity ratio"), (axes[1], "mean_density", "density")):
        for i, r in enumerate(rows):
            color = "#d62728" if r["flags"] else ROUTED
            ci = r["interval"][key]
            err = None if ci is None else [[r[key] - ci[0]], [ci[1] - r[key]]]
            ax.errorbar(r[key], i, xerr=err, fmt="o", color=color, capsize=3)
        ax.axvline(section["overall"][key], color=DENSE, ls="--", lw=1, label="overall")
        ax.set(xlabel=f"{label} (95% CI)")
    axes[0].set_yticks(y, [r["group"] for r in rows])
    axes[0].invert_yaxis()
    axes[0].legend(loc="lower right", fontsize=8)
    fig.suptitle("Per data group (red: flagged)")
    return _save(fig, path)


def plot_usage(section: dict, path: Path) -> str:
    layers = section["layers"]
    names = list(layers)
    hist = np.array([layers[k]["usage_histogram"] for k in names], dtype=float)  # [L, bins]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8), gridspec_kw={"width_ratios": [3, 2]})
    im = axes[0].imshow(np.log10(hist.T + 1), aspect="auto", origin="lower", cmap="viridis",
                        extent=(-0.5, len(names) - 0.5, 0, 1))
    fig.colorbar(im, ax=axes[0], label="log10(units + 1)")
    axes[0].set(xlabel="layer", ylabel="share of tokens selecting a unit", title="Unit use per layer")
    axes[1].plot(range(len(names)), [layers[k]["gini"] for k in names], "o-", color=ROUTED, label="Gini")
    axes[1].plot(range(len(names)), [layers[k]["never"] for k in names], "v-", color="#d62728", label="never used")
    axes[1].plot(range(len(names)), [layers[k]["almost_always"] for k in names], "^-", color=ORACLE,
                 label=f"used by >= {section['almost_always_threshold']:.0%}")
    axes[1].set(xlabel="layer", ylabel="share", title="Imbalance per layer", ylim=(0, 1))
    axes[1].legend(fontsize=8)
    return _save(fig, path)


def plot_token_density(section: dict, path: Path) -> str:
    layers = section["layers"]
    names = list(layers)
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for p, style in (("p10", ":"), ("p50", "-"), ("p90", "--"), ("p99", "-.")):
        ax.plot(range(len(names)), [layers[k]["token_density"][p] for k in names], style, color=ROUTED, label=p)
    ax.set(xlabel="layer", ylabel="units per token / units", title="Per-token density by layer", ylim=(0, 1.05))
    ax.legend(fontsize=8, ncol=4)
    return _save(fig, path)


def plot_union(section: dict, path: Path) -> str:
    u = section["union"]
    fig, ax = plt.subplots(figsize=(6, 3.4))
    ax.plot(u["batch"], u["measured"], "o-", color=ROUTED, label="measured union")
    ax.plot(u["batch"], u["independent"], "s--", color=ORACLE, label="independent tokens 1-(1-d)^B")
    ax.axhline(1.0, color=DENSE, lw=1, label="dense")
    ax.set(xlabel="tokens in flight B", ylabel="share of FFN rows read per step",
           title="Union of selected units grows with batch", ylim=(0, 1.05))
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_explain(section: dict, path: Path) -> str:
    counts = np.array(section["counts"], dtype=float) / np.array(section["units"], dtype=float)  # [T, L]
    tokens = section["tokens"]
    fig, ax = plt.subplots(figsize=(min(14, 2 + 0.16 * len(tokens)), 4))
    im = ax.imshow(counts.T, aspect="auto", origin="lower", cmap="magma", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, label="share of the layer's units used")
    ax.set_xticks(range(len(tokens)), [t.replace("\n", "\\n") for t in tokens], rotation=90, fontsize=6)
    ax.set(ylabel="layer", title="Units used per token and layer")
    return _save(fig, path)


def plot_traffic(section: dict, path: Path) -> str:
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for arm, series in section["per_arm_over_time"].items():
        color = {"dense": DENSE, "routed": ROUTED}.get(arm)
        axes[0].plot(series["minute"], series["requests"], "o-", color=color, label=arm, ms=3)
        axes[1].plot(series["minute"], series["completion_tokens"], "o-", color=color, label=arm, ms=3)
        axes[2].plot(series["minute"], series["failsafe"], "o-", color=color, label=arm, ms=3)
    for ax, what in zip(axes, ("requests", "generated tokens", "fail-safe events"), strict=True):
        ax.set(xlabel="minutes since the first request", ylabel=f"{what} per minute",
               title=f"{what.capitalize()} per arm")
        ax.legend(fontsize=8)
    for e in section["rollout_events"]:  # stage changes as vertical lines, rollbacks in red
        for ax in axes:
            ax.axvline((e["created"] - section["start"]) / 60, color="#d62728" if e["kind"] == "rollback" else "#999",
                       ls=":", lw=1)
    return _save(fig, path)


def plot_density_by_arm(section: dict, path: Path) -> str:
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for arm, values in section["density_by_arm"].items():
        if values:
            ax.hist(values, bins=20, range=(0, 1), alpha=0.6, label=arm,
                    color={"dense": DENSE, "routed": ROUTED}.get(arm))
    ax.set(xlabel="request FFN density", ylabel="requests", title="Density per arm")
    ax.legend(fontsize=8)
    return _save(fig, path)
