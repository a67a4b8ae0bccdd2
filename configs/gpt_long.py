"""A small byte-level GPT trained long, with the learning rate decaying to 1% of its peak: the
precision study's setting where pure-BF16 update swamping bites (experiments/precision_study.py).

Launch:   python -m bf16jax.main --config=configs/gpt_long.py --workdir=runs/gpt_long
Hardware: CPU (2 cores: ~2 minutes on an idle machine); any GPU/TPU.
Expected: 0.13M params (2 layers, width 64), 2,500 steps of 16 x 64 bytes of the KJV; final eval
          loss ~1.5 nats/byte under fp32 (see experiments/results/precision_study/). In the last
          thousand steps Adam's updates (~lr = 3e-5..5e-4) fall below half a BF16 ulp of most
          weights, so round-to-nearest pure BF16 stops training there.
"""

from bf16jax.config import base_config


def get_config():
    c = base_config("gpt")
    c.model.update(num_layers=2, num_heads=4, embed_dim=64, mlp_dim=256, max_len=64)
    c.data.update(seq_len=64, batch_size=16, eval_batch_size=32)
    c.optim.update(learning_rate=3e-3, warmup_steps=100, weight_decay=0.1, min_lr_ratio=0.01)
    c.train.update(steps=2500, log_every=50, eval_every=500, eval_steps=8, sample_tokens=0)
    c.checkpoint.update(every_steps=500)
    return c
