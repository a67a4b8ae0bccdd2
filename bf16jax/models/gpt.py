"""GPT-2-style decoder-only language model (Radford et al. 2019) on bf16jax layers.

Layout: token + learned position embeddings, pre-LN blocks (LayerNorm -> causal self-attention,
LayerNorm -> GELU MLP, each added to the residual stream), a final LayerNorm and logits from the
tied token embedding (`Embed.attend`). The residual stream is kept in the policy's residual dtype
(compute dtype unless `r=f32`); logits leave in accum_dtype (FP32 island). `scan_layers=True`
stacks the blocks with `nnx.vmap` (params get a leading "layers" logical axis) and runs them with
`nnx.scan`, so compile time does not grow with depth; the stacked blocks share one policy, so an
override that would treat layers differently is refused (`overrides.check_stacked_layers`).
`remat=True` wraps each block in `nnx.remat` (activations recomputed in the backward pass).
Dropout (GPT-2's embd/resid/attn pdrop, plus an optional MLP-hidden rate) is active only when
`dropout_key` is passed (training); each layer gets `fold_in(key, i)`.
Policy paths: embed, pos_embed, blocks/{i}/{norm1,attn,norm2,mlp}, norm_f, head.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bf16jax.layers import MLP, Attention, Embed, LayerNorm, Linear, dropout, dropout_keys
from bf16jax.overrides import check_stacked_layers
from bf16jax.precision import Policy, record_paths
from bf16jax.sharding import constrain_batch

__all__ = ["Block", "GPT", "stack_layers", "run_layers", "generate"]

LAYERS_AXIS = "layers"  # logical axis name of the stacked-layer dimension


class Block(nnx.Module):
    """Pre-LN transformer block: x + attn(norm1(x)), then + mlp(norm2(x)). Shared with ViT.

    `dropout_rate` drops each sub-layer's output before the residual add (GPT-2's resid_pdrop),
    `attention_dropout_rate` the attention probabilities, `mlp_dropout_rate` the MLP hidden.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        mlp_dim: int,
        *,
        policy: Policy,
        name: str,
        rngs: nnx.Rngs,
        causal: bool,
        attention_impl: str | None = None,
        norm_eps: float = 1e-5,
        mlp_activation: str = "gelu",
        dropout_rate: float = 0.0,
        attention_dropout_rate: float = 0.0,
        mlp_dropout_rate: float = 0.0,
    ):
        self.policy = policy.for_module(name)
        self.dropout_rate = dropout_rate
        norm = functools.partial(LayerNorm, embed_dim, policy=policy, rngs=rngs, eps=norm_eps)
        self.norm1 = norm(name=f"{name}/norm1")
        self.attn = Attention(
            embed_dim,
            num_heads,
            policy=policy,
            name=f"{name}/attn",
            rngs=rngs,
            causal=causal,
            implementation=attention_impl,
            dropout_rate=attention_dropout_rate,
        )
        self.norm2 = norm(name=f"{name}/norm2")
        self.mlp = MLP(
            embed_dim,
            mlp_dim,
            policy=policy,
            name=f"{name}/mlp",
            rngs=rngs,
            activation=mlp_activation,
            dropout_rate=mlp_dropout_rate,
        )

    def __call__(self, x: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        # [B, T, D] -> [B, T, D] in the residual dtype (compute unless `r=f32`). Sub-layers may be
        # overridden to another dtype (".*attn.*->fp32"): their outputs are cast to it as well.
        r = self.policy.cast_to_residual
        k_attn, k_res1, k_mlp, k_res2 = dropout_keys(dropout_key, 4)
        x = r(x)
        h = r(self.attn(self.norm1(x), dropout_key=k_attn))
        x = x + dropout(h, self.dropout_rate, k_res1)
        h = r(self.mlp(self.norm2(x), dropout_key=k_mlp))
        return x + dropout(h, self.dropout_rate, k_res2)


def stack_layers(make_layer, num_layers: int, rngs: nnx.Rngs) -> nnx.Module:
    """Creates `num_layers` copies of `make_layer(rngs)` with params stacked on a leading axis.

    Each copy gets its own RNG stream (`nnx.split_rngs`); params' logical names get a leading
    "layers" axis so sharding rules can leave it unsharded.
    """

    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: LAYERS_AXIS})
    def create(rngs: nnx.Rngs):
        return make_layer(rngs)

    return create(rngs)


