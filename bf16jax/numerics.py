"""16-bit numerics: stochastic rounding, Kahan-compensated updates, and precision diagnostics.

- `stochastic_round(x, key)`: unbiased FP32 -> BF16 rounding done on the bit pattern (add 16
  uniform random low bits, truncate), so E[SR(x)] = x and XLA cannot optimize it away (on GPU it
  deletes `x.astype(bf16).astype(f32)` round trips inside jit). Exact BF16 values are fixed
  points; +-0, +-Inf and NaN pass through; finite inputs never round to Inf (saturate at the
  largest BF16). Croci et al. 2022 (arXiv:2207.10321) survey SR; Zamirai et al. 2020
  (arXiv:2010.06192) show pure-BF16 training with SR or Kahan matches FP32.
- `kahan_add(w, u, c)`: w + u with a compensation buffer c in the param dtype (Kahan 1965); the
  rounding of the sum is forced with `lax.reduce_precision`, for the same XLA reason.
- Diagnostics that catch silent precision loss: update swamping (nonzero update, unchanged
  weight) per parameter group, gradient zero / subnormal / non-finite fractions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "stochastic_round",
    "round_nearest",
    "kahan_add",
    "leaf_keys",
    "PARAM_GROUPS",
    "param_group",
    "swamping_fractions",
    "gradient_health",
]

_F32 = np.dtype(jnp.float32)
_BF16 = np.dtype(jnp.bfloat16)
_BF16_MAX_BITS = 0x7F7F0000  # largest finite bfloat16, as the high half of an FP32 pattern


def stochastic_round(x: jax.Array, key: jax.Array, dtype=jnp.bfloat16) -> jax.Array:
    """Rounds FP32 `x` to BF16 up or down with probability proportional to proximity.

    Args:
      x: an array (cast to FP32 first).
      key: a PRNG key; the same key gives the same rounding.
      dtype: the target dtype; only bfloat16 (whose values are the top 16 bits of an FP32) is
        supported, FP32 returns `x` unchanged.

    Returns:
      `x` in `dtype`: each element is one of the two BF16 neighbours of x (x itself if exact).
    """
    dtype = np.dtype(dtype)
    x = jnp.asarray(x).astype(_F32)
    if dtype == _F32:
        return x
    if dtype != _BF16:
        raise ValueError(f"stochastic_round supports bfloat16 (or float32), not {dtype}.")
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    noise = jax.random.bits(key, x.shape, jnp.uint32) >> 16  # uniform in [0, 2^16)
    # Adding to the magnitude bits and truncating rounds |x| up with probability equal to the
    # dropped fraction: unbiased for either sign, and subnormals are handled the same way.
    rounded = (bits + noise) & jnp.uint32(0xFFFF0000)
    magnitude = bits & jnp.uint32(0x7FFFFFFF)
    # A finite value must not carry into the Inf pattern: saturate at the largest BF16.
    overflow = (magnitude <= jnp.uint32(0x7F7FFFFF)) & (
        (rounded & jnp.uint32(0x7FFFFFFF)) > jnp.uint32(_BF16_MAX_BITS)
    )
    rounded = jnp.where(overflow, (bits & jnp.uint32(0x80000000)) | _BF16_MAX_BITS, rounded)
    # NaN, Inf: keep the input (truncating a NaN payload could make it Inf).
    special = magnitude >= jnp.uint32(0x7F800000)
    out = jnp.where(special, bits, rounded)
    # The low 16 bits are zero (except NaN payloads), so the cast to bf16 is exact.
    return jax.lax.bitcast_convert_type(out, _F32).astype(dtype)


def round_nearest(x: jax.Array, dtype) -> jax.Array:
    """Round-to-nearest-even of FP32 `x` to `dtype`, forced even where XLA elides casts."""
    dtype = np.dtype(dtype)
    x = jnp.asarray(x).astype(_F32)
    if dtype == _F32:
        return x
    info = jnp.finfo(dtype)
    # why: on GPU, XLA removed a bare astype(bf16).astype(f32) round trip; reduce_precision stays.
    r = jax.lax.reduce_precision(x, exponent_bits=info.nexp, mantissa_bits=info.nmant)
    return r.astype(dtype)


def kahan_add(w: jax.Array, u: jax.Array, c: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Compensated w + u for w stored in a 16-bit dtype: returns (new w, new compensation).

    y = u + c; s = round(w + y); c' = y - (s - w). The part of the update the stored weight
    could not take is carried in c' (stored in w's dtype) and added to the next update, so
    updates far below half an ulp of w still accumulate.
    """
    dtype = w.dtype
    w32 = w.astype(_F32)
    y = u.astype(_F32) + c.astype(_F32)
    s = round_nearest(w32 + y, dtype)
    # s - w is exact in FP32 (both 16-bit, close); the residual is what rounding dropped.
    residual = y - (s.astype(_F32) - w32)
    return s, round_nearest(residual, c.dtype)


