"""T5 v1.1-small pre-training with span corruption on your own corpus, prepared once with a
T5 SentencePiece tokenizer (sentinels <extra_id_i> = 32099 - i, as T5 / FLAN-T5).

Launch:   python -m bf16jax.convert import flan-t5-small runs/flan_t5_small  # for spiece.model
          python -m bf16jax.prepare 'corpus/*.jsonl' --out=data/corpus_t5 \
              --tokenizer=runs/flan_t5_small --eval_fraction=0.001 --workers=8
          python -m bf16jax.main --config=configs/t5_span_prepared.py \
              --config.data.path=data/corpus_t5 --workdir=runs/t5_span_own
          (bytes instead: prepare without --tokenizer and add --config.model.vocab_size=384)
Hardware: one GPU or a TPU v4-8; a CPU runs it slowly.
Expected: T5's objective (noise density 0.15, mean span 3, inputs 512, targets 114); short
          documents packed several to a row as separate segments (data.packing); Adafactor as T5.
"""

from bf16jax.config import base_config


def get_config():
    c = base_config("t5")
    c.model.update(
        vocab_size=32128,
        embed_dim=512,
        num_heads=6,
        head_dim=64,
        mlp_dim=1024,
        num_encoder_layers=8,
        num_decoder_layers=8,
        tie_embeddings=False,
    )
    # data.path: the `python -m bf16jax.prepare` output (required, --config.data.path=DIR).
    c.data.update(name="prepared", path="", packing=True, enc_len=512, dec_len=114)
    c.data.update(noise_density=0.15, mean_noise_span=3.0, batch_size=64, eval_batch_size=64)
    c.optim.update(name="adafactor", learning_rate=1e-2, warmup_steps=1000, weight_decay=0.0)
    c.optim.clip_norm = 0.0
    c.train.update(steps=20_000, log_every=100, eval_every=1000, eval_steps=20, sample_tokens=0)
    c.checkpoint.update(every_steps=2000)
    return c
