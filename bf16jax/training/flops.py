"""Model FLOPs of a training step for every model family, and what throughput counts.

MFU = model FLOPs per step / step time / (dense BF16 peak x devices) (`bf16jax.training.metrics`
has the
peaks). Model FLOPs follow PaLM (arXiv:2204.02311, appendix B): a parameter that multiplies a
token costs 2 FLOPs forward and 4 backward, so 6 per parameter per token it touches; attention
scores and the weighted sum cost 2 * 2 * T_q * T_k * D forward per layer (D = heads * head_dim),
12 * T_q * T_k * D for training, halved where a causal mask skips half the score matrix.
Embedding lookups and position / relative-position tables do no matmul and are not counted;
remat recomputation, the loss, the softmax and the optimizer are not model FLOPs either.

- GPT (T tokens per sequence, L layers): per token 6 N + 6 L T D; N counts every parameter
  but the position embeddings (the tied embedding is the output head's matmul). Throughput in
  tokens/s.
- T5 (encoder T_e tokens, decoder T_d): per example 6 (N_enc T_e + (N_dec + N_head) T_d)
  + L_enc 12 T_e^2 D (bidirectional) + L_dec (6 T_d^2 D (causal) + 12 T_d T_e D (cross)).
  N_head is the output projection (the embedding when tied). Throughput in tokens/s,
  T_e + T_d tokens per example.
- ViT (T patches, mean pooling): per image 6 (N_body T + N_head) + L 12 T^2 D; N_body is the
  patch embedding, blocks and final norm (not the position table), N_head the classifier, which
  sees one pooled vector per image. Throughput in images/s.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import jax

__all__ = ["TrainCost", "train_cost", "param_counts"]


@dataclasses.dataclass(frozen=True)
class TrainCost:
    """What one training step of the global batch processes and costs.

    Attributes:
      unit: what throughput counts: "tokens" (GPT, T5) or "images" (ViT).
      units_per_step: tokens or images in one global batch.
      flops_per_step: model FLOPs of one step (forward + backward) of the global batch.
    """

    unit: str
    units_per_step: int
    flops_per_step: float

    def throughput(self, step_time_s: float) -> float:
        """Units (tokens or images) per second at `step_time_s` seconds per step."""
        return self.units_per_step / step_time_s

    def mfu(self, step_time_s: float, peak_flops: float | None, n_devices: int) -> float | None:
        """Model FLOPs utilization in [0, 1]; None when the device peak is unknown (CPU)."""
        if not peak_flops:
            return None
        return self.flops_per_step / step_time_s / (peak_flops * n_devices)


def param_counts(params) -> Counter:
    """Parameter elements per top-level module name ("blocks", "embed", "encoder", ...)."""
    counts: Counter = Counter()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        first = path[0]
        name = getattr(first, "key", getattr(first, "name", getattr(first, "idx", first)))
        counts[str(name)] += int(getattr(leaf, "size", 1))
    return counts


def train_cost(config, params) -> TrainCost:
    """The `TrainCost` of `config` (its model and data sizes) with these params.

    Args:
      config: a bf16jax config (`config.model`, `config.data`).
      params: the model's parameters (an `nnx.State`, abstract or real).
    """
    m, d = config.model, config.data
    counts = param_counts(params)
    batch = int(d.batch_size)
    if m.name == "gpt":
        t, attn = int(d.seq_len), int(m.embed_dim)
        n = sum(counts.values()) - counts["pos_embed"]
        per_token = 6.0 * n + 6.0 * int(m.num_layers) * t * attn
        return TrainCost("tokens", batch * t, batch * t * per_token)
    if m.name == "t5":
        te, td = int(d.enc_len), int(d.dec_len)
        attn = int(m.num_heads) * int(m.head_dim)
        n_enc = counts["encoder"] - _relpos(params, "encoder")
        n_dec = counts["decoder"] - _relpos(params, "decoder")
        n_head = counts["head"] if "head" in counts else counts["embed"]  # tied: embed.attend
        per_example = 6.0 * (n_enc * te + (n_dec + n_head) * td)
        per_example += int(m.num_encoder_layers) * 12.0 * te * te * attn
        per_example += int(m.num_decoder_layers) * (6.0 * td * td + 12.0 * td * te) * attn
        return TrainCost("tokens", batch * (te + td), batch * per_example)
    if m.name == "vit":
        t = (int(m.image_size) // int(m.patch_size)) ** 2
        n_head = counts["head"]
        n_body = sum(counts.values()) - counts["pos_embed"] - n_head
        per_image = 6.0 * (n_body * t + n_head) + int(m.num_layers) * 12.0 * t * t * m.embed_dim
        return TrainCost("images", batch, batch * per_image)
    raise ValueError(f"No FLOPs convention for model {m.name!r}: use gpt, t5 or vit.")


def _relpos(params, stack: str) -> int:
    """Elements of the relative-position bias tables under `stack` (lookups, no matmul)."""
    total = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        if names[0] == stack and any("relpos" in n for n in names):
            total += int(getattr(leaf, "size", 1))
    return total
