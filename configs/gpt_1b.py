"""GPT 1.3B (24 layers, 2048 wide, 16 heads, 2048 context), layers scanned and rematerialized.

Launch:   python -m bf16jax.main --config=configs/gpt_1b.py --workdir=gs://BUCKET/runs/gpt_1b
Hardware: a TPU pod slice (v4-32, v5e-64, v5p-128) or 8+ GPUs; FSDP over all devices
          (mesh.fsdp=-1). Params + AdamW state are ~21 GB in FP32, so it must be sharded.
Expected: compiles in well under a minute thanks to nnx.scan over layers; see experiments/ for the
          ahead-of-time compiled per-device memory on real TPU topologies.
"""

from bf16jax.config import base_config


def get_config():
    c = base_config("gpt")
    c.model.update(
        vocab_size=50304,
        num_layers=24,
        num_heads=16,
        embed_dim=2048,
        mlp_dim=8192,
        max_len=2048,
        scan_layers=True,
        # "full" fits every slice in experiments/results/aot_tpu (v4-32: 70% of HBM). Where HBM
        # is free, spend it on saved activations instead of recompute (make aot-tpu, --remats):
        # v5e-64 --config.model.remat=save_dots (70% of HBM, step at peak 386 vs 453 ms),
        # v5p-128 --config.model.remat=none (39%, 161 ms).
        remat="full",
    )
    c.data.update(seq_len=2048, batch_size=256, eval_batch_size=64)
    c.optim.update(learning_rate=2e-4, warmup_steps=2000, weight_decay=0.1, b2=0.95)
    c.train.update(steps=100_000, log_every=100, eval_every=2000, eval_steps=20)
    c.mesh.update(data=1, fsdp=-1, tensor=1)
    c.checkpoint.update(every_steps=2000, max_to_keep=3)
    return c
