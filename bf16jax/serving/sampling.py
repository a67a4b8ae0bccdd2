"""Token sampling and the jit-compiled decode loop that generates with a KV cache.

`filter_logits` applies temperature, top-k and top-p (nucleus sampling, Holtzman et al. 2019,
arXiv:1904.09751) per row; `decode_loop` runs a model's decode step inside one `lax.while_loop`
until every row is done. Invariants:

- fixed shapes: batch B, output buffer N, stop sequences [B, S, L]; a row's settings are
  arrays [B], so one compiled program serves any mix of requests;
- a row's samples depend only on its own seed, inputs and settings, never on its batch
  neighbours (per-row PRNG keys: `fold_in(key(seed), step)`);
- temperature 0 is greedy (argmax of the raw logits); top_k 0 and top_p 1 switch those off;
- a row stops at EOS, at a stop sequence (matched on generated tokens only), at its max token
  count, or when the cache is full; EOS and the stop sequence are not part of its output;
- sampling arithmetic is an FP32 island: probability thresholds compare FP32 values.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["FINISH_REASONS", "STOP_PAD", "filter_logits", "sample", "decode_loop"]

# finish_reason codes returned by `decode_loop`, by index.
FINISH_REASONS = ("length", "eos", "stop", "context")
_LENGTH, _EOS, _STOP, _CONTEXT = range(4)
STOP_PAD = -1  # left padding of right-aligned stop sequences
_F32 = jnp.float32


def filter_logits(
    logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array
) -> jax.Array:
    """Logits [B, V] divided by the temperature, with -inf outside the top-k / top-p set.

    Args:
      logits: [B, V] in any float dtype (sampled in FP32).
      temperature: [B]; values <= 0 mean greedy and are treated as 1 here.
      top_k: [B] int; keep the k largest (0 or >= V: all). Ties with the k-th are kept.
      top_p: [B]; keep the smallest set of most likely tokens whose probability reaches p
        (after top-k; the most likely token is always kept; >= 1: all).

    Returns:
      [B, V] FP32.
    """
    # why: the cumulative probabilities of top-p must not be summed in 16 bits.
    x = logits.astype(_F32) / jnp.where(temperature > 0, temperature, 1.0).astype(_F32)[:, None]
    v = x.shape[-1]
    k = jnp.where((top_k > 0) & (top_k < v), top_k, v).astype(jnp.int32)  # [B]
    ranked = -jnp.sort(-x, axis=-1)  # [B, V] descending
    kth = jnp.take_along_axis(ranked, k[:, None] - 1, axis=-1)  # [B, 1]
    ranked = jnp.where(jnp.arange(v)[None] < k[:, None], ranked, -jnp.inf)
    probs = jax.nn.softmax(ranked, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the tokens ranked above
    keep = (before < top_p.astype(_F32)[:, None]) | (top_p >= 1.0)[:, None]
    kept = jnp.maximum(jnp.sum(keep & (jnp.arange(v)[None] < k[:, None]), axis=-1), 1)
    nucleus_min = jnp.take_along_axis(ranked, kept[:, None] - 1, axis=-1)  # [B, 1]
    threshold = jnp.maximum(kth, nucleus_min)
    return jnp.where(x < threshold, -jnp.inf, x)


def sample(
    logits: jax.Array,
    keys: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
) -> jax.Array:
    """One token per row [B] int32: argmax where temperature <= 0, else a sample from
    `filter_logits`. `keys` [B] are typed PRNG keys, one per row."""
    greedy = jnp.argmax(logits.astype(_F32), axis=-1).astype(jnp.int32)

    def drawn(_):
        filtered = filter_logits(logits, temperature, top_k, top_p)
        draws = jax.vmap(jax.random.categorical)(keys, filtered)
        return jnp.where(temperature > 0, draws, greedy).astype(jnp.int32)

    # why: an all-greedy batch skips the sort and the Gumbel draws, a fifth of a decode step
    # of gpt_tiny on CPU; the tokens are the same either way.
    return jax.lax.cond(jnp.any(temperature > 0), drawn, lambda _: greedy, None)


def _stop_match(tail: jax.Array, stop: jax.Array) -> jax.Array:
    """Length of the longest stop sequence that `tail` ends with (0: none), [B].

    tail [B, L]: the row's last L generated tokens, STOP_PAD where fewer; stop [B, S, L]:
    right-aligned stop sequences, STOP_PAD-padded on the left (all STOP_PAD: unused).
    """
    used = stop != STOP_PAD  # [B, S, L]
    length = jnp.sum(used, axis=-1)  # [B, S]
    same = jnp.all(~used | (stop == tail[:, None, :]), axis=-1) & (length > 0)
    return jnp.max(jnp.where(same, length, 0), axis=-1)


def decode_loop(
    step: Callable[[jax.Array, Any, jax.Array], tuple[jax.Array, Any]],
    state: Any,
    logits: jax.Array,
    *,
    start: jax.Array,
    cache_len: int,
    num_steps: int,
    seeds: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
    max_tokens: jax.Array,
    stop: jax.Array,
    eos_id: int,
    pad_id: int = 0,
) -> dict[str, jax.Array]:
    """Samples up to `num_steps` tokens per row, feeding each back through `step`.

    Token i of row b is predicted by `logits` (i = 0) or by the step that fed token i - 1 at
    position start[b] + i - 1; so a row can produce at most cache_len - start[b] + 1 tokens.

    Args:
      step: (tokens [B, 1], state, index [B]) -> (logits [B, 1, V], state): the model's
        decode step (e.g. `GPT.decode_step` bound to its params).
      state: the decode state after the prompt (KV cache).
      logits: [B, V], the prediction of each row's first new token.
      start: [B] int32, the position where the first new token would be fed.
      cache_len: positions in the cache (a static int).
      num_steps: static bound on new tokens (the output buffer's length).
      seeds: [B] uint32, one PRNG seed per row.
      temperature, top_k, top_p: [B] sampling settings (see `filter_logits`).
      max_tokens: [B] int32 >= 1, new tokens wanted per row.
      stop: [B, S, L] int32 stop sequences, right-aligned and STOP_PAD-padded.
      eos_id: the end-of-sequence id (stops a row, not returned).
      pad_id: written after a row is done.

    Returns:
      dict of `tokens` [B, num_steps] int32 (pad_id past `length`), `length` [B] int32 (the
      tokens to keep: EOS and a matched stop sequence excluded), `finish_reason` [B] int32
      (index into FINISH_REASONS).
    """
    b = logits.shape[0]
    keys = jax.vmap(jax.random.key)(seeds.astype(jnp.uint32))
    stop = stop.astype(jnp.int32)
    start = start.astype(jnp.int32)
    carry = dict(
        i=jnp.zeros([], jnp.int32),
        logits=logits.astype(_F32),
        state=state,
        tokens=jnp.full((b, num_steps), pad_id, jnp.int32),
        count=jnp.zeros([b], jnp.int32),
        length=jnp.zeros([b], jnp.int32),
        reason=jnp.zeros([b], jnp.int32),
        done=jnp.zeros([b], jnp.bool_),
        tail=jnp.full((b, stop.shape[-1]), STOP_PAD, jnp.int32),
    )

    def body(c):
        i = c["i"]
        step_keys = jax.vmap(jax.random.fold_in, (0, None))(keys, i)
        token = sample(c["logits"], step_keys, temperature, top_k, top_p)  # [B]
        active = ~c["done"]
        tokens = c["tokens"].at[:, i].set(jnp.where(active, token, pad_id))
        count = c["count"] + active.astype(jnp.int32)
        shifted = jnp.concatenate([c["tail"][:, 1:], token[:, None]], axis=1)
        tail = jnp.where(active[:, None], shifted, c["tail"])
        stop_len = jnp.where(active, _stop_match(tail, stop), 0)
        eos = active & (token == eos_id)
        stopped = active & ~eos & (stop_len > 0)
        full = active & (count >= max_tokens)
        context = active & (start + i >= cache_len)  # token i cannot be fed: no position left
        finished = eos | stopped | full | context
        reason = jnp.select(
            [eos, stopped, full, context], [_EOS, _STOP, _LENGTH, _CONTEXT], c["reason"]
        )
        keep = count - eos.astype(jnp.int32) - stop_len
        length = jnp.where(finished, keep, c["length"])
        done = c["done"] | finished
        # Pad what a finished row generated after its kept prefix (EOS, the stop sequence).
        cols = jnp.arange(num_steps)[None]
        tokens = jnp.where(done[:, None] & (cols >= length[:, None]), pad_id, tokens)

        def feed(_):
            index = jnp.minimum(start + i, cache_len - 1)
            new_logits, state = step(token[:, None], c["state"], index)
            return new_logits[:, 0].astype(_F32), state

        new_logits, state = jax.lax.cond(
            jnp.all(done), lambda _: (c["logits"], c["state"]), feed, None
        )
        return dict(
            i=i + 1,
            logits=new_logits,
            state=state,
            tokens=tokens,
            count=count,
            length=length,
            reason=reason,
            done=done,
            tail=tail,
        )

    def cond(c):
        return (c["i"] < num_steps) & ~jnp.all(c["done"])

    out = jax.lax.while_loop(cond, body, carry)
    # Rows still running when the buffer ran out keep everything they generated.
    length = jnp.where(out["done"], out["length"], out["count"])
    reason = jnp.where(out["done"], out["reason"], _LENGTH)
    return {"tokens": out["tokens"], "length": length, "finish_reason": reason}
