"""T5 v1.1 / FLAN-T5-style encoder-decoder (Raffel et al. 2020, arXiv:1910.10683; Chung et al.
2022, arXiv:2210.11416) on bf16jax layers.

T5 as T5 is (Mesh TensorFlow and Hugging Face agree): RMSNorm (T5's LayerNorm without mean or
bias, eps `norm_eps`), no biases anywhere, relative position buckets instead of absolute
positions (bidirectional in the encoder, causal in the decoder; one bias per stack, computed once
and shared by all its layers), attention scores *not* scaled by head_dim**-0.5 (the factor is in
q's initialisation instead, so checkpoints load unchanged), and a separate LM head unless
`tie_embeddings` (then the decoder output is scaled by embed_dim**-0.5 before `Embed.attend`).
`mlp_activation`: "gated-gelu" (v1.1 / FLAN-T5) or "relu" (v1.0). Dropout as T5 places it: on
the embeddings, attention probabilities, the MLP hidden, each sub-layer's output and the final
norm's output, only when a `dropout_key` is passed. Encoder padding (PAD=0) is masked as
attention keys in the encoder self-attention and the decoder cross-attention. Packed rows
(several examples per row): a batch with "encoder_segment_ids" / "decoder_segment_ids" (example
k is segment k on both sides, 0 = padding) and "encoder_positions" / "decoder_positions"
(restarting per example) attends within each example (cross-attention: decoder segment ==
encoder segment; the segments replace the PAD mask) and takes relative positions from the
positions; a batch without them runs the unpacked program.
`init_cache` (runs the encoder once) and `decode_step` generate with a KV cache.
Policy paths: embed, {encoder,decoder}/relpos, {encoder,decoder}/layers_{i}/..., {..}/norm, head.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bf16jax.models.gpt import cache_dtype
from bf16jax.nn.layers import (
    MLP,
    Attention,
    Embed,
    KVCache,
    Linear,
    RMSNorm,
    dropout,
    dropout_keys,
    logical_param,
)
from bf16jax.nn.loss import head_logits, materialize
from bf16jax.parallel.sharding import constrain_batch
from bf16jax.precision import Policy

__all__ = [
    "T5",
    "T5Stack",
    "RelativePositionBias",
    "relative_position_bucket",
    "PACKING_KEYS",
]

PAD_ID = 0
# The extra arrays of a packed batch (`data.packing`); a batch without them is unpacked.
PACKING_KEYS = (
    "encoder_segment_ids",
    "encoder_positions",
    "decoder_segment_ids",
    "decoder_positions",
)


class _Layer(nnx.Module):
    """One encoder (self-attn, MLP) or decoder (self-attn, cross-attn, MLP) layer, pre-norm."""

    def __init__(self, cfg: dict, *, decoder: bool, policy: Policy, name: str, rngs: nnx.Rngs):
        self.policy = policy.for_module(name)
        self.decoder = decoder
        self.dropout_rate = cfg["dropout_rate"]
        d, h = cfg["embed_dim"], cfg["num_heads"]
        norm = functools.partial(RMSNorm, d, policy=policy, rngs=rngs, eps=cfg["norm_eps"])

        def attention(sub, causal):
            return Attention(
                d,
                h,
                policy=policy,
                name=f"{name}/{sub}",
                rngs=rngs,
                head_dim=cfg["head_dim"],
                causal=causal,
                use_bias=False,
                implementation=cfg["attention_impl"],
                scale_logits=False,  # T5: no 1/sqrt(d_kv); q's init carries it
                dropout_rate=cfg["attention_dropout_rate"],
                platform=cfg.get("platform"),
            )

        self.self_attn_norm = norm(name=f"{name}/self_attn_norm")
        self.self_attn = attention("self_attn", causal=decoder)
        if decoder:
            self.cross_attn_norm = norm(name=f"{name}/cross_attn_norm")
            self.cross_attn = attention("cross_attn", causal=False)
        self.mlp_norm = norm(name=f"{name}/mlp_norm")
        self.mlp = MLP(
            d,
            cfg["mlp_dim"],
            policy=policy,
            name=f"{name}/mlp",
            rngs=rngs,
            activation=cfg["mlp_activation"],
            use_bias=False,
            dropout_rate=cfg["mlp_dropout_rate"],
        )

    def __call__(
        self,
        x,
        *,
        bias,
        mask=None,
        context=None,
        context_mask=None,
        dropout_key=None,
        segment_ids=None,
        context_segment_ids=None,
    ):
        keys = dropout_keys(dropout_key, 6)

        def self_attend(h):
            out = self.self_attn(
                h, mask=mask, bias=bias, dropout_key=keys[0], segment_ids=segment_ids
            )
            return out, None

        def cross_attend(h):
            return self.cross_attn(
                h,
                context,
                mask=context_mask,
                dropout_key=keys[2],
                segment_ids=segment_ids,
                kv_segment_ids=context_segment_ids,
            )

        return self._forward(x, self_attend, cross_attend, keys)[0]

    def decode(self, x, cache: KVCache, index, *, bias, context_kv: KVCache, context_mask):
        """A decoder layer on new tokens with a self-attention KV cache and the cross-attention
        keys/values of the encoder output precomputed; returns (y, new cache)."""
        return self._forward(
            x,
            lambda h: self.self_attn.decode(h, cache, index, bias=bias),
            lambda h: self.cross_attn.attend(h, context_kv, mask=context_mask),
            (None,) * 6,
        )

    def _forward(self, x, self_attend, cross_attend, keys):
        r = self.policy.cast_to_residual  # the residual stream's dtype (compute unless r=f32)
        x = r(x)
        h, aux = self_attend(self.self_attn_norm(x))
        x = x + dropout(r(h), self.dropout_rate, keys[1])
        if self.decoder:
            h = cross_attend(self.cross_attn_norm(x))
            x = x + dropout(r(h), self.dropout_rate, keys[3])
        h = self.mlp(self.mlp_norm(x), dropout_key=keys[4])
        return x + dropout(r(h), self.dropout_rate, keys[5]), aux


class T5Stack(nnx.Module):
    """The encoder or decoder stack: layers sharing one relative position bias, final RMSNorm."""

    def __init__(self, cfg: dict, *, decoder: bool, policy: Policy, name: str, rngs: nnx.Rngs):
        self.policy = policy.for_module(name)
        self.decoder = decoder
        self.dropout_rate = cfg["dropout_rate"]
        self.relpos = RelativePositionBias(
            cfg["num_heads"],
            policy=policy,
            name=f"{name}/relpos",
            rngs=rngs,
            num_buckets=cfg["relpos_buckets"],
            max_distance=cfg["relpos_max_distance"],
            bidirectional=not decoder,
        )
        n = cfg["num_decoder_layers"] if decoder else cfg["num_encoder_layers"]
        self.layers = nnx.List(
            _Layer(cfg, decoder=decoder, policy=policy, name=f"{name}/layers_{i}", rngs=rngs)
            for i in range(n)
        )
        self.norm = RMSNorm(
            cfg["embed_dim"], policy=policy, name=f"{name}/norm", rngs=rngs, eps=cfg["norm_eps"]
        )

    def __call__(
        self,
        x,
        *,
        mask=None,
        context=None,
        context_mask=None,
        dropout_key=None,
        segment_ids=None,
        positions=None,
        context_segment_ids=None,
    ):
        """x [B, T, D] compute -> [B, T, D] compute after the final norm (and its dropout).

        Packed rows: `segment_ids` / `positions` [B, T] of x, `context_segment_ids` [B, S] of
        the encoder output (cross-attention).
        """
        t = x.shape[1]
        n = len(self.layers)
        keys = dropout_keys(dropout_key, n + 2)  # embeddings, each layer, final norm
        # T5 computes the position bias once (first layer) and reuses it in every layer.
        if positions is None:
            bias = self.relpos(t, t)  # [1, H, T, T] accum
        else:
            bias = self.relpos.from_positions(positions, positions)  # [B, H, T, T] accum
        packed = {}
        if segment_ids is not None:  # only then: the unpacked program stays as it is
            packed = dict(segment_ids=segment_ids, context_segment_ids=context_segment_ids)
        x = dropout(self.policy.cast_to_residual(x), self.dropout_rate, keys[0])
        x = constrain_batch(x)
        for layer, key in zip(self.layers, keys[1 : n + 1], strict=True):
            x = layer(
                x,
                bias=bias,
                mask=mask,
                context=context,
                context_mask=context_mask,
                dropout_key=key,
                **packed,
            )
            x = constrain_batch(x)
        x = self.policy.cast_to_compute(self.norm(x))
        return dropout(x, self.dropout_rate, keys[n + 1])

    def decode(self, x, cache: dict, index, *, context_mask):
        """The decoder stack on new tokens x [B, T, D] at positions index[b] + t with KV caches.

        `cache` holds per layer the self-attention "k"/"v" [B, S, H, Dh] and the encoder's
        "cross_k"/"cross_v". The relative position bias of each query row is the row of the
        full [S, S] bias at its position, so it equals the uncached bias exactly.
        Returns ([B, T, D] after the final norm, the updated cache).
        """
        t, s = x.shape[1], cache["k"][0].shape[1]
        full = self.relpos(s, s)[0]  # [H, S, S] accum
        q_pos = jnp.minimum(index[:, None] + jnp.arange(t, dtype=index.dtype), s - 1)  # [B, T]
        bias = jnp.transpose(jnp.take(full, q_pos, axis=1), (1, 0, 2, 3))  # [B, H, T, S]
        x = self.policy.cast_to_compute(x)
        ks, vs = [], []
        for i, layer in enumerate(self.layers):
            x, (k, v) = layer.decode(
                x,
                (cache["k"][i], cache["v"][i]),
                index,
                bias=bias,
                context_kv=(cache["cross_k"][i], cache["cross_v"][i]),
                context_mask=context_mask,
            )
            ks.append(k)
            vs.append(v)
        return self.policy.cast_to_compute(self.norm(x)), {**cache, "k": tuple(ks), "v": tuple(vs)}


class T5(nnx.Module):
    """T5 v1.1 encoder-decoder. `cfg` holds the sizes read by `build_model` (see there)."""

    def __init__(self, cfg: dict, *, policy: Policy, rngs: nnx.Rngs):
        self.policy = policy
        self.tie_embeddings = cfg["tie_embeddings"]
        self.embed_dim = cfg["embed_dim"]
        # One token embedding shared by encoder and decoder, as in T5.
        self.embed = Embed(
            cfg["vocab_size"], cfg["embed_dim"], policy=policy, name="embed", rngs=rngs
        )
        self.encoder = T5Stack(cfg, decoder=False, policy=policy, name="encoder", rngs=rngs)
        self.decoder = T5Stack(cfg, decoder=True, policy=policy, name="decoder", rngs=rngs)
        if not self.tie_embeddings:
            self.head = Linear(
                cfg["embed_dim"],
                cfg["vocab_size"],
                policy=policy,
                name="head",
                rngs=rngs,
                use_bias=False,
                kernel_axes=("embed", "vocab"),
                edge=True,  # output logits: unquantized unless an override asks
            )

    @staticmethod
    def _padding_mask(encoder_inputs: jax.Array) -> jax.Array:
        # Keys only: [B, 1, 1, Te]. Padded query rows compute values nobody reads (they are
        # masked as keys everywhere), and no row is ever fully masked, so no NaN.
        return (encoder_inputs != PAD_ID)[:, None, None, :]

    def encode(
        self,
        encoder_inputs: jax.Array,
        dropout_key: jax.Array | None = None,
        *,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
    ) -> jax.Array:
        """Encoder outputs [B, Te, D] in compute dtype for token ids [B, Te] (PAD=0); packed
        rows: `segment_ids`, `positions` [B, Te] (then the segments mask padding, not PAD)."""
        _check_ids(encoder_inputs, "encoder_inputs")
        _check_packing(encoder_inputs, "encoder", segment_ids, positions)
        x = self.policy.cast_to_compute(self.embed(encoder_inputs))
        if segment_ids is None:
            return self.encoder(x, mask=self._padding_mask(encoder_inputs), dropout_key=dropout_key)
        return self.encoder(
            x, dropout_key=dropout_key, segment_ids=segment_ids, positions=positions
        )

    def decode(
        self,
        encoded: jax.Array,
        encoder_inputs: jax.Array,
        decoder_inputs: jax.Array,
        dropout_key: jax.Array | None = None,
        *,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        encoder_segment_ids: jax.Array | None = None,
    ):
        """Decoder hidden states [B, Td, D] in compute dtype (after the final norm); packed
        rows: the decoder's `segment_ids`, `positions` [B, Td] and `encoder_segment_ids`."""
        _check_ids(decoder_inputs, "decoder_inputs")
        _check_packing(decoder_inputs, "decoder", segment_ids, positions)
        if (segment_ids is None) != (encoder_segment_ids is None):
            raise ValueError(
                "T5 packed rows need segment ids on both sides: pass encoder_segment_ids and "
                "decoder_segment_ids together (or neither)."
            )
        y = self.policy.cast_to_compute(self.embed(decoder_inputs))
        if segment_ids is None:
            return self.decoder(
                y,
                context=encoded,
                context_mask=self._padding_mask(encoder_inputs),
                dropout_key=dropout_key,
            )
        return self.decoder(
            y,
            context=encoded,
            dropout_key=dropout_key,
            segment_ids=segment_ids,
            positions=positions,
            context_segment_ids=encoder_segment_ids,
        )

    def features(
        self, encoder_inputs: jax.Array, decoder_inputs: jax.Array, **packing: jax.Array | None
    ) -> jax.Array:
        """Decoder final hidden states [B, Td, D] in output dtype; `packing`: the batch's
        `PACKING_KEYS` (see `__call__`)."""
        return self.policy.cast_to_output(
            self._decoder_output(encoder_inputs, decoder_inputs, None, packing)
        )

    @property
    def output_head(self) -> Embed | Linear:
        """The output projection: the tied token embedding or the separate "head"."""
        return self.embed if self.tie_embeddings else self.head

    def _decoder_output(self, encoder_inputs, decoder_inputs, dropout_key, packing: dict):
        """The decoder's final hidden states [B, Td, D] (compute dtype)."""
        unknown = set(packing) - set(PACKING_KEYS)
        if unknown:
            raise ValueError(
                f"Unknown T5 packing arrays {sorted(unknown)}: use {', '.join(PACKING_KEYS)}."
            )
        get = packing.get
        k_enc, k_dec = dropout_keys(dropout_key, 2)
        encoded = self.encode(
            encoder_inputs,
            k_enc,
            segment_ids=get("encoder_segment_ids"),
            positions=get("encoder_positions"),
        )
        return self.decode(
            encoded,
            encoder_inputs,
            decoder_inputs,
            k_dec,
            segment_ids=get("decoder_segment_ids"),
            positions=get("decoder_positions"),
            encoder_segment_ids=get("encoder_segment_ids"),
        )

    def _head_input(self, encoder_inputs, decoder_inputs, dropout_key=None, **packing):
        """The decoder's final hidden states [B, Td, D] as the output head reads them."""
        h = self._decoder_output(encoder_inputs, decoder_inputs, dropout_key, packing)
        return self._scaled_for_head(h)

    def _scaled_for_head(self, h: jax.Array) -> jax.Array:
        # T5 rescales before the tied projection so logits do not grow with sqrt(D).
        return h * self.embed_dim**-0.5 if self.tie_embeddings else h

    def __call__(
        self,
        encoder_inputs: jax.Array,
        decoder_inputs: jax.Array,
        *,
        dropout_key: jax.Array | None = None,
        **packing: jax.Array | None,
    ) -> jax.Array:
        """Logits [B, Td, V] in accum dtype (FP32 island); `dropout_key` = training.

        Packed rows: `packing` holds `PACKING_KEYS`: encoder_segment_ids / encoder_positions
        [B, Te], decoder_segment_ids / decoder_positions [B, Td] (int; example k of the row is
        segment k on both sides, 0 = padding; positions restart at 0 per example).
        """
        h = self._head_input(encoder_inputs, decoder_inputs, dropout_key, **packing)
        return constrain_batch(head_logits(h, self.output_head))

    def head_and_targets(
        self, batch: dict, *, dropout_key: jax.Array | None = None
    ) -> tuple[jax.Array, Embed | Linear, jax.Array, jax.Array]:
        """(head input [B, Td, D] compute, output head, targets int32 [B, Td], weights f32
        [B, Td]): what `loss.fused_cross_entropy` takes instead of the [B, Td, V] logits."""
        targets = jnp.asarray(batch["targets"], jnp.int32)
        weights = batch.get("weights")
        if weights is None:
            weights = (targets != PAD_ID).astype(jnp.float32)
        packing = {k: batch[k] for k in PACKING_KEYS if k in batch}
        hidden = self._head_input(
            batch["encoder_inputs"], batch["decoder_inputs"], dropout_key, **packing
        )
        return hidden, self.output_head, targets, jnp.asarray(weights, jnp.float32)

    # ----------------------------------------------------------------- KV-cache decoding
    def init_cache(self, encoder_inputs: jax.Array, length: int) -> dict:
        """Runs the encoder once and returns the decoding cache for up to `length` tokens.

        Returns a dict: per decoder layer (tuples) zero self-attention "k"/"v"
        [B, length, H, Dh] and the encoder output's cross-attention "cross_k"/"cross_v"
        [B, Te, H, Dh]; "encoder_mask" [B, Te] (False at PAD).
        """
        encoded = self.encode(encoder_inputs)
        layers = self.decoder.layers
        cross = [layer.cross_attn.kv(encoded) for layer in layers]
        attn = layers[0].self_attn
        shape = (encoder_inputs.shape[0], length, attn.num_heads, attn.head_dim)
        zeros = tuple(jnp.zeros(shape, cache_dtype(self.decoder)) for _ in layers)
        return {
            "k": zeros,
            "v": zeros,
            "cross_k": tuple(k.astype(zeros[0].dtype) for k, _ in cross),
            "cross_v": tuple(v.astype(zeros[0].dtype) for _, v in cross),
            "encoder_mask": encoder_inputs != PAD_ID,
        }

    def decode_step(
        self, tokens: jax.Array, cache: dict, index: jax.Array
    ) -> tuple[jax.Array, dict]:
        """Decoder logits for new tokens `tokens` [B, T] at positions index[b] + t.

        Start with `init_cache` and the start token PAD at index 0; then one token per step.
        Returns (logits [B, T, V] in accum dtype, the updated cache); the logits equal
        `self(encoder_inputs, decoder_inputs)` at the same positions up to float rounding.
        """
        _check_ids(tokens, "decoder tokens")
        y = self.policy.cast_to_compute(self.embed(tokens))
        mask = cache["encoder_mask"][:, None, None, :]  # keys only, as `_padding_mask`
        h, cache = self.decoder.decode(y, cache, index.astype(jnp.int32), context_mask=mask)
        logits = head_logits(self._scaled_for_head(h), self.output_head)
        return constrain_batch(logits), cache

    def logits_and_targets(
        self, batch: dict, *, dropout_key: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(logits f32 [B, Td, V], targets int32 [B, Td], weights f32 [B, Td]) for a span batch."""
        return materialize(*self.head_and_targets(batch, dropout_key=dropout_key))


def relative_position_bucket(
    relative_position: np.ndarray, *, bidirectional: bool, num_buckets: int, max_distance: int
) -> np.ndarray:
    """T5's bucketing of key - query offsets (Raffel et al. 2020, mesh_tensorflow).

    Half the buckets (per direction when bidirectional) hold exact small offsets, the rest grow
    logarithmically up to `max_distance`; larger offsets share the last bucket.
    """
    ret = np.zeros_like(relative_position)
    n = -relative_position
    if bidirectional:
        num_buckets //= 2
        ret += (n < 0).astype(ret.dtype) * num_buckets
        n = np.abs(n)
    else:
        n = np.maximum(n, 0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    with np.errstate(divide="ignore"):
        log_ratio = np.log(np.maximum(n, 1) / max_exact) / np.log(max_distance / max_exact)
    val_if_large = max_exact + (log_ratio * (num_buckets - max_exact)).astype(ret.dtype)
    val_if_large = np.minimum(val_if_large, num_buckets - 1)
    return ret + np.where(is_small, n, val_if_large)


class RelativePositionBias(nnx.Module):
    """T5 relative position bias: a learned scalar per (bucket, head), added to attention logits.

    `__call__(q_len, k_len)` returns [1, H, q_len, k_len] in accum dtype (it joins the logits).
    """

    def __init__(
        self,
        num_heads: int,
        *,
        policy: Policy,
        name: str,
        rngs: nnx.Rngs,
        num_buckets: int = 32,
        max_distance: int = 128,
        bidirectional: bool = True,
    ):
        if num_buckets < 2 or (bidirectional and num_buckets < 4):
            raise ValueError(
                f"relpos num_buckets={num_buckets} is too small: use at least 4 (bidirectional) "
                "or 2."
            )
        self.policy = policy.for_module(name)
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.bidirectional = bidirectional
        self.embedding = logical_param(
            nnx.initializers.normal(1.0 / math.sqrt(num_heads)),
            (num_buckets, num_heads),
            ("relpos_buckets", "heads"),
            self.policy.param_dtype,
            rngs,
        )

    def __call__(self, q_len: int, k_len: int) -> jax.Array:
        # Buckets depend only on static lengths: computed in numpy at trace time.
        rel = np.arange(k_len)[None, :] - np.arange(q_len)[:, None]  # [T, S] key - query
        buckets = relative_position_bucket(
            rel,
            bidirectional=self.bidirectional,
            num_buckets=self.num_buckets,
            max_distance=self.max_distance,
        )
        table = self.policy.cast_to_accum(self.embedding[...])  # [buckets, H]
        values = jnp.take(table, jnp.asarray(buckets, jnp.int32), axis=0)  # [T, S, H]
        return jnp.transpose(values, (2, 0, 1))[None]

    def from_positions(self, q_positions: jax.Array, k_positions: jax.Array) -> jax.Array:
        """[B, H, T, S] accum: the bias of key - query position offsets per example, for
        packed rows whose positions (q [B, T], k [B, S]) restart in each segment.

        Offsets lie in [-(T-1), S-1] (positions < the row length): their buckets are a static
        numpy table, as in `__call__`, so equal offsets give bit-equal biases.
        """
        t, s = q_positions.shape[1], k_positions.shape[1]
        offsets = np.arange(-(t - 1), s)  # key - query, index 0 <-> offset -(T-1)
        buckets = relative_position_bucket(
            offsets,
            bidirectional=self.bidirectional,
            num_buckets=self.num_buckets,
            max_distance=self.max_distance,
        )
        table = self.policy.cast_to_accum(self.embedding[...])  # [buckets, H]
        per_offset = jnp.take(table, jnp.asarray(buckets, jnp.int32), axis=0)  # [T+S-1, H]
        rel = k_positions[:, None, :] - q_positions[:, :, None] + (t - 1)  # [B, T, S]
        # Clipped: pairs of two segments may reach past the table; the segment mask drops them.
        values = jnp.take(per_offset, rel.astype(jnp.int32), axis=0, mode="clip")  # [B,T,S,H]
        return jnp.transpose(values, (0, 3, 1, 2))


def _check_ids(ids: jax.Array, key: str) -> None:
    if ids.ndim != 2:
        raise ValueError(f"T5 {key} must be [batch, seq] token ids, got shape {ids.shape}.")


def _check_packing(ids: jax.Array, side: str, segment_ids, positions) -> None:
    """ValueError unless the given packing arrays are integer and shaped like `ids`."""
    for name, x in (("segment_ids", segment_ids), ("positions", positions)):
        if x is not None and (
            tuple(x.shape) != tuple(ids.shape) or not jnp.issubdtype(x.dtype, jnp.integer)
        ):
            raise ValueError(
                f"T5 {side}_{name} must be integers shaped like {side}_inputs "
                f"{tuple(ids.shape)}, got {x.dtype} {tuple(x.shape)}: the data's packing yields "
                "one per token."
            )
