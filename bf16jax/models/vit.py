"""A small Vision Transformer classifier (Dosovitskiy et al. 2020, arXiv:2010.11929).

Images [B, H, W, C] are cut into non-overlapping p x p patches, each flattened and projected by a
Linear ("patch_embed", the same map as a stride-p convolution), plus a learned position embedding
per patch. Pre-LN blocks (shared with GPT, not causal), a final LayerNorm, then global average
pooling over patch tokens instead of a CLS token (as the simplified ViT of Beyer et al. 2022,
arXiv:2205.01580: as accurate, one token fewer), and a Linear head. The pooling mean is taken in
accum_dtype; logits leave in accum_dtype (FP32 island). Policy paths: patch_embed, pos_embed,
blocks/{i}/{norm1,attn,norm2,mlp}, norm, head.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from bf16jax.models.gpt import Block
from bf16jax.nn.layers import Embed, LayerNorm, Linear
from bf16jax.nn.loss import materialize
from bf16jax.parallel.sharding import constrain_batch
from bf16jax.precision import Policy

__all__ = ["ViT", "patchify"]


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
    """[B, H, W, C] -> [B, (H/p)*(W/p), p*p*C] patches in row-major patch order."""
    b, h, w, c = images.shape
    p = patch_size
    x = images.reshape(b, h // p, p, w // p, p, c)
    x = x.transpose(0, 1, 3, 2, 4, 5)  # [B, H/p, W/p, p, p, C]
    return x.reshape(b, (h // p) * (w // p), p * p * c)


class ViT(nnx.Module):
    """ViT classifier with mean pooling. `cfg` holds the sizes read by `build_model`."""

    def __init__(self, cfg: dict, *, policy: Policy, rngs: nnx.Rngs):
        self.policy = policy
        self.image_size = cfg["image_size"]
        self.patch_size = cfg["patch_size"]
        self.channels = cfg["channels"]
        d = cfg["embed_dim"]
        num_patches = (self.image_size // self.patch_size) ** 2
        patch_dim = self.patch_size**2 * self.channels
        self.patch_embed = Linear(
            patch_dim,
            d,
            policy=policy,
            name="patch_embed",
            rngs=rngs,
            kernel_axes=(None, "embed"),
            edge=True,  # first layer: unquantized unless an override asks
        )
        self.pos_embed = Embed(
            num_patches, d, policy=policy, name="pos_embed", rngs=rngs, axes=(None, "embed")
        )
        self.blocks = nnx.List(
            Block(
                d,
                cfg["num_heads"],
                cfg["mlp_dim"],
                policy=policy,
                name=f"blocks/{i}",
                rngs=rngs,
                causal=False,
                attention_impl=cfg["attention_impl"],
                norm_eps=cfg["norm_eps"],
                mlp_activation=cfg["mlp_activation"],
                dropout_rate=cfg["dropout_rate"],
                attention_dropout_rate=cfg["attention_dropout_rate"],
                mlp_dropout_rate=cfg["mlp_dropout_rate"],
                platform=cfg.get("platform"),
            )
            for i in range(cfg["num_layers"])
        )
        self.norm = LayerNorm(d, policy=policy, name="norm", rngs=rngs, eps=cfg["norm_eps"])
        self.head = Linear(
            d,
            cfg["num_classes"],
            policy=policy,
            name="head",
            rngs=rngs,
            kernel_axes=("embed", None),
            edge=True,  # output logits: unquantized unless an override asks
        )

    def _pooled(self, images: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        """Mean-pooled final-norm features [B, D] in compute dtype."""
        expected = (self.image_size, self.image_size, self.channels)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"ViT expects images [batch, {', '.join(map(str, expected))}], got "
                f"{tuple(images.shape)}: match model.image_size / model.channels to the data."
            )
        patches = patchify(self.policy.cast_to_compute(images), self.patch_size)
        x = self.policy.cast_to_residual(self.patch_embed(patches))  # [B, N, D] residual dtype
        pos = self.policy.cast_to_residual(self.pos_embed(jnp.arange(x.shape[1])))  # [N, D]
        x = constrain_batch(x + pos[None])
        for i, block in enumerate(self.blocks):
            key = None if dropout_key is None else jax.random.fold_in(dropout_key, i)
            x = constrain_batch(block(x, dropout_key=key))
        x = self.norm(x)
        # Mean over tokens in accum dtype: a bf16 sum over N tokens would lose low bits.
        return self.policy.cast_to_compute(jnp.mean(self.policy.cast_to_accum(x), axis=1))

    def features(self, images: jax.Array) -> jax.Array:
        """Pooled features [B, D] in output dtype for images [B, H, W, C]."""
        return self.policy.cast_to_output(self._pooled(images))

    @property
    def output_head(self) -> Linear:
        """The classifier head."""
        return self.head

    def __call__(self, images: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
        """Class logits [B, num_classes] in accum dtype (FP32 island); `dropout_key` = training."""
        return constrain_batch(self.head.logits(self._pooled(images, dropout_key)))

    def head_and_targets(
        self, batch: dict, *, dropout_key: jax.Array | None = None
    ) -> tuple[jax.Array, Linear, jax.Array, jax.Array]:
        """(pooled features [B, D] compute, head, labels int32 [B], weights ones f32 [B]):
        what `loss.fused_cross_entropy` takes instead of the logits."""
        targets = jnp.asarray(batch["label"], jnp.int32)
        hidden = self._pooled(batch["image"], dropout_key)
        return hidden, self.head, targets, jnp.ones(targets.shape, jnp.float32)

    def logits_and_targets(
        self, batch: dict, *, dropout_key: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(logits f32 [B, K], labels int32 [B], weights ones f32 [B]) for an image batch."""
        return materialize(*self.head_and_targets(batch, dropout_key=dropout_key))
