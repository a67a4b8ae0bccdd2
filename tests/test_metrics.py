"""Held-out quality metrics: ECE and reliability bins, agreement, per-example prediction stats."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from bf16jax.evaluation import calibration as metrics
from bf16jax.nn.loss import cross_entropy
from bf16jax.training import metrics as training_metrics


def _ece_by_loop(conf, correct, num_bins=15):
    """Guo et al.'s definition written out with Python loops (the reference)."""
    n, total = len(conf), 0.0
    for m in range(1, num_bins + 1):
        lo, hi = (m - 1) / num_bins, m / num_bins
        idx = [i for i in range(n) if (lo < conf[i] <= hi) or (m == 1 and conf[i] == 0)]
        if idx:
            acc = np.mean([correct[i] for i in idx])
            avg = np.mean([conf[i] for i in idx])
            total += len(idx) / n * abs(acc - avg)
    return total


def test_ece_of_a_hand_computed_example():
    # 0.9 (one right, one wrong): |0.5 - 0.9| * 2/4; 0.6 (both right): |1 - 0.6| * 2/4.
    ece = metrics.expected_calibration_error([0.9, 0.9, 0.6, 0.6], [1, 0, 1, 1])
    assert ece == pytest.approx(0.4)


def test_ece_matches_the_loop_definition_on_random_data():
    rng = np.random.default_rng(0)
    conf = rng.uniform(0.05, 1.0, 500)
    conf[:5] = [1 / 15, 2 / 15, 1.0, 0.5, 14 / 15]  # exact bin edges
    correct = (rng.uniform(size=500) < conf).astype(float)
    assert metrics.expected_calibration_error(conf, correct) == pytest.approx(
        _ece_by_loop(conf, correct), abs=1e-12
    )


def test_bins_are_right_closed():
    bins = metrics.calibration_bins([0.0, 1 / 15, 1 / 15 + 1e-9, 1.0], [1, 1, 0, 1])
    np.testing.assert_array_equal(bins["weight"][:2], [2, 1])
    assert bins["weight"][-1] == 1 and bins["weight"].sum() == 4
    assert np.isnan(bins["accuracy"][5])  # empty bin


def test_calibrated_and_overconfident_predictors():
    rng = np.random.default_rng(1)
    conf = rng.uniform(0.3, 1.0, 200_000)
    calibrated = rng.uniform(size=conf.size) < conf
    overconfident = rng.uniform(size=conf.size) < conf - 0.2
    assert metrics.expected_calibration_error(conf, calibrated) < 0.005
    assert metrics.expected_calibration_error(conf, overconfident) == pytest.approx(0.2, abs=0.01)


