"""Masked targets in the cross-entropy and the per-example stats (issue #13, defect 6).

Before: a label outside [0, V) gave a NaN loss even at weight 0 (-100, the usual ignore label,
or >= V), with finite gradients, so the step was not skipped; -1 silently wrapped to V - 1.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bf16jax import metrics
from bf16jax.loss import cross_entropy

V = 7


def _batch():
    logits = jax.random.normal(jax.random.key(0), (2, 4, V)) * 3
    targets = jnp.array([[1, 2, 3, 4], [5, 6, 0, 1]], jnp.int32)
    weights = jnp.ones((2, 4), jnp.float32)
    return logits, targets, weights


@pytest.mark.parametrize("label", [-100, -1, V, 10_000])
def test_ignored_positions_with_weight_zero_give_the_loss_without_them(label):
    logits, targets, weights = _batch()
    weights = weights.at[1, 2].set(0.0)
    want, _ = cross_entropy(logits, targets, weights)
    bad = targets.at[1, 2].set(label)
    for fn in (cross_entropy, jax.jit(cross_entropy)):
        loss, aux = fn(logits, bad, weights)
        assert float(loss) == pytest.approx(float(want), rel=1e-6) and np.isfinite(float(loss))
        assert float(aux["invalid_targets"]) == 0.0
    grads = jax.jit(jax.grad(lambda x: cross_entropy(x, bad, weights)[0]))(logits)
    assert bool(jnp.all(jnp.isfinite(grads))) and float(jnp.abs(grads[1, 2]).max()) == 0.0
    stats = jax.jit(metrics.prediction_stats)(logits, bad, weights)
    assert np.all(np.isfinite(np.asarray(stats["nll"]))) and float(stats["nll"][6]) == 0.0


@pytest.mark.parametrize("label", [-1, V])
def test_out_of_range_labels_with_positive_weight_are_errors(label):
    logits, targets, weights = _batch()
    bad = targets.at[0, 1].set(label)
    with pytest.raises(ValueError, match=rf"1 target\(s\) outside \[0, {V}\).*\[{label}\]"):
        cross_entropy(logits, bad, weights)  # eager: a clear error
    # Under jit: the loss is NaN, the gradients too (so the train step is skipped, not trained
    # on a wrapped label), and the count says why.
    loss, aux = jax.jit(cross_entropy)(logits, bad, weights)
    assert np.isnan(float(loss)) and float(aux["invalid_targets"]) == 1.0
    grads = jax.jit(jax.grad(lambda x, t, w: cross_entropy(x, t, w)[0]))(logits, bad, weights)
    assert bool(jnp.any(jnp.isnan(grads)))
    wrapped, _ = jax.jit(cross_entropy)(logits, targets.at[0, 1].set(V - 1), weights)
    assert np.isfinite(float(wrapped))  # what -1 used to be read as
