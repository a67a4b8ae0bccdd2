"""The precision study's PNG plots: loss curves, reliability diagrams, accuracy vs memory and,
for image models, adversarial accuracy against the attack budget (FGSM, PGD).

Called by `precision_study.py` after the sweep, which hands over everything a plot shows (the
runs' results and the pooled reliability bins): this module imports nothing from the study.
Needs matplotlib (`pip install -e .[plots]`). Each `draw_*` function returns the figure (tests
read its ticks, legend and labels); `write_plots` saves them.

Readability rules the figures keep: a log axis is labelled where the curves are (ticks at the
quantiles of the plotted values, not at powers of ten they never reach), legends sit outside
every axes and name every colour and marker, and reliability bars carry their example counts.
"""

from __future__ import annotations

import os

import numpy as np

SPREAD = 0.3  # log2 width over which the policies at one x are spread (accuracy vs memory)


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def ticks_where(values, n: int = 8, min_gap: float = 0.03) -> list[float]:
    """Log-axis tick positions where the data is: quantiles of `values` at 3 significant digits.

    A curve that spends most of its steps in a narrow band (a loss settling at 2.2-2.4) gets
    most of the ticks there. Ticks closer than `min_gap` of the axis' log span are dropped.
    """
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v) & (v > 0)]
    if v.size == 0:
        return []
    picks = [float(f"{q:.3g}") for q in np.quantile(v, np.linspace(0.0, 1.0, n))]
    lo, hi = np.log(v.min()), np.log(v.max())
    gap = max(hi - lo, 1e-12) * min_gap
    out: list[float] = []
    for t in sorted(set(picks)):
        if not out or np.log(t) - np.log(out[-1]) >= gap:
            out.append(t)
    return out


def _label_log_axis(ax, values) -> None:
    """Labelled major ticks where `values` lie; no minor ticks (their 3x10^0 labels)."""
    from matplotlib import ticker

    ax.set_yscale("log")
    ticks = ticks_where(values)
    ax.yaxis.set_major_locator(ticker.FixedLocator(ticks))
    ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%.3g"))
    ax.yaxis.set_minor_locator(ticker.NullLocator())
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v) & (v > 0)]
    if v.size:
        pad = (v.max() / v.min()) ** 0.03
        ax.set_ylim(v.min() / pad, v.max() * pad)


def _legend_below(fig, handles, **kwargs) -> None:
    """The figure's legend under its axes (constrained layout makes room: it covers nothing),
    in as many columns as fit the figure's width: a row wider than the page loses its ends."""
    for ncols in range(min(len(handles), 5), 0, -1):
        legend = fig.legend(handles=handles, loc="outside lower center", ncols=ncols,
                            fontsize=8, **kwargs)  # fmt: skip
        fig.canvas.draw()
        box = legend.get_window_extent(fig.canvas.get_renderer())
        if ncols == 1 or (box.x0 >= fig.bbox.x0 and box.x1 <= fig.bbox.x1):
            return
        legend.remove()


def seeds_label(n: int) -> str:
    return f"{n} seed" if n == 1 else f"{n} seeds"


def mean_pm(mean: float, std: float, n: int, fmt: str = ".2f", unit: str = "") -> str:
    """ "m unit ± s", or "m unit (1 seed)" where a spread over one seed would read as 0."""
    if n < 2:
        return f"{mean:{fmt}}{unit} ({seeds_label(n)})"
    return f"{mean:{fmt}}{unit} ± {std:{fmt}}"


def degenerate(by_policy: dict) -> str | None:
    """Why a model's rows show nothing about the policies, or None: more than one policy and
    every one at the same clean accuracy with 100 % agreement with FP32 (a run that learned a
    constant, or far too few steps)."""
    accs = [e["clean/accuracy"][0] for e in by_policy.values() if e.get("clean/accuracy")]
    agree = [e["clean/agreement"][0] for e in by_policy.values() if e.get("clean/agreement")]
    if len(accs) < 2 or max(accs) - min(accs) > 1e-9 or not agree or min(agree) < 1.0:
        return None
    return (
        f"degenerate: every policy at {100 * accs[0]:.2f}% accuracy with 100% agreement with "
        "fp32 (no run learned anything that tells the policies apart)"
    )


def _series(results: list[dict], model: str) -> dict[str, dict]:
    """Per policy: steps, train-loss curves of every seed (one row each) and the eval dots."""
    out = {}
    for policy in dict.fromkeys(r["policy"] for r in results if r["model"] == model):
        rows = [r for r in results if r["model"] == model and r["policy"] == policy]
        steps = rows[0]["curve"]["train_steps"]
        curves = np.array(
            [r["curve"]["train_loss"] for r in rows if r["curve"]["train_steps"] == steps]
        )
        ev = [r["curve"] for r in rows]
        out[policy] = {
            "steps": np.asarray(steps),
            "train": curves,
            "eval_steps": np.asarray(ev[0]["eval_steps"]),
            "eval": np.mean([c["eval_loss"] for c in ev], 0),
        }
    return out


