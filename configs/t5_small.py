"""T5 v1.1 / FLAN-T5 small dimensions, trained with T5 span corruption on byte-level KJV.

Launch:   python -m bf16jax.main --config=configs/t5_small.py --workdir=runs/t5_small
Hardware: one GPU or a TPU v4-8; a shrunk version (see tests/test_main.py) runs on CPU.
Expected: d_model 512, d_ff 1024, 6 heads of 64, 8+8 layers, separate head (as FLAN-T5 small),
          vocabulary 384 (bytes + 100 sentinels) instead of 32128 SentencePiece ids.
          Adafactor as in T5, which FLAN-T5 was pre-trained with in BF16.
"""

from bf16jax.config import base_config


def get_config():
    c = base_config("t5")
    c.model.update(
        embed_dim=512,
        num_heads=6,
        head_dim=64,
        mlp_dim=1024,
        num_encoder_layers=8,
        num_decoder_layers=8,
        tie_embeddings=False,
    )
    c.data.update(enc_len=512, dec_len=128, batch_size=64, eval_batch_size=64)
    c.optim.update(name="adafactor", learning_rate=1e-2, warmup_steps=1000, weight_decay=0.0)
    c.optim.clip_norm = 0.0
    c.train.update(steps=20_000, log_every=100, eval_every=1000, eval_steps=20)
    c.checkpoint.update(every_steps=2000)
    return c
