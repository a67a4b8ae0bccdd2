"""GPT-2 124M pre-trained on your own corpus, prepared once with GPT-2's BPE tokenizer.

Launch:   python -m bf16jax.convert import gpt2 runs/gpt2      # a directory with GPT-2's files
          python -m bf16jax.prepare 'corpus/*.jsonl' --out=data/corpus_gpt2 \
              --tokenizer=runs/gpt2 --eval_fraction=0.001 --workers=8
          python -m bf16jax.main --config=configs/gpt2_124m_prepared.py \
              --config.data.path=data/corpus_gpt2 --workdir=runs/gpt2_124m_own
Hardware: one H100 (or a TPU v4-8 / v5e-8 with mesh.data=-1). Runs on CPU, slowly.
Expected: the compute of GPT-2 124M (50304 vocab, 1024 context); the loss depends on the corpus.
          Documents are packed several to a row (data.packing): attention stops at document
          boundaries and positions restart per document (the models' segment_ids support); the
          loader gives >= 5M tokens/s on 2 CPU cores (experiments/results/data_bench.md).
"""

from bf16jax.config import base_config


def get_config():
    c = base_config("gpt")
    c.model.update(
        vocab_size=50304, num_layers=12, num_heads=12, embed_dim=768, mlp_dim=3072, max_len=1024
    )
    # data.path: the `python -m bf16jax.prepare` output (required, --config.data.path=DIR), or
    # data.mixture="DIR=W,DIR=W" for several prepared sets.
    c.data.update(name="prepared", path="", packing=True, seq_len=1024)
    c.data.update(batch_size=16, eval_batch_size=16)
    c.optim.update(learning_rate=6e-4, warmup_steps=200, weight_decay=0.1, b2=0.95)
    c.train.update(steps=5000, log_every=50, eval_every=500, eval_steps=20, sample_tokens=0)
    c.checkpoint.update(every_steps=1000)
    return c
