"""The training loss: weighted softmax cross-entropy with optional z-loss, always in FP32.

Invariant: logits are promoted to FP32 before log-softmax, whatever the policy (an FP32 island:
log Z of a 50k-way softmax in BF16 is off by up to 2^-8 * |log Z|, which is larger than the
loss differences training chases). z-loss adds `z_loss * log(Z)^2` per token (PaLM,
arXiv:2204.02311), which keeps log Z near 0 and BF16 logits well-conditioned.

Masked targets (`target_mask`, shared by every loss and metric that gathers a target's logit):
a position with weight 0 contributes exactly 0 whatever its label (-100, the usual "ignore"
label, or any id outside [0, V)), never NaN; a label outside [0, V) with a positive weight is an
error: eagerly a ValueError, under jit a NaN loss *and* NaN gradients (so the train step is
skipped, not trained on a wrapped label: -1 is not V - 1) plus the count `invalid_targets`,
which the training loop turns into an error.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["cross_entropy", "target_mask", "check_targets"]


def target_mask(
    targets: jax.Array, weights: jax.Array, num_classes: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(safe int32 targets, FP32 weights, bool `invalid`) for gathering target logits.

    `safe` holds 0 where a label is outside [0, num_classes), so a gather never reads out of
    bounds (JAX returns NaN there, and wraps -1 to the last class). `invalid` marks the
    out-of-range labels with a positive weight: errors, not padding.
    """
    targets = targets.astype(jnp.int32)
    in_range = (targets >= 0) & (targets < num_classes)
    weights = weights.astype(jnp.float32)
    return jnp.where(in_range, targets, 0), weights, (~in_range) & (weights > 0)


def check_targets(targets, weights, num_classes: int) -> None:
    """Raises ValueError for labels outside [0, num_classes) with a positive weight.

    Only for concrete (non-traced) arrays; under jit `cross_entropy` flags them instead.
    """
    t = np.asarray(targets)
    w = np.ones(t.shape, np.float32) if weights is None else np.asarray(weights, np.float32)
    bad = ((t < 0) | (t >= num_classes)) & (w > 0)
    if bad.any():
        raise ValueError(
            f"{int(bad.sum())} target(s) outside [0, {num_classes}) have a positive weight "
            f"(e.g. {sorted(set(t[bad].tolist()))[:5]}): labels must be class ids; give ignored "
            "positions weight 0 (e.g. label -100 with weight 0)."
        )


def _is_traced(*xs) -> bool:
    return any(isinstance(x, jax.core.Tracer) for x in xs if x is not None)


def cross_entropy(
    logits: jax.Array,
    targets: jax.Array,
    weights: jax.Array | None = None,
    *,
    z_loss: float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Weighted mean cross-entropy of integer `targets` under `logits`.

    Args:
      logits: [..., V] scores (any float dtype; computed in FP32).
      targets: [...] integer class ids in [0, V); any value where the weight is 0 (e.g. -100).
      weights: [...] non-negative per-position weights (e.g. 0 for padding); ones if None.
        Only their ratios matter: the loss is sum(w * nll) / sum(w), or 0 if all are 0.
      z_loss: coefficient of the log(Z)^2 auxiliary loss (0 disables it).

    Returns:
      (loss, aux): `loss` is the FP32 scalar to differentiate (mean NLL + z-loss over the
      weighted positions); `aux` holds FP32 scalars `nll`, `z_loss`, `accuracy`, `log_z` (mean
      |log Z|), `weight_sum` and `invalid_targets` (labels outside [0, V) with positive weight;
      if any, the loss and its gradients are NaN).

    Raises:
      ValueError: shapes or dtypes that do not fit; out-of-range labels with a positive weight
        when the inputs are concrete (not traced).
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} do not match: "
            "logits must be targets.shape + (num_classes,)."
        )
    if not jnp.issubdtype(targets.dtype, jnp.integer):
        raise ValueError(f"targets must be integer class ids, got dtype {targets.dtype}.")
    num_classes = logits.shape[-1]
    if not _is_traced(targets, weights):
        check_targets(targets, weights, num_classes)
    # why: FP32 island; log-softmax and its gradient in low precision bias the loss.
    logits = logits.astype(jnp.float32)
    if weights is None:
        weights = jnp.ones(targets.shape, jnp.float32)
    safe, weights, invalid = target_mask(targets, weights, num_classes)
    log_z = jax.nn.logsumexp(logits, axis=-1)  # [...]
    target_logit = jnp.take_along_axis(logits, safe[..., None], -1)[..., 0]
    # An invalid label poisons the loss and, through log Z, its gradient: the step is skipped.
    poison = jnp.where(invalid, jnp.nan, 0.0)
    nll = jnp.where(weights > 0, log_z - target_logit, 0.0) + poison * log_z
    weight_sum = jnp.sum(weights)
    # A true weighted mean for any positive total (fractional weights too); 0 if all weights are 0.
    denom = jnp.where(weight_sum > 0, weight_sum, 1.0)
    mean_nll = jnp.sum(nll * weights) / denom
    mean_z = jnp.sum(jnp.square(log_z) * weights) / denom
    loss = mean_nll + jnp.float32(z_loss) * mean_z if z_loss else mean_nll
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    aux = {
        "nll": mean_nll,
        "z_loss": mean_z,
        "accuracy": jnp.sum(correct * weights) / denom,
        "log_z": jnp.sum(jnp.abs(log_z) * weights) / denom,
        "weight_sum": weight_sum,
        "invalid_targets": jnp.sum(invalid, dtype=jnp.float32),
    }
    return loss, aux
