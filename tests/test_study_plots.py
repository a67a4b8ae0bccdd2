"""experiments/study_plots.py: the study's figures are readable (drawn from made-up results).

Ticks label the band the loss curves settle in, legends cover no axes and name every policy and
marker, reliability bars carry their counts. tests/test_study.py runs the plots end to end.
"""

import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import study_plots  # noqa: E402

from bf16jax.evaluation import calibration as metrics  # noqa: E402

POLICIES = ("fp32", "bf16", "bf16-pure", "bf16-pure-sr", "bf16-pure-kahan", "bf16;q=w8a8")


def _results():
    steps = list(range(10, 310, 10))
    out = []
    for i, policy in enumerate(POLICIES):
        for seed in (0, 1):
            # 4.8 at the start, settling in 2.2-2.4 (the band where policies differ)
            loss = [2.2 + 0.03 * i + 0.01 * seed + 2.6 * np.exp(-s / 25) for s in steps]
            curve = {"train_steps": steps, "train_loss": loss, "eval_steps": [100, 200, 300],
                     "eval_loss": [loss[9] + 0.02, loss[19] + 0.02, loss[-1] + 0.02]}  # fmt: skip
            out.append({"model": "gpt_tiny", "policy": policy, "seed": seed, "curve": curve})
    return out


def _table():
    rows = {}
    for i, policy in enumerate(POLICIES):
        train = 12.0 if policy == "fp32" else (2.0 if "pure" in policy else 10.0)
        rows[policy] = {
            "clean/accuracy": [0.36 + 0.002 * i, 0.004],
            "clean/ece": [0.015, 0.002],
            "train_bytes_per_param": [train, 0.0],
            "inference_bytes_per_param": [1.1 if "q=" in policy else 2.0, 0.0],
        }
    return {"gpt_tiny": rows, "vit_digits": rows}


def _legend_clear_of_axes(fig):
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legend = fig.legends[0]
    box = legend.get_window_extent(renderer)
    for ax in fig.axes:
        if ax.axison:
            assert not box.overlaps(ax.get_window_extent(renderer)), "the legend covers an axes"
    page = fig.bbox
    assert page.x0 <= box.x0 and box.x1 <= page.x1 and page.y0 <= box.y0, "legend off the page"
    return [t.get_text() for t in legend.get_texts()]


def test_loss_curve_ticks_label_the_band_the_curves_settle_in():
    fig = study_plots.draw_loss_curves(_results(), "gpt_tiny")
    whole = fig.axes[0]
    assert whole.get_yscale() == "log"
    fig.canvas.draw()
    lo, hi = whole.get_ylim()
    labelled = [
        float(t.get_text())
        for t in whole.get_yticklabels()
        if t.get_text() and lo <= t.get_position()[1] <= hi
    ]
    # The last half of training lies in 2.2-2.4; a power-of-ten axis labels nothing there.
    assert sum(2.2 <= t <= 2.45 for t in labelled) >= 3, labelled
    assert len(whole.yaxis.get_minor_locator().tick_values(lo, hi)) == 0  # no 3x10^0 labels
    late = fig.axes[1]
    assert late.get_yscale() == "linear" and late.get_ylim()[1] < 2.6  # the zoom on the band
    labels = _legend_clear_of_axes(fig)
    assert all(any(label.startswith(p + " ") for label in labels) for p in POLICIES)
    assert any("eval loss" in label for label in labels)


def test_ticks_where_follows_the_data():
    values = np.concatenate([np.linspace(2.2, 2.4, 90), np.linspace(2.4, 5.0, 10)])
    ticks = study_plots.ticks_where(values)
    assert ticks[0] == 2.2 and ticks[-1] == 5.0
    assert sum(t <= 2.4 for t in ticks) >= 4  # most ticks where most of the values are
    assert study_plots.ticks_where([np.nan, -1.0]) == []


def test_accuracy_vs_memory_legend_covers_nothing_and_names_every_marker():
    fig = study_plots.draw_accuracy_vs_memory(_table())
    labels = _legend_clear_of_axes(fig)
    assert set(POLICIES) <= set(labels)
    assert any("training state" in t for t in labels)
    assert any("inference weights" in t for t in labels)
    # policies sharing an x (bf16-pure, bf16-pure-sr, ... at 2 bytes) are spread apart
    xs = [line.get_xdata()[0] for line in fig.axes[0].lines if line.get_marker() == "o"]
    assert len(set(np.round(xs, 6))) == len(POLICIES)


def test_reliability_figure_counts_every_bin():
    rng = np.random.default_rng(0)
    conf = rng.uniform(0.3, 1.0, 500)
    bins = metrics.calibration_bins(conf, (rng.uniform(size=500) < conf).astype(float))
    fig = study_plots.draw_reliability({"fp32": bins, "bf16": bins}, {"fp32": "1%", "bf16": "1%"},
                                       "gpt_tiny")  # fmt: skip
    counts = [t.get_text() for t in fig.axes[0].texts if t.get_gid() == "bin-count"]
    filled = bins["weight"][bins["weight"] > 0]
    assert counts == [f"{w:.3g}" for w in filled]
    labels = _legend_clear_of_axes(fig)
    assert any("perfect calibration" in t for t in labels)


def test_robustness_legend_names_the_policies_and_both_line_styles():
    per = {"fgsm": {"0": [0.9, 0.01], "0.1": [0.5, 0.02]}, "pgd": {"0": [0.9, 0.01]}}
    table = {"fp32": {"robust/policy": per}, "bf16;q=w8a8": {"robust/policy": per,
                                                             "robust/int8": per}}  # fmt: skip
    fig = study_plots.draw_robustness(table, "vit_digits")
    labels = _legend_clear_of_axes(fig)
    assert {"fp32", "bf16;q=w8a8"} <= set(labels)
    assert any("int8" in t for t in labels) and any("under its policy" in t for t in labels)
