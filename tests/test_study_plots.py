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


EIGHT = ("fp32", "bf16", "bf16-pure", "bf16-pure-sr", "bf16-pure-kahan", "bf16-pure-split",
         "bf16;q=w8a8", "bf16;q=w4a8")  # fmt: skip


def _study_table(accs=None, seeds=(0, 1, 2), agreement=None):
    """One model, the study's eight policies at their real bytes / param."""
    train = {"fp32": 12.0, "bf16": 12.0, "bf16-pure": 10.0, "bf16-pure-sr": 10.0,
             "bf16-pure-kahan": 14.0, "bf16-pure-split": 12.0, "bf16;q=w8a8": 12.0,
             "bf16;q=w4a8": 12.0}  # fmt: skip
    rows = {}
    for i, policy in enumerate(EIGHT):
        acc = 0.95 + 0.001 * i if accs is None else accs
        rows[policy] = {
            "seeds": list(seeds),
            "clean/accuracy": [acc, 0.004 if len(seeds) > 1 else 0.0],
            "clean/ece": [0.015, 0.002],
            "clean/agreement": [1.0 if agreement is None else agreement, 0.0],
            "train_bytes_per_param": [train[policy], 0.0],
            "inference_bytes_per_param": [4.0 if policy == "fp32" else 2.0, 0.0],
            "throughput_unit": "examples/s",
        }
    return {"vit_digits": rows}


def test_accuracy_vs_memory_legend_fits_the_page_with_one_model_and_eight_policies():
    """Before: 10 entries in 5 columns under a 5.5-inch figure ran off both sides (fp32 lost)."""
    fig = study_plots.draw_accuracy_vs_memory(_study_table())
    labels = _legend_clear_of_axes(fig)
    assert set(EIGHT) <= set(labels)
    box = fig.legends[0].get_window_extent(fig.canvas.get_renderer())
    assert fig.bbox.x0 <= box.x0 and box.x1 <= fig.bbox.x1


def test_spread_points_keep_their_order_along_x():
    """Before: the +-11 % spread put bf16-pure's 10 B/param right of fp32's 12 (bf16-pure
    drawn last, fp32 first)."""
    rows = _study_table()["vit_digits"]
    order = [p for p in EIGHT if p != "bf16-pure"] + ["bf16-pure"]
    table = {"vit_digits": {p: rows[p] for p in order}}
    fig = study_plots.draw_accuracy_vs_memory(table)
    drawn = [line.get_xdata()[0] for line in fig.axes[0].lines if line.get_marker() == "o"]
    true = [table["vit_digits"][p]["train_bytes_per_param"][0] for p in order]
    for a, xa in zip(true, drawn, strict=True):
        for b, xb in zip(true, drawn, strict=True):
            if a < b:
                assert xa < xb, (a, xa, b, xb)
    assert len(set(np.round(drawn, 9))) == len(order)  # same-x points still apart
    shift, half = study_plots.dodges([10.0, 12.0, 12.0, 12.0, 14.0])
    assert 10 * shift[0] < 12 * shift[1] < 12 * shift[2] < 12 * shift[3] < 14 * shift[4]
    assert half < 0.45 * np.log2(12 / 10) + 1e-12 and shift[0] == shift[4] == 1.0


def test_one_seed_is_one_seed_and_has_no_spread():
    results = [r for r in _results() if r["seed"] == 0]
    fig = study_plots.draw_loss_curves(results, "gpt_tiny")
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "fp32 (1 seed)" in labels and not any("1 seeds" in t for t in labels)
    assert study_plots.mean_pm(1.5, 0.0, 1, unit="%") == "1.50% (1 seed)"
    assert study_plots.mean_pm(1.5, 0.2, 3, unit="%") == "1.50% ± 0.20"
    import study_tables

    md = study_tables.markdown(_study_table(seeds=(0,)), {})
    row = next(ln for ln in md.splitlines() if ln.startswith("| `fp32` |"))
    assert "±" not in row and "| 1 |" in row
    md3 = study_tables.markdown(_study_table(), {})
    assert "±" in next(ln for ln in md3.splitlines() if ln.startswith("| `fp32` |"))


def test_a_degenerate_study_is_flagged():
    """Every policy at 12.62 % with 100 % agreement: the table compares nothing, and says so."""
    import study_tables

    flat = _study_table(accs=0.1262, agreement=1.0)
    assert "degenerate" in study_plots.degenerate(flat["vit_digits"])
    assert study_plots.degenerate(_study_table(agreement=0.97)["vit_digits"]) is None
    fig = study_plots.draw_accuracy_vs_memory(flat)
    assert "degenerate: every policy at 12.62%" in fig.axes[0].get_title()
    assert "**Degenerate: every policy at 12.62%" in study_tables.markdown(flat, {})
