"""Dropout (Srivastava et al. 2014, JMLR 15): inverted dropout and the keys that drive it.

Active only when a PRNG key is passed (the train step's key, folded per use); without one every
call is the identity, so evaluation and prediction are deterministic. Used by the layers
(MLP hidden, residual, embeddings) and by attention (probabilities, XLA path only).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["dropout", "dropout_keys"]


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout (Srivastava et al. 2014): zero with probability `rate`, scale the rest.

    The identity when `key` is None (evaluation, prediction) or `rate` is 0; keeps x's dtype.
    """
    if key is None or rate == 0.0:
        return x
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"Dropout rate {rate} must lie in [0, 1).")
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros([], x.dtype))


def dropout_keys(key: jax.Array | None, n: int) -> tuple[jax.Array | None, ...]:
    """`n` independent keys `fold_in(key, i)`, or `n` Nones when `key` is None (no dropout)."""
    if key is None:
        return (None,) * n
    return tuple(jax.random.fold_in(key, i) for i in range(n))
