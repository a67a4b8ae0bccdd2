"""The training loss: weighted softmax cross-entropy with optional z-loss, always in FP32.

Invariant: logits are promoted to FP32 before log-softmax, whatever the policy (an FP32 island:
log Z of a 50k-way softmax in BF16 is off by up to 2^-8 * |log Z|, which is larger than the
loss differences training chases). z-loss adds `z_loss * log(Z)^2` per token (PaLM,
arXiv:2204.02311), which keeps log Z near 0 and BF16 logits well-conditioned.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["cross_entropy"]


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
      targets: [...] integer class ids in [0, V).
      weights: [...] non-negative per-position weights (e.g. 0 for padding); ones if None.
        Only their ratios matter: the loss is sum(w * nll) / sum(w), or 0 if all are 0.
      z_loss: coefficient of the log(Z)^2 auxiliary loss (0 disables it).

    Returns:
      (loss, aux): `loss` is the FP32 scalar to differentiate (mean NLL + z-loss over the
      weighted positions); `aux` holds FP32 scalars `nll`, `z_loss`, `accuracy`, `log_z` (mean
      |log Z|) and `weight_sum`.
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} do not match: "
            "logits must be targets.shape + (num_classes,)."
        )
    if not jnp.issubdtype(targets.dtype, jnp.integer):
        raise ValueError(f"targets must be integer class ids, got dtype {targets.dtype}.")
    # why: FP32 island; log-softmax and its gradient in low precision bias the loss.
    logits = logits.astype(jnp.float32)
    if weights is None:
        weights = jnp.ones(targets.shape, jnp.float32)
    weights = weights.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)  # [...]
    target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), -1)[..., 0]
    nll = log_z - target_logit
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
    }
    return loss, aux
