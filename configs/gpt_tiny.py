"""GPT tiny on the King James Bible, byte level: the CPU demo of `make demo`.

Launch:   python -m bf16jax.main --config=configs/gpt_tiny.py --workdir=runs/gpt_tiny
Hardware: a laptop / CI CPU (2 cores); any GPU or TPU.
Expected: 0.86M params, 300 steps of 32x128 bytes in 2-3 minutes on 2 CPU cores; final eval
          loss 2.22 nats/byte (35% next-byte accuracy) under `bf16` and `fp32` (measured, seed 0;
          see docs/guides/pure_bf16.md for the pure-BF16 variants).
"""

from bf16jax.config import base_config


def get_config():
    c = base_config("gpt")
    c.model.update(num_layers=4, num_heads=4, embed_dim=128, mlp_dim=512, max_len=128)
    c.data.update(seq_len=128, batch_size=32, eval_batch_size=32)
    c.optim.update(learning_rate=3e-3, warmup_steps=30, weight_decay=0.1)
    c.train.update(steps=300, log_every=25, eval_every=100, eval_steps=8, sample_tokens=200)
    c.checkpoint.update(every_steps=100)
    return c
