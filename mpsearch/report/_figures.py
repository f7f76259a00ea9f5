"""The report's figures, each a function of :class:`~mpsearch.report.StudyData` returning a
matplotlib ``Figure`` (made without pyplot, so the API can draw them on any thread)."""

from __future__ import annotations

import io
import math
from itertools import groupby

from matplotlib.figure import Figure

from mpsearch.report._data import SENSITIVITY_LABELS, StudyData, block_of, kind, short_name

MIB = 2**20
# One color per bit-width, low (red) to high (blue); 16 is grey: it is the unquantized layer.
BIT_COLORS = {2: "#c0392b", 3: "#e67e22", 4: "#f1c40f", 5: "#a3cb38", 6: "#1abc9c", 8: "#2e86c1", 16: "#7f8c8d"}
KIND_STYLE = {
    "sampled": dict(marker="o", color="#4c72b0", s=14, alpha=0.7, label="sampled"),
    "relinearised": dict(marker="D", color="#dd8452", s=26, alpha=0.9, label="re-linearised ILP"),
    "baseline": dict(marker="s", color="#222222", s=26, alpha=0.9, label="baseline (warm start)"),
}


def png(fig: Figure) -> bytes:
    """``fig`` as PNG bytes (no timestamp, so one study draws the same file twice)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    return buf.getvalue()


def _empty(fig: Figure, ax, text: str) -> Figure:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="#555555")
    ax.set_axis_off()
    return fig


def _log_if_wide(ax, values, axis: str = "y", wide: float = 30.0) -> None:
    positive = [v for v in values if v is not None and v > 0]
    if positive and max(positive) / min(positive) > wide:
        (ax.set_yscale if axis == "y" else ax.set_xscale)("log")


def loss_by_trial(data: StudyData) -> Figure:
    """Every complete trial's loss by number, the best so far within the budget, the baselines."""
    fig = Figure(figsize=(10, 5), layout="constrained")
    ax = fig.subplots()
    done = sorted(data.complete, key=lambda r: r.number)
    if not done:
        return _empty(fig, ax, "no complete trials yet")
    for name, style in KIND_STYLE.items():
        points = [r for r in done if kind(r) == name]
        if points:
            ax.scatter([r.number for r in points], [r.loss for r in points], zorder=3, **style)
    pruned = [r for r in data.records if r.state == "PRUNED" and r.intermediate and not r.repeat]
    if pruned:
        last = [r.intermediate[max(r.intermediate)] for r in pruned]
        ax.scatter([r.number for r in pruned], last, marker="x", color="#999999", s=14, label="pruned (last stage)", zorder=2)
    budget, xs, ys, best = data.budget_bytes, [], [], math.inf
    for r in done:
        if budget is None or (r.bytes is not None and r.bytes <= budget):
            best = min(best, r.loss)
        if math.isfinite(best):
            xs.append(r.number)
            ys.append(best)
    if xs:
        ax.step(xs, ys, where="post", color="#55a868", linewidth=2, label="best so far (within budget)", zorder=4)
    baselines = sorted(data.outcome.baselines.items(), key=lambda kv: kv[1]["loss"])
    for i, (name, row) in enumerate(baselines[:8]):
        ax.axhline(row["loss"], linestyle=(0, (4, 2 + i)), linewidth=1, color=f"C{(i + 3) % 10}", label=f"{name} {row['loss']:.4g}")
    _log_if_wide(ax, [r.loss for r in done], wide=5.0)
    ax.set_xlabel("trial")
    ax.set_ylabel("loss (evaluation split)")
    ax.set_title(f"{data.name}: loss by trial")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    return fig


def loss_by_size(data: StudyData) -> Figure:
    """Loss against size for every complete trial, the (loss, bytes) Pareto front, the budget."""
    fig = Figure(figsize=(10, 5), layout="constrained")
    ax = fig.subplots()
    done = [r for r in data.complete if r.bytes is not None]
    if not done:
        return _empty(fig, ax, "no complete trials yet")
    for name, style in KIND_STYLE.items():
        points = [r for r in done if kind(r) == name]
        if points:
            ax.scatter([r.bytes / MIB for r in points], [r.loss for r in points], zorder=3, **style)
    front = data.front()
    ax.step([r.bytes / MIB for r in front], [r.loss for r in front], where="post", color="#55a868", linewidth=2, label="Pareto front", zorder=4)
    if data.budget_bytes is not None:
        bpw = data.bpw(data.budget_bytes)
        ax.axvline(data.budget_bytes / MIB, color="#c44e52", linestyle="--", label=f"budget {data.budget_bytes / MIB:.3g} MiB" + (f" ({bpw:.3g} bpw)" if bpw else ""))
    if data.best is not None:
        b = data.best
        ax.scatter([b.bytes / MIB], [b.loss], marker="*", s=160, color="#55a868", edgecolor="black", zorder=5, label=f"best: trial {b.number}")
    _log_if_wide(ax, [r.loss for r in done], wide=5.0)
    ledger = data.ledger()
    if ledger:
        other, weights = ledger
        top = ax.secondary_xaxis("top", functions=(lambda m: (m * MIB - other) * 8 / weights, lambda b: (other + b * weights / 8) / MIB))
        top.set_xlabel("bits per quantizable weight (scales and zero points included)")
    ax.set_xlabel("model size (MiB): the quantized layers and every other tensor")
    ax.set_ylabel("loss (evaluation split)")
    ax.set_title(f"{data.name}: loss by size", loc="left")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    return fig