def run_layers(
    layers,
    x: jax.Array,
    *,
    scan: bool,
    remat: bool,
    num_layers: int,
    dropout_key: jax.Array | None = None,
    **kwargs,
) -> jax.Array:
    """Applies `layers` (an nnx.List, or a stacked module when `scan`) to `x` in order.

    `kwargs` (masks, biases) are passed unchanged to every layer; layer i gets the dropout key
    `fold_in(dropout_key, i)` (the same with and without scan), or None.
    """

    def apply(layer, h, key):
        return constrain_batch(layer(h, dropout_key=key, **kwargs))

    if remat:
        # Inside scan, CSE cannot merge recomputation across iterations: prevent_cse is not
        # needed there and costs performance (jax.checkpoint docs).
        apply = nnx.remat(apply, prevent_cse=not scan)
    if not scan:
        for i, layer in enumerate(layers):
            x = apply(layer, x, None if dropout_key is None else jax.random.fold_in(dropout_key, i))
        return x
    scan_kw = dict(out_axes=nnx.Carry, transform_metadata={nnx.PARTITION_NAME: LAYERS_AXIS})
    if dropout_key is None:

        @nnx.scan(in_axes=(nnx.Carry, 0), **scan_kw)
        def body(h, layer):
            return apply(layer, h, None)

        return body(x, layers)

    keys = jax.vmap(lambda i: jax.random.fold_in(dropout_key, i))(jnp.arange(num_layers))

    @nnx.scan(in_axes=(nnx.Carry, 0, 0), **scan_kw)
    def body_dropout(h, layer, key):
        return apply(layer, h, key)

    return body_dropout(x, layers, keys)