def draw_loss_curves(results: list[dict], model: str):
    """Train loss (mean over seeds, band = min..max) and eval loss per policy.

    Left: the whole run on a log axis labelled where the curves are. Right: the second half of
    training on a linear axis, where the policies part (or don't).
    """
    plt = _plt()
    series = _series(results, model)
    fig, (whole, late) = plt.subplots(1, 2, figsize=(11, 4.4), layout="constrained")
    seen = []
    for i, (policy, s) in enumerate(series.items()):
        color = f"C{i}"
        steps, curves = s["steps"], s["train"]
        half = steps >= steps[-1] / 2
        for ax, keep in ((whole, np.ones_like(half)), (late, half)):
            label = f"{policy} ({seeds_label(len(curves))})" if ax is whole else None
            ax.plot(steps[keep], curves.mean(0)[keep], color=color, label=label)
            if len(curves) > 1:
                ax.fill_between(steps[keep], curves.min(0)[keep], curves.max(0)[keep],
                                color=color, alpha=0.15)  # fmt: skip
            ev_keep = s["eval_steps"] >= (steps[-1] / 2 if ax is late else 0)
            ax.plot(s["eval_steps"][ev_keep], s["eval"][ev_keep], "o", color=color, ms=5)
        seen += [curves.ravel(), s["eval"]]
    _label_log_axis(whole, np.concatenate(seen))
    whole.set(xlabel="step", ylabel="loss (log)", title=f"{model}: whole run")
    late.set(xlabel="step", ylabel="loss", title="second half (linear)")
    for ax in (whole, late):
        ax.grid(alpha=0.3)
    handles, _ = whole.get_legend_handles_labels()
    note = "eval loss (mean over seeds); line: train loss, band: min..max over seeds"
    handles.append(whole.plot([], [], "o", color="gray", label=note)[0])
    _legend_below(fig, handles)
    return fig


def draw_reliability(bins_by_policy: dict[str, dict], eces: dict[str, str], model: str):
    """One reliability diagram per policy (clean eval predictions pooled over seeds), each bin
    labelled with its example count (tokens for a language model)."""
    from matplotlib.patches import Patch

    from bf16jax.evaluation.calibration import plot_reliability

    plt = _plt()
    n = len(bins_by_policy)
    cols = min(n, 4)
    rows = -(-n // cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(3.2 * cols, 3.2 * rows + 0.6), squeeze=False, layout="constrained"
    )
    for ax, (policy, bins) in zip(axes.flat, bins_by_policy.items(), strict=False):
        plot_reliability(bins, ax=ax, title=f"{policy}\nECE {eces[policy]}")
        ax.title.set_fontsize(9)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    handles = [
        Patch(facecolor="C0", edgecolor="black", label="accuracy in the bin"),
        Patch(facecolor="tab:red", alpha=0.3, label="gap to the bin's mean confidence"),
        axes.flat[0].plot([], [], "k--", linewidth=1, label="perfect calibration")[0],
    ]
    fig.legend(handles=handles, loc="outside lower center", ncols=3, fontsize=8,
               title="numbers: examples per bin", title_fontsize=8)  # fmt: skip
    fig.suptitle(f"{model}: reliability (15 bins, seeds pooled)")
    return fig


def dodges(xs: list[float]) -> tuple[list[float], float]:
    """Multiplicative offsets that spread points sharing an x, and the half-width used (log2;
    0 when no two points share an x).

    Points within 1 % of each other share an x (bytes / param differ in the 5th digit between
    policies with and without LSQ step sizes). Only points at a shared x move, each group evenly
    over at most +-SPREAD/2 in log2 and less than half the log2 gap to the nearest other x, so
    no point crosses another's x.
    """
    logs = np.log2(np.asarray(xs, np.float64))
    key = np.round(logs / np.log2(1.01)).astype(np.int64)  # same x: within 1 %
    groups = [np.flatnonzero(key == k) for k in np.unique(key)]
    centers = np.sort([logs[g].mean() for g in groups])
    gap = float(np.min(np.diff(centers))) if len(centers) > 1 else np.inf
    half = min(SPREAD / 2, 0.45 * gap)
    out, used = [1.0] * len(xs), 0.0
    for group in groups:
        if group.size < 2:
            continue
        used = half
        for rank, i in enumerate(group):
            out[i] = float(2 ** (half * (2 * rank - (group.size - 1)) / (group.size - 1)))
    return out, used


