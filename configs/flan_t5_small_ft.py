"""Fine-tune FLAN-T5-small on KJV verse continuation (text-to-text), from its published files.

Task:     "continue: <verse>" -> the next verse of the same chapter (data.name=kjv_continuation),
          tokenized with the checkpoint's own SentencePiece model; eval on the held-out books.
Steps (the model files need a machine with network once; everything after runs offline):
  1. Put google/flan-t5-small's config.json, model.safetensors, spiece.model (+ tokenizer
     files) in a directory, e.g. `huggingface-cli download google/flan-t5-small
     --local-dir flan-t5-small` (or git clone https://huggingface.co/google/flan-t5-small).
  2. python -m bf16jax.convert import flan-t5-small runs/flan_t5_small
  3. python -m bf16jax.main --config=configs/flan_t5_small_ft.py \
         --config.init_from=runs/flan_t5_small --workdir=runs/flan_ft_bf16
     (pure BF16: add --config.precision=bf16-pure-kahan and a new --workdir)
  4. python -m bf16jax.convert export runs/flan_t5_small runs/flan_ft_hf \
         --checkpoint=runs/flan_ft_bf16      # a transformers directory again
Your own jsonl instead of the KJV task ({"input": ..., "target": ...} per line):
  python -m bf16jax.prepare my_task.jsonl --kind=text2text --tokenizer=runs/flan_t5_small \
      --out=data/my_task --eval_fraction=0.05
  python -m bf16jax.main --config=configs/flan_t5_small_ft.py \
      --config.init_from=runs/flan_t5_small --config.data.name=prepared \
      --config.data.path=data/my_task --workdir=runs/flan_ft_mine
  (other field names: --input_field / --target_field; data.packing=true packs short pairs;
  a pair longer than enc_len / dec_len is left out and counted in the log, never truncated)
Hardware: one GPU or TPU host (77M params); a CPU runs it slowly. The architecture comes from
          the converted checkpoint (`init_from`); the sizes below are FLAN-T5-small's.
Expected: FLAN-T5's fine-tuning recipe: Adafactor, constant LR 1e-3, dropout 0.1, BF16.
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
        mlp_activation="gated-gelu",
        norm_eps=1e-6,
        dropout_rate=0.1,
        attention_dropout_rate=0.1,
        mlp_dropout_rate=0.1,
    )
    c.init_from = ""  # --config.init_from=DIR, the output of `bf16jax.interop.convert import`
    # name="prepared" with data.path=DIR trains on a `prepare --kind=text2text` set instead.
    c.data.update(
        name="kjv_continuation",
        tokenizer="init_from",
        prompt="continue: ",
        enc_len=96,
        dec_len=96,
        batch_size=32,
        eval_batch_size=32,
    )
    c.optim.update(
        name="adafactor",
        learning_rate=1e-3,
        schedule="constant",
        warmup_steps=0,
        weight_decay=0.0,
        clip_norm=0.0,
    )
    c.train.update(steps=2000, log_every=50, eval_every=500, eval_steps=20)
    c.checkpoint.update(every_steps=500)
    return c