def leaf_keys(key: jax.Array, tree) -> list[jax.Array]:
    """One key per leaf of `tree`, `fold_in(key, leaf_index)`: identical on every replica."""
    return [jax.random.fold_in(key, i) for i in range(len(jax.tree.leaves(tree)))]


# ----------------------------------------------------------------------------- diagnostics
PARAM_GROUPS = ("norm_gains", "biases", "embeddings", "matrices")


def param_group(path: tuple) -> str:
    """The diagnostic group of a parameter from its tree path (names, not values)."""
    names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
    names = [n for n in names if n != "value"]
    last = names[-1] if names else ""
    if last == "scale":
        return "norm_gains"
    if last == "bias":
        return "biases"
    if last == "embedding":
        return "embeddings"
    return "matrices"


def swamping_fractions(old_params, new_params, updates) -> dict[str, jax.Array]:
    """Per group: fraction of elements whose update was nonzero but whose stored value did not
    change (the update was swamped by rounding), among elements with a nonzero update.

    Returns FP32 scalars `swamped/<group>` (0 when a group had no nonzero update) and
    `swamped/all`.
    """
    flat_old = jax.tree_util.tree_flatten_with_path(old_params)[0]
    new_leaves = jax.tree.leaves(new_params)
    upd_leaves = jax.tree.leaves(updates)
    counts = {g: [jnp.zeros([], _F32), jnp.zeros([], _F32)] for g in PARAM_GROUPS}
    for (path, w), w_new, u in zip(flat_old, new_leaves, upd_leaves, strict=True):
        moved = u != 0
        stuck = moved & (w_new == w)
        c = counts[param_group(path)]
        c[0] = c[0] + jnp.sum(stuck, dtype=_F32)
        c[1] = c[1] + jnp.sum(moved, dtype=_F32)
    out = {f"swamped/{g}": s / jnp.maximum(n, 1.0) for g, (s, n) in counts.items()}
    total_s = sum(s for s, _ in counts.values())
    total_n = sum(n for _, n in counts.values())
    out["swamped/all"] = total_s / jnp.maximum(total_n, 1.0)
    return out


def gradient_health(grads, compute_dtype) -> dict[str, jax.Array]:
    """Fractions of gradient entries that are exactly zero, subnormal in `compute_dtype` (nonzero
    but below its smallest normal: flushed or imprecise there), and non-finite."""
    tiny = float(jnp.finfo(compute_dtype).tiny)
    zero = sub = bad = total = jnp.zeros([], _F32)
    for g in jax.tree.leaves(grads):
        g = g.astype(_F32)
        a = jnp.abs(g)
        zero = zero + jnp.sum(g == 0, dtype=_F32)
        sub = sub + jnp.sum((a > 0) & (a < tiny), dtype=_F32)
        bad = bad + jnp.sum(~jnp.isfinite(g), dtype=_F32)
        total = total + jnp.float32(g.size)
    total = jnp.maximum(total, 1.0)
    return {"grad/zero": zero / total, "grad/subnormal": sub / total, "grad/nonfinite": bad / total}
