"""GPT-2-style decoder-only language model (Radford et al. 2019) on bf16jax layers.

Layout: token + learned position embeddings, pre-LN blocks (LayerNorm -> causal self-attention,
LayerNorm -> GELU MLP, each added to the residual stream), a final LayerNorm and logits from the
tied token embedding (`Embed.attend`). The residual stream is kept in the policy's residual dtype
(compute dtype unless `r=f32`); logits leave in accum_dtype (FP32 island). `scan_layers=True`
stacks the blocks with `nnx.vmap` (params get a leading "layers" logical axis) and runs them with
`nnx.scan`, so compile time does not grow with depth; the stacked blocks share one policy, so an
override that would treat layers differently is refused (`overrides.check_stacked_layers`).
`remat` rematerializes each block in the backward pass (`REMAT_POLICIES`):
"none" keeps every activation, "save_dots" keeps the projection and MLP matmul outputs and
recomputes the rest (attention scores, norms, GELU), "full" keeps only the block inputs.
Dropout (GPT-2's embd/resid/attn pdrop, plus an optional MLP-hidden rate) is active only when
`dropout_key` is passed (training); each layer gets `fold_in(key, i)`.
Packed rows: a batch with `segment_ids` and `positions` [B, T] (several documents per row)
attends causally within each document and reads the position embedding at `positions`; a batch
without them runs the same program as an unpacked model.
`init_cache` / `decode_step` run the same blocks with a KV cache for generation.
Policy paths: embed, pos_embed, blocks/{i}/{norm1,attn,norm2,mlp}, norm_f, head.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bf16jax.nn.layers import (
    MATMUL_OUTPUT,
    MLP,
    Attention,
    Embed,
    KVCache,
    LayerNorm,
    Linear,
    dropout,
    dropout_keys,
)
from bf16jax.nn.loss import head_logits, materialize
from bf16jax.parallel.sharding import constrain_batch
from bf16jax.precision import Policy, record_paths
from bf16jax.precision.overrides import check_stacked_layers

__all__ = [
    "Block",
    "GPT",
    "REMAT_POLICIES",
    "stack_layers",
    "run_layers",
    "generate",
    "cache_dtype",
    "PACKING_KEYS",
]

# The extra arrays of a packed batch (`data.packing`); a batch without them is unpacked.
PACKING_KEYS = ("segment_ids", "positions")

LAYERS_AXIS = "layers"  # logical axis name of the stacked-layer dimension

# model.remat -> what a block keeps for the backward pass (jax.checkpoint policies). "save_dots"
# keeps every Linear's output (q/k/v/o and MLP projections, [B, T, out] in compute dtype, named
# MATMUL_OUTPUT), not the attention scores or the attention kernel's output: those, the norms and
# GELU are recomputed. (JAX's dots_with_no_batch_dims_saveable would keep the same matmuls, but
# their FP32 accumulator outputs: twice the bytes.)
REMAT_POLICIES = {
    "none": None,
    "save_dots": jax.checkpoint_policies.save_only_these_names(MATMUL_OUTPUT),
    "full": jax.checkpoint_policies.nothing_saveable,
}


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
        attention_impl: str | None = "auto",
        platform: str | None = None,
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
            platform=platform,
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

    def __call__(
        self,
        x: jax.Array,
        dropout_key: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
    ) -> jax.Array:  # [B, T, D] -> [B, T, D]; segment_ids [B, T] for packed rows
        k_attn, *keys = dropout_keys(dropout_key, 4)

        def attend(h):
            return self.attn(h, dropout_key=k_attn, segment_ids=segment_ids), None

        return self._forward(x, attend, keys)[0]

    def decode(
        self, x: jax.Array, cache: KVCache, index: jax.Array, length: int | None = None
    ) -> tuple[jax.Array, KVCache]:
        """The block on new tokens `x` [B, T, D] at positions index[b] + t, reading and writing
        the attention's KV cache (`layers.Attention.decode`, reading its first `length`
        positions); returns (y, new cache)."""
        return self._forward(
            x, lambda h: self.attn.decode(h, cache, index, length=length), (None,) * 3
        )

    def _forward(self, x, attend, keys):
        # The residual stream is in the residual dtype (compute unless `r=f32`). Sub-layers may be
        # overridden to another dtype (".*attn.*->fp32"): their outputs are cast to it as well.
        r = self.policy.cast_to_residual
        k_res1, k_mlp, k_res2 = keys
        x = r(x)
        y, aux = attend(self.norm1(x))
        x = x + dropout(r(y), self.dropout_rate, k_res1)
        h = r(self.mlp(self.norm2(x), dropout_key=k_mlp))
        return x + dropout(h, self.dropout_rate, k_res2), aux


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
    remat: str = "none",
    num_layers: int,
    dropout_key: jax.Array | None = None,
    **kwargs,
) -> jax.Array:
    """Applies `layers` (an nnx.List, or a stacked module when `scan`) to `x` in order.

    `remat` names a `REMAT_POLICIES` entry; `kwargs` (masks, biases) are passed unchanged to
    every layer; layer i gets the dropout key `fold_in(dropout_key, i)` (the same with and
    without scan), or None.
    """

    def apply(layer, h, key):
        return constrain_batch(layer(h, dropout_key=key, **kwargs))

    if remat not in REMAT_POLICIES:
        raise ValueError(
            f"Unknown remat policy {remat!r}: use one of {', '.join(map(repr, REMAT_POLICIES))}."
        )
    if remat != "none":
        # Inside scan, CSE cannot merge recomputation across iterations: prevent_cse is not
        # needed there and costs performance (jax.checkpoint docs).
        apply = nnx.remat(apply, prevent_cse=not scan, policy=REMAT_POLICIES[remat])
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
      remat: what each block keeps for the backward pass: "none", "save_dots" or "full"
        (`REMAT_POLICIES`).
      attention_impl: "auto" (cuDNN on a GPU under 16-bit compute, Pallas splash attention on
        a TPU, bf16jax's XLA path otherwise), or "xla", "cudnn", "pallas" to force one; see
        `bf16jax.nn.attention`.
      platform: the platform the model will run on ("cpu", "gpu", "tpu"; default
        `jax.default_backend()`), for resolving `attention_impl`.
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
        remat: str = "none",
        attention_impl: str | None = "auto",
        platform: str | None = None,
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
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.scan_layers = scan_layers
        if remat not in REMAT_POLICIES:
            raise ValueError(
                f"model.remat={remat!r} is not valid: use one of "
                f"{', '.join(map(repr, REMAT_POLICIES))}."
            )
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
                platform=platform,
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

    def _hidden(
        self,
        inputs: jax.Array,
        dropout_key: jax.Array | None = None,
        *,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
    ) -> jax.Array:
        """Final-norm hidden states [B, T, D] in compute dtype (packed rows: see `__call__`)."""
        if inputs.ndim != 2:
            raise ValueError(f"GPT inputs must be [batch, seq] token ids, got {inputs.shape}.")
        seq_len = inputs.shape[1]
        if seq_len > self.max_len:
            raise ValueError(
                f"Sequence length {seq_len} exceeds model.max_len={self.max_len}: raise "
                "model.max_len or shorten data.seq_len."
            )
        _check_packing(inputs, segment_ids=segment_ids, positions=positions)
        x = self.policy.cast_to_residual(self.embed(inputs))  # [B, T, D]
        if positions is None:
            pos = self.policy.cast_to_residual(self.pos_embed(jnp.arange(seq_len)))[None]
        else:  # restarting at 0 in each packed document (< seq_len <= max_len)
            pos = self.policy.cast_to_residual(self.pos_embed(positions))  # [B, T, D]
        k_embed, k_layers = dropout_keys(dropout_key, 2)
        x = constrain_batch(dropout(x + pos, self.dropout_rate, k_embed))
        # Without segment ids the blocks get no extra argument: the unpacked program is unchanged.
        packed = {} if segment_ids is None else {"segment_ids": segment_ids}
        x = run_layers(
            self.blocks,
            x,
            scan=self.scan_layers,
            remat=self.remat,
            num_layers=self.num_layers,
            dropout_key=k_layers,
            **packed,
        )
        return self.policy.cast_to_compute(self.norm_f(x))

    def features(
        self,
        inputs: jax.Array,
        *,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
    ) -> jax.Array:
        """Final hidden states [B, T, D] in output dtype for token ids `inputs` [B, T]."""
        h = self._hidden(inputs, segment_ids=segment_ids, positions=positions)
        return self.policy.cast_to_output(h)

    @property
    def output_head(self) -> Embed | Linear:
        """The output projection: the tied token embedding or the separate "head"."""
        return self.embed if self.tie_embeddings else self.head

    def __call__(
        self,
        inputs: jax.Array,
        *,
        dropout_key: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
    ) -> jax.Array:
        """Logits [B, T, V] in accum dtype (FP32 island) for token ids `inputs` [B, T].

        `dropout_key` turns dropout on (training); without it the model is deterministic.
        Packed rows: `segment_ids` [B, T] int (1, 2, ... per document, 0 = padding) keep
        attention inside each document; `positions` [B, T] int (restarting at 0 per document)
        index the position embedding.
        """
        h = self._hidden(inputs, dropout_key, segment_ids=segment_ids, positions=positions)
        return self._logits(h)

    def _logits(self, h: jax.Array) -> jax.Array:  # [B, T, D] compute -> [B, T, V] accum
        return constrain_batch(head_logits(h, self.output_head))

    def head_and_targets(
        self, batch: dict, *, dropout_key: jax.Array | None = None
    ) -> tuple[jax.Array, Embed | Linear, jax.Array, jax.Array]:
        """(hidden [B, T, D] compute, output head, targets int32 [B, T], weights f32 [B, T]):
        what `loss.fused_cross_entropy` takes instead of the [B, T, V] logits. A packed batch
        also holds "segment_ids" and "positions" [B, T] (see `__call__`)."""
        targets = jnp.asarray(batch["targets"], jnp.int32)
        weights = batch.get("weights")
        if weights is None:
            weights = jnp.ones(targets.shape, jnp.float32)
        hidden = self._hidden(
            batch["inputs"],
            dropout_key,
            segment_ids=batch.get("segment_ids"),
            positions=batch.get("positions"),
        )
        return hidden, self.output_head, targets, jnp.asarray(weights, jnp.float32)

    # ----------------------------------------------------------------- KV-cache decoding
    def init_cache(self, batch_size: int) -> dict:
        """A zero KV cache for `batch_size` sequences of up to `max_len` tokens.

        {"k": ..., "v": ...}: per layer [B, max_len, H, Dh] (a tuple), or stacked
        [L, B, max_len, H, Dh] with `scan_layers`, in the widest compute dtype of the attention
        layers (so a per-layer FP32 override keeps FP32 keys).
        """
        shape = (batch_size, self.max_len, self.num_heads, self.head_dim)
        dtype = cache_dtype(self)
        if self.scan_layers:
            zeros = jnp.zeros((self.num_layers, *shape), dtype)
            return {"k": zeros, "v": zeros}
        zeros = tuple(jnp.zeros(shape, dtype) for _ in range(self.num_layers))
        return {"k": zeros, "v": zeros}

    def decode_step(
        self, tokens: jax.Array, cache: dict, index: jax.Array, length: int | None = None
    ) -> tuple[jax.Array, dict]:
        """Logits for new tokens with a KV cache: the prompt at once, then one token per step.

        Args:
          tokens: [B, T] ids at positions index[b] .. index[b] + T - 1 (T = the prompt length
            for prefill from index 0, or 1 per generated token).
          cache: from `init_cache` or the previous call.
          index: [B] int32, the position of each row's first new token; index[b] + T must not
            exceed max_len (rows past it are clamped and produce garbage, never an error).
          length: attend over the first `length` cache positions only (static; every
            index[b] + T <= length): a decode step's cost follows the context in use.

        Returns:
          (logits [B, T, V] in accum dtype, the updated cache). The logits equal `self(inputs)`
          at the same positions up to float rounding (tests/test_generate.py checks it).
        """
        if tokens.ndim != 2 or index.shape != tokens.shape[:1]:
            raise ValueError(
                f"GPT.decode_step needs tokens [batch, T] and index [batch], got {tokens.shape} "
                f"and {index.shape}."
            )
        c = self.policy.cast_to_compute
        t = tokens.shape[1]
        index = index.astype(jnp.int32)
        pos = jnp.minimum(index[:, None] + jnp.arange(t, dtype=jnp.int32), self.max_len - 1)
        x = c(self.embed(tokens)) + c(self.pos_embed(pos))  # [B, T, D]
        if self.scan_layers:

            @nnx.scan(
                in_axes=(nnx.Carry, 0, 0, 0),
                out_axes=(nnx.Carry, 0, 0),
                transform_metadata={nnx.PARTITION_NAME: LAYERS_AXIS},
            )
            def body(h, layer, k, v):
                h, (k, v) = layer.decode(h, (k, v), index, length)
                return h, k, v

            x, k, v = body(x, self.blocks, cache["k"], cache["v"])
        else:
            k, v = [], []
            for block, k_i, v_i in zip(self.blocks, cache["k"], cache["v"], strict=True):
                x, (k_i, v_i) = block.decode(x, (k_i, v_i), index, length)
                k.append(k_i)
                v.append(v_i)
            k, v = tuple(k), tuple(v)
        return self._logits(c(self.norm_f(x))), {"k": k, "v": v}

    def logits_and_targets(
        self, batch: dict, *, dropout_key: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(logits f32 [B, T, V], targets int32 [B, T], weights f32 [B, T]) for an LM batch."""
        return materialize(*self.head_and_targets(batch, dropout_key=dropout_key))


