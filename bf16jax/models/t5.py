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
attention keys in the encoder self-attention and the decoder cross-attention.
Policy paths: embed, {encoder,decoder}/relpos, {encoder,decoder}/layers_{i}/..., {..}/norm, head.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from bf16jax.layers import (
    MLP,
    Attention,
    Embed,
    Linear,
    RelativePositionBias,
    RMSNorm,
    dropout,
    dropout_keys,
)
from bf16jax.precision import Policy
from bf16jax.sharding import constrain_batch

__all__ = ["T5", "T5Stack"]

PAD_ID = 0


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

    def __call__(self, x, *, bias, mask=None, context=None, context_mask=None, dropout_key=None):
        r = self.policy.cast_to_residual  # the residual stream's dtype (compute unless r=f32)
        keys = dropout_keys(dropout_key, 6)
        x = r(x)
        h = self.self_attn(self.self_attn_norm(x), mask=mask, bias=bias, dropout_key=keys[0])
        x = x + dropout(r(h), self.dropout_rate, keys[1])
        if self.decoder:
            h = self.cross_attn(
                self.cross_attn_norm(x), context, mask=context_mask, dropout_key=keys[2]
            )
            x = x + dropout(r(h), self.dropout_rate, keys[3])
        h = self.mlp(self.mlp_norm(x), dropout_key=keys[4])
        return x + dropout(r(h), self.dropout_rate, keys[5])


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

    def __call__(self, x, *, mask=None, context=None, context_mask=None, dropout_key=None):
        """x [B, T, D] compute -> [B, T, D] compute after the final norm (and its dropout)."""
        t = x.shape[1]
        n = len(self.layers)
        keys = dropout_keys(dropout_key, n + 2)  # embeddings, each layer, final norm
        # T5 computes the position bias once (first layer) and reuses it in every layer.
        bias = self.relpos(t, t)  # [1, H, T, T] accum
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
            )
            x = constrain_batch(x)
        x = self.policy.cast_to_compute(self.norm(x))
        return dropout(x, self.dropout_rate, keys[n + 1])


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

    def encode(self, encoder_inputs: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        """Encoder outputs [B, Te, D] in compute dtype for token ids [B, Te] (PAD=0)."""
        _check_ids(encoder_inputs, "encoder_inputs")
        x = self.policy.cast_to_compute(self.embed(encoder_inputs))
        return self.encoder(x, mask=self._padding_mask(encoder_inputs), dropout_key=dropout_key)

    def decode(
        self,
        encoded: jax.Array,
        encoder_inputs: jax.Array,
        decoder_inputs: jax.Array,
        dropout_key: jax.Array | None = None,
    ):
        """Decoder hidden states [B, Td, D] in compute dtype (after the final norm)."""
        _check_ids(decoder_inputs, "decoder_inputs")
        y = self.policy.cast_to_compute(self.embed(decoder_inputs))
        return self.decoder(
            y,
            context=encoded,
            context_mask=self._padding_mask(encoder_inputs),
            dropout_key=dropout_key,
        )

    def features(self, encoder_inputs: jax.Array, decoder_inputs: jax.Array) -> jax.Array:
        """Decoder final hidden states [B, Td, D] in output dtype."""
        encoded = self.encode(encoder_inputs)
        return self.policy.cast_to_output(self.decode(encoded, encoder_inputs, decoder_inputs))

    def __call__(
        self,
        encoder_inputs: jax.Array,
        decoder_inputs: jax.Array,
        *,
        dropout_key: jax.Array | None = None,
    ) -> jax.Array:
        """Logits [B, Td, V] in accum dtype (FP32 island); `dropout_key` = training."""
        k_enc, k_dec = dropout_keys(dropout_key, 2)
        encoded = self.encode(encoder_inputs, k_enc)
        h = self.decode(encoded, encoder_inputs, decoder_inputs, k_dec)
        if self.tie_embeddings:
            # T5 rescales before the tied projection so logits do not grow with sqrt(D).
            return constrain_batch(self.embed.attend(h * self.embed_dim**-0.5))
        return constrain_batch(self.policy.cast_to_accum(self.head(h)))

    def logits_and_targets(
        self, batch: dict, *, dropout_key: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(logits f32 [B, Td, V], targets int32 [B, Td], weights f32 [B, Td]) for a span batch."""
        logits = self(batch["encoder_inputs"], batch["decoder_inputs"], dropout_key=dropout_key)
        targets = jnp.asarray(batch["targets"], jnp.int32)
        weights = batch.get("weights")
        if weights is None:
            weights = (targets != PAD_ID).astype(jnp.float32)
        return logits, targets, jnp.asarray(weights, jnp.float32)


def _check_ids(ids: jax.Array, key: str) -> None:
    if ids.ndim != 2:
        raise ValueError(f"T5 {key} must be [batch, seq] token ids, got shape {ids.shape}.")