def _layer_axis(ax, layers: list[str]) -> None:
    """Layer names along x, a line between blocks and each block's name above its layers."""
    ax.set_xticks(range(len(layers)), [short_name(n) for n in layers], rotation=90, fontsize=6 if len(layers) < 80 else 4)
    ax.set_xlim(-0.5, len(layers) - 0.5)
    start = 0
    for block, members in groupby(layers, key=block_of):
        count = len(list(members))
        if start:
            ax.axvline(start - 0.5, color="#bbbbbb", linewidth=0.6, zorder=0)
        ax.text(start + (count - 1) / 2, 1.01, block, transform=ax.get_xaxis_transform(), ha="center", va="bottom", fontsize=6)
        start += count


def _width(layers: list[str]) -> float:
    return min(max(10.0, 0.16 * len(layers)), 60.0)


def best_plan(data: StudyData) -> Figure:
    """The best plan's bits per layer, grouped by block, over each layer's sensitivity."""
    layers, best = data.layers, data.best
    with_sens = bool(data.sensitivity)
    fig = Figure(figsize=(_width(layers), 6.5 if with_sens else 4), layout="constrained")
    axes = fig.subplots(2 if with_sens else 1, 1, sharex=True, height_ratios=[1, 1] if with_sens else None, squeeze=False)[:, 0]
    ax = axes[0]
    if best is None or best.plan is None:
        return _empty(fig, ax, "no complete plan within the budget yet")
    bits = best.plan.bits()
    values = [bits.get(n) for n in layers]
    ax.bar(range(len(layers)), [math.log2(v) if v else 0 for v in values], color=[BIT_COLORS.get(v, "#8e44ad") for v in values], width=0.85)
    ax.set_yticks([math.log2(b) for b in data.menu], [str(b) for b in data.menu])
    ax.set_ylabel("bits")
    ax.set_title(f"best plan: trial {best.number}, loss {best.loss:.5g}, {best.attrs.get('bpw', float('nan')):.4g} bpw", loc="left", pad=14)
    if with_sens:
        sx = axes[1]
        scores = [data.sensitivity.get(n) for n in layers]
        shown = [max(s, 0.0) if s is not None else 0.0 for s in scores]
        sx.bar(range(len(layers)), shown, color="#4c72b0", width=0.85)
        _log_if_wide(sx, shown)
        zero = [i for i, s in enumerate(scores) if s is not None and s <= 0]
        if zero:
            sx.scatter(zero, [0] * len(zero) if sx.get_yscale() == "linear" else [min(v for v in shown if v > 0)] * len(zero), marker="v", color="#c44e52", s=12, label="zero: the loss cannot see it")
            sx.legend(fontsize=7, frameon=False, loc="upper right")
        sx.set_ylabel(f"sensitivity at {data.sensitivity_bits} bits", fontsize=8)
        sx.set_title(SENSITIVITY_LABELS.get(data.sensitivity_method, data.sensitivity_method), loc="left", fontsize=9)
    _layer_axis(ax, layers)
    if with_sens:
        ax.tick_params(labelbottom=False)
        axes[1].set_xticks(range(len(layers)), [short_name(n) for n in layers], rotation=90, fontsize=6 if len(layers) < 80 else 4)
    return fig


def top_k_bits(data: StudyData) -> Figure:
    """Each layer's share of each bit-width over the top ``k`` plans; dots mark the best plan."""
    layers, menu = data.layers, data.menu
    fig = Figure(figsize=(_width(layers), 3.2 + 0.25 * len(menu)), layout="constrained")
    ax = fig.subplots()
    if not data.top:
        return _empty(fig, ax, "no complete plan within the budget yet")
    shares = data.top_k_shares()
    k = len(data.top)
    grid = [[shares[n][b] / k for n in layers] for b in menu]
    image = ax.imshow(grid, aspect="auto", cmap="Blues", vmin=0, vmax=1, origin="lower", interpolation="nearest")
    best = data.best.plan.bits()
    ax.scatter(range(len(layers)), [menu.index(best[n]) for n in layers], marker="o", s=8, color="#c44e52")
    ax.set_yticks(range(len(menu)), [str(b) for b in menu])
    ax.set_ylabel("bits")
    _layer_axis(ax, layers)
    ax.set_title(f"bits across the top {k} plans within the budget (share of plans; red dots: the best plan)", loc="left", pad=14)
    fig.colorbar(image, ax=ax, fraction=0.02, pad=0.01, label="share")
    return fig
