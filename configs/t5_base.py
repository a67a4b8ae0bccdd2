"""T5 v1.1 / FLAN-T5 base dimensions (d_model 768, d_ff 2048, 12 heads, 12+12 layers).

Launch:   python -m bf16jax.main --config=configs/t5_base.py --workdir=gs://BUCKET/runs/t5_base
Hardware: a TPU v4-8 / v5e-8 or one large GPU; FSDP over all devices by default.
Expected: ~200M params with the byte vocabulary; Adafactor, BF16 compute as FLAN-T5 pre-training.
"""

from bf16jax.config import base_config


def get_config():
    c = base_config("t5")
    c.model.update(
        embed_dim=768,
        num_heads=12,
        head_dim=64,
        mlp_dim=2048,
        num_encoder_layers=12,
        num_decoder_layers=12,
        tie_embeddings=False,
    )
    c.data.update(enc_len=512, dec_len=128, batch_size=128, eval_batch_size=64)
    c.optim.update(name="adafactor", learning_rate=1e-2, warmup_steps=1000, weight_decay=0.0)
    c.optim.clip_norm = 0.0
    c.train.update(steps=50_000, log_every=100, eval_every=2000, eval_steps=20)
    c.mesh.update(data=1, fsdp=-1, tensor=1)
    c.checkpoint.update(every_steps=2000, max_to_keep=3)
    return c
