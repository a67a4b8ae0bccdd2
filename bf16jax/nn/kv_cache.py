"""The KV-cache path of attention, used for generation (`GPT.decode_step`, `T5.decode_step`).

`CachedAttention` is a mixin of `layers.Attention`: `kv` projects keys and values once (a
decoder's cross-attention context, or a prompt), `decode` writes new tokens' keys and values into
a fixed-size cache and attends over it, `attend` queries precomputed keys and values. All three
run the layer's own projections and `_attend` (FP32 logits and softmax), so cached and uncached
attention compute the same function; tests/test_generate.py checks it against recomputation.
A cache is a plain tuple (k, v), each [B, S, H, Dh] in compute dtype: it crosses `jax.export`
boundaries, which serialize builtin containers only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["KVCache", "CachedAttention", "write_rows"]

KVCache = tuple[jax.Array, jax.Array]


def write_rows(cache: jax.Array, new: jax.Array, index: jax.Array) -> jax.Array:
    """cache [B, S, ...] with new [B, T, ...] written at rows index[b] .. index[b] + T - 1."""

    def one(c, u, i):
        return jax.lax.dynamic_update_slice_in_dim(c, u, i, axis=0)

    return jax.vmap(one)(cache, new, index)


class CachedAttention:
    """Mixin: the KV-cache methods of `layers.Attention` (which provides k, v, `_heads`,
    `_attend`)."""

    def kv(self, kv_in: jax.Array) -> KVCache:
        """(k, v), each [B, S, H, Dh] in compute dtype, projected from `kv_in` [B, S, D]."""
        return self._heads(self.k(kv_in)), self._heads(self.v(kv_in))

    def attend(self, x: jax.Array, kv: KVCache, *, mask: jax.Array | None = None) -> jax.Array:
        """Attention of queries from `x` [B, T, D] over precomputed `kv` (see `kv`); [B, T, D]."""
        return self._attend(x, kv, mask=mask, bias=None, causal=False, implementation="xla")

    def decode(
        self,
        x: jax.Array,
        cache: KVCache,
        index: jax.Array,
        *,
        bias: jax.Array | None = None,
        length: int | None = None,
    ) -> tuple[jax.Array, KVCache]:
        """Causal self-attention of new tokens `x` [B, T, D] at positions index[b] + t.

        Their keys and values are written into `cache` ((k, v), each [B, S, H, Dh], S the
        longest sequence) at those positions, then each query attends to cache positions up to
        its own. Positions beyond the written ones hold stale values and are masked. `index`
        [B] int32 may differ per row; index[b] + T must not exceed S. `bias` (e.g. T5's
        relative positions) is [B|1, H, T, S]. `length` (static): the queries attend to the
        first `length` positions only (every index[b] + T <= length), which costs that many
        positions' reads instead of S. Returns ([B, T, D], the updated cache).
        """
        k_new, v_new = self.kv(x)  # [B, T, H, Dh]
        k_cache, v_cache = cache
        k = write_rows(k_cache, k_new.astype(k_cache.dtype), index)
        v = write_rows(v_cache, v_new.astype(v_cache.dtype), index)
        s = k.shape[1] if length is None else length
        t = x.shape[1]
        q_pos = index[:, None] + jnp.arange(t, dtype=index.dtype)[None]  # [B, T]
        mask = (jnp.arange(s, dtype=index.dtype)[None, None] <= q_pos[..., None])[:, None]
        kv = (k, v) if length is None else (k[:, :length], v[:, :length])
        # A query of one token gains nothing from a fused kernel: bf16jax's XLA path.
        out = self._attend(x, kv, mask=mask, bias=bias, causal=False, implementation="xla")
        return out, (k, v)