class GPT(nnx.Module):
    """GPT-2-style causal language model.

    Args:
      vocab_size, num_layers, num_heads, embed_dim, mlp_dim, max_len: model sizes.
      policy: the root precision policy; sub-modules resolve their own.
      rngs: parameter RNGs.
      scan_layers: stack blocks and run them with `nnx.scan`.
      remat: rematerialize each block in the backward pass.
      attention_impl: passed to `jax.nn.dot_product_attention` ("xla", "cudnn" or None).
      tie_embeddings: logits from the token embedding (GPT-2) or a separate "head".
      norm_eps: LayerNorm epsilon (GPT-2: 1e-5).
      mlp_activation: one of `layers.MLP_ACTIVATIONS` (GPT-2: "gelu", the tanh form).
      dropout_rate: embedding and residual dropout (GPT-2's embd_pdrop = resid_pdrop).
      attention_dropout_rate: attention-probability dropout (attn_pdrop).
      mlp_dropout_rate: dropout of the MLP hidden activations (0 in GPT-2).
    """

    def __init__(
        self,
        *,
        vocab_size: int,
        num_layers: int,
        num_heads: int,
        embed_dim: int,
        mlp_dim: int,
        max_len: int,
        policy: Policy,
        rngs: nnx.Rngs,
        scan_layers: bool = False,
        remat: bool = False,
        attention_impl: str | None = None,
        tie_embeddings: bool = True,
        norm_eps: float = 1e-5,
        mlp_activation: str = "gelu",
        dropout_rate: float = 0.0,
        attention_dropout_rate: float = 0.0,
        mlp_dropout_rate: float = 0.0,
    ):
        self.policy = policy
        self.dropout_rate = dropout_rate
        self.max_len = max_len
        self.num_layers = num_layers
        self.scan_layers = scan_layers
        self.remat = remat
        self.tie_embeddings = tie_embeddings
        self.embed = Embed(vocab_size, embed_dim, policy=policy, name="embed", rngs=rngs)
        self.pos_embed = Embed(
            max_len, embed_dim, policy=policy, name="pos_embed", rngs=rngs, axes=(None, "embed")
        )

        def make_block(name, rngs):
            return Block(
                embed_dim,
                num_heads,
                mlp_dim,
                policy=policy,
                name=name,
                rngs=rngs,
                causal=True,
                attention_impl=attention_impl,
                norm_eps=norm_eps,
                mlp_activation=mlp_activation,
                dropout_rate=dropout_rate,
                attention_dropout_rate=attention_dropout_rate,
                mlp_dropout_rate=mlp_dropout_rate,
            )

        if scan_layers:
            # The stacked blocks are built once, as "blocks/0", and share its policies: an
            # override that treats some layer differently ("blocks/3/...") is refused.
            with record_paths() as paths:
                self.blocks = stack_layers(lambda r: make_block("blocks/0", r), num_layers, rngs)
            layers = [f"blocks/{i}" for i in range(num_layers)]
            check_stacked_layers(policy, paths, "blocks/0", layers)
        else:
            self.blocks = nnx.List(make_block(f"blocks/{i}", rngs) for i in range(num_layers))
        self.norm_f = LayerNorm(embed_dim, policy=policy, name="norm_f", rngs=rngs, eps=norm_eps)
        if not tie_embeddings:
            self.head = Linear(
                embed_dim,
                vocab_size,
                policy=policy,
                name="head",
                rngs=rngs,
                use_bias=False,
                kernel_axes=("embed", "vocab"),
                edge=True,  # output logits: unquantized unless an override asks
            )

    def _hidden(self, inputs: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        """Final-norm hidden states [B, T, D] in compute dtype."""
        if inputs.ndim != 2:
            raise ValueError(f"GPT inputs must be [batch, seq] token ids, got {inputs.shape}.")
        seq_len = inputs.shape[1]
        if seq_len > self.max_len:
            raise ValueError(
                f"Sequence length {seq_len} exceeds model.max_len={self.max_len}: raise "
                "model.max_len or shorten data.seq_len."
            )
        x = self.policy.cast_to_residual(self.embed(inputs))  # [B, T, D]
        pos = self.policy.cast_to_residual(self.pos_embed(jnp.arange(seq_len)))  # [T, D]
        k_embed, k_layers = dropout_keys(dropout_key, 2)
        x = constrain_batch(dropout(x + pos[None], self.dropout_rate, k_embed))
        x = run_layers(
            self.blocks,
            x,
            scan=self.scan_layers,
            remat=self.remat,
            num_layers=self.num_layers,
            dropout_key=k_layers,
        )
        return self.policy.cast_to_compute(self.norm_f(x))

    def features(self, inputs: jax.Array) -> jax.Array:
        """Final hidden states [B, T, D] in output dtype for token ids `inputs` [B, T]."""
        return self.policy.cast_to_output(self._hidden(inputs))

    def __call__(self, inputs: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
        """Logits [B, T, V] in accum dtype (FP32 island) for token ids `inputs` [B, T].

        `dropout_key` turns dropout on (training); without it the model is deterministic.
        """
        h = self._hidden(inputs, dropout_key)
        if self.tie_embeddings:
            return constrain_batch(self.embed.attend(h))
        return constrain_batch(self.policy.cast_to_accum(self.head(h)))

    def logits_and_targets(
        self, batch: dict, *, dropout_key: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(logits f32 [B, T, V], targets int32 [B, T], weights f32 [B, T]) for an LM batch."""
        logits = self(batch["inputs"], dropout_key=dropout_key)
        targets = jnp.asarray(batch["targets"], jnp.int32)
        weights = batch.get("weights")
        if weights is None:
            weights = jnp.ones(targets.shape, jnp.float32)
        return logits, targets, jnp.asarray(weights, jnp.float32)


def generate(
    model: GPT,
    prompt: np.ndarray,
    num_tokens: int,
    *,
    key: jax.Array,
    temperature: float = 1.0,
    vocab_limit: int | None = None,
) -> np.ndarray:
    """Samples `num_tokens` ids after `prompt` (1-D int ids); returns prompt + samples.

    Recomputes the whole window each token (no KV cache): meant for demos and eval samples of
    small models. The window slides once the text is longer than `model.max_len`.
    `temperature=0` is greedy; `vocab_limit` keeps only ids below it (e.g. the tokenizer's
    vocabulary when the model's is padded).
    """
    window = model.max_len
    graphdef, params = nnx.split(model)

    @jax.jit
    def next_token(params, tokens, pos, key):  # tokens [1, window], predicts at pos
        logits = nnx.merge(graphdef, params)(tokens)[0, pos]  # [V] f32
        if vocab_limit is not None:
            logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_limit, logits, -jnp.inf)
        if temperature == 0:
            return jnp.argmax(logits).astype(jnp.int32)
        return jax.random.categorical(key, logits / temperature).astype(jnp.int32)

    out = [int(t) for t in np.asarray(prompt).reshape(-1)]
    if not out:
        raise ValueError("generate needs a non-empty prompt.")
    for i in range(num_tokens):
        ctx = out[-window:]
        buf = np.zeros((1, window), np.int32)
        buf[0, : len(ctx)] = ctx
        token = next_token(params, buf, len(ctx) - 1, jax.random.fold_in(key, i))
        out.append(int(token))
    return np.asarray(out, np.int32)
