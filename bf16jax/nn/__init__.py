"""Neural-network building blocks that take a precision policy.

Owns the policy-aware NNX layers (Linear, Embed, norms, attention blocks, MLP), attention and its
kernels (XLA, splash, cuDNN), the KV cache, dropout, quantization math (LSQ, int8, FP8) and its
whole-model helpers, and the FP32 loss (materialized and fused cross-entropy).
May import: precision, parallel.
"""