def draw_accuracy_vs_memory(table: dict):
    """Clean accuracy (mean ± std over seeds) against training-state and inference-weight bytes
    per parameter. Policies at the same x are spread sideways (`dodges`: stated on the axis,
    never across another x) so that no error bar hides another; a degenerate model (all
    policies identical) says so in its title."""
    from matplotlib.lines import Line2D

    plt = _plt()
    models = list(table)
    fig, axes = plt.subplots(
        1, len(models), figsize=(5.5 * len(models), 4.8), squeeze=False, layout="constrained"
    )
    policies = list(dict.fromkeys(p for m in models for p in table[m]))
    colors = {p: f"C{i}" for i, p in enumerate(policies)}
    for ax, model in zip(axes[0], models, strict=True):
        entries = [(p, e) for p, e in table[model].items() if e.get("clean/accuracy")]
        points = [(p, e, key, marker) for p, e in entries
                  for key, marker in (("train_bytes_per_param", "o"),
                                      ("inference_bytes_per_param", "s"))
                  if e.get(key) is not None]  # fmt: skip
        shift, half = dodges([e[key][0] for _, e, key, _ in points])
        for (policy, e, key, marker), dodge in zip(points, shift, strict=True):
            acc = e["clean/accuracy"]
            ax.errorbar(e[key][0] * dodge, 100 * acc[0], yerr=100 * acc[1], fmt=marker,
                        color=colors[policy], capsize=3)  # fmt: skip
        spread = 100 * (2**half - 1)
        where = f" (same-x points spread ±{spread:.0f} %)" if half else ""
        seeds = {len(e.get("seeds", [0, 1])) for _, e in entries}
        per = "± std over seeds" if min(seeds) > 1 else "1 seed: no spread shown"
        title = model if not degenerate(table[model]) else f"{model}\n{degenerate(table[model])}"
        ax.set(xlabel=f"bytes / param{where}", ylabel=f"clean accuracy % ({per})")
        ax.set_title(title, fontsize=10 if "\n" not in title else 8)
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], color=colors[p], marker="o", ls="", label=p) for p in policies]
    handles += [
        Line2D([], [], color="black", marker="o", ls="", label="training state (params + optim)"),
        Line2D([], [], color="black", marker="s", ls="", label="inference weights (deployed)"),
    ]
    _legend_below(fig, handles)
    return fig


def draw_robustness(by_policy: dict, model: str):
    """Accuracy (mean ± std over seeds) against the L-inf budget: FGSM left, PGD right; each
    policy attacked under itself (solid) and QAT models as their int8 deployment (dashed)."""
    from matplotlib.lines import Line2D

    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), sharey=True, layout="constrained")
    shown = {}
    for ax, attack in zip(axes, ("fgsm", "pgd"), strict=True):
        for i, (policy, e) in enumerate(by_policy.items()):
            for target, style in (("policy", "-o"), ("int8", "--s")):
                per = e.get(f"robust/{target}", {}).get(attack)
                if not per:
                    continue
                eps = [float(k) for k in per]
                mean = [100 * per[k][0] for k in per]
                std = [100 * per[k][1] for k in per]
                ax.errorbar(eps, mean, yerr=std, fmt=style, color=f"C{i}", ms=3, capsize=2,
                            alpha=0.85)  # fmt: skip
                shown[policy] = f"C{i}"
        ax.set(xlabel="ε (L∞, pixels in [0, 1])", title=f"{model}: {attack.upper()}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy % (± std over seeds)")
    handles = [Line2D([], [], color=c, marker="o", label=p) for p, c in shown.items()]
    handles += [
        Line2D([], [], color="black", ls="-", marker="o", label="attacked under its policy"),
        Line2D([], [], color="black", ls="--", marker="s", label="QAT model deployed as int8"),
    ]
    _legend_below(fig, handles)
    return fig


def write_plots(out: str, results: list[dict], table: dict, bins: dict[str, dict]) -> list[str]:
    """Writes every plot of the study to `out`; returns the paths.

    Args:
      out: the output directory.
      results: one dict per run, with its `curve` (train / eval losses).
      table: the study's summary, model -> policy -> metric -> [mean, std].
      bins: model -> policy -> `metrics.calibration_bins` of the pooled clean predictions.
    """
    figures = []
    for model in table:
        figures.append((f"loss_curves_{model}.png", draw_loss_curves(results, model)))
        eces = {}
        for policy, e in table[model].items():
            m, s = e["clean/ece"]
            eces[policy] = mean_pm(100 * m, 100 * s, len(e.get("seeds", [0, 1])), unit="%")
        figures.append((f"reliability_{model}.png", draw_reliability(bins[model], eces, model)))
        if any("robust/policy" in e for e in table[model].values()):
            figures.append((f"robustness_{model}.png", draw_robustness(table[model], model)))
    figures.append(("accuracy_vs_memory.png", draw_accuracy_vs_memory(table)))
    return [save_figure(fig, out, name) for name, fig in figures]


def save_figure(fig, out: str, name: str) -> str:
    """Saves `fig` as out/name (110 dpi) and closes it; returns the path."""
    path = os.path.join(out, name)
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path
