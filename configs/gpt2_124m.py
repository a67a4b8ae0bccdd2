"""GPT-2 124M (12 layers, 768 wide, 12 heads, 1024 context, 50304 vocab).

Launch:   python -m bf16jax.main --config=configs/gpt2_124m.py --workdir=runs/gpt2_124m
Hardware: one H100 (or a TPU v4-8 / v5e-8 with mesh.data=-1). Runs on CPU, slowly.
Expected: the vocabulary is GPT-2's size so the compute matches GPT-2 124M (the peer benchmarks in
          experiments/ use the same shape); the data is byte-level KJV (ids < 384), so the loss
          approaches the byte-level figure of gpt_tiny, lower with this model size.
"""

from bf16jax.config import base_config


def get_config():
    c = base_config("gpt")
    c.model.update(
        vocab_size=50304, num_layers=12, num_heads=12, embed_dim=768, mlp_dim=3072, max_len=1024
    )
    c.data.update(seq_len=1024, batch_size=16, eval_batch_size=16)
    c.optim.update(learning_rate=6e-4, warmup_steps=200, weight_decay=0.1, b2=0.95)
    c.train.update(steps=5000, log_every=50, eval_every=500, eval_steps=20)
    c.checkpoint.update(every_steps=1000)
    return c