def test_weights_act_like_dropping_examples():
    rng = np.random.default_rng(2)
    conf, correct = rng.uniform(size=100), rng.integers(0, 2, 100)
    w = (rng.uniform(size=100) < 0.6).astype(float)
    keep = w > 0
    assert metrics.expected_calibration_error(conf, correct, w) == pytest.approx(
        metrics.expected_calibration_error(conf[keep], correct[keep])
    )
    assert metrics.agreement([1, 2, 3, 4], [1, 2, 0, 0], [1, 1, 0, 1]) == pytest.approx(2 / 3)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: metrics.calibration_bins([1.2], [1]), "probabilities"),
        (lambda: metrics.calibration_bins([0.5], [1], num_bins=0), "at least one bin"),
        (lambda: metrics.calibration_bins([0.5, 0.4], [1]), "differ"),
        (lambda: metrics.expected_calibration_error([0.5], [1], [0.0]), "all weights are 0"),
        (lambda: metrics.agreement([1, 2], [1]), "same examples"),
    ],
)
def test_bad_input_is_named(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_prediction_stats_match_softmax_and_the_training_loss():
    rng = np.random.default_rng(3)
    logits = jnp.asarray(rng.normal(size=(4, 6, 11)) * 3, jnp.bfloat16)
    targets = jnp.asarray(rng.integers(0, 11, (4, 6)), jnp.int32)
    weights = jnp.asarray(rng.integers(0, 2, (4, 6)), jnp.float32)
    stats = metrics.prediction_stats(logits, targets, weights)
    p = np.asarray(jnp.asarray(logits, jnp.float32), np.float64)
    p = np.exp(p - p.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(stats["confidence"], p.max(-1).reshape(-1), rtol=1e-5)
    nll = -np.log(np.take_along_axis(p, np.asarray(targets)[..., None], -1)[..., 0])
    # Weight-0 positions are ignored (their label may be anything, e.g. -100): NLL 0 there.
    nll = np.where(np.asarray(weights) > 0, nll, 0.0)
    np.testing.assert_allclose(stats["nll"], nll.reshape(-1), rtol=1e-4)
    assert stats["prediction"].dtype == jnp.int32 and stats["nll"].dtype == jnp.float32
    summary = metrics.summarize_predictions(stats)
    _, aux = cross_entropy(logits, targets, weights)
    assert summary["loss"] == pytest.approx(float(aux["nll"]), rel=1e-5)
    assert summary["accuracy"] == pytest.approx(float(aux["accuracy"]), rel=1e-6)
    assert summary["perplexity"] == pytest.approx(np.exp(summary["loss"]))
    assert "perplexity" not in metrics.summarize_predictions(stats, perplexity=False)


def test_reliability_diagram_draws_the_bin_accuracies(tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bins = metrics.calibration_bins([0.95, 0.95, 0.55], [1, 0, 1])
    fig, ax = plt.subplots()
    metrics.plot_reliability(bins, ax=ax, title="t")
    heights = [p.get_height() for p in ax.patches[:15]]
    assert heights[14] == pytest.approx(0.5) and heights[8] == pytest.approx(1.0)
    assert sum(h > 0 for h in heights) == 2
    counts = [t.get_text() for t in ax.texts if t.get_gid() == "bin-count"]
    assert counts == ["1", "2"]  # one label per non-empty bin, its number of examples
    fig.savefig(tmp_path / "r.png")
    plt.close(fig)
    assert (tmp_path / "r.png").stat().st_size > 1000


def test_calibration_bins_match_scikit_learn():
    # scikit-learn's calibration_curve as the oracle for the (unweighted, non-empty) bins,
    # edge values included: both put a confidence of exactly m/M in bin m.
    from sklearn.calibration import calibration_curve

    rng = np.random.default_rng(0)
    confidence = np.concatenate([rng.uniform(0.1, 1.0, 4000), np.arange(1, 16) / 15])
    correct = (rng.uniform(size=confidence.size) < confidence**1.5).astype(np.float64)
    bins = metrics.calibration_bins(confidence, correct)
    accuracy, mean_confidence = calibration_curve(correct, confidence, n_bins=15)
    filled = bins["weight"] > 0
    np.testing.assert_allclose(bins["accuracy"][filled], accuracy, rtol=1e-12)
    np.testing.assert_allclose(bins["confidence"][filled], mean_confidence, rtol=1e-12)


@pytest.mark.parametrize("url", [False, True], ids=["local", "url"])
def test_metric_writer_appends_across_restarts(tmp_path, monkeypatch, url):
    # A gs:// workdir goes through etils.epath and rewrites the file; emulate it on disk.
    monkeypatch.setattr(training_metrics, "_is_url", lambda path: url)
    first = training_metrics.MetricWriter(str(tmp_path), tensorboard=False)
    first.write(1, {"loss": np.float32(2.5)}, prefix="train/")
    first.close()
    second = training_metrics.MetricWriter(str(tmp_path), tensorboard=False)
    row = second.write(2, {"loss": jnp.asarray(1.5), "hist": np.arange(2)}, prefix="train/")
    second.close()
    assert row == {"train/loss": 1.5, "train/hist": [0, 1]}
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == [
        {"step": 1, "train/loss": 2.5},
        {"step": 2, "train/loss": 1.5, "train/hist": [0, 1]},
    ]
