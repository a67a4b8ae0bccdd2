"""The precision study's PNG plots: loss curves, reliability diagrams, accuracy vs memory and,
for image models, adversarial accuracy against the attack budget (FGSM, PGD).

Called by `precision_study.py` after the sweep; needs matplotlib (`pip install -e .[plots]`).
Every figure is drawn from the runs' `result.json` / `predictions.npz`, never from memory.
"""

from __future__ import annotations

import os

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def loss_curves(results: list[dict], model: str, path: str) -> None:
    """Train loss (mean over seeds, band = min..max) and eval loss per policy."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    policies = list(dict.fromkeys(r["policy"] for r in results if r["model"] == model))
    for i, policy in enumerate(policies):
        rows = [r for r in results if r["model"] == model and r["policy"] == policy]
        steps = rows[0]["curve"]["train_steps"]
        curves = np.array(
            [r["curve"]["train_loss"] for r in rows if r["curve"]["train_steps"] == steps]
        )
        color = f"C{i}"
        ax.plot(steps, curves.mean(0), color=color, label=f"{policy} ({len(curves)} seeds)")
        if len(curves) > 1:
            ax.fill_between(steps, curves.min(0), curves.max(0), color=color, alpha=0.15)
        ev = [r["curve"] for r in rows]
        ax.plot(ev[0]["eval_steps"], np.mean([c["eval_loss"] for c in ev], 0), "o", color=color)
    ax.set(xlabel="step", ylabel="loss (train: line, eval: dots)", title=f"{model}: loss curves")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def reliability(bins_by_policy: dict[str, dict], eces: dict[str, str], model: str, path: str):
    """One reliability diagram per policy (clean eval predictions pooled over seeds)."""
    from bf16jax.metrics import plot_reliability

    plt = _plt()
    n = len(bins_by_policy)
    cols = min(n, 4)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    for ax, (policy, bins) in zip(axes.flat, bins_by_policy.items(), strict=False):
        plot_reliability(bins, ax=ax, title=f"{policy}\nECE {eces[policy]}")
        ax.title.set_fontsize(9)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(f"{model}: reliability (15 bins, seeds pooled)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def accuracy_vs_memory(table: dict, path: str) -> None:
    """Clean accuracy (mean ± std over seeds) against training and inference bytes/param."""
    plt = _plt()
    models = list(table)
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4.2), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        for i, (policy, e) in enumerate(table[model].items()):
            acc = e.get("clean/accuracy")
            if acc is None:
                continue
            for key, marker in (("train_bytes_per_param", "o"), ("inference_bytes_per_param", "s")):
                x = e[key][0]
                ax.errorbar(x, 100 * acc[0], yerr=100 * acc[1], fmt=marker, color=f"C{i}",
                            capsize=3, label=policy if marker == "o" else None)  # fmt: skip
            ax.annotate(policy, (e["train_bytes_per_param"][0], 100 * acc[0]), fontsize=7,
                        xytext=(4, 3), textcoords="offset points")  # fmt: skip
        ax.set(xlabel="bytes / param (o: training state, s: inference weights)",
               ylabel="clean accuracy %", title=model)  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def robustness(by_policy: dict, model: str, path: str) -> None:
    """Accuracy (mean ± std over seeds) against the L-inf budget: FGSM left, PGD right; each
    policy attacked under itself (solid) and QAT models as their int8 deployment (dashed)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, attack in zip(axes, ("fgsm", "pgd"), strict=True):
        for i, (policy, e) in enumerate(by_policy.items()):
            for target, style in (("policy", "-o"), ("int8", "--s")):
                per = e.get(f"robust/{target}", {}).get(attack)
                if not per:
                    continue
                eps = [float(k) for k in per]
                mean = [100 * per[k][0] for k in per]
                std = [100 * per[k][1] for k in per]
                label = policy + (" (int8)" if target == "int8" else "")
                ax.errorbar(eps, mean, yerr=std, fmt=style, color=f"C{i}", ms=3, capsize=2,
                            label=label, alpha=0.85)  # fmt: skip
        ax.set(xlabel="ε (L∞, pixels in [0, 1])", title=f"{model}: {attack.upper()}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy %")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(args, results: list[dict], table: dict) -> list[str]:
    """Writes every plot of the study to `args.out`; returns the paths."""
    from precision_study import pooled_bins

    paths = []
    for model in table:
        path = os.path.join(args.out, f"loss_curves_{model}.png")
        loss_curves(results, model, path)
        paths.append(path)
        bins = {policy: pooled_bins(args, results, model, policy) for policy in table[model]}
        eces = {}
        for policy, e in table[model].items():
            m, s = e["clean/ece"]
            eces[policy] = f"{100 * m:.2f}% ± {100 * s:.2f}"
        path = os.path.join(args.out, f"reliability_{model}.png")
        reliability(bins, eces, model, path)
        paths.append(path)
        if any("robust/policy" in e for e in table[model].values()):
            path = os.path.join(args.out, f"robustness_{model}.png")
            robustness(table[model], model, path)
            paths.append(path)
    path = os.path.join(args.out, "accuracy_vs_memory.png")
    accuracy_vs_memory(table, path)
    paths.append(path)
    return paths