def _check_packing(inputs: jax.Array, **packing: jax.Array | None) -> None:
    """ValueError unless each given packing array (segment ids, positions) is integer
    [batch, seq] like `inputs`."""
    for name, ids in packing.items():
        if ids is not None and (
            tuple(ids.shape) != tuple(inputs.shape) or not jnp.issubdtype(ids.dtype, jnp.integer)
        ):
            raise ValueError(
                f"GPT {name} must be integers shaped like inputs {tuple(inputs.shape)}, got "
                f"{ids.dtype} {tuple(ids.shape)}: the data's packing yields one per token."
            )


def cache_dtype(model: nnx.Module):
    """The widest compute dtype among `model`'s attention layers (the KV cache's dtype)."""
    dtypes = [
        m.policy.compute_dtype for _, m in nnx.iter_modules(model) if isinstance(m, Attention)
    ]
    return max(dtypes, key=lambda d: np.dtype(d).itemsize)


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

    Recomputes the whole window each token (no KV cache): the reference that the KV-cache
    generation (`bf16jax.serving.sampling`) is tested against, and the sampler of
    `loop.sample_text`.
    The window slides once the text is longer than `model.max_len`. `temperature=0` is greedy;
    `vocab_limit` keeps only ids below it (e.g. the tokenizer's vocabulary when the model's is
    padded).
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
